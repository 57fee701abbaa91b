"""Tests for genius.quantizer (modal-decoupled residual quantization)."""
from __future__ import annotations

import io
import math
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import genius.quantizer as quantizer_module
from genius.modality import Modality
from genius.quantizer import (
    FULL_ID_CORPUS,
    ModalResidualQuantizer,
    QuantizerConfig,
    common_prefix_length,
    kmeans,
    train_quantizer,
)

DIM = 32


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # These tensors are tiny: OpenMP threads only add synchronisation, and on a shared 2-core
    # machine they made training ~10x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass
class Corpus:
    items: torch.Tensor  # (N, D) unit vectors
    modality: torch.Tensor  # (N,) long
    queries: torch.Tensor  # (N, D): query i targets item i
    label: torch.Tensor  # (N,) semantic cluster


def make_corpus(n: int, *, clusters: int = 16, seed: int = 0) -> Corpus:
    """Clustered items with a per-modality offset (a "modality gap"); queries are their
    target's semantics plus noise and a common query offset."""
    g = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(clusters, DIM, generator=g), dim=-1)
    gaps = 0.8 * F.normalize(torch.randn(3, DIM, generator=g), dim=-1)
    query_gap = 0.8 * F.normalize(torch.randn(DIM, generator=g), dim=-1)
    label = torch.randint(clusters, (n,), generator=g)
    sem = centers[label] + 0.2 * torch.randn(n, DIM, generator=g)
    modality = torch.randint(3, (n,), generator=g)
    items = F.normalize(sem + gaps[modality], dim=-1)
    queries = F.normalize(sem + 0.15 * torch.randn(n, DIM, generator=g) + query_gap, dim=-1)
    return Corpus(items, modality, queries, label)


CONFIG = QuantizerConfig(
    num_levels=4,
    codebook_size=16,
    epochs=10,
    batch_size=128,
    lr=3e-3,
    dead_code_threshold=0.05,
    seed=3,
    # These tests check what the epochs of training do; early stopping has its own tests.
    holdout_share=0.0,
)
TRAIN = slice(0, 2000)
HELD_OUT = slice(2000, 3000)


def new_quantizer(config: QuantizerConfig = CONFIG) -> ModalResidualQuantizer:
    torch.manual_seed(0)  # the projection's first layer is randomly initialised
    return ModalResidualQuantizer.from_config(DIM, config)


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return make_corpus(3000)


@pytest.fixture(scope="module")
def untrained(corpus: Corpus) -> ModalResidualQuantizer:
    q = new_quantizer()
    q.init_codebooks(corpus.items[TRAIN], corpus.modality[TRAIN], expected_batch_size=CONFIG.batch_size, seed=CONFIG.seed)
    q.eval()
    return q


@pytest.fixture(scope="module")
def trained(corpus: Corpus) -> tuple[ModalResidualQuantizer, list[dict]]:
    q = new_quantizer()
    history = train_quantizer(
        q, corpus.queries[TRAIN], corpus.items[TRAIN], corpus.modality[TRAIN], config=CONFIG, progress=False
    )
    return q, history


