"""Merge per-shard ID tables into trie partitions, item tables and vector shards.

Input: one table per shard (Parquet or Arrow IPC) with columns
    key       string, unique across all shards
    modality  image | text | image_text (or 0 | 1 | 2)
    id        binary(W): the packed semantic codes (genius.idcodec)
    source    string, optional (e.g. the WebDataset shard and member)
    metadata  string, optional (JSON text)
    vector    list<float>, optional: the item's embedding, kept as fp16 for re-ranking

Three pure steps, each of which the coordinator can run as one Ray task per unit:
1. `bucket_shard` (per input shard): validate, split rows by partition (code 0 x ranges of
   the first semantic code) and by key hash, write bucket files; memory ~ one shard.
2. `plan_partitions` (driver, O(shards x partitions)): item-number ranges of the partitions,
   and `check_key_bucket` (per key bucket): no key twice; memory ~ one bucket.
3. `merge_partition` (per partition): read its buckets, sort by (ID, key), write the trie
   partition, item tables and vector shards of its item-number range; memory ~ one partition.

Item numbers follow the trie: partitions in (code 0, first code) order, rows in (ID, key)
order. So the output depends only on the set of rows: it is byte-identical however the input
is split into shards and whatever order they arrive in, and a beam's items are neighbours in
the item tables and vector shards.
"""
from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from genius.errors import GeniusError
from genius.idcodec import IdCodec, id_words, sort_order
from genius.modality import Modality
from genius.store.data_files import DEFAULT_ITEMS_PER_FILE, item_table_path, split_range, vector_shard_path
from genius.store.item_table import id_view, make_table, write_item_table
from genius.store.layout import TRIE_DIR
from genius.store.manifest import RangeFile
from genius.store.vector_shards import write_vector_shard
from genius.trie import build_partition, write_partition

BUCKET_SUFFIX = ".arrow"
_MODALITY_BY_NAME = {m.name.lower(): int(m) for m in Modality} | {str(int(m)): int(m) for m in Modality}


class IdTableError(GeniusError, ValueError):
    """A row (or the whole) of an input ID table cannot be merged; names the file and row."""

    def __init__(self, path: str | os.PathLike, row: int | None, reason: str):
        self.path, self.row, self.reason = str(path), row, reason
        super().__init__(f"{path}: {'' if row is None else f'row {row}: '}{reason}")

    def __reduce__(self):
        return (type(self), (self.path, self.row, self.reason))


@dataclass(frozen=True)
class MergeConfig:
    num_levels: int
    codebook_size: int
    ranges_per_modality: int = 1  # trie partitions per code-0 value, by first semantic code
    modality_code: bool = True  # code 0 (the first trie level) is the modality; else always 0
    items_per_file: int = DEFAULT_ITEMS_PER_FILE
    key_buckets: int = 16

    @property
    def codec(self) -> IdCodec:
        return IdCodec(self.num_levels, self.codebook_size)


@dataclass(frozen=True)
class PartitionKey:
    code0: int
    code_lo: int
    code_hi: int

    @property
    def name(self) -> str:
        return f"{Modality(self.code0).name.lower()}-{self.code_lo:05d}"


def partition_bounds(codebook_size: int, ranges: int) -> np.ndarray:
    """First-code boundaries of the partitions of one code-0 value (as genius.trie.Trie.build)."""
    return np.linspace(0, codebook_size, ranges + 1).round().astype(np.int64)


def all_partitions(config: MergeConfig) -> list[PartitionKey]:
    bounds = partition_bounds(config.codebook_size, config.ranges_per_modality)
    return [PartitionKey(int(m), int(lo), int(hi)) for m in Modality
            for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]


@dataclass
class BucketResult:
    """What one input shard contributed: rows per partition, and its bucket files."""

    shard: str
    path: str
    rows: int
    counts: dict[str, int]  # partition name -> rows
    vector_dim: int | None
    partition_files: dict[str, str] = field(default_factory=dict)  # partition name -> bucket file
    key_files: dict[int, str] = field(default_factory=dict)  # key bucket -> file


