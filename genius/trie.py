"""Compact, memory-mappable trie over sorted packed IDs, with batched expansion for beam search.

A partition holds the items of one modality whose first semantic code lies in
[code_lo, code_hi): a sorted (N, width) uint8 array of packed IDs plus an aligned array of
item numbers (uint32 while the corpus fits): 16 bytes per item for 12-byte IDs. There are no
per-node objects. A beam's position in the trie is a row range [lo, hi) of one partition:
the rows sharing its prefix. The children of a prefix are the distinct next codes in that
range; the top levels use dense offset tables (row start of every possible prefix), deeper
levels read the codes of the rows in range, which are few there.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from genius.atomic import write_atomic, write_json_atomic
from genius.idcodec import IdCodec
from genius.modality import NUM_MODALITIES, Modality

log = logging.getLogger(__name__)

MANIFEST = "trie.json"
# A dense table for level l has K**(l+1) + 1 entries; build it while that stays below
# DENSE_FACTOR * N entries (and the hard cap), so tables cost at most a few bytes per item.
DENSE_FACTOR = 1
DENSE_MAX_ENTRIES = 1 << 26


@dataclass
class TriePartition:
    modality: Modality
    code_lo: int
    code_hi: int
    ids: np.ndarray  # (N, width) uint8, sorted as bytes
    items: np.ndarray  # (N,) item numbers, aligned with ids
    dense: list[np.ndarray]  # dense[l]: (K**(l+1) + 1,) int64 row offsets of each prefix

    def __len__(self) -> int:
        return len(self.ids)


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


def _dense_levels(num_items: int, num_levels: int, codebook_size: int) -> int:
    levels = 1  # level 0 is always dense: K + 1 offsets
    while levels < num_levels:
        entries = codebook_size ** (levels + 1)
        if entries > max(DENSE_FACTOR * num_items, codebook_size) or entries > DENSE_MAX_ENTRIES:
            break
        levels += 1
    return levels


def _build_dense(codes: np.ndarray, levels: int, codebook_size: int) -> list[np.ndarray]:
    """Offsets of each prefix (of length 1..levels) into sorted rows."""
    tables = []
    prefix = np.zeros(len(codes), dtype=np.int64)
    for level in range(levels):
        prefix = prefix * codebook_size + codes[:, level]
        counts = np.bincount(prefix, minlength=codebook_size ** (level + 1))
        tables.append(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))
    return tables


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
        item_dtype = np.uint32 if (len(items) == 0 or items.max() < 2**32) else np.uint64
        K = codec.codebook_size
        bounds = np.linspace(0, K, ranges_per_modality + 1).round().astype(int)
        partitions = []
        for modality in Modality:
            sel = np.flatnonzero(modalities == modality)
            if len(sel) == 0:
                continue
            m_ids, m_items = ids[sel], items[sel]
            # Sort by ID bytes (column 0 most significant), ties by item number.
            order = np.lexsort([m_items] + [m_ids[:, j] for j in range(codec.width - 1, -1, -1)])
            m_ids, m_items = m_ids[order], m_items[order]
            first = codec.code_at(m_ids, 0)
            for lo_code, hi_code in zip(bounds[:-1], bounds[1:]):
                rows = slice(np.searchsorted(first, lo_code), np.searchsorted(first, hi_code))
                p_ids, p_items = m_ids[rows], m_items[rows].astype(item_dtype)
                if len(p_ids) == 0:
                    continue
                levels = _dense_levels(len(p_ids), codec.num_levels, K)
                dense = _build_dense(codec.unpack(p_ids), levels, K)
                partitions.append(TriePartition(modality, int(lo_code), int(hi_code), p_ids, p_items, dense))
        return cls(codec, partitions)

    # ---------------------------------------------------------------- storage
    def save(self, directory: str | os.PathLike) -> None:
        """Write raw arrays (memory-mappable) plus a JSON manifest; each file atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        entries = []
        for part in self.partitions:
            stem = f"{part.modality.name.lower()}-{int(part.code_lo):05d}"
            files = {"ids": f"{stem}.ids", "items": f"{stem}.items"}
            write_atomic(directory / files["ids"], np.ascontiguousarray(part.ids).tofile)
            write_atomic(directory / files["items"], np.ascontiguousarray(part.items).tofile)
            for level, table in enumerate(part.dense):
                files[f"dense{level}"] = f"{stem}.dense{level}"
                write_atomic(directory / files[f"dense{level}"], np.ascontiguousarray(table).tofile)
            entries.append({
                "modality": part.modality.name.lower(), "code_lo": int(part.code_lo), "code_hi": int(part.code_hi),
                "count": len(part), "item_dtype": str(part.items.dtype), "dense_levels": len(part.dense),
                "files": files,
            })
        manifest = {"num_levels": self.codec.num_levels, "codebook_size": self.codec.codebook_size,
                    "width": self.codec.width, "partitions": entries}
        write_json_atomic(directory / MANIFEST, manifest)

    @classmethod
    def load(cls, directory: str | os.PathLike, mmap: bool = True) -> "Trie":
        directory = Path(directory)
        manifest_path = directory / MANIFEST
        if not manifest_path.exists():
            raise FileNotFoundError(f"no trie manifest at {manifest_path}")
        manifest = json.loads(manifest_path.read_text())
        codec = IdCodec(manifest["num_levels"], manifest["codebook_size"])
        partitions = []
        for e in manifest["partitions"]:
            n, files = e["count"], e["files"]
            ids = _read(directory / files["ids"], np.uint8, (n, codec.width), mmap)
            items = _read(directory / files["items"], np.dtype(e["item_dtype"]), (n,), mmap)
            dense = [_read(directory / files[f"dense{l}"], np.int64, None, mmap) for l in range(e["dense_levels"])]
            partitions.append(TriePartition(Modality.parse(e["modality"]), e["code_lo"], e["code_hi"], ids, items, dense))
        return cls(codec, partitions)

    # ---------------------------------------------------------------- queries
    def __len__(self) -> int:
        return sum(len(p) for p in self.partitions)

    @property
    def modalities(self) -> list[Modality]:
        return sorted({p.modality for p in self.partitions})

    def bytes_per_item(self) -> float:
        total = sum(p.ids.nbytes + p.items.nbytes + sum(t.nbytes for t in p.dense) for p in self.partitions)
        return total / max(1, len(self))

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

    def leaf_items(self, state: TrieState) -> list[np.ndarray]:
        """Item numbers under each beam's (complete) ID."""
        return [np.asarray(self.partitions[p].items[lo:hi]) for p, lo, hi in zip(state.part, state.lo, state.hi)]

    def contains(self, modality: Modality, ids: np.ndarray) -> np.ndarray:
        """Whether each packed ID exists under `modality` (for tests and validation)."""
        ids = np.asarray(ids, dtype=np.uint8)
        keys = {bytes(r) for p in self.partitions if p.modality == modality for r in np.asarray(p.ids)}
        return np.array([bytes(r) in keys for r in ids], dtype=bool)


