"""Writing the data of a version (trie partitions, item tables, vector shards, deletes) into a
staging folder, from in-memory or memory-mapped sources, a range of item numbers per file."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from genius.atomic import write_atomic
from genius.idcodec import IdCodec
from genius.modality import Modality
from genius.store.item_table import SUFFIX as TABLE_SUFFIX
from genius.store.item_table import ItemTables, range_file_name, write_item_table
from genius.store.layout import DELETES, ITEMS_DIR, TRIE_DIR, VECTORS_DIR
from genius.store.manifest import RangeFile
from genius.store.vector_shards import SUFFIX as VECTOR_SUFFIX
from genius.store.vector_shards import VectorShards, write_vector_shard
from genius.trie import Trie, write_partition

DEFAULT_ITEMS_PER_FILE = 1 << 20


def item_table_path(start: int, end: int) -> str:
    return f"{ITEMS_DIR}/{range_file_name(start, end)}{TABLE_SUFFIX}"


def vector_shard_path(start: int, end: int) -> str:
    return f"{VECTORS_DIR}/{range_file_name(start, end)}{VECTOR_SUFFIX}"


def split_range(start: int, end: int, per_file: int) -> list[tuple[int, int]]:
    if per_file < 1:
        raise ValueError(f"items per file must be >= 1, got {per_file}")
    return [(s, min(s + per_file, end)) for s in range(start, end, per_file)]


def write_trie(version_dir: Path, trie: Trie) -> list[dict]:
    return [write_partition(version_dir / TRIE_DIR, part, trie.codec) for part in trie.partitions]


def write_item_tables(version_dir: Path, items: ItemTables, per_file: int) -> list[RangeFile]:
    """Copy `items` into files of at most `per_file` rows (ranges never span two sources)."""
    out = []
    for start, table in items.scan():
        for lo, hi in split_range(start, start + table.num_rows, per_file):
            rel = item_table_path(lo, hi)
            write_item_table(version_dir / rel, table.slice(lo - start, hi - lo))
            out.append(RangeFile(lo, hi, rel))
    return out


def write_vector_shards(version_dir: Path, vectors: VectorShards, per_file: int) -> list[RangeFile]:
    out = []
    for r, array in zip(vectors.ranges, vectors.arrays):
        for lo, hi in split_range(r.start, r.end, per_file):
            rel = vector_shard_path(lo, hi)
            write_vector_shard(version_dir / rel, array[lo - r.start : hi - r.start])
            out.append(RangeFile(lo, hi, rel))
    return out


def write_deletes(version_dir: Path, deleted: np.ndarray) -> str | None:
    if len(deleted) == 0:
        return None
    deleted = np.asarray(deleted, dtype=np.int64)
    if (np.diff(deleted) <= 0).any():
        raise ValueError("deleted item numbers must be sorted and distinct")
    write_atomic(version_dir / DELETES, lambda f: np.save(f, deleted))
    return DELETES


def modality_counts(items: ItemTables, deleted: np.ndarray) -> dict[str, int]:
    """Live items per modality name (a pass over the modality columns: a byte per item)."""
    counts = np.zeros(len(Modality), dtype=np.int64)
    deleted = np.asarray(deleted, dtype=np.int64)
    for start, table in items.scan():
        column = table.column("modality").combine_chunks().indices.to_numpy(zero_copy_only=False)
        counts += np.bincount(column, minlength=len(Modality))
        dead = deleted[(deleted >= start) & (deleted < start + table.num_rows)]
        if len(dead):
            counts -= np.bincount(column[dead - start], minlength=len(Modality))
    return {m.name.lower(): int(c) for m, c in zip(Modality, counts) if c}


def codec_fields(codec: IdCodec) -> dict[str, int]:
    return {"num_levels": codec.num_levels, "codebook_size": codec.codebook_size, "id_width": codec.width}
