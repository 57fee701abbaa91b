"""WebDataset shards: an atomic writer with a manifest, and a reader that never crashes.

Layout of a shard folder (what every converter in `genius.data` writes)::

    OUT/<prefix>-000000.tar     <key>.png|jpg  image bytes (absent for text-only records)
    OUT/<prefix>-000001.tar     <key>.txt      UTF-8 text/caption (absent for image-only)
    ...                         <key>.json     metadata object (always present)
    OUT/shards.json             manifest: files, item counts, modalities, sha256, and the
                                converter's counts of skipped records by reason

Members of one record are consecutive, as WebDataset expects; keys hold only
``[A-Za-z0-9_-]`` because WebDataset splits a member name at its first dot. A shard is
written under a hidden temporary name and renamed when complete; the manifest is
written last, so its presence means the conversion finished.

`iter_shards` / `ShardReader` read these shards and those of standard tools (e.g.
img2dataset's ``00000.tar`` with ``key.jpg``, ``key.txt``, ``key.json``), from local paths or
any URL WebDataset opens (``http(s)://``, ``pipe:CMD``, ``gs://``, ``hf://``, ...: fetched with
``webdataset.gopen`` into a temporary file, then read like a local shard). A shard that
cannot be opened, a truncated shard, a corrupt tar region, or a bad member (bad JSON,
invalid UTF-8, an undecodable image) is counted in `ReadStats` by reason and logged
with the shard file and the record key, and the reader goes on with the next record.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import io
import json
import logging
import os
import re
import tarfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from genius.atomic import write_json_atomic
from genius.errors import GeniusError
from genius.items import Items
from genius.modality import Modality

log = logging.getLogger(__name__)

MANIFEST_FILE = "shards.json"
MANIFEST_FORMAT = "genius-shards"
MANIFEST_VERSION = 1
IMAGE_EXTS = frozenset({"jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "ppm"})
TEXT_EXTS = frozenset({"txt", "text"})
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
DEFAULT_SHARD_SIZE = 10_000
DEFAULT_MAX_SHARD_BYTES = 1 << 30
# One warning line per (shard or run, reason) up to this many; the rest go to DEBUG so
# that a badly damaged input cannot flood the log (the counts stay exact).
_MAX_WARNINGS_PER_REASON = 20

_KEY_OK = re.compile(r"^[A-Za-z0-9_-]+$")
_KEY_BAD_CHARS = re.compile(r"[^A-Za-z0-9_-]+")
_MEMBER_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # WebDataset's base_plus_ext


class MissingSourceError(GeniusError, FileNotFoundError):
    """A converter's input files are absent; the message says what to install or pass."""


class ProgressBar(Protocol):
    def update(self, n: int = 1) -> Any: ...

    def close(self) -> Any: ...


ProgressFactory = Callable[..., ProgressBar]  # called as factory(total=..., desc=...), e.g. tqdm


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def open_progress(factory: ProgressFactory | None, total: int | None, desc: str) -> ProgressBar:
    return factory(total=total, desc=desc) if factory is not None else _NoProgress()


def spread_limit(sizes: Sequence[int], limit: int | None) -> list[int]:
    """How many records to take from each part (split, file) so that a --limit sample
    keeps the parts' proportions: largest-remainder rounding, never more than a part has."""
    if limit is None or limit >= sum(sizes):
        return list(sizes)
    total = sum(sizes)
    shares = [limit * n / total for n in sizes]
    out = [int(x) for x in shares]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (-(shares[i] - out[i]), i))
    for i in by_remainder[: limit - sum(out)]:
        out[i] += 1
    return out


def make_key(text: str) -> str:
    """A WebDataset-safe key from any string: path separators become '-', other runs of
    characters outside [A-Za-z0-9_-] become '_' (dots would split the key)."""
    key = _KEY_BAD_CHARS.sub("_", text.replace("/", "-").replace("\\", "-")).strip("_")
    return key or "_"


def check_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY_OK.match(key):
        raise ValueError(f"invalid record key {key!r}: use only letters, digits, '_' and '-' (see make_key)")
    return key


@dataclass
class Record:
    """One item of a shard: an image, a text, or both, with its JSON metadata."""

    key: str
    image: bytes | None = None
    image_ext: str | None = None  # 'png', 'jpg', ... (member extension, lower case)
    text: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, bytes] = field(default_factory=dict)  # other members, by extension
    shard: str | None = None  # the file it was read from (reader only)

    @property
    def modality(self) -> Modality:
        if self.image is not None and self.text is not None:
            return Modality.IMAGE_TEXT
        if self.image is not None:
            return Modality.IMAGE
        if self.text is not None:
            return Modality.TEXT
        raise ValueError(f"record {self.key!r} has neither image nor text")


