"""Fashion-MNIST → WebDataset shards, from the Debian package `dataset-fashion-mnist`.

70,000 greyscale 28×28 images (60k train, 10k test) of 10 clothing classes, stored as
PNG exactly as in the dataset (light item on a black background). Each image gets a
caption built from its class name, varied by templates and by two attributes measured
on the pixels — what the data allows, no more:

* tone: mean intensity of the item's pixels (dark < 125 ≤ grey < 185 ≤ light, roughly
  the dataset's terciles), worded as the image shows it;
* texture: mean absolute Laplacian inside the item (its eroded mask): ≥ 100 (the top
  ~15 %: prints, checks, lace, straps) "patterned", < 64 (the lower half) "plain".

The JSON keeps `label`, `class_name`, `split` (train/test), `index` (row in the split's
file), the attributes and the template number, so that evaluations can use the labels.
Captions are drawn with a seeded generator: the same seed gives the same shards.
"""
from __future__ import annotations

import gzip
import io
import logging
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from genius.data.shards import (
    DEFAULT_SHARD_SIZE, MissingSourceError, ProgressFactory, Record, ShardWriter, open_progress, spread_limit,
)

log = logging.getLogger(__name__)

DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
PACKAGE = "dataset-fashion-mnist"
SPLITS = ("train", "test")
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# Caption nouns: (phrase, plural). Plural nouns take no article ("a photo of trousers").
_NOUNS = (("t-shirt", False), ("trousers", True), ("pullover", False), ("dress", False), ("coat", False),
          ("sandal", False), ("shirt", False), ("sneaker", False), ("bag", False), ("ankle boot", False))
_TONE_WORDS = {"dark": ("dark", "black", "dark grey"), "grey": ("grey", "mid-grey"),
               "light": ("light", "white", "light grey")}
_TEMPLATES = (
    "a photo of {np}",
    "{np}",
    "a photo of {tone_np}",
    "{tone_np}",
    "{texture_tone_np}",
    "a low-resolution photo of {tone_np}",
    "a greyscale product photo of {np}",
    "a small picture of {texture_np}",
)
_OBJECT_THRESHOLD = 25  # pixel value above which a pixel belongs to the item
_DARK, _LIGHT = 125.0, 185.0
_PLAIN, _PATTERNED = 64.0, 100.0
_MIN_INTERIOR = 60  # pixels; thinner items (sandal straps) get no texture word


def find_files(source: str | Path | None) -> dict[str, tuple[Path, Path]]:
    """The (images, labels) idx files of each split, gzipped or not."""
    folder = Path(source) if source is not None else DEFAULT_SOURCE
    found: dict[str, tuple[Path, Path]] = {}
    missing: list[str] = []
    for split, names in _FILES.items():
        paths = []
        for name in names:
            path = next((folder / n for n in (f"{name}.gz", name) if (folder / n).is_file()), None)
            if path is None:
                missing.append(f"{name}.gz")
            paths.append(path)
        if all(paths):
            found[split] = (paths[0], paths[1])
    if missing:
        hint = (f"install the Debian package: apt-get install {PACKAGE}" if source is None
                else f"pass --source PATH to a folder holding them (or apt-get install {PACKAGE})")
        raise MissingSourceError(f"Fashion-MNIST files not found in {folder}: {', '.join(missing)}; {hint}")
    return found


def read_idx(path: Path) -> np.ndarray:
    """An idx-ubyte file (optionally gzipped) as a uint8 array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: cannot read: {e}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an idx file of unsigned bytes (magic {data[:4].hex()})")
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", data[4:header])
    if len(data) - header != math.prod(dims):
        raise ValueError(f"{path}: {len(data) - header} data bytes, the header declares {dims}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def attributes(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image: mean item intensity and texture (mean |Laplacian| over the eroded mask;
    NaN where the item has too small an interior)."""
    x = images.astype(np.float32)
    mask = images > _OBJECT_THRESHOLD
    mean = (x * mask).sum((1, 2)) / np.maximum(mask.sum((1, 2)), 1)
    inner = np.zeros_like(mask)
    inner[:, 1:-1, 1:-1] = (mask[:, 1:-1, 1:-1] & mask[:, :-2, 1:-1] & mask[:, 2:, 1:-1]
                            & mask[:, 1:-1, :-2] & mask[:, 1:-1, 2:])
    lap = np.zeros_like(x)
    lap[:, 1:-1, 1:-1] = np.abs(4 * x[:, 1:-1, 1:-1] - x[:, :-2, 1:-1] - x[:, 2:, 1:-1]
                                - x[:, 1:-1, :-2] - x[:, 1:-1, 2:])
    n = inner.sum((1, 2))
    texture = np.where(n >= _MIN_INTERIOR, (lap * inner).sum((1, 2)) / np.maximum(n, 1), np.nan)
    return mean, texture


