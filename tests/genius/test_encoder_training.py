"""Stage-1 encoder training on generated coloured shapes: learning, frozen text tower,
exact resume, bad data, fusion training, and the `genius train encoder` command."""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import tarfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from genius.encoder_training import (
    CHECKPOINT_FILE,
    EncoderTrainConfig,
    PairExample,
    collate_examples,
    train_encoder,
    zero_shot_accuracy,
)
from genius.encoders import EncoderConfig, MultimodalEncoder

COLORS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220),
          "yellow": (230, 210, 20), "purple": (140, 40, 170)}
SHAPES = ("circle", "square")
CLASSES = [(c, s) for c in COLORS for s in SHAPES]
PROMPTS = [f"a {c} {s}" for c, s in CLASSES]
SIZE = 32


def draw(cls: int, rng: np.random.Generator) -> Image.Image:
    """A shape of class `cls` at a random place and size, on a random light background."""
    colour, shape = CLASSES[cls]
    image = Image.new("RGB", (SIZE, SIZE), tuple(int(v) for v in rng.integers(200, 256, 3)))
    r = int(rng.integers(SIZE // 4, SIZE * 2 // 5))
    x, y = (int(v) for v in rng.integers(r, SIZE - r, 2))
    fill = tuple(int(np.clip(v + rng.integers(-25, 26), 0, 255)) for v in COLORS[colour])
    (ImageDraw.Draw(image).ellipse if shape == "circle" else ImageDraw.Draw(image).rectangle)(
        [x - r, y - r, x + r, y + r], fill=fill)
    return image


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def shapes():
    rng = np.random.default_rng(0)
    train_labels = np.arange(300) % 10
    train = [PairExample.caption(draw(int(c), rng), PROMPTS[c], key=f"shape-{i}") for i, c in enumerate(train_labels)]
    test_labels = np.arange(200) % 10
    test = [draw(int(c), rng) for c in test_labels]
    return train, test, test_labels


def make_encoder() -> MultimodalEncoder:
    torch.manual_seed(0)
    return MultimodalEncoder.from_config(EncoderConfig(image_size=SIZE, batch_size=64))


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- learning


def test_training_aligns_images_to_the_locked_text_tower(shapes) -> None:
    train, test, test_labels = shapes
    encoder = make_encoder()
    text_before, fusion_before = snapshot(encoder.text_tower), snapshot(encoder.fusion)
    image_before = snapshot(encoder.image_tower)
    before = zero_shot_accuracy(encoder, test, test_labels, PROMPTS)

    config = EncoderTrainConfig(epochs=30, batch_size=32, lr=3e-3, warmup_steps=10)
    history = train_encoder(encoder, train, config, progress=False)

    after = zero_shot_accuracy(encoder, test, test_labels, PROMPTS)
    print(f"zero-shot accuracy: {before:.2f} -> {after:.2f}")
    assert after >= 0.6 and after >= before + 0.4, (before, after)  # chance: 0.1
    # prompt ensembles: a list of prompts per class
    ensembles = [[p, f"a photo of {p}"] for p in PROMPTS]
    assert zero_shot_accuracy(encoder, test, test_labels, ensembles) >= 0.5

    assert len(history) == 30 and [h["epoch"] for h in history] == list(range(30))
    assert all(h["steps"] == 9 and h["images"] == 288 for h in history)
    assert history[-1]["loss"] < history[0]["loss"] - 0.5
    assert history[-1]["logit_scale"] != pytest.approx(1 / 0.07)  # learnt temperature
    assert history[-1]["lr"] == pytest.approx(0.0, abs=1e-9)  # cosine schedule ran to its end

    assert same(snapshot(encoder.text_tower), text_before), "the locked text tower must not change"
    assert same(snapshot(encoder.fusion), fusion_before), "train_fusion=False leaves the fusion alone"
    assert not same(snapshot(encoder.image_tower), image_before)
    # flags as before training; the encoder is back in eval mode
    assert not any(p.requires_grad for p in encoder.text_parameters())
    assert all(p.requires_grad for p in encoder.fusion.parameters())
    assert not encoder.training


# --------------------------------------------------------------------------- resume


class Interrupting:
    """Random-access data that raises after `fail_after` reads, like a killed job."""

    def __init__(self, data, fail_after: int | None) -> None:
        self.data, self.fail_after, self.reads = data, fail_after, 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        self.reads += 1
        if self.fail_after is not None and self.reads > self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        return self.data[i]


class Streamed:
    """The same data as an iterable only (like shards): no random access, no shuffling."""

    def __init__(self, data, fail_after: int | None) -> None:
        self.inner = Interrupting(data, fail_after)

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self):
        return (self.inner[i] for i in range(len(self.inner)))


def _mixed_examples(shapes) -> list[PairExample]:
    """Caption pairs plus composed queries (image + text -> image) that train the fusion."""
    train, _, _ = shapes
    rng = np.random.default_rng(5)
    examples = list(train[:96])
    for i in range(32):
        cls = int(rng.integers(10))
        colour = list(COLORS)[int(rng.integers(5))]
        target = CLASSES.index((colour, CLASSES[cls][1]))
        examples.append(PairExample(query_image=draw(cls, rng), query_text=f"make it {colour}",
                                    target_image=draw(target, rng), key=f"composed-{i}"))
    return examples


@pytest.mark.parametrize("random_access", [True, False], ids=["sequence", "iterable"])
def test_resume_gives_the_same_result_as_an_uninterrupted_run(shapes, tmp_path, random_access) -> None:
    examples = _mixed_examples(shapes)
    wrap = Interrupting if random_access else Streamed
    config = EncoderTrainConfig(epochs=3, batch_size=16, lr=2e-3, warmup_steps=3, train_fusion=True,
                                checkpoint_every_steps=4)  # 8 steps per epoch, 24 in all

    reference = make_encoder()
    ref_history = train_encoder(reference, wrap(examples, None), config, checkpoint_dir=tmp_path / "ref",
                                progress=False)

    resumed = make_encoder()
    interrupted = wrap(examples, fail_after=128 + 16 * 5 + 3)  # inside epoch 1, batch 5
    with pytest.raises(KeyboardInterrupt):
        train_encoder(resumed, interrupted, config, checkpoint_dir=tmp_path / "run", progress=False)
    checkpoint = torch.load(tmp_path / "run" / CHECKPOINT_FILE, weights_only=True)
    assert 8 < checkpoint["step"] < 16 and checkpoint["batch"] > 0  # mid-epoch, mid-run
    # a fresh process would start from a fresh model: scramble the in-memory one
    with torch.no_grad():
        for p in resumed.image_tower.parameters():
            p.add_(1.0)
    history = train_encoder(resumed, wrap(examples, None), config, checkpoint_dir=tmp_path / "run",
                            progress=False)

    assert same(snapshot(resumed.image_tower), snapshot(reference.image_tower))
    assert same(snapshot(resumed.fusion), snapshot(reference.fusion))
    assert torch.equal(resumed.clip.logit_scale, reference.clip.logit_scale)
    strip = lambda hs: [{k: v for k, v in h.items() if k != "images_per_s"} for h in hs]  # noqa: E731
    assert strip(history) == strip(ref_history)
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "run").iterdir())
    # the fusion was trained by the composed examples
    assert not torch.equal(reference.fusion.gate[-1].weight, torch.zeros_like(reference.fusion.gate[-1].weight))

    # a finished run is not trained again
    again = train_encoder(resumed, wrap(examples, None), config, checkpoint_dir=tmp_path / "run", progress=False)
    assert strip(again) == strip(ref_history)


