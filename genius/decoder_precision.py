"""The decoder in lower precision for search: bf16 or int8 (dynamic quantization).

Training and the stored weights stay fp32; a search may run a converted copy. `bench/decode.py`
measures both against fp32 (speed and top-10 agreement): on a CPU with avx512_bf16 they were
1.8x and 2.2x fp32's speed with 0.99 and 0.96 of its top-10 IDs.
"""
from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from genius.decoder import DecoderCache, GeniusDecoder

PRECISIONS = ("fp32", "bf16", "int8")


class Bf16Decoder(GeniusDecoder):
    """A GeniusDecoder converted to bfloat16 (weights, activations, KV cache); query embeddings
    are cast on entry. beam_search takes each level's logits to fp32 before its log-softmax,
    so scores are summed in fp32."""

    def start_cache(self, query_emb: torch.Tensor) -> DecoderCache:
        return super().start_cache(query_emb.to(self.lm_head.weight.dtype))


def with_precision(decoder: GeniusDecoder, precision: str) -> GeniusDecoder:
    """A copy of `decoder` that searches in `precision` ("fp32": the decoder itself). int8
    quantizes the layers' projections and feed-forward; the level logits stay fp32."""
    if precision == "fp32":
        return decoder
    if precision == "bf16":
        low = copy.deepcopy(decoder).to(torch.bfloat16)
        low.__class__ = Bf16Decoder
        return low.eval()
    if precision == "int8":
        low = copy.deepcopy(decoder)
        with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao
            warnings.simplefilter("ignore")
            low.layers = torch.ao.quantization.quantize_dynamic(low.layers, {nn.Linear}, dtype=torch.qint8)
        return low.eval()
    raise ValueError(f"unknown decode precision {precision!r}: choose from {', '.join(PRECISIONS)}")


def precision_support(precision: str) -> tuple[bool, str]:
    """Whether this torch build and CPU run `precision`, and why (not)."""
    if precision == "fp32":
        return True, "fp32"
    try:
        if precision == "bf16":
            if not torch.backends.mkldnn.is_available():
                return False, "torch built without oneDNN (mkldnn)"
            supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
            if supported is not None and not supported():
                return False, "oneDNN reports no bf16 support on this CPU (needs avx512bw, avx512_bf16 or amx)"
            F.linear(torch.ones(4, 8, dtype=torch.bfloat16), torch.ones(2, 8, dtype=torch.bfloat16))
            return True, "bf16"
        if precision == "int8":
            engines = torch.backends.quantized.supported_engines
            if not {"x86", "fbgemm", "onednn", "qnnpack"} & set(engines):
                return False, f"no quantized engine (supported: {engines})"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.ao.quantization.quantize_dynamic(nn.Sequential(nn.Linear(8, 2)), {nn.Linear},
                                                       dtype=torch.qint8)(torch.ones(4, 8))
            return True, f"quantized engine {torch.backends.quantized.engine}"
    except Exception as exc:  # an unsupported CPU or build: say so instead of failing later
        return False, f"{type(exc).__name__}: {exc}"
    return False, f"unknown decode precision {precision!r}: choose from {', '.join(PRECISIONS)}"