def tone_of(mean: float) -> str:
    return "dark" if mean < _DARK else "grey" if mean < _LIGHT else "light"


def texture_of(value: float) -> str | None:
    if math.isnan(value):
        return None
    return "patterned" if value >= _PATTERNED else "plain" if value < _PLAIN else None


def _with_article(phrase: str, plural: bool) -> str:
    return phrase if plural else ("an " if phrase[0] in "aeiou" else "a ") + phrase


def caption(label: int, tone: str, texture: str | None, rng: np.random.Generator) -> tuple[str, int]:
    """A caption for an item of class `label`; returns (caption, template number)."""
    noun, plural = _NOUNS[label]
    tone_word = _TONE_WORDS[tone][rng.integers(len(_TONE_WORDS[tone]))]
    template = int(rng.integers(len(_TEMPLATES)))
    text = _TEMPLATES[template].format(
        np=_with_article(noun, plural),
        tone_np=_with_article(f"{tone_word} {noun}", plural),
        texture_np=_with_article(f"{texture} {noun}" if texture else noun, plural),
        texture_tone_np=_with_article(" ".join(w for w in (texture, tone_word, noun) if w), plural),
    )
    return text, template


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def convert(
    out_dir: str | Path,
    *,
    source: str | Path | None = None,
    limit: int | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    splits: tuple[str, ...] = SPLITS,
    seed: int = 0,
    progress: ProgressFactory | None = None,
) -> dict[str, Any]:
    """Write Fashion-MNIST as shards ``fashion-mnist-NNNNNN.tar`` (train first, then test)
    into `out_dir`; return the manifest. `limit` caps the total, spread over the splits."""
    unknown = set(splits) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)}: choose from {SPLITS}")
    files = find_files(source)
    data = {s: (read_idx(files[s][0]), read_idx(files[s][1])) for s in splits}
    for s, (images, labels) in data.items():
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"{files[s][0]}: images {images.shape} do not match labels {labels.shape}")
    limits = dict(zip(splits, spread_limit([len(data[s][1]) for s in splits], limit)))
    rng = np.random.default_rng(seed)
    options = {"limit": limit, "splits": list(splits), "seed": seed}
    source_dir = str(files[splits[0]][0].parent) if splits else None
    bar = open_progress(progress, sum(limits.values()), "fashion-mnist")
    with ShardWriter(out_dir, "fashion-mnist", shard_size, dataset="fashion-mnist",
                     source=source_dir, options=options) as writer:
        try:
            for split in splits:
                images, labels = data[split]
                n = limits[split]
                # In chunks: float copies of all 60k images at once would cost ~1 GB.
                parts = [attributes(images[i:min(i + 10_000, n)]) for i in range(0, n, 10_000)]
                means = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0)
                textures = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0)
                for i in range(n):
                    label = int(labels[i])
                    key = f"fmnist-{split}-{i:05d}"
                    if label >= len(CLASS_NAMES):
                        writer.skip("bad_label", key, f"label {label} outside 0..{len(CLASS_NAMES) - 1}")
                        bar.update()
                        continue
                    tone, texture = tone_of(float(means[i])), texture_of(float(textures[i]))
                    text, template = caption(label, tone, texture, rng)
                    meta = {"label": label, "class_name": CLASS_NAMES[label], "split": split, "index": i,
                            "tone": tone, "texture": texture, "mean_intensity": round(float(means[i]), 1),
                            "caption_template": template}
                    writer.write(Record(key=key, image=_png(images[i]), image_ext="png", text=text, meta=meta))
                    bar.update()
            writer.notes["classes"] = list(CLASS_NAMES)
            writer.notes["per_split"] = {s: limits[s] for s in splits}
        finally:
            bar.close()
        return writer.close()