def test_resume_refuses_a_different_batch_size(shapes, tmp_path) -> None:
    train, _, _ = shapes
    encoder = make_encoder()
    train_encoder(encoder, train[:40], EncoderTrainConfig(epochs=1, batch_size=8, max_steps=2), tmp_path,
                  progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        train_encoder(encoder, train[:40], EncoderTrainConfig(epochs=1, batch_size=16), tmp_path, progress=False)


# --------------------------------------------------------------------------- options


def test_unlock_text_trains_and_saves_the_text_tower(shapes, tmp_path) -> None:
    train, _, _ = shapes
    encoder = make_encoder()
    text_before = snapshot(encoder.text_tower)
    config = EncoderTrainConfig(epochs=1, batch_size=16, max_steps=2, lr=1e-4, warmup_steps=0, unlock_text=True)
    history = train_encoder(encoder, train[:64], config, progress=False)
    assert len(history) == 1 and history[0]["steps"] == 2
    assert not same(snapshot(encoder.text_tower), text_before)
    # still unlocked, so save() writes the fine-tuned text weights instead of the package's
    assert all(p.requires_grad for p in encoder.text_parameters())
    texts = ["a red circle", "a blue square"]
    encoder.save(tmp_path / "enc")
    loaded = MultimodalEncoder.load(tmp_path / "enc")
    assert torch.equal(loaded.encode_text(texts), encoder.encode_text(texts))


def test_temperature_can_be_set_and_frozen(shapes) -> None:
    train, _, _ = shapes
    encoder = make_encoder()
    config = EncoderTrainConfig(epochs=1, batch_size=16, max_steps=2, init_temperature=0.05,
                                learn_temperature=False)
    history = train_encoder(encoder, train[:64], config, progress=False)
    assert history[-1]["logit_scale"] == pytest.approx(20.0, rel=1e-5)


def test_fusion_training_aligns_composed_queries() -> None:
    """(image, "make it <colour>") -> an image of the same shape in that colour. With the
    image tower frozen only the fusion can learn to apply the text; success = the nearest
    gallery image has the target's class (chance 0.1)."""
    rng = np.random.default_rng(1)

    def composed(n: int) -> tuple[list[PairExample], np.ndarray]:
        examples, classes = [], []
        for i in range(n):
            cls = int(rng.integers(10))
            colour = list(COLORS)[int(rng.integers(5))]
            target = CLASSES.index((colour, CLASSES[cls][1]))
            examples.append(PairExample(query_image=draw(cls, rng), query_text=f"make it {colour}",
                                        target_image=draw(target, rng), key=f"c{i}"))
            classes.append(target)
        return examples, np.array(classes)

    train, _ = composed(256)
    test, test_classes = composed(200)
    gallery_classes = np.arange(50) % 10
    gallery = [draw(int(c), rng) for c in gallery_classes]

    def accuracy(encoder: MultimodalEncoder) -> float:
        query = encoder.encode_pair([e.query_image for e in test], [e.query_text for e in test])
        nearest = (query @ encoder.encode_image(gallery).T).argmax(1).numpy()
        return float((gallery_classes[nearest] == test_classes).mean())

    encoder = make_encoder()
    image_before = snapshot(encoder.image_tower)
    before = accuracy(encoder)
    config = EncoderTrainConfig(epochs=15, batch_size=64, lr=3e-3, warmup_steps=5, train_image=False,
                                train_fusion=True)
    history = train_encoder(encoder, train, config, progress=False)
    after = accuracy(encoder)
    print(f"composed-query class accuracy: {before:.2f} -> {after:.2f}")
    assert same(snapshot(encoder.image_tower), image_before)  # frozen, BatchNorm statistics included
    assert history[-1]["loss"] < history[0]["loss"] - 1.0
    assert after >= 0.3 and after >= before + 0.15, (before, after)


# --------------------------------------------------------------------------- bad data


def test_bad_examples_are_skipped_counted_and_logged(shapes, caplog) -> None:
    train, _, _ = shapes
    good = list(train[:30])
    truncated = png(draw(0, np.random.default_rng(3)))[:40]
    bad = [
        PairExample.caption(b"not an image at all", "a red circle", key="garbage-bytes"),
        PairExample.caption(truncated, "a red circle", key="truncated-png"),
        PairExample.caption(b"", "a red circle", key="empty-bytes"),
        PairExample.caption(draw(1, np.random.default_rng(4)), "   ", key="blank-caption"),
        PairExample(query_image=draw(2, np.random.default_rng(5)), key="no-target"),
        "not an example",
    ]
    data = good[:10] + bad[:3] + good[10:20] + bad[3:] + good[20:]
    encoder = make_encoder()
    with caplog.at_level(logging.WARNING, logger="genius.encoder_training"):
        history = train_encoder(encoder, data, EncoderTrainConfig(epochs=1, batch_size=12, shuffle=False),
                                progress=False)
    assert sum(h["skipped"] for h in history) == len(bad)
    assert history[0]["steps"] == 3 and history[0]["images"] == 36 - len(bad)
    for key in ("garbage-bytes", "truncated-png", "empty-bytes", "blank-caption", "no-target", "#"):
        assert any(key in r.getMessage() for r in caplog.records), key

    batch = collate_examples(encoder, bad + good[:2], first_index=100)
    assert len(batch) == 2 and len(batch.skipped) == len(bad) and batch.num_raw == len(bad) + 2
    assert batch.skipped[-1][0] == "#105"  # no key: named by position
    assert batch.pixels.shape == (2, 3, SIZE, SIZE)
    assert batch.texts == [good[0].target_text, good[1].target_text]
    assert batch.query_image.tolist() == [0, 1] and batch.target_text.tolist() == [0, 1]
    assert batch.query_text.tolist() == [-1, -1] and batch.target_image.tolist() == [-1, -1]


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        EncoderTrainConfig(batch_size=0)
    with pytest.raises(ValueError):
        EncoderTrainConfig(train_image=False, learn_temperature=False)
    with pytest.raises(ValueError):
        EncoderTrainConfig(init_temperature=0.0)


# --------------------------------------------------------------------------- CLI


def _write_shard(path, records) -> None:
    with tarfile.open(path, "w") as tar:
        for key, members in records:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_train_encoder_command(shapes, tmp_path) -> None:
    from cluster.train_cli import add_train_commands

    train, test, test_labels = shapes
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    for s in range(2):
        records = [(f"s{s}-{i:03d}", {"png": png(ex.query_image), "txt": ex.target_text.encode(), "json": b"{}"})
                   for i, ex in enumerate(train[s * 20 : (s + 1) * 20])]
        records.append((f"s{s}-bad", {"png": b"\x89PNG broken", "txt": b"a red circle", "json": b"{}"}))
        records.append((f"s{s}-textonly", {"txt": b"just words", "json": b"{}"}))
        _write_shard(shard_dir / f"data-{s:06d}.tar", records)

    parser = argparse.ArgumentParser(prog="genius")
    add_train_commands(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "enc"
    argv = ["train", "encoder", "--shards", str(shard_dir / "*.tar"), "--out", str(out), "--epochs", "2",
            "--batch-size", "6", "--image-size", str(SIZE), "--checkpoint-every", "3", "--quiet"]
    args = parser.parse_args(argv)
    assert args.run(args) == 0

    record = json.loads((out / "train_history.json").read_text())
    # 42 image-text records (40 good, 2 broken PNGs) in 7 batches of 6, and 2 text-only ones
    assert [h["steps"] for h in record["history"]] == [7, 7]
    assert [h["skipped"] for h in record["history"]] == [2, 2]
    assert [h["images"] for h in record["history"]] == [40, 40]
    assert record["records_without_pair"] == 2 * 2
    loaded = MultimodalEncoder.load(out)
    assert loaded.encode_image(test[:3]).shape == (3, 384)

    with pytest.raises(ValueError, match="--resume"):
        args.run(parser.parse_args(argv))
    args = parser.parse_args(argv + ["--resume"])
    assert args.run(args) == 0  # finished: nothing left to train
    with pytest.raises(FileNotFoundError):
        args = parser.parse_args(["train", "encoder", "--shards", str(tmp_path / "none-*.tar"), "--out", str(out)])
        args.run(args)

    # --exclude-keys: held-out records (`genius eval --split-out` JSON) are never trained on.
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"held_out": [f"s0-{i:03d}" for i in range(8)] + ["s1-bad"], "train": []}))
    out2 = tmp_path / "enc2"
    args = parser.parse_args(argv[:5] + [str(out2)] + argv[6:] + ["--exclude-keys", str(split)])
    assert args.run(args) == 0
    record = json.loads((out2 / "train_history.json").read_text())
    assert record["excluded_records"] == 9
    # 33 records left (32 good, 1 broken PNG) in 5 full batches of 6 (the ragged tail is dropped)
    assert [h["steps"] for h in record["history"]] == [5, 5]
    assert all(29 <= h["images"] <= 30 for h in record["history"])


