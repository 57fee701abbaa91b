"""Order-preserving packing of semantic codes into fixed-width byte IDs.

An ID holds the L semantic codes (levels 1..L) of an item, each in ceil(log2 K) bits,
big-endian and left-aligned, so that comparing IDs as bytes compares the code tuples
(sorting IDs sorts the trie). With L = 8, K = 4096 that is exactly 96 bits = 12 bytes.
The modality (code 0) is not stored in the ID: it is the trie partition key.

Packing works on the ID as big-endian 64-bit words (`id_words`), in chunks of rows, so
that memory stays at a few bytes per row beyond the input and output.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Rows per chunk in pack/unpack: bounds the temporaries to a few tens of MB.
CHUNK_ROWS = 1 << 20
MAX_BITS_PER_CODE = 32  # a code plus its offset in a byte fits a 40-bit window and a uint64
_U64 = np.uint64


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
        if self.bits_per_code > MAX_BITS_PER_CODE:
            raise ValueError(f"codebook_size must be <= 2**{MAX_BITS_PER_CODE} "
                             f"(codes of at most {MAX_BITS_PER_CODE} bits), got {self.codebook_size}")

    @property
    def bits_per_code(self) -> int:
        # Exact ceil(log2 K), without floating point.
        return max(1, (self.codebook_size - 1).bit_length())

    @property
    def width(self) -> int:
        """Bytes per ID: ceil(L * bits / 8)."""
        return -(-self.num_levels * self.bits_per_code // 8)

    @property
    def num_words(self) -> int:
        """64-bit words per ID (`id_words`)."""
        return -(-self.width // 8)

    def pack(self, codes: np.ndarray) -> np.ndarray:
        """(N, L) integer codes -> (N, width) uint8 IDs."""
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[1] != self.num_levels:
            raise ValueError(f"codes must have shape (N, {self.num_levels}), got {codes.shape}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size}), got [{codes.min()}, {codes.max()}]")
        out = np.empty((len(codes), self.width), dtype=np.uint8)
        for start in range(0, len(codes), CHUNK_ROWS):
            stop = min(start + CHUNK_ROWS, len(codes))
            out[start:stop] = self._pack_chunk(codes[start:stop])
        return out

    def _pack_chunk(self, codes: np.ndarray) -> np.ndarray:
        b, n = self.bits_per_code, len(codes)
        words = np.zeros((self.num_words, n), dtype=_U64)
        for level in range(self.num_levels):
            code = codes[:, level].astype(_U64)
            start = level * b
            word, offset = divmod(start, 64)
            spill = offset + b - 64  # bits that do not fit in this word go to the next one
            if spill <= 0:
                words[word] |= code << _U64(-spill)
            else:
                words[word] |= code >> _U64(spill)
                words[word + 1] |= code << _U64(64 - spill)
        # Big-endian words laid side by side are the ID bytes; the tail is zero padding.
        as_bytes = words.T.astype(">u8", order="C").view(np.uint8).reshape(n, 8 * self.num_words)
        return as_bytes[:, : self.width]

    def unpack(self, ids: np.ndarray) -> np.ndarray:
        """(N, width) uint8 IDs -> (N, L) int64 codes."""
        ids = self._check_ids(ids)
        out = np.empty((len(ids), self.num_levels), dtype=np.int64)
        for start in range(0, len(ids), CHUNK_ROWS):
            stop = min(start + CHUNK_ROWS, len(ids))
            for level in range(self.num_levels):
                out[start:stop, level] = self._code_window(ids[start:stop], level)
        return out

    def code_at(self, ids: np.ndarray, level: int) -> np.ndarray:
        """Code of one level (0-based among the semantic levels) for each ID, without unpacking all."""
        if not 0 <= level < self.num_levels:
            raise ValueError(f"level must lie in [0, {self.num_levels}), got {level}")
        return self._code_window(np.asarray(ids, dtype=np.uint8), level).astype(np.int64)

    def _code_window(self, ids: np.ndarray, level: int) -> np.ndarray:
        """Read the (at most 5) bytes holding the code of `level` as a uint64, then shift and mask."""
        b = self.bits_per_code
        start, stop = level * b, (level + 1) * b
        first, last = start // 8, (stop - 1) // 8
        value = ids[:, first].astype(_U64)
        for j in range(first + 1, last + 1):
            value <<= _U64(8)
            value |= ids[:, j]
        value >>= _U64((last + 1) * 8 - stop)
        value &= _U64((1 << b) - 1)
        return value

    def _check_ids(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.uint8)
        if ids.ndim != 2 or ids.shape[1] != self.width:
            raise ValueError(f"ids must have shape (N, {self.width}), got {ids.shape}")
        return ids

    def to_bytes(self, ids: np.ndarray) -> list[bytes]:
        return [row.tobytes() for row in np.asarray(ids, dtype=np.uint8)]

    def from_bytes(self, values: "list[bytes]") -> np.ndarray:
        for i, v in enumerate(values):
            if len(v) != self.width:
                raise ValueError(f"ID {i} has {len(v)} bytes, expected {self.width}")
        return np.frombuffer(b"".join(values), dtype=np.uint8).reshape(len(values), self.width)


def id_words(ids: np.ndarray) -> tuple[np.ndarray, ...]:
    """(N, W) uint8 IDs -> ceil(W/8) native uint64 arrays: the IDs as big-endian words, zero-padded.

    Comparing the word tuples compares the IDs as bytes (memcmp order).
    """
    ids = np.asarray(ids, dtype=np.uint8)
    if ids.ndim != 2:
        raise ValueError(f"ids must be a 2-d uint8 array, got shape {ids.shape}")
    n, width = ids.shape
    words = []
    for start in range(0, width, 8):
        chunk = ids[:, start : start + 8]
        if chunk.shape[1] < 8 or chunk.strides[1] != 1:
            padded = np.zeros((n, 8), dtype=np.uint8)  # the tail word: pad with zero bytes
            padded[:, : chunk.shape[1]] = chunk
            chunk = padded
        words.append(chunk.view(">u8")[:, 0].astype(_U64))
    return tuple(words)


def sort_order(ids: np.ndarray, tiebreak: np.ndarray | None = None) -> np.ndarray:
    """int64 permutation that sorts the rows of (N, W) uint8 `ids` as bytes, ties by `tiebreak`, then stably.

    The sort key is a list of uint64 digits: the ID words, the tiebreak, the row number. A
    (SIMD) quicksort on the first digit does almost all the work; the rows that tie on it are
    then ordered by (tie run, next digit) packed into one uint64, digit after digit, over the
    tied rows only. Much faster than np.lexsort, whose stable sorts of 64-bit keys are timsorts.
    """
    ids = np.asarray(ids, dtype=np.uint8)
    n = len(ids)
    digits = list(id_words(ids))
    if digits and ids.shape[1] % 8:
        digits[-1] = digits[-1] >> _U64(64 - 8 * (ids.shape[1] % 8))  # drop the zero padding: fewer bits
    if tiebreak is not None:
        digits.append(_order_preserving_u64(tiebreak, n))
    if n < 2 or not digits:
        return np.arange(n, dtype=np.int64)
    order = np.argsort(digits[0]).astype(np.int64, copy=False)
    pos: np.ndarray | None = None  # positions in `order` whose rows may still be misordered (None: all)
    key = digits[0][order]
    for digit in digits[1:] + [None]:  # None: the row number, which makes the order stable
        ties = _tie_runs(key)
        if ties is None:
            break
        keep, run = ties
        pos = keep if pos is None else pos[keep]
        rows = order[pos]
        key = _pair_key(run, rows.astype(_U64) if digit is None else digit[rows])
        by_key = np.argsort(key)
        order[pos] = rows[by_key]
        key = key[by_key]
    return order


def _tie_runs(key: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Indices of the sorted `key` that equal a neighbour, and the number of their run of equal keys."""
    same = key[1:] == key[:-1]
    if not same.any():
        return None
    in_run = np.zeros(len(key), dtype=bool)
    in_run[1:] |= same
    in_run[:-1] |= same
    keep = np.flatnonzero(in_run)
    starts = np.ones(len(key), dtype=bool)
    starts[1:] = ~same
    return keep, (np.cumsum(starts[keep]) - 1).astype(_U64)