@dataclass
class PartitionTask:
    partition: PartitionKey
    files: list[str]  # bucket files, any order
    start: int  # first item number
    count: int
    vector_dim: int | None


@dataclass
class PartitionOutput:
    entry: dict  # trie partition entry (genius.trie.write_partition)
    item_tables: list[RangeFile]
    vector_shards: list[RangeFile]
    modality_counts: dict[str, int]


# ----------------------------------------------------------------------------- step 1


def shard_name(path: str | os.PathLike, position: int) -> str:
    """A file-name-safe unique name for an input table (position breaks ties of equal stems)."""
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(path).name)
    return f"{position:06d}-{stem}"


def read_id_table(path: str | os.PathLike) -> pa.Table:
    path = Path(path)
    try:
        if path.suffix in (".arrow", ".feather", ".ipc"):
            return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
        return pq.read_table(path)
    except FileNotFoundError:
        raise IdTableError(path, None, "file not found") from None
    except (pa.ArrowInvalid, OSError) as exc:
        raise IdTableError(path, None, f"cannot read the table ({exc})") from None


def _validate(path: str | os.PathLike, table: pa.Table, codec: IdCodec) -> tuple[np.ndarray, np.ndarray]:
    """(modality ints, ids (n, W) uint8) of a table whose every row is valid."""
    missing = {"key", "modality", "id"} - set(table.column_names)
    if missing:
        raise IdTableError(path, None, f"missing columns {sorted(missing)} (has {table.column_names})")
    keys = table.column("key")
    if not (pa.types.is_string(keys.type) or pa.types.is_large_string(keys.type)):
        raise IdTableError(path, None, f"column key must be strings, found {keys.type}")
    empty = pc.or_kleene(pc.is_null(keys), pc.equal(pc.utf8_length(keys), 0)).to_numpy(zero_copy_only=False)
    if empty.any():
        raise IdTableError(path, int(np.flatnonzero(empty)[0]), "key is empty")
    modality = _modality_column(path, table.column("modality"))
    ids = _id_column(path, table.column("id"), codec)
    return modality, ids


def _modality_column(path, column: pa.ChunkedArray) -> np.ndarray:
    if pa.types.is_integer(column.type):
        values = column.to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(pc.is_null(column).to_numpy(zero_copy_only=False) | (values < 0) | (values >= len(Modality)))
        if len(bad):
            raise IdTableError(path, int(bad[0]), f"modality {column[int(bad[0])].as_py()!r} is not one of 0, 1, 2")
        return values.astype(np.int64)
    names = pc.replace_substring(pc.utf8_lower(pc.cast(column, pa.string())), "-", "_")
    choices = list(_MODALITY_BY_NAME)
    position = pc.index_in(names, value_set=pa.array(choices, pa.string())).to_numpy(zero_copy_only=False)
    unknown = np.isnan(position) if position.dtype.kind == "f" else position < 0
    if unknown.any():
        row = int(np.flatnonzero(unknown)[0])
        raise IdTableError(path, row, f"modality {column[row].as_py()!r} is not one of image, text, image_text")
    codes = np.array([_MODALITY_BY_NAME[c] for c in choices], dtype=np.int64)
    return codes[position.astype(np.int64)]


