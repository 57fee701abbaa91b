"""Pictures and texts of search hits, read from the WebDataset shards the index was built from.

An index stores no pixels: its item table keeps, per item, `source` = ``"<shard file>/<record
key>"`` (what `genius index build` writes; `genius fit` from tables leaves it empty). The UI
resolves that against the shard list it was given (``--shards``: a folder, glob, brace pattern
or URL, resolved like the build's) and reads the record's members from the tar:

* each shard is scanned ONCE, on first use, into a member index (member -> data offset, size),
  kept in an LRU of `max_shards` shards; after that a member is one seek and one read;
* a URL shard, or a compressed one (``.tar.gz``, which cannot be seeked), is first copied into a
  plain tar in a private temporary folder, deleted when its index leaves the LRU or on close;
* images are served as JPEG thumbnails (at most `thumb_px` pixels a side, LRU-cached by size)
  or as the original bytes ("more like this" searches with the original); texts as UTF-8.

Why not thumbnails in the index: no extra storage or build step, the shards are already on
storage the servers see, and reading them is O(1) per hit after one header scan per shard.
Only shards in the resolved list can be read: a source names a shard by its file name, which
is looked up in that list, never joined to a path (no traversal). A source that names no
listed shard or no record gives `MediaError`; the page then shows the hit's key and metadata.
"""
from __future__ import annotations

import bz2
import gzip
import io
import json
import logging
import lzma
import re
import shutil
import tarfile
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("genius.ui.media")

THUMB_PX = 256
MAX_TEXT_CHARS = 4096  # the replica's query text limit: a hit's text can be searched with as is
MAX_IMAGE_PIXELS = 40_000_000  # as the replica: a larger image is not decoded for a thumbnail
_MEMBER_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # WebDataset's key/extension split
_COMPRESSED = {b"\x1f\x8b": gzip.open, b"BZ": bz2.open, b"\xfd7zXZ": lzma.open}
_CONTENT_TYPES = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp",
                  "gif": "image/gif", "bmp": "image/bmp", "tif": "image/tiff", "tiff": "image/tiff",
                  "ppm": "image/x-portable-pixmap"}


class MediaError(Exception):
    """A plain reason why a hit's picture or text cannot be read; `status` is the HTTP status."""

    def __init__(self, message: str, status: int = 404):
        super().__init__(message)
        self.status = status


@dataclass
class RecordMembers:
    """Where one record's members lie in a local tar file: extension -> (offset, size)."""

    path: Path
    members: dict[str, tuple[int, int]]

    @property
    def image_ext(self) -> str | None:
        from genius.data.shards import IMAGE_EXTS

        return next((e for e in self.members if e in IMAGE_EXTS), None)

    @property
    def text_ext(self) -> str | None:
        from genius.data.shards import TEXT_EXTS

        return next((e for e in self.members if e in TEXT_EXTS), None)

    def read(self, ext: str) -> bytes:
        offset, size = self.members[ext]
        try:
            with open(self.path, "rb") as f:
                f.seek(offset)
                data = f.read(size)
        except OSError as err:  # e.g. a temporary copy evicted meanwhile: the next request rescans
            raise MediaError(f"{self.path.name}: cannot read member .{ext}: {err}", 503) from err
        if len(data) != size:
            raise MediaError(f"{self.path.name}: member .{ext} is cut short ({len(data)} of {size} bytes)", 500)
        return data


@dataclass
class _ShardIndex:
    local: Path  # a plain tar on this machine
    temporary: bool  # a copy of a URL or compressed shard: deleted on eviction
    records: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)


class _BytesLRU:
    """An LRU of byte strings bounded by their total size."""

    def __init__(self, budget: int):
        self.budget, self.size = budget, 0
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: str, value: bytes) -> None:
        with self._lock:
            if key in self._items:
                return
            self._items[key] = value
            self.size += len(value)
            while self.size > self.budget and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self.size -= len(old)


def split_source(source: str) -> tuple[str, str]:
    """("<shard file>", "<record key>") of a source; MediaError when it has not that form."""
    shard, sep, key = (source or "").partition("/")
    if not sep or not shard or not key:
        raise MediaError(f"source {source!r} is not '<shard file>/<record key>'", 400)
    return shard, key


