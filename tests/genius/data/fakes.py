"""Tiny stand-ins for the Debian packages' files, written into test folders."""
from __future__ import annotations

import gzip
import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin


def png_bytes(size: tuple[int, int] = (8, 6), color: tuple[int, ...] = (200, 30, 30), mode: str = "RGB",
              title: str | None = None, **text: str) -> bytes:
    info = PngImagePlugin.PngInfo()
    if title is not None:
        info.add_text("Title", title)
    for k, v in text.items():
        info.add_text(k, v)
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def jpeg_bytes(size: tuple[int, int] = (8, 6), color: tuple[int, int, int] = (10, 120, 200)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def huge_png_header(width: int = 30_000, height: int = 30_000, title: str = "huge") -> bytes:
    """A PNG that declares a huge size (and holds almost no data): a decompression bomb
    for any decoder that trusts the header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    text = b"Title\x00" + title.encode()
    idat = zlib.compress(b"\x00" * 64)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"tEXt", text) + _chunk(b"IDAT", idat)
            + _chunk(b"IEND", b""))


def corrupt_png(title: str = "broken") -> bytes:
    """A PNG whose header is fine and whose image data is garbage."""
    good = png_bytes((16, 16), title=title)
    start = good.index(b"IDAT") + 4
    return good[:start] + b"\x13\x37" * 20 + good[start + 40:]


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fake_fashion_mnist(folder: Path, n_train: int = 12, n_test: int = 5, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n, prefix in (("train", n_train, "train"), ("test", n_test, "t10k")):
        images = np.zeros((n, 28, 28), np.uint8)
        images[:, 6:22, 8:20] = rng.integers(30, 255, size=(n, 1, 1))  # one flat block per image
        labels = np.arange(n) % 10
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
        out[f"{split}_images"], out[f"{split}_labels"] = images, labels
    return out


LICENSE = "  1 This software and database is being provided to you, the LICENSEE, by  \n  2 Princeton University.  \n"


def _data_file(lines: list[str]) -> str:
    """Lines with their real byte offsets filled in for '{off}' (WordNet's synset offset)."""
    text = LICENSE
    for line in lines:
        text += line.replace("{off}", f"{len(text.encode()):08d}") + "  \n"
    return text


def fake_wordnet(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data.noun").write_text(_data_file([
        "{off} 03 n 01 entity 0 000 | that which is perceived to have its own distinct existence",
        "{off} 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 001 @ 00000099 n 0000 | a member of the genus "
        'Canis; "the dog barked all night"; "a dog\'s life"',
        "this line is not a synset",
    ]))
    (folder / "data.verb").write_text(_data_file([
        "{off} 29 v 02 breathe 0 respire 0 001 $ 00000111 v 0000 01 + 02 00 | draw air into, and expel out of, "
        'the lungs; "I can breathe better now"',
    ]))
    (folder / "data.adj").write_text(_data_file([
        '{off} 00 s 02 abounding 0 galore(ip) 0 000 | existing in abundance; "whiskey galore"',
    ]))
    (folder / "data.adv").write_text(_data_file([
        "{off} 02 r 01 barely 0 000 | only just",
    ]))
