"""Compact, memory-mappable trie over sorted packed IDs, with batched expansion for beam search.

A partition holds the items of one modality whose first semantic code lies in
[code_lo, code_hi): a sorted (N, width) uint8 array of packed IDs plus an aligned array of
item numbers (uint32 while the corpus fits): 16 bytes per item for 12-byte IDs. There are no
per-node objects. A beam's position in the trie is a row range [lo, hi) of one partition:
the rows sharing its prefix. The children of a prefix are the distinct next codes in that
range; the top levels use dense offset tables (row start of every possible prefix). Below
them, a prefix with at most T rows reads the codes of its rows; the few prefixes with more
than T rows ("big nodes", at most N / T per level) have their children stored, so that one
expansion costs about max(T, K) per beam however skewed the codes are.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from genius.atomic import write_atomic, write_json_atomic
from genius.idcodec import IdCodec, id_words, sort_order
from genius.modality import NUM_MODALITIES, Modality

log = logging.getLogger(__name__)

MANIFEST = "trie.json"
# A dense table for level l has K**(l+1) + 1 entries; build it while that stays below
# DENSE_FACTOR * N entries (and the hard cap), so tables cost at most a few bytes per item.
DENSE_FACTOR = 1
DENSE_MAX_ENTRIES = 1 << 26
# T, the row count above which a prefix stores its children. None: max(DEFAULT_BIG_NODE_ROWS, 2 K).
# T >= K because an expansion writes a K-wide mask row per beam anyway, so reading up to T ~ K
# rows costs the same order; and a level lists at most N * K / T children (24 bytes each), so
# T = 2 K bounds that by N / 2 while reading 2 K rows costs about twice listing K children.
# Tests set a small T to force the big-node path.
BIG_NODE_ROWS: int | None = None
DEFAULT_BIG_NODE_ROWS = 1024
BIG_NODE_ROWS_PER_CODE = 2
NO_BIG_NODES = np.iinfo(np.int64).max  # the threshold of partitions saved without big-node tables
NODE_COLUMNS = ("level", "lo", "hi", "first_child", "num_children")
CHILD_COLUMNS = ("code", "lo", "hi")


def big_node_rows(codebook_size: int) -> int:
    """The threshold T for a new partition."""
    if BIG_NODE_ROWS is not None:
        return BIG_NODE_ROWS
    return max(DEFAULT_BIG_NODE_ROWS, BIG_NODE_ROWS_PER_CODE * codebook_size)


def _empty_table(columns: tuple[str, ...]) -> np.ndarray:
    return np.zeros((0, len(columns)), dtype=np.int64)


class ItemRange:
    """Item numbers start, start+1, ..., start+n-1 without storing them: what a merged partition
    holds (genius.store.merge numbers items in trie order), so its IDs cost 12 bytes, not 16."""

    def __init__(self, start: int, n: int):
        self.start, self.n = int(start), int(n)
        self.dtype = np.dtype(np.int64)
        self.nbytes = 0
        self.shape = (self.n,)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index):
        if isinstance(index, slice):
            lo, hi, step = index.indices(self.n)
            return np.arange(self.start + lo, self.start + hi, step, dtype=np.int64)
        index = np.asarray(index)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        if ((index < -self.n) | (index >= self.n)).any():
            raise IndexError(f"row out of range for {self.n} items")
        return np.where(index < 0, index + self.n, index).astype(np.int64) + self.start

    def __array__(self, dtype=None, copy=None):
        out = np.arange(self.start, self.start + self.n, dtype=np.int64)
        return out if dtype is None else out.astype(dtype)

    def astype(self, dtype) -> np.ndarray:
        return np.asarray(self).astype(dtype)

    def max(self) -> int:
        return self.start + self.n - 1

    def min(self) -> int:
        return self.start


def _as_item_range(items: np.ndarray) -> ItemRange | None:
    """An ItemRange when the items are consecutive (cheap check, no copy kept)."""
    n = len(items)
    if n == 0 or int(items[-1]) - int(items[0]) != n - 1:
        return None
    return ItemRange(int(items[0]), n) if (np.diff(items) == 1).all() else None


@dataclass
class TriePartition:
    modality: Modality
    code_lo: int
    code_hi: int
    ids: np.ndarray  # (N, width) uint8, sorted as bytes
    items: np.ndarray | ItemRange  # (N,) item numbers, aligned with ids (implicit when consecutive)
    dense: list[np.ndarray]  # dense[l]: (K**(l+1) + 1,) row offsets of each prefix (int32 below 2**31 rows)
    # Big nodes: rows NODE_COLUMNS sorted by (level, lo); a node at level l is a prefix of l codes.
    nodes: np.ndarray = field(default_factory=lambda: _empty_table(NODE_COLUMNS))
    children: np.ndarray = field(default_factory=lambda: _empty_table(CHILD_COLUMNS))  # CHILD_COLUMNS rows
    big_rows: int = NO_BIG_NODES  # T: ranges with more rows than this have a node

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def nbytes(self) -> int:
        arrays = [self.ids, self.items, self.nodes, self.children, *self.dense]
        return sum(int(a.nbytes) for a in arrays)


@dataclass
class TrieState:
    """Position of B beams in the trie: partition number and row range of each beam's prefix.

    `prefix` is the beam's code prefix as an integer (base K), used by the dense levels.
    """

    part: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    prefix: np.ndarray

    def take(self, index: np.ndarray) -> "TrieState":
        return TrieState(self.part[index], self.lo[index], self.hi[index], self.prefix[index])


# ----------------------------------------------------------------------------- partitions


def _dense_levels(num_items: int, num_levels: int, codebook_size: int) -> int:
    levels = 1  # level 0 is always dense: K + 1 offsets
    while levels < num_levels:
        entries = codebook_size ** (levels + 1)
        if entries > max(DENSE_FACTOR * num_items, codebook_size) or entries > DENSE_MAX_ENTRIES:
            break
        levels += 1
    return levels


def _offset_dtype(num_rows: int) -> np.dtype:
    """Dense offsets in 4 bytes where the rows allow (a 12 x 256 trie's second table has 65,537
    of them: 8-byte offsets cost ~4.5 bytes per item at 117k items)."""
    return np.dtype(np.int32 if num_rows < 2**31 else np.int64)


def _build_dense(codec: IdCodec, ids: np.ndarray, levels: int) -> list[np.ndarray]:
    """Offsets of each prefix (of length 1..levels) into sorted rows, one level of codes at a time."""
    K = codec.codebook_size
    tables = []
    prefix = np.zeros(len(ids), dtype=np.int64)
    for level in range(levels):
        prefix = prefix * K + codec.code_at(ids, level)
        counts = np.bincount(prefix, minlength=K ** (level + 1))
        tables.append(np.concatenate([[0], np.cumsum(counts)]).astype(_offset_dtype(len(ids))))
    return tables


def _build_big_nodes(codec: IdCodec, ids: np.ndarray, first_level: int,
                     threshold: int) -> tuple[np.ndarray, np.ndarray]:
    """Node and child tables of the prefixes with more than `threshold` rows, at levels first_level..L-1.

    Walks the levels with one code array and one boolean per row (does a new prefix start
    here), so memory stays at a few arrays of N whatever L.
    """
    n = len(ids)
    node_parts, child_parts = [_empty_table(NODE_COLUMNS)], [_empty_table(CHILD_COLUMNS)]
    if first_level >= codec.num_levels:
        return node_parts[0], child_parts[0]  # every level is dense
    starts = np.zeros(n, dtype=bool)
    starts[:1] = True
    bounds = np.array([0, n], dtype=np.int64)  # row ranges of the prefixes of length `level`
    num_children = 0
    for level in range(codec.num_levels):
        sizes = np.diff(bounds)
        if sizes.max() <= threshold:
            break  # longer prefixes are no bigger: no big node at this level or below
        code = codec.code_at(ids, level)
        starts[1:] |= code[1:] != code[:-1]
        child_bounds = np.append(np.flatnonzero(starts), n)
        if level >= first_level:
            big = np.flatnonzero(sizes > threshold)
            nodes, children = _level_big_nodes(level, bounds[big], bounds[big + 1], child_bounds, code)
            nodes[:, 3] += num_children
            num_children += len(children)
            node_parts.append(nodes)
            child_parts.append(children)
        bounds = child_bounds
    return np.concatenate(node_parts), np.concatenate(child_parts)


def _level_big_nodes(level: int, lo: np.ndarray, hi: np.ndarray, child_bounds: np.ndarray,
                     code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tables of the big nodes [lo, hi) of one level; child_bounds: row ranges of the prefixes one code longer."""
    first = np.searchsorted(child_bounds, lo)
    count = np.searchsorted(child_bounds, hi) - first
    child = _concat_ranges(first, count)
    child_lo, child_hi = child_bounds[child], child_bounds[child + 1]
    nodes = np.column_stack([np.full(len(lo), level), lo, hi, np.cumsum(count) - count, count])
    children = np.column_stack([code[child_lo], child_lo, child_hi])
    return nodes.astype(np.int64), children.astype(np.int64)


