import copy

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutput

from genius.decoder import DecoderConfig, GeniusDecoder, codes_to_tokens, level_token_offset
from genius.hf_t5 import to_hf_t5

CFG = DecoderConfig(d_model=64, num_layers=2, num_heads=4, d_kv=16, d_ff=128, prefix_len=3, dropout=0.0)


def sample(seed=0, n=5, levels=3, size=16):
    torch.manual_seed(seed)
    decoder = GeniusDecoder(CFG, embed_dim=32, num_levels=levels, codebook_size=size).eval()
    codes = torch.cat([torch.randint(0, 3, (n, 1)), torch.randint(0, size, (n, levels))], 1)
    return decoder, torch.randn(n, 32), codes


def test_vocabulary_layout():
    decoder, _, _ = sample()
    assert decoder.vocab_size == 4 + 3 * 16
    assert level_token_offset(0, 16) == 1 and level_token_offset(1, 16) == 4 and level_token_offset(3, 16) == 36


def test_same_logits_as_transformers_t5_with_the_same_weights():
    decoder, query, codes = sample()
    hf = to_hf_t5(decoder)
    ours = decoder(query, codes)
    tokens = codes_to_tokens(codes, 16)
    inputs = torch.cat([torch.zeros(len(codes), 1, dtype=torch.long), tokens[:, :-1]], 1)
    with torch.no_grad():
        ref = hf(encoder_outputs=BaseModelOutput(last_hidden_state=decoder.prefix(query)), decoder_input_ids=inputs).logits
    for step, logits in enumerate(ours):
        start = level_token_offset(step, 16)
        torch.testing.assert_close(logits, ref[:, step, start : start + logits.shape[1]], atol=1e-5, rtol=1e-4)


def test_cached_steps_equal_the_full_pass():
    decoder, query, codes = sample(1)
    full = decoder(query, codes)
    cache = decoder.start_cache(query)
    tokens = codes_to_tokens(codes, 16)
    current = torch.zeros(len(codes), 1, dtype=torch.long)
    for step in range(codes.shape[1]):
        hidden = decoder.step(current, cache)[:, 0]
        torch.testing.assert_close(hidden @ decoder.level_weight(step).T, full[step], atol=1e-5, rtol=1e-4)
        current = tokens[:, step : step + 1]


def test_token_embeddings_start_from_the_codebooks():
    decoder, _, _ = sample()
    codebooks = torch.randn(3, 16, 32)
    decoder.init_token_embeddings(codebooks, torch.randn(3, 32))
    emb = decoder.embed.weight[4:].detach().view(3, 16, -1)
    # The map is linear: similar code vectors get similar token embeddings.
    a, b = codebooks[0, 0], codebooks[0, 1]
    sim_codes = torch.cosine_similarity(a, b, dim=0)
    sim_tokens = torch.cosine_similarity(emb[0, 0], emb[0, 1], dim=0)
    assert abs(float(sim_codes - sim_tokens)) < 0.05


def test_named_sizes():
    assert DecoderConfig.named("paper") == DecoderConfig()
    assert DecoderConfig.named("small") == DecoderConfig.small()
    medium = DecoderConfig.named("medium")
    assert DecoderConfig.small().d_model < medium.d_model < DecoderConfig().d_model
    with pytest.raises(ValueError, match="unknown decoder size"):
        DecoderConfig.named("huge")


def test_decoder_training_resumes_from_an_epoch_checkpoint_bit_for_bit():
    """Stopping after an epoch and resuming from its checkpoint gives the uninterrupted weights."""
    from genius.decoder import DecoderConfig, GeniusDecoder
    from genius.decoder_training import DecoderTrainConfig, train_decoder

    gen = torch.Generator().manual_seed(0)
    q, t = torch.randn(96, 16, generator=gen), torch.randn(96, 16, generator=gen)
    codes = torch.cat([torch.zeros(96, 1, dtype=torch.long), torch.randint(0, 8, (96, 3), generator=gen)], 1)
    config = DecoderTrainConfig(epochs=4, batch_size=32, lr=1e-2)

    def fresh():
        torch.manual_seed(1)
        return GeniusDecoder(DecoderConfig.small(), 16, 3, 8)

    straight = fresh()
    train_decoder(straight, q, t, codes, config, progress=False)
    saved = []
    first = fresh()
    train_decoder(first, q, t, codes, DecoderTrainConfig(**{**config.__dict__, "epochs": 4}), progress=False,
                  checkpoint=lambda state: saved.append(copy.deepcopy(state)))
    resumed = fresh()  # a new process would start from fresh weights, then load the checkpoint
    history = train_decoder(resumed, q, t, codes, config, progress=False, resume=saved[1])
    assert len(history) == 4 and saved[1]["epoch"] == 2
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
