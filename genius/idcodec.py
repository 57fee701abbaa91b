"""Order-preserving packing of semantic codes into fixed-width byte IDs.

An ID holds the L semantic codes (levels 1..L) of an item, each in ceil(log2 K) bits,
big-endian and left-aligned, so that comparing IDs as bytes compares the code tuples
(sorting IDs sorts the trie). With L = 8, K = 4096 that is exactly 96 bits = 12 bytes.
The modality (code 0) is not stored in the ID: it is the trie partition key.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class IdCodec:
    num_levels: int
    codebook_size: int

    def __post_init__(self) -> None:
        # Accept numpy integers too; the values end up in JSON manifests.
        object.__setattr__(self, "num_levels", int(self.num_levels))
        object.__setattr__(self, "codebook_size", int(self.codebook_size))
        if self.num_levels < 1:
            raise ValueError(f"num_levels must be >= 1, got {self.num_levels}")
        if self.codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got {self.codebook_size}")

    @property
    def bits_per_code(self) -> int:
        return max(1, math.ceil(math.log2(self.codebook_size)))

    @property
    def width(self) -> int:
        """Bytes per ID: ceil(L * bits / 8)."""
        return math.ceil(self.num_levels * self.bits_per_code / 8)

    def pack(self, codes: np.ndarray) -> np.ndarray:
        """(N, L) integer codes -> (N, width) uint8 IDs."""
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[1] != self.num_levels:
            raise ValueError(f"codes must have shape (N, {self.num_levels}), got {codes.shape}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size}), got [{codes.min()}, {codes.max()}]")
        b = self.bits_per_code
        shifts = np.arange(b - 1, -1, -1, dtype=np.int64)
        bits = ((codes.astype(np.int64)[:, :, None] >> shifts) & 1).astype(np.uint8)
        # packbits pads the tail with zero bits, which keeps byte order == code order.
        return np.packbits(bits.reshape(len(codes), -1), axis=1)

    def unpack(self, ids: np.ndarray) -> np.ndarray:
        """(N, width) uint8 IDs -> (N, L) int64 codes."""
        ids = np.asarray(ids, dtype=np.uint8)
        if ids.ndim != 2 or ids.shape[1] != self.width:
            raise ValueError(f"ids must have shape (N, {self.width}), got {ids.shape}")
        b = self.bits_per_code
        bits = np.unpackbits(ids, axis=1)[:, : self.num_levels * b].reshape(len(ids), self.num_levels, b)
        weights = (1 << np.arange(b - 1, -1, -1, dtype=np.int64))
        return bits.astype(np.int64) @ weights

    def code_at(self, ids: np.ndarray, level: int) -> np.ndarray:
        """Code of one level (0-based among the semantic levels) for each ID, without unpacking all."""
        b = self.bits_per_code
        start, stop = level * b, (level + 1) * b
        first, last = start // 8, (stop - 1) // 8
        window = np.asarray(ids)[:, first : last + 1].astype(np.int64)
        value = np.zeros(len(window), dtype=np.int64)
        for j in range(window.shape[1]):
            value = (value << 8) | window[:, j]
        tail = (last + 1) * 8 - stop
        return (value >> tail) & ((1 << b) - 1)

    def to_bytes(self, ids: np.ndarray) -> list[bytes]:
        return [row.tobytes() for row in np.asarray(ids, dtype=np.uint8)]

    def from_bytes(self, values: "list[bytes]") -> np.ndarray:
        for i, v in enumerate(values):
            if len(v) != self.width:
                raise ValueError(f"ID {i} has {len(v)} bytes, expected {self.width}")
        return np.frombuffer(b"".join(values), dtype=np.uint8).reshape(len(values), self.width)
