"""Load a GeniusDecoder's weights into transformers' T5ForConditionalGeneration.

Used to decode the way the reference GENIUS code does (`generate` with
`prefix_allowed_tokens_fn`) with the very same weights, for benchmarks and tests.
The query prefix vectors are passed as `encoder_outputs`; the encoder is never run.
"""
from __future__ import annotations

import torch
from transformers import T5Config, T5ForConditionalGeneration

from genius.decoder import START_TOKEN, GeniusDecoder


def to_hf_t5(decoder: GeniusDecoder) -> T5ForConditionalGeneration:
    cfg = decoder.cfg
    hf_cfg = T5Config(
        vocab_size=decoder.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff,
        # Same layer count for the (unused) encoder: unequal counts crash generate() in transformers 5.
        num_layers=cfg.num_layers, num_decoder_layers=cfg.num_layers, num_heads=cfg.num_heads,
        relative_attention_num_buckets=cfg.relative_buckets, relative_attention_max_distance=cfg.relative_max_distance,
        dropout_rate=0.0, layer_norm_epsilon=cfg.layer_norm_eps, feed_forward_proj="relu",
        tie_word_embeddings=False, pad_token_id=START_TOKEN, decoder_start_token_id=START_TOKEN,
        eos_token_id=None,
    )
    # T5Config's constructor resets tie_word_embeddings; our lm_head is a separate matrix.
    hf_cfg.tie_word_embeddings = False
    hf_cfg.scale_decoder_outputs = False
    model = T5ForConditionalGeneration(hf_cfg)
    state = {"shared.weight": decoder.embed.weight, "lm_head.weight": decoder.lm_head.weight,
             "decoder.final_layer_norm.weight": decoder.final_norm.weight,
             "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": decoder.relative_bias.weight}
    for i, layer in enumerate(decoder.layers):
        p = f"decoder.block.{i}.layer"
        for name in "qkvo":
            state[f"{p}.0.SelfAttention.{name}.weight"] = getattr(layer.self_attn, name).weight
            state[f"{p}.1.EncDecAttention.{name}.weight"] = getattr(layer.cross_attn, name).weight
        state[f"{p}.0.layer_norm.weight"] = layer.self_norm.weight
        state[f"{p}.1.layer_norm.weight"] = layer.cross_norm.weight
        state[f"{p}.2.layer_norm.weight"] = layer.ff_norm.weight
        state[f"{p}.2.DenseReluDense.wi.weight"] = layer.wi.weight
        state[f"{p}.2.DenseReluDense.wo.weight"] = layer.wo.weight
    with torch.no_grad():
        own = model.state_dict()
        for key, value in state.items():
            own[key].copy_(value.detach())
        model.decoder.embed_tokens.weight = model.shared.weight
    return model.eval()
