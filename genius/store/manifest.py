"""The manifest of one index version: what the version holds and every file's size and sha256.

Opening an index reads only this file and stats the files it lists (O(files)); `verify`
reads every byte and compares checksums.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from genius.atomic import write_json_atomic
from genius.store.layout import FORMAT_VERSION, MANIFEST, IndexFormatError

CHUNK = 1 << 22


@dataclass
class RangeFile:
    """A file that holds items [start, end) by item number: an item table or a vector shard."""

    start: int
    end: int
    file: str  # relative to the version folder

    def __len__(self) -> int:
        return self.end - self.start


@dataclass
class Manifest:
    version: int
    parent: int | None
    config: dict[str, Any]  # IndexConfig.to_dict()
    embed_dim: int
    num_levels: int
    codebook_size: int
    id_width: int
    num_items: int  # size of the item-number space: item numbers lie in [0, num_items)
    num_deleted: int
    modality_counts: dict[str, int]  # live items per modality name
    partitions: list[dict[str, Any]]  # trie partition entries (genius.trie.write_partition)
    item_tables: list[RangeFile]
    vector_shards: list[RangeFile]
    deletes: str | None  # file of sorted deleted item numbers, or None
    has_encoder: bool
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # relpath -> {size, sha256}
    created: str = ""
    format_version: int = FORMAT_VERSION

    @property
    def num_live(self) -> int:
        return self.num_items - self.num_deleted

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Manifest":
        data = dict(data)
        data["item_tables"] = [RangeFile(**r) for r in data["item_tables"]]
        data["vector_shards"] = [RangeFile(**r) for r in data["vector_shards"]]
        return cls(**data)

    def write(self, version_dir: str | os.PathLike) -> None:
        write_json_atomic(Path(version_dir) / MANIFEST, self.to_dict())

    @classmethod
    def read(cls, version_dir: str | os.PathLike) -> "Manifest":
        path = Path(version_dir) / MANIFEST
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise IndexFormatError(f"{path}: damaged manifest ({exc})") from None
        found = data.get("format_version") if isinstance(data, dict) else None
        if found != FORMAT_VERSION:
            raise IndexFormatError(f"{path}: format version {found}, this genius reads format version {FORMAT_VERSION}")
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError) as exc:
            raise IndexFormatError(f"{path}: damaged manifest ({exc})") from None


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_entries(version_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """{relative path: {size, sha256}} of every file under the folder except the manifest."""
    version_dir = Path(version_dir)
    out = {}
    for path in sorted(p for p in version_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(version_dir).as_posix()
        if rel == MANIFEST:
            continue
        out[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    return out


def check_sizes(version_dir: str | os.PathLike, manifest: Manifest) -> None:
    """Every listed file exists with its recorded size (cheap: one stat per file)."""
    version_dir = Path(version_dir)
    for rel, entry in manifest.files.items():
        path = version_dir / rel
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise IndexFormatError(f"{path}: missing (listed in {version_dir / MANIFEST})") from None
        if size != entry["size"]:
            raise IndexFormatError(f"{path}: {size} bytes, the manifest says {entry['size']}: the file is damaged "
                                   f"(run `genius index verify {version_dir.parent}`)")


@dataclass
class FileProblem:
    file: str
    problem: str

    def __str__(self) -> str:
        return f"{self.file}: {self.problem}"


def verify_files(version_dir: str | os.PathLike, manifest: Manifest) -> list[FileProblem]:
    """Compare every listed file's size and sha256 with the manifest; list extra files too."""
    version_dir = Path(version_dir)
    problems = []
    for rel, entry in sorted(manifest.files.items()):
        path = version_dir / rel
        if not path.is_file():
            problems.append(FileProblem(rel, "missing"))
            continue
        size = path.stat().st_size
        if size != entry["size"]:
            problems.append(FileProblem(rel, f"size {size}, expected {entry['size']}"))
            continue
        if sha256_file(path) != entry["sha256"]:
            problems.append(FileProblem(rel, "sha256 differs from the manifest (contents damaged)"))
    listed = set(manifest.files) | {MANIFEST}
    for path in sorted(p for p in version_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(version_dir).as_posix()
        if rel not in listed:
            problems.append(FileProblem(rel, "not listed in the manifest"))
    return problems