def modality_name(modality: Modality) -> str:
    return modality.name.lower()


def to_items(records: Sequence[Record]) -> Items:
    """Records → `Items` (texts, image bytes, keys) for the encoders and the index."""
    texts = [r.text for r in records]
    images = [r.image for r in records]
    return Items(texts=None if all(t is None for t in texts) else texts,
                 images=None if all(i is None for i in images) else images,
                 keys=[r.key for r in records])


# ----------------------------------------------------------------------------- writer


class ShardWriter:
    """Write records into ``<prefix>-NNNNNN.tar`` shards and ``shards.json``.

    Use as a context manager. Each shard is written as ``.<name>.tmp`` and renamed when
    full or at close; on an exception the temporary file is removed and no manifest is
    written (a manifest from an earlier run is removed at the start, since the shards it
    describes are being replaced). Shards of an earlier run with the same prefix that
    this run did not rewrite are deleted at close, so the folder matches the manifest.
    Converters report records they cannot use with `skip(reason, where, detail)`.
    """

    def __init__(
        self,
        out_dir: str | Path,
        prefix: str,
        max_items_per_shard: int = DEFAULT_SHARD_SIZE,
        *,
        max_bytes_per_shard: int = DEFAULT_MAX_SHARD_BYTES,
        dataset: str | None = None,
        source: str | None = None,
        options: dict[str, Any] | None = None,
    ) -> None:
        if max_items_per_shard <= 0:
            raise ValueError(f"max_items_per_shard must be positive, got {max_items_per_shard}")
        if max_bytes_per_shard <= 0:
            raise ValueError(f"max_bytes_per_shard must be positive, got {max_bytes_per_shard}")
        check_key(prefix)
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.max_items = max_items_per_shard
        self.max_bytes = max_bytes_per_shard
        self.dataset = dataset or prefix
        self.source = source
        self.options = dict(options or {})
        self.skipped: Counter[str] = Counter()
        self.notes: dict[str, Any] = {}  # converter facts for the manifest (not skips)
        self.items = 0
        self.modalities: Counter[str] = Counter()
        self._shards: list[dict[str, Any]] = []
        self._keys: set[str] = set()
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._cur: dict[str, Any] = {}
        self._closed = False
        self._start = time.monotonic()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        manifest = self.out_dir / MANIFEST_FILE
        if manifest.exists():
            log.info("%s: replacing an earlier conversion's manifest", manifest)
            manifest.unlink()

    # --- records -------------------------------------------------------------------
    def write(self, record: Record) -> None:
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        check_key(record.key)
        if record.key in self._keys:
            raise ValueError(f"duplicate record key {record.key!r}")
        if record.image is None and record.text is None:
            raise ValueError(f"record {record.key!r} has neither image nor text")
        members: list[tuple[str, bytes]] = []
        if record.image is not None:
            ext = (record.image_ext or "").lower().lstrip(".")
            if ext not in IMAGE_EXTS:
                raise ValueError(f"record {record.key!r}: image extension {record.image_ext!r} not in {sorted(IMAGE_EXTS)}")
            members.append((ext, bytes(record.image)))
        if record.text is not None:
            members.append(("txt", record.text.encode("utf-8")))
        for ext, data in record.extra.items():
            if ext in IMAGE_EXTS | TEXT_EXTS | {"json"}:
                raise ValueError(f"record {record.key!r}: extra member {ext!r} clashes with a standard member")
            members.append((ext, bytes(data)))
        # default=str: dates, paths and the like become strings instead of failing the run.
        members.append(("json", json.dumps(record.meta, ensure_ascii=False, default=str).encode("utf-8")))
        size = sum(512 + -(-len(d) // 512) * 512 for _, d in members)
        if self._tar is not None and (self._cur["items"] >= self.max_items or self._cur["bytes"] + size > self.max_bytes):
            self._finish_shard()
        if self._tar is None:
            self._open_shard()
        for ext, data in members:
            info = tarfile.TarInfo(f"{record.key}.{ext}")
            info.size = len(data)
            info.mode = 0o444
            info.mtime = 0  # reproducible shards: same input, same bytes, same sha256
            assert self._tar is not None
            self._tar.addfile(info, io.BytesIO(data))
        self._keys.add(record.key)
        mod = modality_name(record.modality)
        self._cur["items"] += 1
        self._cur["bytes"] += size
        self._cur["modalities"][mod] += 1
        self._cur.setdefault("first_key", record.key)
        self._cur["last_key"] = record.key
        self.items += 1
        self.modalities[mod] += 1

    def has_key(self, key: str) -> bool:
        """Whether a record with this key was written in this run."""
        return key in self._keys

    def unique_key(self, key: str) -> str:
        """`key`, or `key-2`, `key-3`, ... when taken (source names that sanitise alike)."""
        check_key(key)
        candidate, n = key, 1
        while candidate in self._keys:
            n += 1
            candidate = f"{key}-{n}"
        return candidate

    def skip(self, reason: str, where: str, detail: str = "") -> None:
        """Count a source record the converter could not use, and log it."""
        self.skipped[reason] += 1
        level = logging.WARNING if self.skipped[reason] <= _MAX_WARNINGS_PER_REASON else logging.DEBUG
        log.log(level, "%s: skipped %s (%s)%s", self.dataset, where, reason, f": {detail}" if detail else "")
        if self.skipped[reason] == _MAX_WARNINGS_PER_REASON:
            log.warning("%s: further '%s' skips are logged at DEBUG level only", self.dataset, reason)

    # --- shards --------------------------------------------------------------------
    def _shard_name(self, index: int) -> str:
        return f"{self.prefix}-{index:06d}.tar"

    def _open_shard(self) -> None:
        name = self._shard_name(len(self._shards))
        self._tmp = self.out_dir / f".{name}.tmp"
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.GNU_FORMAT)
        self._cur = {"file": name, "items": 0, "bytes": 0, "modalities": Counter()}

    def _finish_shard(self) -> None:
        assert self._tar is not None and self._tmp is not None
        self._tar.close()
        with open(self._tmp, "rb") as f:
            os.fsync(f.fileno())
        final = self.out_dir / self._cur["file"]
        os.replace(self._tmp, final)
        self._shards.append({
            "file": self._cur["file"],
            "items": self._cur["items"],
            "modalities": dict(sorted(self._cur["modalities"].items())),
            "bytes": final.stat().st_size,
            "sha256": _sha256(final),
            "first_key": self._cur.get("first_key"),
            "last_key": self._cur.get("last_key"),
        })
        log.debug("wrote %s (%d items)", final, self._cur["items"])
        self._tar, self._tmp, self._cur = None, None, {}

    def abort(self) -> None:
        """Drop the shard being written; leave no manifest."""
        if self._tar is not None:
            self._tar.close()
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
        self._tar, self._tmp, self._closed = None, None, True

    def close(self) -> dict[str, Any]:
        """Finish the last shard, delete stale shards, write and return the manifest."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        if self._tar is not None:
            self._finish_shard()
        self._closed = True
        written = {s["file"] for s in self._shards}
        stale = re.compile(rf"^{re.escape(self.prefix)}-\d{{6}}\.tar$")
        for path in sorted(self.out_dir.iterdir()):
            if stale.match(path.name) and path.name not in written:
                log.warning("removing %s, a shard of an earlier conversion that this one did not rewrite", path)
                path.unlink()
        manifest = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "dataset": self.dataset,
            "source": self.source,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.monotonic() - self._start, 2),
            "prefix": self.prefix,
            "max_items_per_shard": self.max_items,
            "items": self.items,
            "modalities": dict(sorted(self.modalities.items())),
            "skipped": dict(sorted(self.skipped.items())),
            "skipped_total": sum(self.skipped.values()),
            "notes": self.notes,
            "options": self.options,
            "shards": self._shards,
        }
        write_json_atomic(self.out_dir / MANIFEST_FILE, manifest)
        if self.skipped:
            log.warning("%s: %d records written, %d skipped %s", self.dataset, self.items,
                        sum(self.skipped.values()), dict(self.skipped))
        else:
            log.debug("%s: %d records written in %d shards to %s", self.dataset, self.items, len(self._shards), self.out_dir)
        return manifest

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    """The folder's `shards.json`, or None when there is none (e.g. img2dataset output)."""
    path = Path(folder) / MANIFEST_FILE
    if not path.exists():
        return None
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path}: not a {MANIFEST_FORMAT} manifest")
    return manifest


