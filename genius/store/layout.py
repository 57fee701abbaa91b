"""Where things live in an index folder (format v2), and how a path resolves to a version.

    INDEX/
      CURRENT          name of the published version, e.g. "v-3" (swapped by atomic rename)
      v-<n>/           one immutable version: manifest.json, model/, trie/, items/, vectors/, deletes.npy
      .staging-*/      versions being written (never read; removed by `genius index gc`)

A version folder is never modified once published: updates write a new one beside it (files
that did not change are hard-linked), so a reader that opened v-<n> keeps reading it.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from genius.errors import GeniusError

FORMAT_VERSION = 2
CURRENT = "CURRENT"
MANIFEST = "manifest.json"
MODEL_DIR = "model"
TRIE_DIR = "trie"
ITEMS_DIR = "items"
VECTORS_DIR = "vectors"
DELETES = "deletes.npy"
STAGING_PREFIX = ".staging-"
LEGACY_MANIFEST = "index.json"  # format v1: one flat folder

_VERSION_RE = re.compile(r"^v-(\d+)$")


class IndexFormatError(GeniusError, ValueError):
    """An index folder (or one of its files) is missing, damaged or of another format;
    the message names the file."""


def version_name(number: int) -> str:
    return f"v-{number}"


def version_number(name: str) -> int | None:
    match = _VERSION_RE.match(name)
    return int(match.group(1)) if match else None


def list_versions(root: str | os.PathLike) -> list[int]:
    """Numbers of the published version folders under `root`, ascending."""
    root = Path(root)
    if not root.is_dir():
        return []
    numbers = [version_number(p.name) for p in root.iterdir() if p.is_dir()]
    return sorted(n for n in numbers if n is not None)


def read_current(root: str | os.PathLike) -> str | None:
    path = Path(root) / CURRENT
    if not path.exists():
        return None
    name = path.read_text(encoding="utf-8").strip()
    if version_number(name) is None:
        raise IndexFormatError(f"{path}: names {name!r}, which is not a version folder (v-<n>)")
    return name


def resolve_version(path: str | os.PathLike) -> Path:
    """The version folder a path means: INDEX (its CURRENT) or INDEX/v-<n> itself.

    A format-v1 folder, or a folder with no index, raises IndexFormatError saying which."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    current = read_current(path)
    if current is not None:
        version = path / current
        if not (version / MANIFEST).is_file():
            raise IndexFormatError(f"{path / CURRENT} points to {current}, which has no {MANIFEST}")
        return version
    legacy = path / LEGACY_MANIFEST
    if legacy.is_file():
        raise IndexFormatError(
            f"{path} is an index of format version 1 ({LEGACY_MANIFEST}); this genius reads format "
            f"version {FORMAT_VERSION}: rebuild it with `genius fit`")
    if not path.exists():
        raise FileNotFoundError(f"no index at {path}: the folder does not exist")
    raise FileNotFoundError(f"no index at {path}: no {CURRENT} file and no {MANIFEST}")


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or new entry in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
