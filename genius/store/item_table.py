"""Item tables: key, modality, ID, source and metadata of items [start, end), one Arrow IPC file each.

Arrow IPC (Feather v2, uncompressed) is memory-mapped on open: opening reads a footer per
file, and a hit's key or metadata is read from the pages that hold it. Row r of the table
starting at item s is item s + r. `pandas.read_feather` and `pyarrow.feather` read the files.
(bench/store.py measures this against Parquet with a row-group index: `hit_lookup_ms`.)
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from genius.atomic import write_atomic
from genius.modality import NUM_MODALITIES, Modality
from genius.store.layout import IndexFormatError
from genius.store.manifest import RangeFile

MODALITY_NAMES = pa.array([m.name.lower() for m in Modality], pa.string())
SUFFIX = ".arrow"


def schema(id_width: int) -> pa.Schema:
    return pa.schema([
        pa.field("key", pa.string(), nullable=False),
        pa.field("modality", pa.dictionary(pa.int8(), pa.string()), nullable=False),
        pa.field("id", pa.binary(id_width), nullable=False),
        pa.field("source", pa.string()),
        pa.field("metadata", pa.string()),  # JSON text, as the shard's .json member had it
    ])


def range_file_name(start: int, end: int) -> str:
    return f"{start:012d}-{end:012d}"


def make_table(
    keys: Sequence[str] | pa.Array,
    modality: np.ndarray,
    ids: np.ndarray,
    source: Sequence[str | None] | pa.Array | None = None,
    metadata: Sequence[str | None] | pa.Array | None = None,
) -> pa.Table:
    """An item table from columns; modality as ints (genius.modality.Modality), ids (n, W) uint8."""
    ids = np.ascontiguousarray(ids, dtype=np.uint8)
    n, width = ids.shape
    modality = np.asarray(modality)
    if len(modality) != n or len(keys) != n:
        raise ValueError(f"item table columns differ in length: {len(keys)} keys, {len(modality)} modalities, {n} ids")
    if n and (modality.min() < 0 or modality.max() >= NUM_MODALITIES):
        bad = int(np.flatnonzero((modality < 0) | (modality >= NUM_MODALITIES))[0])
        raise ValueError(f"row {bad}: modality {int(modality[bad])} is not one of image, text, image_text")
    none = pa.nulls(n, pa.string())
    columns = [
        keys if isinstance(keys, pa.Array) else pa.array(keys, pa.string()),
        pa.DictionaryArray.from_arrays(pa.array(modality.astype(np.int8), pa.int8()), MODALITY_NAMES),
        pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), n, [None, pa.py_buffer(ids)]),
        none if source is None else (source if isinstance(source, pa.Array) else pa.array(source, pa.string())),
        none if metadata is None else (metadata if isinstance(metadata, pa.Array) else pa.array(metadata, pa.string())),
    ]
    return pa.Table.from_arrays(columns, schema=schema(width))


def write_item_table(path: str | os.PathLike, table: pa.Table, fsync: bool = True) -> None:
    """One Arrow IPC file, one record batch (so that columns map to single zero-copy arrays)."""
    def write(f) -> None:
        with pa.ipc.new_file(f, table.schema) as writer:
            writer.write_table(table, max_chunksize=max(1, table.num_rows))
    write_atomic(path, write, fsync=fsync)


def read_item_table(path: str | os.PathLike, rows: int, id_width: int) -> pa.Table:
    """Memory-map one item table and check its shape against the manifest's."""
    path = Path(path)
    try:
        table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    except FileNotFoundError:
        raise IndexFormatError(f"{path}: item table missing") from None
    except (pa.ArrowInvalid, OSError) as exc:
        raise IndexFormatError(f"{path}: damaged item table ({exc})") from None
    if table.num_rows != rows:
        raise IndexFormatError(f"{path}: {table.num_rows} rows, the manifest says {rows}")
    if table.schema.field("id").type != pa.binary(id_width):
        raise IndexFormatError(f"{path}: IDs of type {table.schema.field('id').type}, expected binary({id_width})")
    return table


def _single_chunk(column: pa.ChunkedArray) -> pa.Array:
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


