"""Writing a new index version beside the published ones and publishing it atomically.

A writer fills a staging folder (`INDEX/.staging-<random>/`), then under the index's lock:
checks that nobody published since it started (its parent is still CURRENT), writes the
manifest with every file's size and sha256, renames the folder to `v-<n>` and swaps CURRENT
by atomic rename. A crash before the swap leaves CURRENT on the last published version (the
staging folder is left for `gc`); a reader that opened a version keeps reading it: versions
are never modified, and old ones are only removed by `gc`.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from genius.atomic import write_atomic
from genius.errors import GeniusError
from genius.store.layout import (
    CURRENT, ITEMS_DIR, MODEL_DIR, STAGING_PREFIX, TRIE_DIR, VECTORS_DIR, fsync_dir, list_versions,
    read_current, version_name, version_number,
)
from genius.store.manifest import Manifest, file_entries

log = logging.getLogger(__name__)
LOCK = ".lock"


class PublishConflictError(GeniusError, RuntimeError):
    """Another writer published a version after this one started from its parent."""


@contextlib.contextmanager
def index_lock(root: Path) -> Iterator[None]:
    """Exclusive lock on the index folder while a version number is taken and CURRENT swapped."""
    with open(root / LOCK, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def current_number(root: str | os.PathLike) -> int | None:
    name = read_current(root)
    return None if name is None else version_number(name)


class VersionWriter:
    """A version under construction. Use as a context manager: an exception discards it."""

    def __init__(self, root: str | os.PathLike, parent: int | None | str = "current", name: str | None = None):
        """`name`: a fixed staging folder name (a resumable job reuses its folder and what is in
        it); by default a random one."""
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.parent = current_number(self.root) if parent == "current" else parent
        self.path = self.root / f"{STAGING_PREFIX}{name or uuid.uuid4().hex}"
        self.path.mkdir(exist_ok=name is not None)
        for sub in (MODEL_DIR, TRIE_DIR, ITEMS_DIR, VECTORS_DIR):
            (self.path / sub).mkdir(exist_ok=True)
        self.published: Path | None = None

    def __enter__(self) -> "VersionWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or self.published is None:
            self.discard()

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def link(self, source: str | os.PathLike, relpath: str) -> None:
        """Reuse an unchanged file of another version (hard link; a copy across file systems)."""
        target = self.path / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)

    def publish(self, manifest: Manifest, check_parent: bool = True) -> Path:
        """Checksum every file, write the manifest, rename to v-<n> and point CURRENT at it."""
        manifest.parent = self.parent
        manifest.files = file_entries(self.path)
        manifest.created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        for sub in sorted({p.parent for p in self.path.rglob("*") if p.is_file()}):
            fsync_dir(sub)
        with index_lock(self.root):
            current = current_number(self.root)
            if check_parent and current != self.parent:
                raise PublishConflictError(
                    f"{self.root}: {version_name(current) if current is not None else 'nothing'} was published "
                    f"after this update started from {version_name(self.parent) if self.parent is not None else 'an empty index'}; "
                    "reopen the index and apply the update again")
            number = max([*list_versions(self.root), -1]) + 1
            manifest.version = number
            manifest.write(self.path)
            target = self.root / version_name(number)
            os.rename(self.path, target)  # target cannot exist: numbers are taken under the lock
            fsync_dir(self.root)
            write_atomic(self.root / CURRENT, lambda f: f.write(f"{version_name(number)}\n".encode()))
            fsync_dir(self.root)
        self.published = target
        log.info("published %s (parent %s, %d files)", target, self.parent, len(manifest.files))
        return target


def gc(root: str | os.PathLike, keep: int = 2, staging_age_s: float = 3600.0) -> list[Path]:
    """Remove all but the newest `keep` versions (never CURRENT's) and staging folders not
    touched for `staging_age_s` seconds (a younger one may belong to a running writer).

    Readers that still hold a removed version keep working on Linux (open and memory-mapped
    files outlive their names), but a process that has not opened its files yet loses them:
    run gc when no reader is starting on an old version."""
    root = Path(root)
    removed = []
    with index_lock(root):
        current = current_number(root)
        versions = list_versions(root)
        keep_set = set(versions[-keep:]) if keep > 0 else set()
        if current is not None:
            keep_set.add(current)
        for path in sorted(root.iterdir()):
            number = version_number(path.name)
            abandoned = path.name.startswith(STAGING_PREFIX) and time.time() - path.stat().st_mtime >= staging_age_s
            stale = abandoned or (number is not None and number not in keep_set)
            if stale and path.is_dir():
                shutil.rmtree(path)
                removed.append(path)
    return removed