class Expansion:
    """Children of B beams at one level: a (B, K) mask, and the child state of chosen codes."""

    def __init__(self, trie: Trie, level: int, state: TrieState):
        K = trie.codec.codebook_size
        B = len(state.lo)
        self.trie, self.level, self.state = trie, level, state
        self.mask = np.zeros((B, K), dtype=bool)
        # Per partition: either dense offsets or the gathered rows of each beam's range.
        self._groups: list[tuple[np.ndarray, TriePartition, np.ndarray | None, np.ndarray | None]] = []
        for p in np.unique(state.part):
            beams = np.flatnonzero(state.part == p)
            part = trie.partitions[p]
            if level < len(part.dense):
                table = part.dense[level]
                base = state.prefix[beams][:, None] * K + np.arange(K)
                self.mask[beams] = table[base + 1] > table[base]
                self._groups.append((beams, part, None, None))
                continue
            lo, hi = state.lo[beams], state.hi[beams]
            counts = hi - lo
            total = int(counts.sum())
            starts = np.cumsum(counts) - counts
            rows = np.repeat(lo - starts, counts) + np.arange(total)
            beam_of = np.repeat(np.arange(len(beams)), counts)
            codes = trie.codec.code_at(np.asarray(part.ids[rows]), level)
            self.mask[beams[beam_of], codes] = True
            # Rows are sorted by code within each beam, so (beam, code) keys are sorted.
            self._groups.append((beams, part, rows, beam_of * K + codes))

    def children(self, beam: np.ndarray, codes: np.ndarray) -> TrieState:
        """State of the child `codes[i]` of beam `beam[i]` (each must be allowed)."""
        K = self.trie.codec.codebook_size
        beam = np.asarray(beam, dtype=np.int64)
        codes = np.asarray(codes, dtype=np.int64)
        lo = np.empty(len(beam), dtype=np.int64)
        hi = np.empty(len(beam), dtype=np.int64)
        part_of_beam = self.state.part[beam]
        for beams, part, rows, keys in self._groups:
            sel = np.flatnonzero(np.isin(beam, beams))
            if len(sel) == 0:
                continue
            if rows is None:
                key = self.state.prefix[beam[sel]] * K + codes[sel]
                table = part.dense[self.level]
                lo[sel], hi[sel] = table[key], table[key + 1]
            else:
                local = np.searchsorted(beams, beam[sel])
                key = local * K + codes[sel]
                left = np.searchsorted(keys, key, "left")
                right = np.searchsorted(keys, key, "right")
                if (right <= left).any():
                    raise ValueError("a chosen code is not a child of its beam")
                lo[sel], hi[sel] = rows[left], rows[right - 1] + 1
        # The integer prefix only serves dense levels; past them it would overflow int64.
        deepest_dense = max(len(p.dense) for p in self.trie.partitions)
        if self.level + 1 < deepest_dense:
            prefix = self.state.prefix[beam] * K + codes
        else:
            prefix = np.zeros(len(beam), dtype=np.int64)
        return TrieState(part_of_beam, lo, hi, prefix)


def _read(path: Path, dtype: np.dtype, shape: tuple | None, mmap: bool) -> np.ndarray:
    if not path.exists():
        raise FileNotFoundError(f"trie file missing: {path}")
    if path.stat().st_size == 0:
        return np.zeros(shape if shape else (0,), dtype=dtype)
    if mmap:
        return np.memmap(path, dtype=dtype, mode="r", shape=shape)
    data = np.fromfile(path, dtype=dtype)
    return data.reshape(shape) if shape else data
