"""Incremental updates of a published index: add items, delete items by key, compact.

Each update writes a new version beside the current one and publishes it (genius.store.publish):
files it does not change are hard-linked from the parent version, the trie partitions it
touches are re-merged (old rows + new rows, sorted by (ID, item number); or old rows minus
deleted ones). The result searches exactly like an index built from scratch from the same
items with the same model: `add` numbers new items after the existing ones, `delete` keeps
the numbers (its tombstones, `deletes.npy`, are skipped by search and key lookups) and
`compact` renumbers the survivors in order and drops the tombstones.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from genius.errors import GeniusError
from genius.idcodec import IdCodec, sort_order
from genius.modality import Modality
from genius.store.data_files import (
    item_table_path, split_range, vector_shard_path, write_deletes,
)
from genius.store.item_table import make_table, write_item_table
from genius.store.layout import TRIE_DIR
from genius.store.manifest import Manifest, RangeFile
from genius.store.merge import partition_bounds
from genius.store.publish import VersionWriter
from genius.store.reader import StoreVersion, open_version
from genius.store.vector_shards import write_vector_shard
from genius.trie import TriePartition, build_partition, read_partition, write_partition

log = logging.getLogger(__name__)


class KeyConflictError(GeniusError, ValueError):
    """Keys that an update cannot take: already present (add) or absent (delete)."""


def _partition_id(entry: dict) -> tuple[int, int]:
    return int(Modality.parse(entry["modality"])), int(entry["code_lo"])


def _uses_modality_code(manifest: Manifest) -> bool:
    return bool(manifest.config.get("quantizer", {}).get("use_modality_code", True))


def _ranges_per_modality(manifest: Manifest) -> int:
    return int(manifest.config.get("ranges_per_modality", 1))


def _partition_of(manifest: Manifest, codec: IdCodec, modality: np.ndarray, ids: np.ndarray) -> list[tuple[int, int, int]]:
    """(code 0, code_lo, code_hi) of the partition each row belongs in."""
    code0 = modality if _uses_modality_code(manifest) else np.zeros_like(modality)
    bounds = partition_bounds(codec.codebook_size, _ranges_per_modality(manifest))
    r = np.searchsorted(bounds, codec.code_at(ids, 0).astype(np.int64), side="right") - 1
    return [(int(c), int(bounds[i]), int(bounds[i + 1])) for c, i in zip(code0, r)]


def _link_unchanged(writer: VersionWriter, version: StoreVersion, skip: set[str]) -> None:
    for rel in version.manifest.files:
        if rel not in skip:
            writer.link(version.path / rel, rel)


def _partition_files(entry: dict) -> set[str]:
    return {f"{TRIE_DIR}/{name}" for name in entry["files"].values()}


def _rewrite_partition(writer: VersionWriter, codec: IdCodec, key: tuple[int, int, int], ids: np.ndarray,
                       items: np.ndarray) -> dict | None:
    """Sort rows by (ID, item number), write the partition; None when no row is left."""
    if len(ids) == 0:
        return None
    order = sort_order(ids, tiebreak=items)
    part = build_partition(codec, Modality(key[0]), key[1], key[2], ids[order], items[order])
    return write_partition(writer.path / TRIE_DIR, part, codec)


def _entries_sorted(entries: list[dict]) -> list[dict]:
    return sorted(entries, key=_partition_id)


def _live(version: StoreVersion, items: np.ndarray) -> np.ndarray:
    return ~np.isin(items, version.deleted)


# ----------------------------------------------------------------------------- add


def add_items(
    root: str | os.PathLike,
    keys: Sequence[str],
    modality: np.ndarray,
    ids: np.ndarray,
    vectors: np.ndarray | None = None,
    source: Sequence[str | None] | None = None,
    metadata: Sequence[str | None] | None = None,
) -> Path:
    """Publish a version with these items added (numbered after the existing ones)."""
    version = open_version(root)
    manifest, codec = version.manifest, version.codec
    keys = list(keys)
    modality = np.asarray(modality, dtype=np.int64)
    ids = np.ascontiguousarray(ids, dtype=np.uint8)
    m = len(keys)
    if m == 0:
        raise ValueError("no items to add")
    if ids.shape != (m, codec.width) or len(modality) != m:
        raise ValueError(f"{m} keys need ids of shape ({m}, {codec.width}) and {m} modalities, "
                         f"got {ids.shape} and {len(modality)}")
    _check_new_keys(version, keys)
    if version.vectors is not None:
        if vectors is None:
            raise ValueError("this index stores re-ranking vectors: give the new items' vectors too")
        vectors = np.asarray(vectors)
        if vectors.shape != (m, manifest.embed_dim):
            raise ValueError(f"vectors must have shape ({m}, {manifest.embed_dim}), got {vectors.shape}")
    start = manifest.num_items
    numbers = np.arange(start, start + m, dtype=np.int64)
    where = _partition_of(manifest, codec, modality, ids)
    touched = {key for key in set(where)}
    entries = {_partition_id(e): e for e in manifest.partitions}
    skip = set().union(*[_partition_files(entries[(c0, lo)]) for c0, lo, _ in touched if (c0, lo) in entries])
    per_file = int(manifest.config.get("items_per_file", 1 << 20))
    with VersionWriter(root, parent=manifest.version) as writer:
        _link_unchanged(writer, version, skip)
        new_entries = {k: e for k, e in entries.items() if not any((c0, lo) == k for c0, lo, _ in touched)}
        rows_of = {}
        for row, key in enumerate(where):
            rows_of.setdefault(key, []).append(row)
        for key, rows in sorted(rows_of.items()):
            rows = np.asarray(rows)
            old_ids, old_items = _partition_rows(version, entries.get(key[:2]))
            entry = _rewrite_partition(writer, codec, key, np.concatenate([old_ids, ids[rows]]),
                                       np.concatenate([old_items, numbers[rows]]))
            new_entries[key[:2]] = entry
        item_tables, vector_shards = list(manifest.item_tables), list(manifest.vector_shards)
        table = make_table(keys, modality, ids, source, metadata)
        for lo, hi in split_range(start, start + m, per_file):
            rel = item_table_path(lo, hi)
            write_item_table(writer.path / rel, table.slice(lo - start, hi - lo))
            item_tables.append(RangeFile(lo, hi, rel))
            if vectors is not None and version.vectors is not None:
                rel = vector_shard_path(lo, hi)
                write_vector_shard(writer.path / rel, vectors[lo - start : hi - start])
                vector_shards.append(RangeFile(lo, hi, rel))
        counts = dict(manifest.modality_counts)
        for value, c in zip(*np.unique(modality, return_counts=True)):
            name = Modality(int(value)).name.lower()
            counts[name] = counts.get(name, 0) + int(c)
        new = _next_manifest(manifest, partitions=_entries_sorted(list(new_entries.values())),
                             item_tables=item_tables, vector_shards=vector_shards, num_items=start + m,
                             modality_counts=counts)
        path = writer.publish(new)
    log.info("added %d items (%d..%d) to %s -> %s", m, start, start + m - 1, root, path.name)
    return path


def _check_new_keys(version: StoreVersion, keys: list[str]) -> None:
    seen: dict[str, int] = {}
    for row, key in enumerate(keys):
        if not isinstance(key, str) or key == "":
            raise KeyConflictError(f"new item {row}: key is empty")
        if key in seen:
            raise KeyConflictError(f"duplicate key {key!r}: new items {seen[key]} and {row}")
        seen[key] = row
    present = {k: [i for i in v if _live(version, np.array([i]))[0]] for k, v in version.items.find_keys(keys).items()}
    present = {k: v for k, v in present.items() if v}
    if present:
        sample = ", ".join(f"{k!r} (item {v[0]})" for k, v in list(present.items())[:5])
        raise KeyConflictError(f"{len(present)} keys are already in the index: {sample}; delete them first")


def _partition_rows(version: StoreVersion, entry: dict | None) -> tuple[np.ndarray, np.ndarray]:
    codec = version.codec
    if entry is None:
        return np.zeros((0, codec.width), dtype=np.uint8), np.zeros(0, dtype=np.int64)
    part: TriePartition = read_partition(version.path / TRIE_DIR, entry, codec)
    return np.asarray(part.ids), np.asarray(part.items).astype(np.int64)


def _next_manifest(manifest: Manifest, **changes) -> Manifest:
    data = manifest.to_dict()
    data.update({k: v for k, v in changes.items() if k not in ("item_tables", "vector_shards")})
    data["item_tables"] = [vars(r) for r in changes.get("item_tables", manifest.item_tables)]
    data["vector_shards"] = [vars(r) for r in changes.get("vector_shards", manifest.vector_shards)]
    data["files"] = {}
    return Manifest.from_dict(data)


# ----------------------------------------------------------------------------- delete


def delete_keys(root: str | os.PathLike, keys: Sequence[str], missing_ok: bool = False) -> Path:
    """Publish a version without the items of these keys (tombstones + re-merged partitions)."""
    version = open_version(root)
    manifest, codec = version.manifest, version.codec
    found = version.items.find_keys(list(keys))
    numbers = np.array(sorted(i for v in found.values() for i in v), dtype=np.int64)
    numbers = numbers[_live(version, numbers)]
    live_keys = set(version.items.keys(numbers))
    absent = [k for k in dict.fromkeys(keys) if k not in live_keys]
    if absent and not missing_ok:
        sample = ", ".join(repr(k) for k in absent[:5])
        raise KeyConflictError(f"{len(absent)} keys are not in the index: {sample}")
    if len(numbers) == 0:
        raise KeyConflictError("none of the keys is in the index: nothing to delete")
    modality = version.items.modality(numbers)
    where = set(_partition_of(manifest, codec, modality, version.items.ids(numbers)))
    entries = {_partition_id(e): e for e in manifest.partitions}
    skip = set().union(*[_partition_files(entries[(c0, lo)]) for c0, lo, _ in where])
    if manifest.deletes:
        skip.add(manifest.deletes)
    deleted = np.union1d(version.deleted, numbers).astype(np.int64)
    with VersionWriter(root, parent=manifest.version) as writer:
        _link_unchanged(writer, version, skip)
        new_entries = {k: e for k, e in entries.items() if k not in {(c0, lo) for c0, lo, _ in where}}
        for key in sorted(where):
            ids, items = _partition_rows(version, entries[key[:2]])
            keep = ~np.isin(items, numbers)
            entry = _rewrite_partition(writer, codec, key, ids[keep], items[keep])
            if entry is not None:
                new_entries[key[:2]] = entry
        counts = dict(manifest.modality_counts)
        for value, c in zip(*np.unique(modality, return_counts=True)):
            name = Modality(int(value)).name.lower()
            counts[name] -= int(c)
        new = _next_manifest(manifest, partitions=_entries_sorted(list(new_entries.values())),
                             deletes=write_deletes(writer.path, deleted), num_deleted=len(deleted),
                             modality_counts={k: v for k, v in counts.items() if v})
        path = writer.publish(new)
    log.info("deleted %d items from %s -> %s", len(numbers), root, path.name)
    return path


# ----------------------------------------------------------------------------- compact


def compact(root: str | os.PathLike) -> Path | None:
    """Publish a version without tombstones: survivors renumbered in order, tables rewritten.
    Returns None when there is nothing to compact."""
    version = open_version(root)
    manifest, codec = version.manifest, version.codec
    deleted = np.asarray(version.deleted)
    if len(deleted) == 0:
        log.info("%s has no deleted items: nothing to compact", root)
        return None
    renumber = lambda old: old - np.searchsorted(deleted, old)  # noqa: E731  (survivors keep their order)
    per_file = int(manifest.config.get("items_per_file", 1 << 20))
    with VersionWriter(root, parent=manifest.version) as writer:
        _link_unchanged(writer, version, {rel for rel in manifest.files if not rel.startswith("model/")})
        partitions = []
        for entry in manifest.partitions:
            ids, items = _partition_rows(version, entry)
            keep = _live(version, items)
            key = (*_partition_id(entry), int(entry["code_hi"]))
            part = build_partition(codec, Modality(key[0]), key[1], key[2], ids[keep], renumber(items[keep]))
            partitions.append(write_partition(writer.path / TRIE_DIR, part, codec))
        item_tables, vector_shards = _compact_ranges(writer, version, deleted, per_file)
        new = _next_manifest(manifest, partitions=partitions, item_tables=item_tables, vector_shards=vector_shards,
                             num_items=manifest.num_items - len(deleted), num_deleted=0, deletes=None)
        path = writer.publish(new)
    log.info("compacted %s: %d tombstones dropped -> %s", root, len(deleted), path.name)
    return path


def _compact_ranges(writer: VersionWriter, version: StoreVersion, deleted: np.ndarray,
                    per_file: int) -> tuple[list[RangeFile], list[RangeFile]]:
    """Rewrite item tables (and vector shards) without deleted rows, one source range at a time."""
    item_tables, vector_shards = [], []
    new_start = 0
    vectors = version.vectors
    for start, table in version.items.scan():
        end = start + table.num_rows
        dead = deleted[(deleted >= start) & (deleted < end)] - start
        keep = np.setdiff1d(np.arange(table.num_rows), dead)
        kept = table.take(pa.array(keep)) if len(dead) else table
        for lo, hi in split_range(new_start, new_start + len(keep), per_file):
            rel = item_table_path(lo, hi)
            write_item_table(writer.path / rel, kept.slice(lo - new_start, hi - lo))
            item_tables.append(RangeFile(lo, hi, rel))
            if vectors is not None:
                rel = vector_shard_path(lo, hi)
                write_vector_shard(writer.path / rel, vectors[start + keep[lo - new_start : hi - new_start]])
                vector_shards.append(RangeFile(lo, hi, rel))
        new_start += len(keep)
    return item_tables, vector_shards