def _order_preserving_u64(values: np.ndarray, n: int) -> np.ndarray:
    """Integers of any dtype -> uint64 offsets from their minimum (same order, few bits)."""
    values = np.asarray(values)
    if values.shape != (n,):
        raise ValueError(f"tiebreak must have shape ({n},), got {values.shape}")
    if values.dtype.kind not in "uib":
        raise ValueError(f"tiebreak must be an integer array, got dtype {values.dtype}")
    if n == 0:
        return np.zeros(0, dtype=_U64)
    wide = values.astype(np.uint64 if values.dtype.kind in "ub" else np.int64)
    # Subtracting modulo 2**64 gives the exact offset even for int64 extremes.
    return wide.view(_U64) - wide.min().view(_U64)


def _pair_key(run: np.ndarray, digit: np.ndarray) -> np.ndarray:
    """One uint64 key ordering by (run, digit); the digit is replaced by its dense rank if both do not fit."""
    run_bits = int(run[-1]).bit_length()  # runs are numbered in increasing order
    digit_bits = int(digit.max()).bit_length()
    if run_bits + digit_bits > 64:
        by_digit = np.argsort(digit)
        sorted_digit = digit[by_digit]
        dense = np.empty(len(digit), dtype=_U64)
        dense[by_digit] = np.concatenate([[0], np.cumsum(sorted_digit[1:] != sorted_digit[:-1])])
        digit, digit_bits = dense, int(dense.max()).bit_length()
    return (run << _U64(digit_bits)) | digit
