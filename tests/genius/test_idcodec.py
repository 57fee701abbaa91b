import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from genius.idcodec import IdCodec


@st.composite
def codec_and_codes(draw):
    levels = draw(st.integers(1, 10))
    size = draw(st.integers(2, 5000))
    rows = draw(st.integers(1, 20))
    codes = draw(st.lists(st.lists(st.integers(0, size - 1), min_size=levels, max_size=levels), min_size=rows, max_size=rows))
    return IdCodec(levels, size), np.array(codes, dtype=np.int64)


def test_paper_size_is_twelve_bytes():
    assert IdCodec(8, 4096).width == 12


@settings(max_examples=200, deadline=None)
@given(codec_and_codes())
def test_round_trip(args):
    codec, codes = args
    ids = codec.pack(codes)
    assert ids.shape == (len(codes), codec.width) and ids.dtype == np.uint8
    assert np.array_equal(codec.unpack(ids), codes)
    for level in range(codec.num_levels):
        assert np.array_equal(codec.code_at(ids, level), codes[:, level])
    assert np.array_equal(codec.from_bytes(codec.to_bytes(ids)), ids)


@settings(max_examples=200, deadline=None)
@given(codec_and_codes())
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
    with pytest.raises(ValueError, match="expected 2"):
        codec.from_bytes([b"abc"])