class ItemTables:
    """The item tables of one index, searched by item number; memory-mapped when read from disk."""

    def __init__(self, ranges: list[RangeFile], tables: list[pa.Table], id_width: int):
        if len(ranges) != len(tables):
            raise ValueError("one table per range")
        self.ranges = ranges
        self.tables = tables
        self.id_width = id_width
        self._starts = np.array([r.start for r in ranges], dtype=np.int64)
        self._ends = np.array([r.end for r in ranges], dtype=np.int64)
        # Per table, zero-copy views of the fixed-width columns (modality, id).
        self._modality = [_single_chunk(t.column("modality")).indices.to_numpy(zero_copy_only=False) for t in tables]
        self._ids = [id_view(_single_chunk(t.column("id")), id_width) for t in tables]

    @classmethod
    def open(cls, version_dir: str | os.PathLike, ranges: list[RangeFile], id_width: int) -> "ItemTables":
        version_dir = Path(version_dir)
        return cls(ranges, [read_item_table(version_dir / r.file, len(r), id_width) for r in ranges], id_width)

    @classmethod
    def in_memory(cls, table: pa.Table, start: int = 0) -> "ItemTables":
        width = table.schema.field("id").type.byte_width
        return cls([RangeFile(start, start + table.num_rows, "")], [table], width)

    @property
    def num_items(self) -> int:
        """Size of the item-number space (the end of the last range)."""
        return int(self._ends.max()) if len(self._ends) else 0

    def _locate(self, items: np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(table number, positions in `items`, rows in that table) for each table hit."""
        items = np.asarray(items, dtype=np.int64)
        which = np.searchsorted(self._starts, items, side="right") - 1
        bad = (which < 0) | (items >= self._ends[np.maximum(which, 0)]) if len(self._starts) else np.ones(len(items), bool)
        if bad.any():
            raise IndexError(f"item {int(items[np.flatnonzero(bad)[0]])} is not in this index")
        for t in np.unique(which):
            positions = np.flatnonzero(which == t)
            yield int(t), positions, items[positions] - self._starts[t]

    def modality(self, items: np.ndarray) -> np.ndarray:
        out = np.empty(len(items), dtype=np.int64)
        for t, positions, rows in self._locate(items):
            out[positions] = self._modality[t][rows]
        return out

    def ids(self, items: np.ndarray) -> np.ndarray:
        out = np.empty((len(items), self.id_width), dtype=np.uint8)
        for t, positions, rows in self._locate(items):
            out[positions] = self._ids[t][rows]
        return out

    def column(self, name: str, items: np.ndarray) -> list:
        """Python values of one column (key, source, metadata, ...) for these items, in order."""
        out: list = [None] * len(items)
        for t, positions, rows in self._locate(items):
            values = self.tables[t].column(name).take(pa.array(rows)).to_pylist()
            for p, v in zip(positions.tolist(), values):
                out[p] = v
        return out

    def keys(self, items: np.ndarray) -> list[str]:
        return self.column("key", items)

    def rows(self, items: np.ndarray) -> pa.Table:
        """The table rows of these items (with an `item` column), in the order given."""
        items = np.asarray(items, dtype=np.int64)
        parts, order = [], []
        for t, positions, rows in self._locate(items):
            parts.append(self.tables[t].take(pa.array(rows)))
            order.append(positions)
        if not parts:
            return schema(self.id_width).empty_table().add_column(0, "item", pa.array([], pa.int64()))
        table = pa.concat_tables(parts)
        table = table.take(pa.array(np.argsort(np.concatenate(order), kind="stable")))
        return table.add_column(0, "item", pa.array(items, pa.int64()))

    def scan(self) -> Iterator[tuple[int, pa.Table]]:
        """(first item number, table) of every range, in item order."""
        for r, table in zip(self.ranges, self.tables):
            yield r.start, table

    def find_keys(self, keys: Sequence[str]) -> dict[str, list[int]]:
        """Item numbers of each given key (a scan of the key columns, one table at a time)."""
        wanted = pa.array(list(keys), pa.string())
        found: dict[str, list[int]] = {}
        for start, table in self.scan():
            column = table.column("key")
            hits = np.flatnonzero(pc.is_in(column, value_set=wanted).to_numpy(zero_copy_only=False))
            for row, key in zip(hits.tolist(), column.take(pa.array(hits)).to_pylist()):
                found.setdefault(key, []).append(start + row)
        return found


def id_view(column: pa.Array | pa.ChunkedArray, width: int) -> np.ndarray:
    """(n, width) uint8 rows of a binary(width) column: a view of its data buffer (no copy)
    for one array, the chunks' views concatenated for a chunked column."""
    if isinstance(column, pa.ChunkedArray):
        if column.num_chunks == 1:
            return id_view(column.chunk(0), width)
        return np.concatenate([id_view(c, width) for c in column.chunks]) if column.num_chunks else \
            np.zeros((0, width), dtype=np.uint8)
    n = len(column)
    if n == 0:
        return np.zeros((0, width), dtype=np.uint8)
    data = np.frombuffer(column.buffers()[1], dtype=np.uint8)
    return data[column.offset * width : (column.offset + n) * width].reshape(n, width)
