"""Opening one published index version: O(files) work, nothing per item decoded.

The trie partitions, item tables and vector shards are memory-mapped; the manifest's file
sizes are checked (one stat per file) so that a truncated file is named at open rather than
failing a search later. `genius index verify` checks the checksums too.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from genius.idcodec import IdCodec
from genius.store.item_table import ItemTables
from genius.store.layout import TRIE_DIR, IndexFormatError, resolve_version
from genius.store.manifest import Manifest, check_sizes, verify_files
from genius.store.vector_shards import VectorShards
from genius.trie import Trie, read_partition


@dataclass
class StoreVersion:
    """The data of one version: trie, item tables, vectors and deletes (the model is loaded apart)."""

    path: Path
    manifest: Manifest
    trie: Trie
    items: ItemTables
    vectors: VectorShards | None
    deleted: np.ndarray  # sorted item numbers

    @property
    def codec(self) -> IdCodec:
        return self.trie.codec


def open_version(path: str | os.PathLike, mmap: bool = True, verify: bool = False) -> StoreVersion:
    """Open INDEX (its CURRENT version) or INDEX/v-<n>. verify=True also compares every file's
    sha256 with the manifest first (reads every byte) and names the damaged files."""
    version_dir = resolve_version(path)
    manifest = Manifest.read(version_dir)
    check_sizes(version_dir, manifest)
    if verify:
        problems = verify_files(version_dir, manifest)
        if problems:
            raise IndexFormatError(f"{version_dir}: damaged files: " + "; ".join(str(p) for p in problems))
    codec = IdCodec(manifest.num_levels, manifest.codebook_size)
    if codec.width != manifest.id_width:
        raise IndexFormatError(f"{version_dir}: ID width {manifest.id_width} does not match {codec}")
    try:
        partitions = [read_partition(version_dir / TRIE_DIR, entry, codec, mmap) for entry in manifest.partitions]
    except (ValueError, FileNotFoundError) as exc:
        raise IndexFormatError(str(exc)) from None
    trie = Trie(codec, partitions)
    items = ItemTables.open(version_dir, manifest.item_tables, manifest.id_width)
    vectors = None
    if manifest.vector_shards:
        vectors = VectorShards.open(version_dir, manifest.vector_shards, manifest.embed_dim, mmap)
    deleted = read_deletes(version_dir / manifest.deletes) if manifest.deletes else np.zeros(0, dtype=np.int64)
    if len(deleted) != manifest.num_deleted:
        raise IndexFormatError(f"{version_dir / str(manifest.deletes)}: {len(deleted)} deleted items, "
                               f"the manifest says {manifest.num_deleted}")
    return StoreVersion(version_dir, manifest, trie, items, vectors, deleted)


def read_deletes(path: Path) -> np.ndarray:
    try:
        deleted = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as exc:
        raise IndexFormatError(f"{path}: damaged deletes file ({exc})") from None
    if deleted.ndim != 1 or deleted.dtype != np.int64:
        raise IndexFormatError(f"{path}: expected a 1-D int64 array, found {deleted.dtype} {deleted.shape}")
    return deleted