# ----------------------------------------------------------------------------- reader


@dataclass
class ReadStats:
    """What a read saw. `skipped` counts records by reason; `shard_errors` counts events
    that lose an unknown number of records (unreadable shard, truncation, corrupt region)."""

    shards: int = 0  # shards opened
    records: int = 0  # records yielded
    skipped: Counter[str] = field(default_factory=Counter)
    shard_errors: Counter[str] = field(default_factory=Counter)
    failed_shards: list[str] = field(default_factory=list)  # shards with any shard error
    per_shard: dict[str, int] = field(default_factory=dict)  # records yielded per shard

    @property
    def ok(self) -> bool:
        return not self.skipped and not self.shard_errors

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["skipped"] = dict(sorted(self.skipped.items()))
        d["shard_errors"] = dict(sorted(self.shard_errors.items()))
        return d


ImageCheck = Literal["verify", "decode", "none"]


class _Skip(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def is_url(text: str) -> bool:
    """A shard name WebDataset opens as a stream (http(s)://, pipe:, gs://, ...), not a local path."""
    return text.startswith("pipe:") or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", text) is not None \
        and not text.startswith("file://")


def fetch_shard(url: str, folder: str | None = None) -> Path:
    """Copy the shard at `url` into a temporary file (the reader seeks to find corrupt regions;
    streams cannot). Raises OSError naming the URL when the stream fails."""
    import shutil
    import tempfile

    from webdataset.gopen import gopen

    fd, name = tempfile.mkstemp(prefix="genius-shard-", suffix=".tar", dir=folder)
    try:
        with os.fdopen(fd, "wb") as out:
            stream = gopen(url, "rb")
            try:
                shutil.copyfileobj(stream, out, 1 << 20)
            finally:
                stream.close()  # a pipe's exit status is checked here
    except Exception as e:
        Path(name).unlink(missing_ok=True)
        raise OSError(f"{url}: cannot fetch the shard: {e}") from e
    return Path(name)


class ShardReader:
    """Iterate over the records of WebDataset shards; `stats` says what was read and skipped.

    `paths`: shard files, folders (their `shards.json` when present, else every
    ``*.tar``/``*.tar.gz`` in them), brace patterns like ``data-{000000..000009}.tar``, or URLs
    WebDataset opens (``https://host/data-{000000..000009}.tar``, ``pipe:aws s3 cp s3://b/x.tar -``).
    `check_images`: 'verify' checks each image's structure and checksums without decoding
    pixels (cheap), 'decode' decodes it with the encoders' size bound, 'none' trusts it.
    Keys are checked for duplicates within a shard only (a global set would not scale).
    """

    def __init__(
        self,
        paths: str | Path | Iterable[str | Path],
        *,
        check_images: ImageCheck = "verify",
        max_pixels: int | None = None,
        stats: ReadStats | None = None,
    ) -> None:
        if check_images not in ("verify", "decode", "none"):
            raise ValueError(f"check_images must be 'verify', 'decode' or 'none', got {check_images!r}")
        self.check_images = check_images
        self.max_pixels = max_pixels
        self.stats = stats if stats is not None else ReadStats()
        self.expected: dict[str, int] = {}  # shard → item count from a manifest
        self.paths = self._resolve(paths)

    # --- shard list ----------------------------------------------------------------
    def _resolve(self, paths: str | Path | Iterable[str | Path]) -> list[Path | str]:
        """Local shards as Paths, URLs as strings (a Path would fold their '//')."""
        if isinstance(paths, (str, Path)):
            paths = [paths]
        out: list[Path | str] = []
        for p in paths:
            text = str(p)
            if "{" in text and ".." in text:
                import braceexpand  # a WebDataset dependency

                out.extend(x if is_url(x) else Path(x) for x in braceexpand.braceexpand(text))
                continue
            if isinstance(p, str) and is_url(p):
                out.append(p)  # an unreachable URL is reported when read, not here
                continue
            path = Path(p)
            if not path.is_dir():
                out.append(path)  # a missing file is reported when read, not here
                continue
            manifest = read_manifest(path)
            if manifest is not None:
                for shard in manifest["shards"]:
                    out.append(path / shard["file"])
                    self.expected[str(path / shard["file"])] = int(shard["items"])
            else:
                found = sorted(q for q in path.iterdir()
                               if q.name.endswith(SHARD_SUFFIXES) and not q.name.startswith("."))
                if not found:
                    log.warning("%s: no shards (*.tar) in this folder", path)
                out.extend(found)
        return out

    # --- records -------------------------------------------------------------------
    def __iter__(self) -> Iterator[Record]:
        for path in self.paths:
            yield from self._read_shard(path)

    def _shard_error(self, path: Path, reason: str, detail: str) -> None:
        self.stats.shard_errors[reason] += 1
        if str(path) not in self.stats.failed_shards:
            self.stats.failed_shards.append(str(path))
        log.error("%s: %s: %s", path, reason, detail)

    def _skip(self, path: Path, key: str, reason: str, detail: str, counts: Counter[str]) -> None:
        self.stats.skipped[reason] += 1
        counts[reason] += 1
        level = logging.WARNING if counts[reason] <= _MAX_WARNINGS_PER_REASON else logging.DEBUG
        log.log(level, "%s: skipped record %r (%s): %s", path, key, reason, detail)

    def _read_shard(self, path: Path | str) -> Iterator[Record]:
        if not is_url(str(path)):
            yield from self._read_tar(path, path)
            return
        try:
            local = fetch_shard(str(path))
        except Exception as e:  # noqa: BLE001 - unreachable host, 404, failing pipe command, ...
            self._shard_error(path, "unreadable_shard", str(e))
            return
        try:
            yield from self._read_tar(local, path)
        finally:
            local.unlink(missing_ok=True)

    def _read_tar(self, local: Path | str, path: Path | str) -> Iterator[Record]:
        """Records of the tar file `local`; messages and sources name the shard `path`."""
        try:
            tar = tarfile.open(local, "r:*", ignore_zeros=True)  # ignore_zeros: resync after a bad header
        except Exception as e:  # noqa: BLE001 - missing, not a tar, bad gzip, ...
            self._shard_error(path, "unreadable_shard", str(e))
            return
        self.stats.shards += 1
        counts: Counter[str] = Counter()  # this shard's skips, to rate-limit its warnings
        seen: set[str] = set()
        yielded = 0
        key: str | None = None
        members: dict[str, bytes] = {}
        damage: tuple[str, str] | None = None  # why the record being gathered is unusable
        damage_next: tuple[str, str] | None = None  # for the record after a corrupt region
        end = 0  # where the last good member's data ended

        def finish() -> Record | None:
            if key is None:
                return None
            if damage is not None:
                self._skip(path, key, damage[0], damage[1], counts)
                return None
            try:
                return self._make_record(key, members, str(path))
            except _Skip as s:
                self._skip(path, key, s.reason, s.detail, counts)
                return None

        with tar:
            broken = False
            while True:
                try:
                    info = tar.next()
                except Exception as e:  # noqa: BLE001 - ReadError, EOFError, zlib.error...: never stop the job
                    # Nothing after this point can be located: the record being gathered
                    # may lack members that were past the break.
                    self._shard_error(path, "truncated_shard", f"after key {key!r} at byte {end}: {e}")
                    damage = damage or ("truncated_shard", f"shard breaks off after this record's members: {e}")
                    broken = True
                    break
                if info is None:
                    break
                if info.offset > end and not _is_zeros(tar.fileobj, end, info.offset):  # resynced past junk
                    self._shard_error(path, "corrupt_region", f"unreadable bytes {end}..{info.offset} between "
                                      f"key {key!r} and member {info.name!r}")
                    # The lost bytes may have held members of either neighbouring record.
                    damage = damage or ("corrupt_region", f"next to unreadable bytes {end}..{info.offset}")
                    damage_next = ("corrupt_region", f"next to unreadable bytes {end}..{info.offset}")
                end = tar.offset
                if not info.isreg():
                    continue  # directories and links carry no record data
                match = _MEMBER_NAME.match(info.name)
                if match is None:
                    log.debug("%s: ignoring member %r (no extension)", path, info.name)
                    continue
                mkey, ext = match.group(1), match.group(2).lower()
                if mkey != key:
                    record = finish()
                    if record is not None:
                        yielded += 1
                        yield record
                    key, members, damage = mkey, {}, None
                    if damage_next is not None:
                        damage, damage_next = damage_next, None
                    if mkey in seen:
                        damage = ("duplicate_key", "key appears twice in this shard")
                    seen.add(mkey)
                elif damage_next is not None:  # region fell inside this record
                    damage, damage_next = damage or damage_next, None
                if ext in members:
                    damage = damage or ("duplicate_member", f"two members named {info.name!r}")
                    continue
                try:
                    f = tar.extractfile(info)
                    data = f.read() if f is not None else b""
                except Exception as e:  # noqa: BLE001 - as above
                    damage = damage or ("truncated_member", f"{info.name}: {e}")
                    continue
                if len(data) != info.size:
                    damage = damage or ("truncated_member", f"{info.name}: {len(data)} of {info.size} bytes")
                    continue
                members[ext] = data
            # tarfile stops quietly at a cut or garbled header: the archive must end in
            # zero blocks (its end marker), else the last record may lack members.
            try:
                tail = "ok" if broken else _tail_state(tar.fileobj, end)
            except Exception as e:  # noqa: BLE001 - e.g. a gzip stream that breaks off
                tail = f"unreadable end ({e})"
            if tail != "ok" and end == 0:
                self._shard_error(path, "unreadable_shard", f"no tar member found ({tail})")
            elif tail != "ok":
                self._shard_error(path, "truncated_shard", f"{tail} after byte {end} (after key {key!r})")
                damage = damage or ("truncated_shard", f"last record before the shard's {tail}")
            record = finish()
            if record is not None:
                yielded += 1
                yield record
        self.stats.records += yielded
        self.stats.per_shard[str(path)] = yielded
        expected = self.expected.get(str(path))
        if expected is not None and yielded != expected and not counts and str(path) not in self.stats.failed_shards:
            # Fewer records than the manifest says and no reason seen: still not silent.
            self._shard_error(path, "count_mismatch", f"{yielded} records read, the manifest lists {expected}")

    def _make_record(self, key: str, members: dict[str, bytes], shard: str) -> Record:
        record = Record(key=key, shard=shard)
        for ext, data in members.items():
            if ext == "json":
                try:
                    meta = json.loads(data.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise _Skip("bad_json", str(e)) from None
                if not isinstance(meta, dict):
                    raise _Skip("bad_json", f"metadata is a JSON {type(meta).__name__}, not an object")
                record.meta = meta
            elif ext in TEXT_EXTS and record.text is None:
                record.text = self._check_text(data)
            elif ext in IMAGE_EXTS and record.image is None:
                self._check_image(data)
                record.image, record.image_ext = data, ext
            else:
                record.extra[ext] = data
        if record.image is None and record.text is None:
            raise _Skip("no_content", f"neither image nor text among members {sorted(members)}")
        return record

    @staticmethod
    def _check_text(data: bytes) -> str:
        from genius.encoders import validate_text

        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _Skip("bad_text", f"not UTF-8: {e}") from None
        try:
            return validate_text(text)
        except ValueError as e:
            raise _Skip("bad_text", str(e)) from None

    def _check_image(self, data: bytes) -> None:
        if self.check_images == "none":
            return
        from PIL import Image

        from genius.encoders import DEFAULT_MAX_IMAGE_PIXELS, decode_image_bytes

        max_pixels = self.max_pixels or DEFAULT_MAX_IMAGE_PIXELS
        if self.check_images == "decode":
            try:
                decode_image_bytes(data, max_pixels)
            except ValueError as e:
                raise _Skip("bad_image", str(e)) from None
            return
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data)) as image:
                    image.verify()  # PNG: every chunk's CRC; JPEG/others: the headers
        except Image.DecompressionBombError as e:
            raise _Skip("image_too_large", str(e)) from None
        except Exception as e:  # PIL raises many types for bad data
            raise _Skip("bad_image", f"{type(e).__name__}: {e}") from None