def _id_column(path, column: pa.ChunkedArray, codec: IdCodec) -> np.ndarray:
    width = codec.width
    if not (pa.types.is_binary(column.type) or pa.types.is_fixed_size_binary(column.type)
            or pa.types.is_large_binary(column.type)):
        raise IdTableError(path, None, f"column id must be binary({width}), found {column.type}")
    array = column.combine_chunks()
    if array.null_count:
        raise IdTableError(path, int(np.flatnonzero(pc.is_null(array).to_numpy(zero_copy_only=False))[0]), "id is missing")
    if pa.types.is_fixed_size_binary(array.type):
        if array.type.byte_width != width:
            raise IdTableError(path, 0, f"ID of {array.type.byte_width} bytes, expected {width}")
    else:
        lengths = pc.binary_length(array).to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(lengths != width)
        if len(bad):
            raise IdTableError(path, int(bad[0]), f"ID of {int(lengths[bad[0]])} bytes, expected {width}")
        array = pc.cast(array, pa.binary(width))
    ids = id_view(array, width)
    if codec.codebook_size == 1 << codec.bits_per_code and (codec.num_levels * codec.bits_per_code) % 8 == 0:
        return ids  # every bit pattern is a valid ID (e.g. 8 x 4096 in 12 bytes)
    # Every code below K and the padding bits zero: packing the unpacked codes gives the ID back.
    repacked = codec.pack(np.minimum(codec.unpack(ids), codec.codebook_size - 1))
    bad = np.flatnonzero((repacked != ids).any(axis=1))
    if len(bad):
        codes = codec.unpack(ids[bad[:1]])[0].tolist()
        raise IdTableError(path, int(bad[0]), f"ID {ids[bad[0]].tobytes().hex()} does not hold {codec.num_levels} codes "
                                              f"below {codec.codebook_size} (decodes to {codes})")
    return ids


def _vector_column(path, table: pa.Table) -> np.ndarray | None:
    if "vector" not in table.column_names or table.num_rows == 0:
        return None
    column = table.column("vector").combine_chunks()
    if column.null_count:
        raise IdTableError(path, int(np.flatnonzero(pc.is_null(column).to_numpy(zero_copy_only=False))[0]), "vector is missing")
    if not (pa.types.is_list(column.type) or pa.types.is_fixed_size_list(column.type) or pa.types.is_large_list(column.type)):
        raise IdTableError(path, None, f"column vector must be a list of floats, found {column.type}")
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    if len(lengths) and (lengths != lengths[0]).any():
        bad = int(np.flatnonzero(lengths != lengths[0])[0])
        raise IdTableError(path, bad, f"vector of length {int(lengths[bad])}, row 0 has {int(lengths[0])}")
    dim = int(lengths[0]) if len(lengths) else 0
    values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(column), dim)
    finite = np.isfinite(values).all(axis=1)
    if not finite.all():
        raise IdTableError(path, int(np.flatnonzero(~finite)[0]), "vector has NaN or inf")
    return values.astype(np.float16)


def _key_bucket(keys: pa.ChunkedArray, buckets: int) -> np.ndarray:
    """Bucket of each key, the same on every machine and run. Equal keys must meet in one
    bucket (where duplicates are found); spread only matters for balance, so the hash mixes
    the length with the first and the last 8 UTF-8 bytes, gathered for all keys at once."""
    array = keys.combine_chunks()
    if not pa.types.is_string(array.type):
        array = pc.cast(array, pa.string())
    n = len(array)
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int32)[array.offset : array.offset + n + 1].astype(np.int64)
    data = np.frombuffer(array.buffers()[2], dtype=np.uint8) if array.buffers()[2] is not None else np.zeros(0, np.uint8)
    data = np.concatenate([data, np.zeros(8, np.uint8)])  # room to read 8 bytes past the last key
    starts, ends = offsets[:-1], offsets[1:]
    lengths = (ends - starts).astype(np.uint64)
    windows = np.lib.stride_tricks.sliding_window_view(data, 8)  # a view: row j = data[j:j+8]
    short = lengths < 8
    mask = np.full(n, np.uint64(0xFFFFFFFFFFFFFFFF))
    mask[short] = (np.uint64(1) << (np.uint64(8) * lengths[short])) - np.uint64(1)
    h = windows[starts].view("<u8").ravel() & mask
    t = windows[np.maximum(ends - 8, starts)].view("<u8").ravel() & mask
    with np.errstate(over="ignore"):
        h = (h ^ (t * np.uint64(0x9E3779B97F4A7C15)) ^ (lengths * np.uint64(0xBF58476D1CE4E5B9)))
        h ^= h >> np.uint64(31)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(29)
    return (h % np.uint64(buckets)).astype(np.int64)


