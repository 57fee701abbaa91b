"""The decoder in bf16 / int8 for search: valid IDs, scores near fp32's, fp32 weights untouched."""
import numpy as np
import pytest
import torch

from genius.beam_search import beam_search
from genius.decoder import DecoderConfig, GeniusDecoder
from genius.decoder_precision import PRECISIONS, precision_support, with_precision
from genius.idcodec import IdCodec
from genius.trie import Trie

TINY = DecoderConfig(d_model=32, num_layers=2, num_heads=2, d_kv=16, d_ff=64, prefix_len=2, dropout=0.0)


def case(seed: int = 0):
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    codes = rng.integers(0, 16, (300, 4))
    modality = rng.integers(0, 3, 300)
    codec = IdCodec(4, 16)
    trie = Trie.build(codec, codec.pack(codes), modality)
    decoder = GeniusDecoder(TINY, embed_dim=16, num_levels=4, codebook_size=16).eval()
    valid = {(int(m),) + tuple(int(c) for c in row) for m, row in zip(modality, codes)}
    return decoder, trie, valid, torch.randn(6, 16)


@pytest.mark.parametrize("precision", [p for p in PRECISIONS if p != "fp32"])
def test_low_precision_search_emits_valid_ids_scored_near_fp32(precision):
    ok, why = precision_support(precision)
    if not ok:
        pytest.skip(f"{precision} not supported here: {why}")
    decoder, trie, valid, queries = case()
    before = {k: v.clone() for k, v in decoder.state_dict().items()}
    low = with_precision(decoder, precision)
    assert low is not decoder
    exact = beam_search(decoder, trie, queries, beam_size=8)
    approx = beam_search(low, trie, queries, beam_size=8)
    for q in range(len(queries)):
        assert {tuple(int(c) for c in row) for row in approx.codes[q]} <= valid
    # The same IDs score alike: each ID low precision returns, re-found in fp32's beam.
    for q in range(len(queries)):
        exact_scores = {tuple(r): s for r, s in zip(exact.codes[q].tolist(), exact.scores[q])}
        shared = [(exact_scores[tuple(r)], s) for r, s in zip(approx.codes[q].tolist(), approx.scores[q])
                  if tuple(r) in exact_scores]
        assert len(shared) >= 6, "low precision keeps most of fp32's top 8"
        assert max(abs(a - b) for a, b in shared) < 0.15
    # The stored model is untouched: still fp32, same weights.
    for name, value in decoder.state_dict().items():
        assert value.dtype == before[name].dtype and torch.equal(value, before[name]), name


def test_fp32_is_the_decoder_itself_and_unknown_names_are_refused():
    decoder, *_ = case()
    assert with_precision(decoder, "fp32") is decoder
    with pytest.raises(ValueError, match="unknown decode precision 'fp16'"):
        with_precision(decoder, "fp16")
    ok, why = precision_support("fp16")
    assert not ok and "unknown" in why
