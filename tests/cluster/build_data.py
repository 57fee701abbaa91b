"""Small WebDataset shards for build tests: text items with queries in their metadata, some
image-text items, and optional bad records (corrupt image, empty text, non-UTF-8 text)."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from PIL import Image

COLORS = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple"]
THINGS = ["bicycle", "teapot", "violin", "lantern", "kayak", "cactus", "hammock", "telescope", "umbrella",
          "saxophone", "backpack", "windmill", "compass"]


def item_text(i: int) -> str:
    return f"a {COLORS[i % len(COLORS)]} {THINGS[(i // len(COLORS)) % len(THINGS)]} on shelf {i}"


def query_texts(i: int) -> list[str]:
    color, thing = COLORS[i % len(COLORS)], THINGS[(i // len(COLORS)) % len(THINGS)]
    return [f"{color} {thing} shelf {i}", f"the {thing} that is {color}, number {i}"]


def png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256)).save(buf, format="PNG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder: Path, shards: int = 4, per_shard: int = 20, images_every: int = 5,
                 bad: bool = False) -> list[str]:
    """Shards shard-00000.tar ...; returns the keys of the good records."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = []
    for s in range(shards):
        with tarfile.open(folder / f"shard-{s:05d}.tar", "w") as tar:
            for j in range(per_shard):
                i = s * per_shard + j
                key = f"item-{i:05d}"
                _add(tar, f"{key}.txt", item_text(i).encode())
                _add(tar, f"{key}.json", json.dumps({"queries": query_texts(i), "n": i}).encode())
                if images_every and i % images_every == 0:
                    _add(tar, f"{key}.png", png(i))
                keys.append(key)
            if bad:
                _add(tar, f"bad-image-{s}.png", b"\x89PNG\r\n\x1a\n not an image at all")
                _add(tar, f"bad-image-{s}.txt", b"a caption for a broken image")
                _add(tar, f"empty-text-{s}.txt", b"   ")
                _add(tar, f"latin-text-{s}.txt", "caf\xe9".encode("latin-1"))
    return keys


def write_awkward_shards(folder: Path, first: int) -> list[str]:
    """Shard `first`: a record repeating the key item-00003 (skipped as a duplicate) and a new
    one; shard `first + 1`: not a tar at all (reported, not fatal). Returns the new good keys."""
    with tarfile.open(folder / f"shard-{first:05d}.tar", "w") as tar:
        _add(tar, "item-00003.txt", b"the same key as a record of shard 0")
        _add(tar, "extra-1.txt", b"an extra record after the duplicate")
    (folder / f"shard-{first + 1:05d}.tar").write_bytes(b"this is not a tar archive " * 40)
    return ["extra-1"]


def write_text_shard(path: Path, texts: dict[str, str]) -> None:
    """One shard of text records {key: text}."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, text in texts.items():
            _add(tar, f"{key}.txt", text.encode())
