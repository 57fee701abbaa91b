"""Re-ranking vectors: fp16 (n, D) arrays of items [start, end), one .npy file each, memory-mapped.

Row r of the shard starting at item s is item s + r. A shard is also the unit a shard server
(genius serve shard) holds.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from genius.atomic import write_atomic
from genius.store.layout import IndexFormatError
from genius.store.manifest import RangeFile

SUFFIX = ".npy"


def write_vector_shard(path: str | os.PathLike, vectors: np.ndarray) -> None:
    write_atomic(path, lambda f: np.save(f, np.ascontiguousarray(vectors, dtype=np.float16)))


def read_vector_shard(path: str | os.PathLike, rows: int, dim: int, mmap: bool = True) -> np.ndarray:
    path = Path(path)
    try:
        array = np.load(path, mmap_mode="r" if mmap else None)
    except FileNotFoundError:
        raise IndexFormatError(f"{path}: vector shard missing") from None
    except (ValueError, OSError) as exc:
        raise IndexFormatError(f"{path}: damaged vector shard ({exc})") from None
    if array.shape != (rows, dim) or array.dtype != np.float16:
        raise IndexFormatError(f"{path}: holds {array.dtype} {array.shape}, the manifest says float16 ({rows}, {dim})")
    return array


class VectorShards:
    """Item vectors by item number across shards."""

    def __init__(self, ranges: list[RangeFile], arrays: list[np.ndarray], dim: int):
        self.ranges = ranges
        self.arrays = arrays
        self.dim = dim
        self._starts = np.array([r.start for r in ranges], dtype=np.int64)
        self._ends = np.array([r.end for r in ranges], dtype=np.int64)

    @classmethod
    def open(cls, version_dir: str | os.PathLike, ranges: list[RangeFile], dim: int, mmap: bool = True) -> "VectorShards":
        version_dir = Path(version_dir)
        return cls(ranges, [read_vector_shard(version_dir / r.file, len(r), dim, mmap) for r in ranges], dim)

    @classmethod
    def in_memory(cls, vectors: np.ndarray, start: int = 0) -> "VectorShards":
        vectors = np.asarray(vectors, dtype=np.float16)
        return cls([RangeFile(start, start + len(vectors), "")], [vectors], vectors.shape[1])

    def __getitem__(self, items: np.ndarray) -> np.ndarray:
        """(n, D) float16 vectors of these item numbers."""
        items = np.asarray(items, dtype=np.int64)
        out = np.empty((len(items), self.dim), dtype=np.float16)
        which = np.searchsorted(self._starts, items, side="right") - 1
        if len(items) and (len(self._starts) == 0 or (which < 0).any() or (items >= self._ends[np.maximum(which, 0)]).any()):
            raise IndexError("an item number lies outside every vector shard")
        for s in np.unique(which):
            positions = np.flatnonzero(which == s)
            out[positions] = self.arrays[s][items[positions] - self._starts[s]]
        return out
