import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import genius.idcodec as idcodec_module
from genius.idcodec import IdCodec, id_words, sort_order

SIZES = st.one_of(st.integers(2, 2**16), st.sampled_from([2**16 + 1, 2**20 - 3, 2**31, 2**31 + 7, 2**32 - 1, 2**32]))


def reference_pack(codec: IdCodec, codes: np.ndarray) -> np.ndarray:
    """The original bit-matrix implementation: one bit per (row, level, bit), then np.packbits."""
    b = codec.bits_per_code
    shifts = np.arange(b - 1, -1, -1, dtype=np.int64)
    bits = ((codes.astype(np.int64)[:, :, None] >> shifts) & 1).astype(np.uint8)
    return np.packbits(bits.reshape(len(codes), -1), axis=1)


@st.composite
def codec_and_codes(draw, max_levels=16, sizes=SIZES):
    levels = draw(st.integers(1, max_levels))
    size = draw(sizes)
    rows = draw(st.integers(1, 20))
    # Extremes (0 and K-1) exercise every bit of each code's window.
    code = st.one_of(st.integers(0, size - 1), st.sampled_from([0, size - 1]))
    codes = draw(st.lists(st.lists(code, min_size=levels, max_size=levels), min_size=rows, max_size=rows))
    return IdCodec(levels, size), np.array(codes, dtype=np.int64)


def test_paper_size_is_twelve_bytes():
    assert IdCodec(8, 4096).width == 12


def check_round_trip(codec: IdCodec, codes: np.ndarray) -> None:
    ids = codec.pack(codes)
    assert ids.shape == (len(codes), codec.width) and ids.dtype == np.uint8
    assert np.array_equal(ids, reference_pack(codec, codes))
    assert np.array_equal(codec.unpack(ids), codes)
    for level in range(codec.num_levels):
        assert np.array_equal(codec.code_at(ids, level), codes[:, level])
    assert np.array_equal(codec.from_bytes(codec.to_bytes(ids)), ids)


@settings(max_examples=300, deadline=None)
@given(codec_and_codes())
def test_round_trip_and_same_bytes_as_the_bit_matrix_packing(args):
    check_round_trip(*args)