def mean_prefix(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean common-prefix length over the semantic levels 1..L."""
    return float(common_prefix_length(a[:, 1:], b[:, 1:]).float().mean())


# --------------------------------------------------------------------------- code 0


def test_code0_is_the_items_modality(corpus: Corpus, trained) -> None:
    q, _ = trained
    codes = q.encode(corpus.items, corpus.modality)
    assert codes.shape == (3000, 1 + CONFIG.num_levels)
    assert codes.dtype == torch.long
    assert torch.equal(codes[:, 0], corpus.modality)
    # The same vectors labelled with another modality get that modality as code 0.
    flipped = (corpus.modality + 1) % 3
    assert torch.equal(q.encode(corpus.items, flipped)[:, 0], flipped)
    # Modality enums, lists and numpy arrays are accepted.
    listed = [Modality(int(m)) for m in corpus.modality[:5]]
    assert torch.equal(q.encode(corpus.items[:5].numpy(), listed)[:, 0], corpus.modality[:5])


def test_code0_constant_without_modality_code(corpus: Corpus) -> None:
    config = replace(CONFIG.with_ablation("no_modality_code"), epochs=1)
    q = new_quantizer(config)
    train_quantizer(q, corpus.queries[TRAIN], corpus.items[TRAIN], corpus.modality[TRAIN], config=config, progress=False)
    codes = q.encode(corpus.items, corpus.modality)
    assert torch.all(codes[:, 0] == 0)
    # All modalities share one centroid, so the ID no longer depends on the label at all.
    assert torch.equal(q.encode(corpus.items, (corpus.modality + 1) % 3), codes)


def test_config_and_quantizer_must_agree_on_modality_code(corpus: Corpus) -> None:
    q = new_quantizer(CONFIG.with_ablation("no_modality_code"))
    with pytest.raises(ValueError, match="use_modality_code"):
        train_quantizer(q, corpus.queries[:64], corpus.items[:64], corpus.modality[:64], config=CONFIG, progress=False)


# --------------------------------------------------------------------------- reconstruction


@pytest.mark.parametrize("which", ["untrained", "trained"])
def test_reconstruction_error_falls_with_levels(corpus: Corpus, untrained, trained, which: str) -> None:
    q = untrained if which == "untrained" else trained[0]
    err = q.reconstruction_error(corpus.items[HELD_OUT], corpus.modality[HELD_OUT])
    assert err.shape == (CONFIG.num_levels,)
    assert torch.all(err[1:] <= err[:-1] + 1e-6), err
    assert err[-1] < 0.9 * err[0], err  # and the levels do real work


# --------------------------------------------------------------------------- training


def test_trained_pairs_share_longer_prefixes(corpus: Corpus, untrained, trained) -> None:
    q, history = trained
    targets = q.encode(corpus.items[TRAIN], corpus.modality[TRAIN])
    # A query is quantized as an item of its target's modality.
    queries = q.encode(corpus.queries[TRAIN], corpus.modality[TRAIN])
    perm = torch.randperm(targets.shape[0], generator=torch.Generator().manual_seed(1))
    pairs = mean_prefix(queries, targets)
    random_pairs = mean_prefix(queries, targets[perm])
    assert pairs > random_pairs + 1.0, (pairs, random_pairs)
    # Training (contrastive + MSE) brings pairs closer than the k-means init alone did.
    before = mean_prefix(
        untrained.encode(corpus.queries[TRAIN], corpus.modality[TRAIN]),
        untrained.encode(corpus.items[TRAIN], corpus.modality[TRAIN]),
    )
    assert pairs > before + 0.25, (pairs, before)
    # And it holds for pairs never trained on.
    held_q = q.encode(corpus.queries[HELD_OUT], corpus.modality[HELD_OUT])
    held_t = q.encode(corpus.items[HELD_OUT], corpus.modality[HELD_OUT])
    assert mean_prefix(held_q, held_t) > mean_prefix(held_q, held_t.roll(1, 0)) + 1.0
    # The loss went down.
    assert len(history) == CONFIG.epochs
    assert history[-1]["loss"] < history[0]["loss"]
    assert {"loss", "cl", "rq", "mse", "epoch", "seconds"} <= set(history[0])


def test_training_is_seeded_and_leaves_global_rng_alone(corpus: Corpus, trained) -> None:
    q, history = trained
    state = torch.get_rng_state()
    again = new_quantizer()
    history2 = train_quantizer(
        again, corpus.queries[TRAIN], corpus.items[TRAIN], corpus.modality[TRAIN], config=CONFIG, progress=False
    )
    assert torch.equal(torch.get_rng_state(), state)
    assert [h["loss"] for h in history2] == [h["loss"] for h in history]
    assert torch.equal(again.encode(corpus.items, corpus.modality), q.encode(corpus.items, corpus.modality))


def test_early_stopping_keeps_the_epoch_whose_codes_rank_held_out_targets_best(corpus: Corpus) -> None:
    cfg = replace(CONFIG, holdout_share=0.1, patience=0)
    q = new_quantizer(cfg)
    history = train_quantizer(q, corpus.queries[TRAIN], corpus.items[TRAIN], corpus.modality[TRAIN], config=cfg,
                              progress=False)
    assert len(history) == cfg.epochs
    recalls = [h["holdout_r10"] for h in history]
    # On this corpus the MSE loss pulls a class's items onto shared codes, so the codes rank an
    # instance's own target worse as training goes on: an early epoch is the best (not epoch
    # 0, which this test assumes: the replay below could not reproduce it).
    best = int(np.argmax(recalls)) + 1
    assert best < cfg.epochs and recalls[best - 1] > recalls[-1], recalls
    # The kept quantizer is the one that training stopped at that epoch gives (same seed, same
    # held-out pairs): projection, codebooks and centroids alike.
    replay = new_quantizer(cfg)
    train_quantizer(replay, corpus.queries[TRAIN], corpus.items[TRAIN], corpus.modality[TRAIN],
                    config=replace(cfg, epochs=best), progress=False)
    for name, value in replay.state_dict().items():
        assert torch.equal(value, q.state_dict()[name]), name
    # With patience, training stops that many epochs after the best.
    patient = replace(cfg, patience=2)
    stopped = train_quantizer(new_quantizer(patient), corpus.queries[TRAIN], corpus.items[TRAIN],
                              corpus.modality[TRAIN], config=patient, progress=False)
    assert len(stopped) == best + 2
    assert [h["holdout_r10"] for h in stopped] == recalls[: best + 2]


@pytest.mark.parametrize("chunk", [7, 8192])
def test_held_out_recall_is_a_ranking_among_the_candidates(corpus: Corpus, trained, monkeypatch, chunk) -> None:
    q, _ = trained
    monkeypatch.setattr(quantizer_module, "HOLDOUT_CHUNK", chunk)
    rows = torch.arange(2000, 2300)
    gen = torch.Generator().manual_seed(0)
    holdout = quantizer_module._Holdout.build(corpus.queries[rows], corpus.items[rows], corpus.modality[rows],
                                              corpus.items, corpus.modality, gen, q.device)
    assert len(holdout.candidates) == len(torch.unique(corpus.items, dim=0))  # every item: under the cap
    codes, projected = holdout.recall_at_10(q)
    # Brute force: the target among the 10 best, ties (same ID) counted half.
    query = q.project(holdout.query)
    z = q.project(holdout.candidates)
    rebuilt = q.decode(q.encode(holdout.candidates, holdout.candidate_modality))
    for vectors, got in ((rebuilt, codes), (z, projected)):
        scores = query @ vectors.T
        own = scores[torch.arange(len(rows)), holdout.position][:, None]
        rank = (scores > own).sum(1) + 0.5 * ((scores == own).sum(1) - 1)
        assert got == pytest.approx(float((rank < 10).float().mean()))
    assert 0.3 < projected  # the pairs are close: far above chance (10 / 3000)


def test_too_few_pairs_train_every_epoch_without_holding_out(corpus: Corpus) -> None:
    cfg = replace(CONFIG, epochs=3, holdout_share=0.1, holdout_min=50)
    history = train_quantizer(new_quantizer(cfg), corpus.queries[:400], corpus.items[:400], corpus.modality[:400],
                              config=cfg, progress=False)
    assert len(history) == 3 and "holdout_r10" not in history[0]


@pytest.mark.parametrize("share", [-0.1, 1.0])
def test_a_holdout_share_outside_0_1_is_refused(share) -> None:
    with pytest.raises(ValueError, match=r"holdout_share must be in \[0, 1\)"):
        replace(CONFIG, holdout_share=share)


def test_ablations_and_extra_items_run(corpus: Corpus) -> None:
    base = replace(CONFIG, epochs=1)
    no_cl = base.with_ablation("no_contrastive")
    q = new_quantizer(no_cl)
    history = train_quantizer(
        q, corpus.queries[:512], corpus.items[:512], corpus.modality[:512],
        item_emb=corpus.items[512:1024], item_modality=corpus.modality[512:1024],
        config=no_cl, progress=False, query_modality=torch.full((512,), int(Modality.TEXT)),
    )
    assert history[0]["cl"] == 0.0
    assert np.isfinite(history[0]["loss"])
    with pytest.raises(ValueError, match="unknown ablation"):
        base.with_ablation("no_such_thing")


# --------------------------------------------------------------------------- encode/decode


def test_encode_is_deterministic_and_decode_matches_forward(corpus: Corpus, trained) -> None:
    q, _ = trained
    x, m = corpus.items[:500], corpus.modality[:500]
    before = {k: v.clone() for k, v in q.state_dict().items()}
    codes = q.encode(x, m)
    assert torch.equal(q.encode(x, m), codes)
    assert torch.equal(q.encode(x, m, batch_size=7), codes)
    q.eval()
    with torch.no_grad():
        out = q(x, m)
    assert torch.equal(out.codes, codes)
    assert torch.equal(q.decode(codes), out.quantized)
    # With autograd on, the straight-through output still has exactly the code vectors' value.
    out_grad = q(x, m)
    assert out_grad.quantized.requires_grad
    assert torch.equal(out_grad.quantized.detach(), out.quantized)
    # The semantic part is the quantized vector minus the modality centroid.
    assert torch.allclose(out.semantic, out.quantized - q.modality_centroids[m], atol=1e-6)
    # A prefix of the ID decodes to a coarser vector.
    coarse = q.decode(codes[:, :2])
    assert coarse.shape == out.quantized.shape
    assert not torch.equal(coarse, out.quantized)
    # Eval passes change nothing: no EMA updates, no restarts, no centroid moves.
    for k, v in q.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_code_scores_sum_to_the_inner_product_with_the_reconstruction(corpus: Corpus, trained) -> None:
    q, _ = trained
    queries, items, m = corpus.queries[:50], corpus.items[:50], corpus.modality[:50]
    codes = q.encode(items, m)
    modality_scores, level_scores = q.code_scores(queries)
    assert modality_scores.shape == (50, 3) and level_scores.shape == (50, CONFIG.num_levels, CONFIG.codebook_size)
    rows = torch.arange(50)
    summed = modality_scores[rows, codes[:, 0]] + sum(level_scores[rows, l, codes[:, 1 + l]] for l in range(CONFIG.num_levels))
    with torch.no_grad():
        direct = (q.project(queries) * q.decode(codes)).sum(-1)
    assert torch.allclose(summed, direct, atol=1e-5)
    # A trained quantizer's scores rank a query's own target above the other items' IDs.
    all_scores = modality_scores[:, codes[:, 0]] + sum(level_scores[:, l, codes[:, 1 + l]] for l in range(CONFIG.num_levels))
    own_rank = (all_scores > all_scores.diagonal()[:, None]).sum(1).float()
    assert own_rank.mean() < 0.25 * 50, "the codes' own score puts the target in the top quarter on average"


def test_state_dict_round_trip_reproduces_codes(corpus: Corpus, trained) -> None:
    q, _ = trained
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    buf.seek(0)
    fresh = ModalResidualQuantizer.from_config(DIM, CONFIG)
    assert not fresh.is_initialized
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.is_initialized
    assert torch.equal(fresh.encode(corpus.items, corpus.modality), q.encode(corpus.items, corpus.modality))
    codes = q.encode(corpus.items[:100], corpus.modality[:100])
    assert torch.equal(fresh.decode(codes), q.decode(codes))


def test_uninitialised_quantizer_refuses_to_encode(corpus: Corpus) -> None:
    q = new_quantizer()
    with pytest.raises(RuntimeError, match="init_codebooks"):
        q.encode(corpus.items[:4], corpus.modality[:4])


def test_bad_inputs_are_rejected(corpus: Corpus, untrained) -> None:
    with pytest.raises(ValueError, match="modality"):
        untrained.encode(corpus.items[:4], torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="modalities"):
        untrained.encode(corpus.items[:4], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="embeddings"):
        untrained.encode(corpus.items[:4, :8], corpus.modality[:4])


# --------------------------------------------------------------------------- codebooks


def test_kmeans_init_uses_every_code(corpus: Corpus) -> None:
    q = ModalResidualQuantizer(dim=DIM, num_levels=3, codebook_size=64, kmeans_iters=10)
    used = q.init_codebooks(corpus.items, corpus.modality, expected_batch_size=256)
    assert used == [64, 64, 64]
    codes = q.encode(corpus.items, corpus.modality)
    for level in range(1, 4):
        assert torch.unique(codes[:, level]).numel() == 64, level
    for layer in q.rvq.layers:
        assert torch.all(layer._codebook.cluster_size > 0)
        # Initial EMA sizes are per-batch counts: they sum to the expected batch size.
        assert float(layer._codebook.cluster_size.sum()) == pytest.approx(256, rel=1e-4)


def test_kmeans_repairs_empty_clusters() -> None:
    # Half the points are one exact duplicate: a random init puts several centroids on it,
    # and all but one would stay empty without the repair.
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.zeros(500, 4), torch.randn(500, 4, generator=g)])
    centroids, assign, counts = kmeans(x, 50, 5, generator=torch.Generator().manual_seed(1))
    assert centroids.shape == (50, 4)
    assert torch.all(counts > 0)
    assert torch.equal(torch.bincount(assign, minlength=50), counts)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(8, 200), k=st.integers(1, 8), seed=st.integers(0, 2**16), steps=st.sampled_from([0, 4]))
def test_kmeans_never_leaves_a_code_empty(n: int, k: int, seed: int, steps: int) -> None:
    x = torch.randn(n, 3, generator=torch.Generator().manual_seed(seed))
    _, _, counts = kmeans(x, k, 3, generator=torch.Generator().manual_seed(seed), progressive_steps=steps)
    assert torch.all(counts > 0)
    assert int(counts.sum()) == n


def test_progressive_kmeans_leaves_smaller_residuals_on_a_decaying_spectrum() -> None:
    # Embeddings' variance decays over their principal axes; residual quantization of such data
    # (4 levels of 32 codes, axes hidden by a rotation) ends with a smaller error when each
    # level's k-means adds dimensions progressively.
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(3000, 128, generator=g) * torch.arange(1, 129).float().pow(-1.0)
        x = x @ torch.linalg.qr(torch.randn(128, 128, generator=g))[0]
        error = {}
        for steps in (0, 8):
            residual = x.clone()
            for level in range(4):
                centroids, assign, counts = kmeans(residual, 32, 10, progressive_steps=steps,
                                                   generator=torch.Generator().manual_seed(10 * seed + level))
                assert torch.equal(torch.bincount(assign, minlength=32), counts)
                residual = residual - centroids[assign]
            error[steps] = float((residual**2).sum(1).mean())
        assert error[8] < 0.985 * error[0], (seed, error)


def test_codebooks_refitted_on_the_trained_projection_reconstruct_better(corpus: Corpus) -> None:
    # The EMA codebooks trail a projection the contrastive loss moves; the final refit is a
    # k-means of where the projection finally puts the items.
    errors = {}
    for refit in (False, True):
        cfg = replace(CONFIG, refit_codebooks=refit)
        q = new_quantizer(cfg)
        train_quantizer(q, corpus.queries[TRAIN], corpus.items[TRAIN], corpus.modality[TRAIN], config=cfg,
                        progress=False)
        errors[refit] = q.reconstruction_error(corpus.items[HELD_OUT], corpus.modality[HELD_OUT])
    assert torch.all(errors[True] < 0.9 * errors[False]), errors


def test_dead_code_is_restarted_from_batch_vectors(corpus: Corpus) -> None:
    q = new_quantizer()
    q.init_codebooks(corpus.items[TRAIN], corpus.modality[TRAIN], expected_batch_size=128)
    book = q.rvq.layers[0]._codebook
    dead = 5
    # Kill code 5 of level 1: far from all data, EMA size 0.
    book.embed.data[0, dead] = 100.0
    book.embed_avg.data[0, dead] = 0.0
    book.cluster_size.data[0, dead] = 0.0
    x, m = corpus.items[:128], corpus.modality[:128]
    # Eval never restarts.
    frozen = book.embed.clone()
    q.encode(x, m)
    assert torch.equal(book.embed, frozen)
    # Training does: the dead code moves onto one of this batch's level-1 inputs.
    with torch.no_grad():
        level1_inputs = q.project(x) - q.modality_centroids[m]
    q.train()
    q(x, m)
    q.eval()
    revived = book.embed[0, dead]
    assert float(revived.abs().max()) < 10.0
    # (exact differences: torch.cdist's matmul form is only accurate to ~1e-3 near zero)
    assert float(((level1_inputs - revived) ** 2).sum(1).min()) < 1e-10
    assert float(book.cluster_size[0, dead]) >= q.dead_code_threshold
    # The other codes were only EMA-updated, not replaced.
    alive = torch.ones(CONFIG.codebook_size, dtype=torch.bool)
    alive[dead] = False
    assert torch.allclose(book.embed[0, alive], frozen[0, alive], atol=0.2)


def test_queries_do_not_update_codebooks(corpus: Corpus, untrained) -> None:
    q = new_quantizer()
    q.load_state_dict(untrained.state_dict())
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q.train()
    out = q(corpus.queries[:128], corpus.modality[:128], update_codebooks=False)
    q.eval()
    assert out.rq_loss.requires_grad  # the commitment loss still trains the projection
    for k, v in q.state_dict().items():
        assert torch.equal(v, before[k]), k


# --------------------------------------------------------------------------- helpers


@pytest.mark.parametrize("n", [50, 1000, 70_000, 5_600_000, 10**9])
def test_for_corpus_suggests_small_codebooks_for_small_corpora(n: int) -> None:
    cfg = QuantizerConfig.for_corpus(n)
    k = cfg.codebook_size
    assert k & (k - 1) == 0 and 4 <= k <= 4096
    assert k <= 2 * n**0.5 or k == 4
    assert 2 <= cfg.num_levels and cfg.num_levels * math.log2(k) <= 96  # the 12-byte ID
    assert k**cfg.num_levels >= n  # room for distinct IDs
    if n >= FULL_ID_CORPUS:  # finer codes fill the ID
        assert k >= 256 and cfg.num_levels * math.log2(k) > 96 - math.log2(k)
    assert 0 < cfg.dead_code_threshold < cfg.batch_size / k
    assert QuantizerConfig.for_corpus(n, seed=7).seed == 7
    if n == 10**9:
        assert k == 4096


@settings(max_examples=50, deadline=None)
@given(rows=st.lists(st.tuples(st.lists(st.integers(0, 2), min_size=4, max_size=4),
                               st.lists(st.integers(0, 2), min_size=4, max_size=4)), min_size=1, max_size=20))
def test_common_prefix_length_matches_definition(rows) -> None:
    a = torch.tensor([r[0] for r in rows])
    b = torch.tensor([r[1] for r in rows])
    expected = []
    for ra, rb in rows:
        n = 0
        while n < len(ra) and ra[n] == rb[n]:
            n += 1
        expected.append(n)
    assert common_prefix_length(a, b).tolist() == expected


def test_for_corpus_derives_threshold_and_levels_from_a_given_codebook_size() -> None:
    auto = QuantizerConfig.for_corpus(20_000)
    given = QuantizerConfig.for_corpus(20_000, codebook_size=32)
    assert given.codebook_size == 32 and 32 ** given.num_levels >= 20_000 and auto.codebook_size != 32
    assert given.dead_code_threshold == pytest.approx(0.02 * given.batch_size / 32)
    assert QuantizerConfig.for_corpus(20_000, codebook_size=32, num_levels=6).num_levels == 6