def bucket_shard(path: str | os.PathLike, shard: str, config: MergeConfig, work_dir: str | os.PathLike,
                 drop_rows: Sequence[int] = ()) -> BucketResult:
    """Step 1 for one input table: validate it and write its rows' bucket files under `work_dir`.
    `drop_rows`: rows left out (a build's duplicate keys); key-bucket rows keep input numbering."""
    work_dir = Path(work_dir)
    codec = config.codec
    table = read_id_table(path)
    row_numbers = np.arange(table.num_rows, dtype=np.int64)
    if len(drop_rows):
        keep = np.setdiff1d(row_numbers, np.asarray(drop_rows, dtype=np.int64))
        table, row_numbers = table.take(pa.array(keep)), keep
    modality, ids = _validate(path, table, codec)
    vectors = _vector_column(path, table)
    code0 = modality if config.modality_code else np.zeros_like(modality)
    first = codec.code_at(ids, 0).astype(np.int64)
    bounds = partition_bounds(config.codebook_size, config.ranges_per_modality)
    part_range = np.searchsorted(bounds, first, side="right") - 1
    n = table.num_rows
    nulls = pa.nulls(n, pa.string())
    columns = {
        "key": table.column("key").cast(pa.string()),
        "modality": pa.array(modality.astype(np.int8)),
        "id": pa.FixedSizeBinaryArray.from_buffers(pa.binary(codec.width), n, [None, pa.py_buffer(np.ascontiguousarray(ids))]),
        "source": table.column("source").cast(pa.string()) if "source" in table.column_names else nulls,
        "metadata": table.column("metadata").cast(pa.string()) if "metadata" in table.column_names else nulls,
    }
    if vectors is not None:
        columns["vector"] = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
    rows = pa.table(columns)
    result = BucketResult(shard, str(path), n, {}, None if vectors is None else vectors.shape[1])
    # Rows grouped by partition and sorted by ID within it: a partition's task then gathers its
    # rows from a few sorted runs (one per shard), which is far kinder to caches than at random.
    part_number = (code0 * config.ranges_per_modality + part_range).astype(np.int16)
    by_id = sort_order(ids)
    order = by_id[np.argsort(part_number[by_id], kind="stable")]  # a radix sort for 16-bit keys
    ends = np.cumsum(np.bincount(part_number, minlength=len(Modality) * config.ranges_per_modality))
    grouped = rows.take(pa.array(order))
    for key in all_partitions(config):
        number = key.code0 * config.ranges_per_modality + int(np.searchsorted(bounds, key.code_lo, side="right") - 1)
        lo, hi = (int(ends[number - 1]) if number else 0), int(ends[number])
        if hi == lo:
            continue
        file = work_dir / f"p-{key.name}" / f"{shard}{BUCKET_SUFFIX}"
        _write_bucket(file, grouped.slice(lo, hi - lo))
        result.counts[key.name] = hi - lo
        result.partition_files[key.name] = str(file)
    key_bucket = _key_bucket(table.column("key"), config.key_buckets)
    order = np.argsort(key_bucket.astype(np.int16), kind="stable")
    ends = np.cumsum(np.bincount(key_bucket, minlength=config.key_buckets))
    keys_only = pa.table({"key": columns["key"], "row": pa.array(row_numbers)}).take(pa.array(order))
    for b in range(config.key_buckets):
        lo, hi = (int(ends[b - 1]) if b else 0), int(ends[b])
        if hi == lo:
            continue
        file = work_dir / f"k-{b:04d}" / f"{shard}{BUCKET_SUFFIX}"
        _write_bucket(file, keys_only.slice(lo, hi - lo))
        result.key_files[b] = str(file)
    return result