@pytest.mark.parametrize("width", range(1, 17))
def test_every_width_round_trips(width):
    rng = np.random.default_rng(width)
    # All (levels, bits) with this width, including codes that straddle up to 5 bytes.
    cases = [(levels, bits) for levels in range(1, 17) for bits in (1, 3, 7, 8, 9, 12, 13, 16, 17, 31, 32)
             if -(-levels * bits // 8) == width]
    assert cases
    for levels, bits in cases:
        for size in {2**bits, 2 ** (bits - 1) + 1}:  # the largest and smallest K of this many bits
            codec = IdCodec(levels, size)
            assert codec.width == width and codec.bits_per_code == bits
            codes = rng.integers(0, size, (64, levels), dtype=np.int64)
            codes[0], codes[1] = 0, size - 1
            check_round_trip(codec, codes)


def test_pack_works_in_chunks(monkeypatch):
    monkeypatch.setattr(idcodec_module, "CHUNK_ROWS", 7)
    codec = IdCodec(5, 3000)
    codes = np.random.default_rng(0).integers(0, 3000, (50, 5))
    check_round_trip(codec, codes)
    assert codec.pack(codes[:0]).shape == (0, codec.width) and codec.unpack(codec.pack(codes[:0])).shape == (0, 5)


def test_code_spanning_five_bytes():
    codec = IdCodec(3, 2**31)  # level 1 holds bits 31..61: bytes 3..7
    codes = np.array([[2**31 - 1, 2**31 - 1, 1], [0, 2**30 + 5, 0]])
    check_round_trip(codec, codes)


@settings(max_examples=200, deadline=None)
@given(codec_and_codes(max_levels=10, sizes=st.integers(2, 5000)))
def test_byte_order_equals_code_order(args):
    codec, codes = args
    ids = codec.to_bytes(codec.pack(codes))
    by_bytes = sorted(range(len(codes)), key=lambda i: (ids[i], i))
    by_codes = sorted(range(len(codes)), key=lambda i: (tuple(codes[i]), i))
    assert by_bytes == by_codes


def test_rejects_out_of_range_codes_and_bad_shapes():
    codec = IdCodec(3, 10)
    with pytest.raises(ValueError, match="codes must lie in"):
        codec.pack(np.array([[0, 10, 1]]))
    with pytest.raises(ValueError, match="shape"):
        codec.pack(np.zeros((2, 4), dtype=int))
    with pytest.raises(ValueError, match="shape"):
        codec.unpack(np.zeros((2, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match="expected 2"):
        codec.from_bytes([b"abc"])


def test_codebook_larger_than_32_bits_is_refused():
    assert IdCodec(2, 2**32).bits_per_code == 32
    with pytest.raises(ValueError, match=r"codebook_size must be <= 2\*\*32"):
        IdCodec(2, 2**32 + 1)


# ----------------------------------------------------------------------------- sorting


@st.composite
def ids_and_tiebreak(draw):
    width = draw(st.integers(1, 20))
    rows = draw(st.integers(0, 60))
    distinct = draw(st.integers(1, 8))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    pool = rng.integers(0, 256, (distinct, width), dtype=np.uint8)
    ids = pool[rng.integers(0, distinct, rows)]  # many duplicates
    if rows and draw(st.booleans()):
        ids[:, : rng.integers(0, width + 1)] = 7  # long shared prefixes
    kind = draw(st.sampled_from(["none", "small", "int64", "uint64", "int8"]))
    tiebreak = {
        "none": None,
        "small": rng.integers(0, 4, rows),
        "int64": rng.choice(np.array([np.iinfo(np.int64).min, -1, 0, 5, np.iinfo(np.int64).max]), rows),
        "uint64": rng.choice(np.array([0, 1, 2**63, 2**64 - 1], dtype=np.uint64), rows),
        "int8": rng.integers(-128, 128, rows).astype(np.int8),
    }[kind]
    return ids, tiebreak


@settings(max_examples=300, deadline=None)
@given(ids_and_tiebreak())
def test_sort_order_matches_a_stable_lexsort_of_the_bytes(args):
    ids, tiebreak = args
    keys = [ids[:, j] for j in range(ids.shape[1] - 1, -1, -1)]
    expected = np.lexsort(keys if tiebreak is None else [tiebreak] + keys)
    order = sort_order(ids, tiebreak)
    assert order.dtype == np.int64
    assert np.array_equal(order, expected)


def test_sort_order_of_skewed_random_ids():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 256, (20_000, 12), dtype=np.uint8)
    ids[rng.random(20_000) < 0.3, :9] = 1
    items = rng.permutation(20_000)
    expected = np.lexsort([items] + [ids[:, j] for j in range(11, -1, -1)])
    assert np.array_equal(sort_order(ids, items), expected)


def test_sort_order_rejects_a_bad_tiebreak():
    ids = np.zeros((3, 4), dtype=np.uint8)
    with pytest.raises(ValueError, match="shape"):
        sort_order(ids, np.arange(2))
    with pytest.raises(ValueError, match="integer"):
        sort_order(ids, np.zeros(3))


@settings(max_examples=100, deadline=None)
@given(ids_and_tiebreak())
def test_id_words_compare_like_bytes(args):
    ids, _ = args
    words = id_words(ids)
    assert len(words) == -(-ids.shape[1] // 8) and all(w.dtype == np.uint64 for w in words)
    as_tuples = [tuple(int(w[i]) for w in words) for i in range(len(ids))]
    as_bytes = [bytes(r) for r in ids]
    for i in range(len(ids) - 1):
        assert (as_tuples[i] < as_tuples[i + 1]) == (as_bytes[i] < as_bytes[i + 1])
        assert (as_tuples[i] == as_tuples[i + 1]) == (as_bytes[i] == as_bytes[i + 1])
    fortran = id_words(np.asfortranarray(ids))  # strided rows take the copying path
    assert all(np.array_equal(a, b) for a, b in zip(fortran, words))
