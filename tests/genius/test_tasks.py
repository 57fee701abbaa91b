"""Retrieval tasks built from generated records: pools, relevance and clean splits."""
import io
import math

import numpy as np
import pytest
from PIL import Image, ImageDraw

from genius.data.shards import Record
from genius.modality import Modality
from genius.tasks import (
    LABELLED_TASKS, build_tasks, instruct, labelled_image_tasks, normalise_title, titled_image_tasks,
    universal_pool, wordnet_tasks,
)

# (colour word, RGB, shape): one class each.
SHAPE_CLASSES = [("red", (220, 30, 30), "circle"), ("green", (30, 200, 40), "square"),
                 ("blue", (30, 40, 220), "triangle"), ("yellow", (230, 220, 20), "circle"),
                 ("purple", (150, 30, 160), "square"), ("cyan", (20, 210, 210), "triangle")]
TEMPLATES = ["a photo of a {c} {s}", "a {c} {s}", "a small {c} {s} on black"]


def shape_png(rgb, shape, rng, size=32) -> bytes:
    image = Image.new("RGB", (size, size), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    x, y = (int(v) for v in rng.integers(2, 8, 2))
    s = int(rng.integers(18, 24))
    if shape == "circle":
        draw.ellipse([x, y, x + s, y + s], fill=rgb)
    elif shape == "square":
        draw.rectangle([x, y, x + s, y + s], fill=rgb)
    else:
        draw.polygon([(x, y + s), (x + s, y + s), (x + s // 2, y)], fill=rgb)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def shape_records(n=300, seed=0) -> list[Record]:
    """Coloured shapes with class-level captions, meta label/class_name (like Fashion-MNIST)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        c = int(rng.integers(len(SHAPE_CLASSES)))
        colour, rgb, shape = SHAPE_CLASSES[c]
        out.append(Record(key=f"shape-{i:05d}", image=shape_png(rgb, shape, rng), image_ext="png",
                          text=TEMPLATES[i % len(TEMPLATES)].format(c=colour, s=shape),
                          meta={"label": c, "class_name": f"{colour} {shape}"}))
    return out


def titled_records(seed=0) -> list[Record]:
    """Clip-art-like records: a few very common titles, many rare ones."""
    rng = np.random.default_rng(seed)
    titles = ["Star"] * 60 + ["  star "] * 10 + ["Arrow"] * 25 + [f"Icon {i}" for i in range(150)]
    titles += [f"Flower {i % 40}" for i in range(80)]
    out = []
    for i, title in enumerate(titles):
        colour, rgb, shape = SHAPE_CLASSES[i % len(SHAPE_CLASSES)]
        out.append(Record(key=f"clip-{i:04d}", image=shape_png(rgb, shape, rng), image_ext="png",
                          text=title.strip() if i % 7 else None, meta={"title": title}))  # some lack a caption
    return out


def wordnet_records() -> list[Record]:
    """Synsets as text-only records: lemma text, meta definition; some share a lemma text."""
    out = []
    for i in range(200):
        lemma = f"bank {i % 3}" if i < 9 else f"word{i}, term{i}"
        out.append(Record(key=f"wn-n-{i:08d}", text=lemma,
                          meta={"definition": f"the definition of sense {i}", "synset": f"wn-n-{i:08d}"}))
    out.append(Record(key="wn-n-99999999", text="no gloss", meta={}))  # unusable: no definition
    return out


@pytest.fixture(scope="module")
def records():
    return shape_records()


@pytest.fixture(scope="module")
def tasks(records):
    return labelled_image_tasks(records, corpus="shapes", max_candidates=80, max_queries=30, max_train=150, seed=1)


def record_of(key: str) -> str:
    return key.split("/")[0].split("@")[0]


def test_all_labelled_tasks_with_their_modalities(tasks):
    assert [t.short_name for t in tasks] == list(LABELLED_TASKS)
    expected = {"text->image": (Modality.TEXT, Modality.IMAGE), "image->text": (Modality.IMAGE, Modality.TEXT),
                "text->image_text": (Modality.TEXT, Modality.IMAGE_TEXT),
                "image->image": (Modality.IMAGE, Modality.IMAGE),
                "image_text->image": (Modality.IMAGE_TEXT, Modality.IMAGE)}
    for t in tasks:
        assert t.name == f"shapes/{t.short_name}"
        assert (t.query_modality, t.candidate_modality) == expected[t.short_name]
        assert (t.candidates.modality == t.candidate_modality).all()
        assert (t.test_queries.modality == t.query_modality).all()
        assert (t.train_candidates.modality == t.candidate_modality).all()
        assert len(t.candidates) == 80 and 0 < len(t.test_queries) <= 30
        assert len(t.candidates.keys) == len(set(t.candidates.keys))
        assert "class-level" in t.relevance_rule
        t.validate()


def test_splits_are_clean_across_all_tasks(tasks):
    pool_records = {record_of(k) for t in tasks for k in t.candidates.keys}
    target_records = {record_of(t.train_candidates.keys[i]) for t in tasks for i in t.train_targets}
    train_query_records = {record_of(k) for t in tasks for k in t.train_queries.keys}
    test_query_records = {record_of(k) for t in tasks for k in t.test_queries.keys}
    assert not pool_records & target_records, "a test candidate is a training target"
    assert not test_query_records & train_query_records, "a test query is also a training query"
    assert not test_query_records & pool_records, "class-level tasks draw queries from other records"
    for t in tasks:
        assert not set(t.candidates.keys) & {t.train_candidates.keys[i] for i in t.train_targets}


def test_class_level_relevance(records, tasks):
    label = {r.key: r.meta["label"] for r in records}
    for t in tasks:
        pool_labels = np.array([label[record_of(k)] for k in t.candidates.keys])
        for q, rel in enumerate(t.relevance):
            key = t.test_queries.keys[q]
            wanted = label[record_of(key)]
            if t.short_name == "image_text->image":
                wanted = int(key.rsplit("to-", 1)[1])
                assert wanted != label[record_of(key)], "the modification names another class"
                colour, _, shape = SHAPE_CLASSES[wanted]
                assert t.test_queries.texts[q] == f"the same item but as a {colour} {shape}"
            assert rel == set(np.flatnonzero(pool_labels == wanted).tolist())
        # Training pairs follow the same rule (targets of the right class).
        for q, target in enumerate(t.train_targets):
            qlabel = label[record_of(t.train_queries.keys[q])]
            tlabel = label[record_of(t.train_candidates.keys[target])]
            if t.short_name == "image_text->image":
                assert tlabel == int(t.train_queries.keys[q].rsplit("to-", 1)[1]) != qlabel
            else:
                assert tlabel == qlabel
            if t.short_name == "image->image":
                assert record_of(t.train_queries.keys[q]) != record_of(t.train_candidates.keys[target])


def test_chance_recall(tasks):
    t = tasks[0]
    n = len(t.candidates)
    expected_r1 = np.mean([len(r) / n for r in t.relevance])
    assert t.chance_recall(1) == pytest.approx(expected_r1)
    # recall@k of a random ranking: 1 - P(none of the k drawn is relevant), hypergeometric.
    for k in (5, 10):
        expected = np.mean([1 - math.comb(n - len(r), k) / math.comb(n, k) for r in t.relevance])
        assert t.chance_recall(k) == pytest.approx(expected)
    assert t.chance_recall(1) < t.chance_recall(5) < t.chance_recall(10) < 1.0
    # A ranking of the whole pool finds every relevant set (k past the pool is the pool).
    assert t.chance_recall(n) == t.chance_recall(n + 5) == pytest.approx(1.0)
    # ... and a simulated random ranking agrees.
    rng = np.random.default_rng(0)
    hits = [bool(set(rng.permutation(n)[:10].tolist()) & rel) for _ in range(100) for rel in t.relevance]
    assert np.mean(hits) == pytest.approx(t.chance_recall(10), abs=0.03)


def test_validate_catches_a_training_target_in_the_pool(tasks):
    t = tasks[0]
    from dataclasses import replace

    bad = replace(t, train_candidates=t.candidates, train_targets=np.zeros(len(t.train_queries), dtype=int))
    with pytest.raises(ValueError, match="training targets"):
        bad.validate()
    leaky = replace(t, test_queries=t.train_queries.subset([0]), relevance=[{0}])
    with pytest.raises(ValueError, match="overlap training queries"):
        leaky.validate()


def test_universal_pool_merges_by_key_and_keeps_relevance_within_the_task(tasks):
    up = universal_pool(tasks)
    counts = up.summary()["by_modality"]
    # text->image, image->image and composed share the image pool: 80 images, texts, pairs.
    assert counts == {"image": 80, "text": 80, "image_text": 80}
    assert len(set(up.candidates.keys)) == len(up.candidates) == 240
    assert not set(up.candidates.keys) & set(up.train_candidates.keys)
    for orig, view in zip(tasks, up.tasks):
        assert view.candidates is up.candidates
        mapped = [{up.candidates.keys[i] for i in rel} for rel in view.relevance]
        assert mapped == [{orig.candidates.keys[i] for i in rel} for rel in orig.relevance]
        for rel in view.relevance:
            assert (up.candidates.modality[sorted(rel)] == orig.candidate_modality).all()
        assert [up.candidates.keys[i] for i in up.rows[orig.name]] == orig.candidates.keys
        # Instructions name the target modality; image queries become (image, instruction) pairs.
        assert all(k.endswith(f"@to-{orig.candidate_modality.name.lower()}") for k in view.test_queries.keys)
        if orig.query_modality == Modality.IMAGE:
            assert (view.test_queries.modality == Modality.IMAGE_TEXT).all()
        elif orig.query_modality == Modality.TEXT:
            assert all(t.startswith("retrieve ") for t in view.test_queries.texts)
        assert [up.train_candidates.keys[i] for i in view.train_targets] == \
            [orig.train_candidates.keys[i] for i in orig.train_targets]
        view.validate()


def test_universal_pool_without_instructions_keeps_queries(tasks):
    up = universal_pool(tasks[:2], instructions=False)
    assert up.tasks[0].test_queries is tasks[0].test_queries
    assert up.summary()["instructions"] is False


def test_universal_pool_refuses_tasks_from_different_splits(records, tasks):
    other = labelled_image_tasks(records, corpus="shapes2", tasks=["image->image"], max_candidates=80,
                                 max_queries=30, max_train=150, seed=7)
    with pytest.raises(ValueError, match="training targets of another"):
        universal_pool([tasks[0], other[0]])


def test_instruct_shapes():
    from genius.items import Items

    items = Items(texts=["a red circle", None], images=[None, b"png"], keys=["a/text", "b/image"])
    out = instruct(items, Modality.IMAGE)
    assert out.texts == ["retrieve an image: a red circle", "retrieve a similar image"]
    assert out.modality.tolist() == [Modality.TEXT, Modality.IMAGE_TEXT]
    assert out.keys == ["a/text@to-image", "b/image@to-image"]


def test_titled_tasks_split_by_title_and_relevance_is_same_title():
    recs = titled_records()
    title = {r.key: normalise_title(r.meta["title"]) for r in recs}
    tasks = titled_image_tasks(recs, max_candidates=100, max_queries=40, max_per_title=20, seed=0)
    assert [t.short_name for t in tasks] == ["text->image", "image->text"]
    for t in tasks:
        pool_titles = [title[record_of(k)] for k in t.candidates.keys]
        train_titles = {title[record_of(k)] for k in t.train_queries.keys}
        assert not set(pool_titles) & train_titles, "split by title"
        assert max(pool_titles.count(x) for x in set(pool_titles)) <= 20
        assert "star" not in train_titles or "star" not in pool_titles
        for q, rel in enumerate(t.relevance):
            qkey = record_of(t.test_queries.keys[q])
            assert rel == {i for i, x in enumerate(pool_titles) if x == title[qkey]}
            assert qkey in {record_of(t.candidates.keys[i]) for i in rel}, "its own record is relevant"
        assert len({title[record_of(k)] for k in t.test_queries.keys}) == len(t.test_queries), "one query per title"
        assert "same title" in t.relevance_rule
        assert "skipped_records" not in t.info, "records without a caption use their title"
        t.validate()


def test_wordnet_definition_to_synset():
    recs = wordnet_records()
    (task,) = wordnet_tasks(recs, max_candidates=60, max_queries=20, seed=0)
    assert task.name == "wordnet/definition->synset"
    assert task.query_modality == task.candidate_modality == Modality.TEXT
    assert task.info["records"] == 200  # the record without a definition is skipped
    pool_texts = task.candidates.texts
    assert not set(pool_texts) & set(task.train_candidates.texts), "split by lemma text"
    for q, rel in enumerate(task.relevance):
        synset = task.test_queries.keys[q].split("/")[0]
        own = task.candidates.keys.index(f"{synset}/text")
        assert own in rel
        assert rel == {i for i, t in enumerate(pool_texts) if t == pool_texts[own]}
        assert task.test_queries.texts[q] == f"the definition of sense {int(synset.split('-')[-1])}"
    assert "instance-level" in task.relevance_rule
    task.validate()


def test_build_tasks_dispatch_and_errors(records):
    tasks = build_tasks("fashion-mnist", records, tasks=["text->image"], max_candidates=50, max_queries=10)
    assert [t.name for t in tasks] == ["fashion-mnist/text->image"]
    with pytest.raises(ValueError, match="unknown task"):
        build_tasks("fashion-mnist", records, tasks=["audio->image"])
    with pytest.raises(ValueError, match="unknown corpus kind"):
        build_tasks("coco", records)


def test_records_without_image_are_skipped(records):
    text_only = [Record(key="t-1", text="a red circle", meta={"label": 0})]
    tasks = labelled_image_tasks(list(records[:120]) + text_only, tasks=["text->image"], max_candidates=30,
                                 max_queries=10)
    assert tasks[0].info["skipped_records"] == {"no_image": 1}
    assert tasks[0].info["records"] == 120


def test_small_corpora_shrink_the_pool():
    tasks = labelled_image_tasks(shape_records(60), tasks=["image->text"], max_candidates=100, max_queries=50)
    t = tasks[0]
    assert len(t.candidates) + t.info["query_records"] <= 30
    assert len(t.train_queries) >= 30