def _write_bucket(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_item_table(path, table, fsync=False)  # scratch: a lost bucket is rewritten by its shard's task


def _read_bucket(path: str) -> pa.Table:
    return pa.ipc.open_file(pa.memory_map(path, "r")).read_all()


# ----------------------------------------------------------------------------- step 2


def plan_partitions(results: Sequence[BucketResult], config: MergeConfig) -> list[PartitionTask]:
    """Item-number range of every non-empty partition, in trie order."""
    dims = {r.vector_dim for r in results if r.rows}
    if len(dims) > 1:
        with_dim = {r.vector_dim: r.path for r in results if r.rows}
        raise IdTableError(next(iter(with_dim.values())), None,
                           f"input tables disagree on vectors: dimensions {sorted(d or 0 for d in dims)} "
                           f"(e.g. {with_dim})")
    dim = dims.pop() if dims else None
    tasks, start = [], 0
    for key in all_partitions(config):
        files = sorted(r.partition_files[key.name] for r in results if key.name in r.partition_files)
        count = sum(r.counts.get(key.name, 0) for r in results)
        if count:
            tasks.append(PartitionTask(key, files, start, count, dim))
            start += count
    return tasks


@dataclass(frozen=True)
class DuplicateKey:
    """A repeated key: where it is first seen (smallest (shard, row)) and one later place."""

    key: str
    first_shard: str
    first_row: int
    shard: str
    row: int


def duplicate_keys(files: Sequence[str]) -> list[DuplicateKey]:
    """Every repeated key among these key-bucket files except its first occurrence: the rows a
    build skips as duplicates (the first one of each key is kept)."""
    keys, rows, shards = [], [], []
    for f in files:
        t = _read_bucket(f)
        keys.append(t.column("key"))
        rows.append(t.column("row").to_numpy())
        shards.extend([Path(f).stem] * t.num_rows)
    if not keys:
        return []
    all_keys = pa.chunked_array([c for k in keys for c in k.chunks], pa.string())
    counts = pc.value_counts(all_keys)
    repeated = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    if len(repeated) == 0:
        return []
    flat_rows = np.concatenate(rows)
    hits = np.flatnonzero(pc.is_in(all_keys, value_set=repeated).to_numpy(zero_copy_only=False))
    places = sorted((all_keys[int(i)].as_py(), shards[i], int(flat_rows[i])) for i in hits)
    out, first = [], None
    for key, shard, row in places:
        if first is not None and first[0] == key:
            out.append(DuplicateKey(key, first[1], first[2], shard, row))
        else:
            first = (key, shard, row)
    return out


def check_key_bucket(files: Sequence[str], shard_paths: dict[str, str]) -> None:
    """Raise IdTableError naming both places if a key occurs twice among these bucket files."""
    repeated = duplicate_keys(files)
    if repeated:
        d = repeated[0]
        raise IdTableError(shard_paths.get(d.first_shard, d.first_shard), d.first_row,
                           f"duplicate key {d.key!r} (also {shard_paths.get(d.shard, d.shard)} row {d.row})")


# ----------------------------------------------------------------------------- step 3


def merge_partition(task: PartitionTask, config: MergeConfig, version_dir: str | os.PathLike) -> PartitionOutput:
    """Sort one partition's rows by (ID, key) and write its trie partition, item tables and
    vector shards for items [task.start, task.start + task.count)."""
    version_dir = Path(version_dir)
    codec = config.codec
    table = pa.concat_tables([_read_bucket(f) for f in task.files]) if task.files else None
    if table is None or table.num_rows != task.count:
        raise ValueError(f"partition {task.partition.name}: buckets hold {0 if table is None else table.num_rows} "
                         f"rows, the plan says {task.count}")
    # Taking from the chunked table (one chunk per bucket) skips a concatenated copy of it.
    ids = id_view(table.column("id"), codec.width)
    order = sort_order(ids)
    sorted_ids = np.take(ids, order, axis=0)
    # Ties (items sharing an ID) are ordered by key, so that the order never depends on the input's.
    ties = np.ones(max(len(ids) - 1, 0), dtype=bool)
    for word in id_words(sorted_ids):
        ties &= word[1:] == word[:-1]
    if ties.any():
        key_rank = np.empty(table.num_rows, dtype=np.int64)
        key_rank[pc.sort_indices(table.column("key")).to_numpy()] = np.arange(table.num_rows)
        order = sort_order(ids, tiebreak=key_rank)
        sorted_ids = np.take(ids, order, axis=0)
    table = table.take(pa.array(order))
    items = np.arange(task.start, task.start + task.count, dtype=np.int64)
    key = task.partition
    part = build_partition(codec, Modality(key.code0), key.code_lo, key.code_hi, sorted_ids, items)
    entry = write_partition(version_dir / TRIE_DIR, part, codec)
    modality = table.column("modality").to_numpy().astype(np.int64)
    item_tables, vector_shards = [], []
    for lo, hi in split_range(task.start, task.start + task.count, config.items_per_file):
        a, b = lo - task.start, hi - task.start
        chunk = table.slice(a, b - a)
        rel = item_table_path(lo, hi)
        write_item_table(version_dir / rel, make_table(chunk.column("key").combine_chunks(), modality[a:b],
                                                       sorted_ids[a:b], chunk.column("source").combine_chunks(),
                                                       chunk.column("metadata").combine_chunks()))
        item_tables.append(RangeFile(lo, hi, rel))
        if task.vector_dim is not None:
            flat = chunk.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
            rel = vector_shard_path(lo, hi)
            write_vector_shard(version_dir / rel, flat.reshape(b - a, task.vector_dim))
            vector_shards.append(RangeFile(lo, hi, rel))
    counts = np.bincount(modality, minlength=len(Modality))
    return PartitionOutput(entry, item_tables, vector_shards,
                           {m.name.lower(): int(c) for m, c in zip(Modality, counts) if c})


# ----------------------------------------------------------------------------- driver


@dataclass
class MergeResult:
    partitions: list[dict]
    item_tables: list[RangeFile]
    vector_shards: list[RangeFile]
    num_items: int
    vector_dim: int | None
    modality_counts: dict[str, int]
    rows_by_shard: dict[str, int]


def combine_outputs(tasks: Sequence[PartitionTask], outputs: Sequence[PartitionOutput],
                    buckets: Sequence[BucketResult]) -> MergeResult:
    counts: dict[str, int] = {}
    for out in outputs:
        for name, c in out.modality_counts.items():
            counts[name] = counts.get(name, 0) + c
    return MergeResult(
        partitions=[o.entry for o in outputs],
        item_tables=[r for o in outputs for r in o.item_tables],
        vector_shards=[r for o in outputs for r in o.vector_shards],
        num_items=sum(t.count for t in tasks),
        vector_dim=tasks[0].vector_dim if tasks else None,
        modality_counts=counts,
        rows_by_shard={b.path: b.rows for b in buckets},
    )


def merge_id_tables(paths: Sequence[str | os.PathLike], config: MergeConfig, version_dir: str | os.PathLike,
                    work_dir: str | os.PathLike) -> MergeResult:
    """All three steps in this process, one unit after another (the cluster runs them as tasks)."""
    buckets = [bucket_shard(p, shard_name(p, i), config, work_dir) for i, p in enumerate(paths)]
    shard_paths = {b.shard: b.path for b in buckets}
    for bucket in range(config.key_buckets):
        check_key_bucket(sorted(b.key_files[bucket] for b in buckets if bucket in b.key_files), shard_paths)
    tasks = plan_partitions(buckets, config)
    outputs = [merge_partition(task, config, version_dir) for task in tasks]
    return combine_outputs(tasks, outputs, buckets)