def _tail_state(fileobj: Any, start: int) -> str:
    """'ok' when the bytes after the last member are zeros holding at least the two-block
    end marker; else why not."""
    fileobj.seek(start)
    size = 0
    while chunk := fileobj.read(1 << 20):
        if chunk.count(0) != len(chunk):
            return "unreadable bytes"
        size += len(chunk)
    return "ok" if size >= 2 * tarfile.BLOCKSIZE else "no end-of-archive marker"


def _is_zeros(fileobj: Any, start: int, stop: int) -> bool:
    """Whether bytes [start, stop) of the archive are all zero (end markers of tars
    concatenated into one shard) rather than junk that tarfile skipped."""
    fileobj.seek(start)
    left = stop - start
    while left > 0:
        chunk = fileobj.read(min(left, 1 << 20))
        if not chunk:
            return True
        if chunk.count(0) != len(chunk):
            return False
        left -= len(chunk)
    return True


def iter_shards(
    paths: str | Path | Iterable[str | Path],
    *,
    stats: ReadStats | None = None,
    check_images: ImageCheck = "verify",
    max_pixels: int | None = None,
) -> Iterator[Record]:
    """Records of the given shards (see `ShardReader`); pass `stats` to get the counts."""
    return iter(ShardReader(paths, check_images=check_images, max_pixels=max_pixels, stats=stats))