def build_shards(index: str | Path) -> list[str] | None:
    """The shard list an index build recorded in INDEX/.build/job.json, when that is still there
    (best effort: the UI's default for `genius serve local --ui` without --ui-shards)."""
    try:
        job = json.loads((Path(index) / ".build" / "job.json").read_text(encoding="utf-8"))
        shards = job["settings"]["shards"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(shards, list):
        return None
    from genius.data.shards import is_url

    # Shards moved or deleted since the build are left out: the others still show.
    found = [str(s) for s in shards if is_url(str(s)) or Path(str(s)).is_file()]
    return found or None


def resolve(shards: str | Sequence[str | Path]) -> list[Path | str]:
    """A shard spec (folder, glob, brace pattern, URL; see `genius index build --shards`) or a
    list of shard paths/URLs, as shard paths (URLs stay strings)."""
    from cluster.train_cli import resolve_shards

    if isinstance(shards, (str, Path)):
        return resolve_shards(str(shards))
    out: list[Path | str] = []
    for s in shards:
        out.extend(resolve_shards(str(s)))
    return out


class ShardMedia:
    """Read hits' members from shards by source; thread-safe (the UI calls it from a pool)."""

    def __init__(self, shards: Iterable[Path | str], max_shards: int = 64, thumb_px: int = THUMB_PX,
                 thumb_cache_bytes: int = 64 << 20):
        from genius.data.shards import is_url

        self.by_name: dict[str, Path | str] = {}
        for s in shards:
            shard = s if is_url(str(s)) else Path(s)
            name = str(s).rstrip("/").rsplit("/", 1)[-1]  # as the build names it in sources
            if name in self.by_name and self.by_name[name] != shard:
                # A source names its shard by file name only: the first one listed wins.
                log.warning("two shards are named %s (%s, %s): sources name the first", name, self.by_name[name], s)
                continue
            self.by_name[name] = shard
        self.max_shards, self.thumb_px = max_shards, thumb_px
        self.scans = 0  # shards scanned so far (each once, while in the LRU)
        self._indexes: OrderedDict[str, _ShardIndex] = OrderedDict()
        self._building: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self._thumbs = _BytesLRU(thumb_cache_bytes)
        self._tmp: Path | None = None

    @classmethod
    def from_spec(cls, shards: str | Sequence[str | Path], **kwargs) -> "ShardMedia":
        media = cls(resolve(shards), **kwargs)
        log.info("pictures and texts of hits from %d shards", len(media.by_name))
        return media

    # --- records -------------------------------------------------------------------
    def record(self, source: str) -> RecordMembers:
        shard, key = split_source(source)
        index = self._index(shard)
        members = index.records.get(key)
        if members is None:
            raise MediaError(f"record {key!r} is not in shard {shard}")
        return RecordMembers(index.local, members)

    def describe(self, source: str, max_text: int = MAX_TEXT_CHARS) -> dict[str, object]:
        """{"image": bool, "text": str | None} of a hit, for the search results."""
        record = self.record(source)
        text = None
        if record.text_ext is not None:
            text = record.read(record.text_ext)[: 4 * max_text].decode("utf-8", errors="replace")[:max_text]
        return {"image": record.image_ext is not None, "text": text}

    def image(self, source: str) -> tuple[bytes, str]:
        """The record's original image bytes and content type."""
        record = self.record(source)
        if record.image_ext is None:
            raise MediaError(f"record {source!r} has no image")
        return record.read(record.image_ext), _CONTENT_TYPES.get(record.image_ext, "application/octet-stream")

    def text(self, source: str, max_chars: int = 64 << 10) -> str:
        record = self.record(source)
        if record.text_ext is None:
            raise MediaError(f"record {source!r} has no text")
        return record.read(record.text_ext)[: 4 * max_chars].decode("utf-8", errors="replace")[:max_chars]

    def thumbnail(self, source: str) -> bytes:
        """A JPEG of the record's image, at most thumb_px a side (cached)."""
        cached = self._thumbs.get(source)
        if cached is not None:
            return cached
        data, _ = self.image(source)
        thumb = make_thumbnail(data, self.thumb_px)
        self._thumbs.put(source, thumb)
        return thumb

    # --- shard indexes -------------------------------------------------------------
    def _index(self, name: str) -> _ShardIndex:
        shard = self.by_name.get(name)
        if shard is None:  # only listed shards: a source never becomes a path
            raise MediaError(f"shard {name!r} is not among the UI's shards (--shards)")
        with self._lock:
            index = self._indexes.get(name)
            if index is not None:
                self._indexes.move_to_end(name)
                return index
            building = self._building.setdefault(name, threading.Lock())
        with building:  # one scan per shard, even when many thumbnails ask at once
            with self._lock:
                index = self._indexes.get(name)
            if index is None:
                index = self._scan(shard)
                with self._lock:
                    self._indexes[name] = index
                    self.scans += 1
                    while len(self._indexes) > self.max_shards:
                        _, old = self._indexes.popitem(last=False)
                        if old.temporary:
                            old.local.unlink(missing_ok=True)
        return index

    def _scan(self, shard: Path | str) -> _ShardIndex:
        local, temporary = self._local_tar(shard)
        records: dict[str, dict[str, tuple[int, int]]] = {}
        try:
            with tarfile.open(local, "r:", ignore_zeros=True) as tar:
                for info in tar:
                    match = _MEMBER_NAME.match(info.name) if info.isreg() else None
                    if match is not None:
                        # The first member of a name wins, like the shard reader.
                        records.setdefault(match.group(1), {}).setdefault(
                            match.group(2).lower(), (info.offset_data, info.size))
        except (tarfile.TarError, OSError, EOFError) as err:
            if not records:
                if temporary:
                    local.unlink(missing_ok=True)
                raise MediaError(f"{shard}: cannot read the shard: {err}", 502) from err
            log.warning("%s: read up to a damaged region (%s); %d records indexed", shard, err, len(records))
        log.debug("%s: %d records indexed", shard, len(records))
        return _ShardIndex(local, temporary, records)

    def _local_tar(self, shard: Path | str) -> tuple[Path, bool]:
        """A seekable plain tar of `shard`: itself, or a temporary copy (URL, compressed)."""
        from genius.data.shards import fetch_shard

        if isinstance(shard, str):  # a URL
            try:
                fetched = fetch_shard(shard, str(self._tmpdir()))
            except OSError as err:
                raise MediaError(str(err), 502) from err
            return self._decompressed(fetched, temporary=True)
        if not shard.is_file():
            raise MediaError(f"{shard}: no such shard file", 502)
        return self._decompressed(shard, temporary=False)

    def _decompressed(self, path: Path, temporary: bool) -> tuple[Path, bool]:
        with open(path, "rb") as f:
            magic = f.read(6)
        opener = next((o for m, o in _COMPRESSED.items() if magic.startswith(m)), None)
        if opener is None:
            return path, temporary
        fd, name = tempfile.mkstemp(prefix="shard-", suffix=".tar", dir=self._tmpdir())
        try:
            with opener(path, "rb") as src, open(fd, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        except (OSError, EOFError, lzma.LZMAError) as err:
            Path(name).unlink(missing_ok=True)
            raise MediaError(f"{path}: cannot decompress the shard: {err}", 502) from err
        finally:
            if temporary:
                path.unlink(missing_ok=True)
        return Path(name), True

    def _tmpdir(self) -> Path:
        with self._lock:
            if self._tmp is None:
                self._tmp = Path(tempfile.mkdtemp(prefix="genius-ui-"))
            return self._tmp

    def close(self) -> None:
        """Delete the temporary copies of URL and compressed shards."""
        with self._lock:
            self._indexes.clear()
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)
                self._tmp = None


def make_thumbnail(data: bytes, max_px: int = THUMB_PX) -> bytes:
    """JPEG bytes of an image scaled to fit max_px x max_px (never enlarged); MediaError when the
    bytes do not decode or hold more than MAX_IMAGE_PIXELS."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise MediaError(f"the image is {image.width}x{image.height} pixels, over the thumbnail limit", 422)
            image.draft("RGB", (max_px, max_px))  # JPEG: decode at a reduced scale, much cheaper
            image = ImageOps.exif_transpose(image)
            if image.mode in ("RGBA", "LA", "P"):
                image = image.convert("RGBA")
                canvas = Image.new("RGB", image.size, "white")  # transparency on white, as a page shows it
                canvas.paste(image, mask=image.getchannel("A"))
                image = canvas
            elif image.mode != "RGB":
                image = image.convert("RGB")
            image.thumbnail((max_px, max_px))
            out = io.BytesIO()
            image.save(out, "JPEG", quality=85)
            return out.getvalue()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise MediaError(f"the image does not decode: {err}", 422) from err