def _concat_ranges(start: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Concatenation of arange(start[i], start[i] + count[i]) over i, without a Python loop."""
    total = int(count.sum())
    offsets = np.cumsum(count) - count
    return np.repeat(start - offsets, count) + np.arange(total, dtype=np.int64)


def _check_sorted(ids: np.ndarray, items: np.ndarray, chunk: int = 1 << 20) -> None:
    """Raise unless rows are sorted by (ID bytes, item number): neighbours compared word by word, in chunks."""
    for start in range(0, max(len(ids) - 1, 0), chunk):
        rows = slice(start, start + chunk + 1)  # one row of overlap with the next chunk
        bad = _out_of_order(ids[rows], items[rows])
        if bad.any():
            row = start + int(np.flatnonzero(bad)[0])
            raise ValueError(f"ids are not sorted by (ID bytes, item number): "
                             f"rows {row} and {row + 1} are out of order")


def _out_of_order(ids: np.ndarray, items: np.ndarray) -> np.ndarray:
    less = np.zeros(len(ids) - 1, dtype=bool)  # row i < row i + 1 on the words compared so far
    equal = np.ones(len(ids) - 1, dtype=bool)
    for word in id_words(ids):
        less |= equal & (word[:-1] < word[1:])
        equal &= word[:-1] == word[1:]
    return ~less & ~(equal & (items[:-1] <= items[1:]))


def _item_dtype(items: np.ndarray) -> np.dtype:
    return np.dtype(np.uint32 if len(items) == 0 or int(items.max()) < 2**32 else np.uint64)


def build_partition(codec: IdCodec, modality: Modality, code_lo: int, code_hi: int, ids: np.ndarray,
                    items: np.ndarray) -> TriePartition:
    """A partition from IDs already sorted by (ID bytes, item number), with its dense and big-node tables."""
    ids, items = np.asarray(ids), np.asarray(items)
    if ids.dtype != np.uint8 or ids.ndim != 2 or ids.shape[1] != codec.width:
        raise ValueError(f"ids must be a uint8 array of shape (N, {codec.width}), got {ids.dtype} {ids.shape}")
    if items.shape != (len(ids),) or items.dtype.kind not in "ui":
        raise ValueError(f"items must be {len(ids)} integers, got {items.dtype} {items.shape}")
    if len(items) and int(items.min()) < 0:
        raise ValueError(f"item numbers must be >= 0, got {int(items.min())}")
    if not 0 <= code_lo < code_hi <= codec.codebook_size:
        raise ValueError(f"need 0 <= code_lo < code_hi <= {codec.codebook_size}, got [{code_lo}, {code_hi})")
    _check_sorted(ids, items)
    if len(ids):
        ends = codec.code_at(ids[[0, -1]], 0)
        if ends[0] < code_lo or ends[1] >= code_hi:
            raise ValueError(f"first codes span [{ends[0]}, {ends[1]}], outside the partition's [{code_lo}, {code_hi})")
    ids = np.ascontiguousarray(ids)
    levels = _dense_levels(len(ids), codec.num_levels, codec.codebook_size)
    dense = _build_dense(codec, ids, levels)
    threshold = big_node_rows(codec.codebook_size)
    nodes, children = _build_big_nodes(codec, ids, levels, threshold)
    stored = _as_item_range(items) or items.astype(_item_dtype(items))
    return TriePartition(Modality(modality), int(code_lo), int(code_hi), ids, stored,
                         dense, nodes, children, int(threshold))


def _partition_files(part: TriePartition) -> dict[str, str]:
    stem = f"{Modality(part.modality).name.lower()}-{int(part.code_lo):05d}"
    roles = ["ids", *([] if isinstance(part.items, ItemRange) else ["items"]),
             *(f"dense{l}" for l in range(len(part.dense)))]
    if len(part.nodes):  # most partitions have no big node: no empty files for them
        roles += ["nodes", "children"]
    return {role: f"{stem}.{role}" for role in roles}


def write_partition(directory: str | os.PathLike, part: TriePartition, codec: IdCodec) -> dict:
    """Write one partition's raw arrays (each file atomically); return its manifest entry."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = _partition_files(part)
    arrays = {"ids": part.ids, "items": part.items, "nodes": part.nodes, "children": part.children,
              **{f"dense{l}": t for l, t in enumerate(part.dense)}}
    for role, name in files.items():
        array = np.asarray(arrays[role])
        # Raw little-endian arrays, memory-mapped as they are by read_partition.
        write_atomic(directory / name, np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tofile)
    entry = {
        "modality": part.modality.name.lower(), "code_lo": int(part.code_lo), "code_hi": int(part.code_hi),
        "count": len(part), "item_dtype": str(part.items.dtype), "dense_levels": len(part.dense),
        "dense_dtype": np.dtype(part.dense[0].dtype if part.dense else np.int64).newbyteorder("<").str,
        "big_node_rows": int(part.big_rows), "num_nodes": len(part.nodes), "num_children": len(part.children),
        "files": files,
    }
    if isinstance(part.items, ItemRange):
        entry["items_start"] = part.items.start  # consecutive item numbers: no items file
    return entry


def _expected_shapes(entry: dict, codec: IdCodec) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    n, K = int(entry["count"]), codec.codebook_size
    shapes = {"ids": (np.dtype(np.uint8), (n, codec.width))}
    if "items_start" not in entry:
        shapes["items"] = (np.dtype(entry["item_dtype"]).newbyteorder("<"), (n,))
    # Entries written before 4-byte offsets existed have 8-byte ones.
    dense_dtype = np.dtype(entry.get("dense_dtype", "<i8"))
    if dense_dtype not in (np.dtype("<i4"), np.dtype("<i8")):
        raise ValueError(f"trie partition entry {entry.get('modality')}-{entry.get('code_lo')}: dense_dtype must be "
                         f"<i4 or <i8, got {entry['dense_dtype']!r}")
    for l in range(int(entry["dense_levels"])):
        shapes[f"dense{l}"] = (dense_dtype, (K ** (l + 1) + 1,))
    if int(entry.get("num_nodes", 0)):
        shapes["nodes"] = (np.dtype("<i8"), (int(entry["num_nodes"]), len(NODE_COLUMNS)))
        shapes["children"] = (np.dtype("<i8"), (int(entry["num_children"]), len(CHILD_COLUMNS)))
    return shapes


def read_partition(directory: str | os.PathLike, entry: dict, codec: IdCodec, mmap: bool = True) -> TriePartition:
    """Open one partition from its manifest entry; every file must have exactly the size the entry implies."""
    directory = Path(directory)
    arrays = {}
    for role, (dtype, shape) in _expected_shapes(entry, codec).items():
        if role not in entry["files"]:
            name = f"{entry.get('modality')}-{entry.get('code_lo')}"
            raise ValueError(f"trie partition entry {name} has {entry.get('num_nodes')} big nodes but no {role} file")
        arrays[role] = _read(directory / entry["files"][role], dtype, shape, mmap)
    dense = [arrays[f"dense{l}"] for l in range(int(entry["dense_levels"]))]
    # Entries written before big nodes existed have no threshold: every range is read row by row.
    return TriePartition(Modality.parse(entry["modality"]), int(entry["code_lo"]), int(entry["code_hi"]),
                         arrays["ids"],
                         ItemRange(entry["items_start"], int(entry["count"])) if "items_start" in entry else arrays["items"],
                         dense,
                         arrays.get("nodes", _empty_table(NODE_COLUMNS)),
                         arrays.get("children", _empty_table(CHILD_COLUMNS)),
                         int(entry.get("big_node_rows", NO_BIG_NODES)))


def write_trie_manifest(directory: str | os.PathLike, codec: IdCodec, entries: list[dict]) -> None:
    manifest = {"num_levels": codec.num_levels, "codebook_size": codec.codebook_size, "width": codec.width,
                "partitions": entries}
    write_json_atomic(Path(directory) / MANIFEST, manifest)


def _read(path: Path, dtype: np.dtype, shape: tuple[int, ...], mmap: bool) -> np.ndarray:
    if not path.exists():
        raise FileNotFoundError(f"trie file missing: {path}")
    expected = int(np.prod(shape)) * dtype.itemsize
    actual = path.stat().st_size
    if actual != expected:
        raise ValueError(f"trie file {path} has {actual} bytes, expected {expected} for {dtype} {shape}: "
                         f"the file is truncated or damaged")
    if expected == 0:
        return np.zeros(shape, dtype=dtype)  # an empty file cannot be memory-mapped
    if mmap:
        return np.memmap(path, dtype=dtype, mode="r", shape=shape)
    return np.fromfile(path, dtype=dtype).reshape(shape)


# ----------------------------------------------------------------------------- the trie


class Trie:
    """All partitions of an index, searched together; read-only once built."""

    def __init__(self, codec: IdCodec, partitions: list[TriePartition]):
        self.codec = codec
        self.partitions = partitions
        K = codec.codebook_size
        # Level-0 routing per modality: which partition holds first code c, and its row range.
        self._root_part = np.full((NUM_MODALITIES, K), -1, dtype=np.int64)
        self._root_lo = np.zeros((NUM_MODALITIES, K), dtype=np.int64)
        self._root_hi = np.zeros((NUM_MODALITIES, K), dtype=np.int64)
        for p, part in enumerate(partitions):
            codes = np.arange(part.code_lo, part.code_hi)
            self._root_part[part.modality, codes] = p
            self._root_lo[part.modality, codes] = part.dense[0][codes]
            self._root_hi[part.modality, codes] = part.dense[0][codes + 1]
        self._root_mask = self._root_hi > self._root_lo
        self._node_index = [_NodeIndex.of(part, codec.num_levels) for part in partitions]

    # ---------------------------------------------------------------- building
    @classmethod
    def build(
        cls,
        codec: IdCodec,
        ids: np.ndarray,
        modalities: np.ndarray,
        items: np.ndarray | None = None,
        ranges_per_modality: int = 1,
    ) -> "Trie":
        """Build from packed IDs (N, width), their modality and item numbers (default 0..N-1).

        `ranges_per_modality` splits each modality by first code into that many partitions.
        """
        ids = np.ascontiguousarray(ids, dtype=np.uint8)
        modalities = np.asarray(modalities, dtype=np.int64)
        if items is None:
            items = np.arange(len(ids))
        items = np.asarray(items)
        if not (len(ids) == len(modalities) == len(items)):
            raise ValueError(f"ids, modalities, items differ in length: {len(ids)}, {len(modalities)}, {len(items)}")
        if ids.ndim != 2 or ids.shape[1] != codec.width:
            raise ValueError(f"ids must have shape (N, {codec.width}), got {ids.shape}")
        bounds = np.linspace(0, codec.codebook_size, ranges_per_modality + 1).round().astype(int)
        partitions = []
        for modality in Modality:
            sel = np.flatnonzero(modalities == modality)
            if len(sel) == 0:
                continue
            if len(sel) < len(ids):
                m_ids, m_items = np.take(ids, sel, axis=0), items[sel]  # np.take: faster than fancy row indexing
            else:
                m_ids, m_items = ids, items
            order = sort_order(m_ids, m_items)  # by ID bytes, ties by item number
            m_ids, m_items = np.take(m_ids, order, axis=0), m_items[order]
            first = codec.code_at(m_ids, 0)
            for lo_code, hi_code in zip(bounds[:-1], bounds[1:]):
                rows = slice(np.searchsorted(first, lo_code), np.searchsorted(first, hi_code))
                if rows.stop > rows.start:
                    partitions.append(build_partition(codec, modality, int(lo_code), int(hi_code),
                                                      m_ids[rows], m_items[rows]))
        return cls(codec, partitions)

    # ---------------------------------------------------------------- storage
    def save(self, directory: str | os.PathLike) -> list[dict]:
        """Write every partition's raw arrays, then the JSON manifest (each file atomically); return the entries."""
        entries = [write_partition(directory, part, self.codec) for part in self.partitions]
        write_trie_manifest(directory, self.codec, entries)
        return entries

    @classmethod
    def load(cls, directory: str | os.PathLike, mmap: bool = True) -> "Trie":
        directory = Path(directory)
        manifest_path = directory / MANIFEST
        if not manifest_path.exists():
            raise FileNotFoundError(f"no trie manifest at {manifest_path}")
        manifest = json.loads(manifest_path.read_text())
        codec = IdCodec(manifest["num_levels"], manifest["codebook_size"])
        if manifest.get("width", codec.width) != codec.width:
            raise ValueError(f"{manifest_path}: width {manifest['width']}, the codec gives {codec.width}")
        return cls(codec, [read_partition(directory, e, codec, mmap) for e in manifest["partitions"]])

    # ---------------------------------------------------------------- queries
    def __len__(self) -> int:
        return sum(len(p) for p in self.partitions)

    @property
    def modalities(self) -> list[Modality]:
        return sorted({p.modality for p in self.partitions})

    def bytes_per_item(self) -> float:
        """Bytes of all arrays (IDs, items, dense and big-node tables) per item."""
        return sum(p.nbytes for p in self.partitions) / max(1, len(self))

    def root_mask(self, modalities: np.ndarray) -> np.ndarray:
        """(B, K) allowed first semantic codes for beams whose modality is given."""
        return self._root_mask[modalities]

    def root_children(self, modalities: np.ndarray, codes: np.ndarray) -> TrieState:
        """State after choosing first semantic code `codes` under `modalities`."""
        if not self._root_mask[modalities, codes].all():
            raise ValueError("a chosen first code has no items under its modality")
        part = self._root_part[modalities, codes]
        return TrieState(part, self._root_lo[modalities, codes], self._root_hi[modalities, codes], codes.astype(np.int64))

    def expand(self, level: int, state: TrieState) -> "Expansion":
        """Allowed codes at semantic `level` (>= 1) for every beam in `state`."""
        return Expansion(self, level, state)

    def single_completion(self, state: TrieState) -> np.ndarray:
        """Whether each beam's prefix has exactly one complete ID below it: its rows, sorted by
        ID, share the first row's ID. Every later step of such a beam is forced."""
        single = np.zeros(len(state.lo), dtype=bool)
        for p in np.unique(state.part):
            beams = np.flatnonzero(state.part == p)
            ids = self.partitions[p].ids
            first = np.asarray(np.take(ids, state.lo[beams], axis=0))
            last = np.asarray(np.take(ids, state.hi[beams] - 1, axis=0))
            single[beams] = (first == last).all(1)
        return single

    def leaf_items(self, state: TrieState) -> list[np.ndarray]:
        """Item numbers under each beam's (complete) ID."""
        return [np.asarray(self.partitions[p].items[lo:hi]) for p, lo, hi in zip(state.part, state.lo, state.hi)]

    def contains(self, modality: Modality, ids: np.ndarray) -> np.ndarray:
        """Whether each packed ID exists under `modality` (for tests and validation)."""
        ids = np.asarray(ids, dtype=np.uint8)
        keys = {bytes(r) for p in self.partitions if p.modality == modality for r in np.asarray(p.ids)}
        return np.array([bytes(r) in keys for r in ids], dtype=bool)


@dataclass
class _NodeIndex:
    """Lookup of a partition's big nodes by (level, lo): where each level starts, and the lo column."""

    nodes: np.ndarray
    level_start: np.ndarray  # (L + 1,): nodes of level l are rows level_start[l]:level_start[l + 1]
    lo: np.ndarray  # contiguous copy of the lo column, for searchsorted

    @classmethod
    def of(cls, part: TriePartition, num_levels: int) -> "_NodeIndex":
        levels = np.asarray(part.nodes[:, 0])
        return cls(part.nodes, np.searchsorted(levels, np.arange(num_levels + 1)), np.array(part.nodes[:, 1]))

    def find(self, level: int, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """(B, 5) node rows of the prefixes at `level` with row ranges [lo, hi)."""
        start, stop = self.level_start[level], self.level_start[level + 1]
        at = start + np.searchsorted(self.lo[start:stop], lo)
        if (at < stop).all():
            nodes = np.asarray(self.nodes[at])
            if (nodes[:, 1] == lo).all() and (nodes[:, 2] == hi).all():
                return nodes
        raise ValueError(f"a beam's range at level {level} exceeds the big-node threshold but has no node: "
                         f"damaged trie tables, or a state from another trie")


@dataclass
class _DenseChildren:
    """Children of beams at a dense level: read from the offsets of every possible prefix."""

    beams: np.ndarray  # beam numbers in the expansion's state, ascending
    prefix: np.ndarray  # their code prefixes as integers
    table: np.ndarray  # dense offsets of the level
    K: int

    def mark(self, mask: np.ndarray) -> None:
        base = self.prefix[:, None] * self.K + np.arange(self.K)
        mask[self.beams] = self.table[base + 1] > self.table[base]

    def find(self, local: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        key = self.prefix[local] * self.K + codes
        lo, hi = self.table[key], self.table[key + 1]
        if (hi <= lo).any():
            raise ValueError("a chosen code is not a child of its beam")
        return lo, hi


@dataclass
class _ListedChildren:
    """Children of beams as a sorted list: key = local beam * K + code, and the child's row range."""

    beams: np.ndarray  # beam numbers in the expansion's state, ascending
    keys: np.ndarray  # sorted, unique
    lo: np.ndarray
    hi: np.ndarray
    K: int

    def mark(self, mask: np.ndarray) -> None:
        local = self.keys // self.K
        # Flat indices into the C-ordered (B, K) mask: faster than a 2-d fancy assignment.
        mask.reshape(-1)[self.keys + (self.beams - np.arange(len(self.beams)))[local] * self.K] = True

    def find(self, local: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        key = local * self.K + codes
        at = np.searchsorted(self.keys, key)
        if (at >= len(self.keys)).any() or (self.keys[np.minimum(at, len(self.keys) - 1)] != key).any():
            raise ValueError("a chosen code is not a child of its beam")
        return self.lo[at], self.hi[at]


def _gathered_children(codec: IdCodec, part: TriePartition, level: int, beams: np.ndarray, lo: np.ndarray,
                       hi: np.ndarray) -> _ListedChildren:
    """Children of small ranges: read the code of every row in range (at most T per beam)."""
    K = codec.codebook_size
    counts = hi - lo
    rows = _concat_ranges(lo, counts)
    beam_of = np.repeat(np.arange(len(beams)), counts)
    # Rows are sorted by code within each beam, so the keys come sorted: runs of equal keys are children.
    keys = beam_of * K + codec.code_at(np.asarray(np.take(part.ids, rows, axis=0)), level)
    first = np.flatnonzero(np.diff(keys, prepend=-1))  # keys are >= 0
    last = np.append(first[1:], len(keys)) - 1
    return _ListedChildren(beams, keys[first], rows[first], rows[last] + 1, K)


def _stored_children(index: _NodeIndex, part: TriePartition, level: int, beams: np.ndarray, lo: np.ndarray,
                     hi: np.ndarray, K: int) -> _ListedChildren:
    """Children of big ranges: from their node's slice of the child table (at most K per beam)."""
    nodes = index.find(level, lo, hi)
    count = nodes[:, 4]
    children = np.take(part.children, _concat_ranges(nodes[:, 3], count), axis=0)
    keys = np.repeat(np.arange(len(beams)), count) * K + children[:, 0]
    return _ListedChildren(beams, keys, children[:, 1], children[:, 2], K)


class Expansion:
    """Children of B beams at one level: a (B, K) mask, and the child state of chosen codes."""

    def __init__(self, trie: Trie, level: int, state: TrieState):
        K = trie.codec.codebook_size
        self.trie, self.level, self.state = trie, level, state
        self.mask = np.zeros((len(state.lo), K), dtype=bool)
        self._groups: list[_DenseChildren | _ListedChildren] = []
        for p in np.unique(state.part):
            beams = np.flatnonzero(state.part == p)
            part = trie.partitions[p]
            if level < len(part.dense):
                self._groups.append(_DenseChildren(beams, state.prefix[beams], part.dense[level], K))
                continue
            lo, hi = state.lo[beams], state.hi[beams]
            # Big ranges (more than T rows) read their node's children instead of all their rows.
            big = hi - lo > part.big_rows
            if not big.all():
                small = ~big
                self._groups.append(_gathered_children(trie.codec, part, level, beams[small], lo[small], hi[small]))
            if big.any():
                self._groups.append(_stored_children(trie._node_index[p], part, level, beams[big], lo[big],
                                                     hi[big], K))
        for group in self._groups:
            group.mark(self.mask)

    def children(self, beam: np.ndarray, codes: np.ndarray) -> TrieState:
        """State of the child `codes[i]` of beam `beam[i]` (each must be allowed)."""
        K = self.trie.codec.codebook_size
        beam = np.asarray(beam, dtype=np.int64)
        codes = np.asarray(codes, dtype=np.int64)
        if ((codes < 0) | (codes >= K)).any():
            raise ValueError(f"a chosen code is not a child of its beam: codes must lie in [0, {K})")
        lo = np.empty(len(beam), dtype=np.int64)
        hi = np.empty(len(beam), dtype=np.int64)
        for group in self._groups:
            sel = np.flatnonzero(np.isin(beam, group.beams))
            if len(sel):
                lo[sel], hi[sel] = group.find(np.searchsorted(group.beams, beam[sel]), codes[sel])
        # The integer prefix only serves dense levels; past them it would overflow int64.
        deepest_dense = max(len(p.dense) for p in self.trie.partitions)
        if self.level + 1 < deepest_dense:
            prefix = self.state.prefix[beam] * K + codes
        else:
            prefix = np.zeros(len(beam), dtype=np.int64)
        return TrieState(self.state.part[beam], lo, hi, prefix)