def test_task_examples_carry_each_side_of_the_training_pairs() -> None:
    from genius.encoder_training import task_examples
    from genius.tasks import labelled_image_tasks
    from tests.genius.test_tasks import shape_records

    composed, t2it = labelled_image_tasks(shape_records(120), corpus="shapes",
                                          tasks=["image_text->image", "text->image_text"],
                                          max_candidates=30, max_queries=10, max_train=60, seed=0)
    examples = task_examples(composed)
    assert len(examples) == len(composed.train_targets) > 0
    assert all(e.query_kind == "image_text" and e.target_kind == "image" for e in examples)
    first = composed.train_candidates.images[int(composed.train_targets[0])]
    assert examples[0].target_image is first and examples[0].query_text == composed.train_queries.texts[0]
    assert all(e.query_kind == "text" and e.target_kind == "image_text" for e in task_examples(t2it))


def test_read_key_list_formats(tmp_path) -> None:
    from cluster.train_cli import read_key_list

    (tmp_path / "a.json").write_text(json.dumps({"held_out": ["k1", "k2"], "train": ["k3"]}))
    (tmp_path / "b.json").write_text(json.dumps(["k1", 7]))
    (tmp_path / "c.txt").write_text("k1\n\n k2 \n")
    (tmp_path / "d.json").write_text(json.dumps({"keys": ["k1"]}))
    assert read_key_list(str(tmp_path / "a.json")) == {"k1", "k2"}
    assert read_key_list(str(tmp_path / "b.json")) == {"k1", "7"}
    assert read_key_list(str(tmp_path / "c.txt")) == {"k1", "k2"}
    with pytest.raises(ValueError, match="held_out"):
        read_key_list(str(tmp_path / "d.json"))
