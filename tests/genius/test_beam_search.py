import numpy as np
import pytest
import torch

from genius.beam_search import beam_search
from genius.decoder import DecoderConfig, GeniusDecoder
from genius.idcodec import IdCodec
from genius.modality import Modality
from genius.trie import Trie

TINY = DecoderConfig(d_model=32, num_layers=2, num_heads=2, d_kv=16, d_ff=64, prefix_len=2, dropout=0.0)


def make_case(seed: int, max_items: int = 80):
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    levels, size = int(rng.integers(1, 5)), int(rng.choice([3, 8, 32]))
    n = int(rng.integers(1, max_items))
    codes = rng.integers(0, size, (n, levels))
    codes[rng.random(n) < 0.4, 0] = 0  # shared first codes
    modality = rng.integers(0, 3, n)
    codec = IdCodec(levels, size)
    trie = Trie.build(codec, codec.pack(codes), modality)
    decoder = GeniusDecoder(TINY, embed_dim=16, num_levels=levels, codebook_size=size).eval()
    return codes, modality, trie, decoder, torch.randn(5, 16)


@pytest.mark.parametrize("seed", range(20))
def test_only_valid_ids_come_out(seed):
    codes, modality, trie, decoder, queries = make_case(seed)
    valid = {(int(m),) + tuple(int(c) for c in row) for m, row in zip(modality, codes)}
    items_of = {}
    for i, key in enumerate((int(m),) + tuple(int(c) for c in row) for m, row in zip(modality, codes)):
        items_of.setdefault(key, set()).add(i)
    beam = int(np.random.default_rng(seed).integers(1, 12))
    result = beam_search(decoder, trie, queries, beam_size=beam)
    for q in range(len(queries)):
        live = np.isfinite(result.scores[q])
        assert live.sum() == min(beam, len(valid))
        assert np.all(np.diff(result.scores[q][live]) <= 1e-6), "beams must come best first"
        for w in np.flatnonzero(live):
            key = tuple(int(c) for c in result.codes[q, w])
            assert key in valid
            assert set(result.items[q][w].tolist()) == items_of[key]
        assert (result.codes[q, ~live] == -1).all()


def brute_force_scores(decoder, query, ids: list[tuple], normalize: str) -> torch.Tensor:
    """Log-probability of every valid ID under teacher forcing, normalised as the beam search does."""
    full = torch.tensor(ids)
    logits = decoder(query.expand(len(ids), -1), full)
    total = torch.zeros(len(ids))
    for step, lg in enumerate(logits):
        if normalize == "allowed":
            allowed = torch.zeros_like(lg, dtype=torch.bool)
            for i, u in enumerate(ids):
                for v in ids:
                    if v[:step] == u[:step]:
                        allowed[i, v[step]] = True
            lp = torch.log_softmax(lg.masked_fill(~allowed, float("-inf")), -1)
        else:
            lp = torch.log_softmax(lg, -1)
        total += lp[torch.arange(len(ids)), full[:, step]]
    return total


@pytest.mark.parametrize("normalize", ["allowed", "level"])
@pytest.mark.parametrize("seed", range(6))
def test_full_beam_finds_the_most_probable_valid_id(seed, normalize):
    codes, modality, trie, decoder, queries = make_case(100 + seed, max_items=40)
    ids = sorted({(int(m),) + tuple(int(c) for c in row) for m, row in zip(modality, codes)})
    result = beam_search(decoder, trie, queries, beam_size=len(ids), normalize=normalize)
    with torch.no_grad():
        for q in range(len(queries)):
            scores = brute_force_scores(decoder, queries[q : q + 1], ids, normalize)
            best = int(scores.argmax())
            assert tuple(result.codes[q, 0].tolist()) == ids[best]
            assert result.scores[q, 0] == pytest.approx(float(scores[best]), abs=1e-4)
            # The whole beam is the exact ranking of all valid IDs.
            order = torch.argsort(scores, descending=True)
            assert np.allclose(result.scores[q], scores[order].numpy(), atol=1e-4)


def test_first_step_restricted_to_chosen_modalities():
    codes, modality, trie, decoder, queries = make_case(7, max_items=200)
    present = set(int(m) for m in modality)
    for wanted in present:
        result = beam_search(decoder, trie, queries, beam_size=10, target_modalities=[Modality(wanted)])
        live = np.isfinite(result.scores)
        assert live.any(axis=1).all(), "every query finds IDs of a modality the trie holds"
        assert (result.codes[..., 0][live] == wanted).all()
    # one set per query
    per_query = [[Modality.IMAGE], [Modality.TEXT], [Modality.IMAGE_TEXT], ["image", "text"], ["text"]]
    result = beam_search(decoder, trie, queries, beam_size=10, target_modalities=per_query)
    for q, allowed in enumerate(per_query):
        live = np.isfinite(result.scores[q])
        wanted = {int(Modality.parse(m)) for m in allowed}
        assert live.any() == bool(wanted & present)
        assert set(result.codes[q, live, 0].tolist()) <= wanted


def test_rejects_bad_arguments():
    _, _, trie, decoder, queries = make_case(3)
    with pytest.raises(ValueError, match="normalize"):
        beam_search(decoder, trie, queries, normalize="full")
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(decoder, trie, queries, beam_size=0)


def random_codebook_scores(queries: torch.Tensor, levels: int, size: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(queries), 3, generator=g), torch.randn(len(queries), levels, size, generator=g)


def codebook_total(scores, q: int, ids: list[tuple]) -> torch.Tensor:
    """An ID's codebook score: one entry per semantic level (the modality is the decoder's)."""
    _, levels = scores
    return torch.tensor([sum(float(levels[q, l, c]) for l, c in enumerate(i[1:])) for i in ids])


@pytest.mark.parametrize("weight", [0.5, 3.0])
@pytest.mark.parametrize("seed", range(5))
def test_codebook_scored_full_beam_is_the_brute_force_ranking(seed, weight):
    codes, modality, trie, decoder, queries = make_case(200 + seed, max_items=40)
    ids = sorted({(int(m),) + tuple(int(c) for c in row) for m, row in zip(modality, codes)})
    scores = random_codebook_scores(queries, codes.shape[1], trie.codec.codebook_size, seed)
    # Every modality searched (min_modality_prob 0): the brute force ranks all IDs.
    result = beam_search(decoder, trie, queries, beam_size=len(ids), codebook_scores=scores, codebook_weight=weight,
                         min_modality_prob=0.0)
    with torch.no_grad():
        for q in range(len(queries)):
            combined = brute_force_scores(decoder, queries[q : q + 1], ids, "allowed") + weight * codebook_total(
                scores, q, ids)
            order = torch.argsort(combined, descending=True)
            assert tuple(result.codes[q, 0].tolist()) == ids[int(order[0])]
            assert np.allclose(result.scores[q], combined[order].numpy(), atol=1e-4)


@pytest.mark.parametrize("seed", range(10))
def test_codebook_scored_beam_emits_only_valid_ids(seed):
    codes, modality, trie, decoder, queries = make_case(300 + seed)
    valid = {(int(m),) + tuple(int(c) for c in row) for m, row in zip(modality, codes)}
    scores = random_codebook_scores(queries, codes.shape[1], trie.codec.codebook_size, seed)
    result = beam_search(decoder, trie, queries, beam_size=7, codebook_scores=scores, codebook_weight=2.0,
                         min_modality_prob=0.0)
    live = np.isfinite(result.scores)
    assert (live.sum(1) == min(7, len(valid))).all()
    assert {tuple(int(c) for c in row) for row in result.codes[live]} <= valid


def test_a_dominant_codebook_weight_ranks_by_the_codes_alone():
    codes, modality, trie, decoder, queries = make_case(11, max_items=60)
    ids = sorted({(int(m),) + tuple(int(c) for c in row) for m, row in zip(modality, codes)})
    scores = random_codebook_scores(queries, codes.shape[1], trie.codec.codebook_size, 0)
    for m in sorted(set(modality.tolist())):  # within one modality (the modality step is the decoder's)
        of_m = [i for i in ids if i[0] == m]
        result = beam_search(decoder, trie, queries, beam_size=len(of_m), target_modalities=[Modality(m)],
                             codebook_scores=scores, codebook_weight=1e4)
        for q in range(len(queries)):
            assert tuple(result.codes[q, 0].tolist()) == of_m[int(codebook_total(scores, q, of_m).argmax())]


def test_the_codebook_bonus_leaves_the_modality_to_the_decoder():
    codes, modality, trie, decoder, queries = make_case(12, max_items=60)
    modality_scores, levels = random_codebook_scores(queries, codes.shape[1], trie.codec.codebook_size, 1)
    plain = beam_search(decoder, trie, queries, beam_size=3, codebook_scores=(torch.zeros_like(modality_scores), levels),
                        codebook_weight=5.0)
    skewed = beam_search(decoder, trie, queries, beam_size=3, codebook_scores=(100 * modality_scores, levels),
                         codebook_weight=5.0)
    np.testing.assert_array_equal(plain.codes, skewed.codes)


def modality_probs(decoder, trie, query: torch.Tensor) -> np.ndarray:
    """The decoder's first-step distribution over the trie's modalities (0 for absent ones)."""
    with torch.no_grad():
        logits = decoder(query[None], torch.zeros((1, 1 + decoder.num_levels), dtype=torch.long))[0][0]
    present = torch.zeros(3, dtype=torch.bool)
    present[[int(m) for m in trie.modalities]] = True
    return torch.softmax(logits.masked_fill(~present, float("-inf")), -1).numpy()


@pytest.mark.parametrize("floor", [0.0, 0.3, 0.4, 1.0])
def test_modalities_the_decoder_rules_out_are_not_searched_once_the_codes_score(floor):
    codes, modality, trie, decoder, queries = make_case(13, max_items=60)
    assert len(set(modality.tolist())) == 3
    scores = random_codebook_scores(queries, codes.shape[1], trie.codec.codebook_size, 2)
    result = beam_search(decoder, trie, queries, beam_size=len(codes), codebook_scores=scores, codebook_weight=2.0,
                         min_modality_prob=floor)
    decoder_only = beam_search(decoder, trie, queries, beam_size=len(codes), min_modality_prob=floor)
    for q in range(len(queries)):
        probs = modality_probs(decoder, trie, queries[q])
        kept = {m for m in range(3) if probs[m] >= floor} | {int(probs.argmax())}
        found = set(result.codes[q, np.isfinite(result.scores[q]), 0].tolist())
        assert found == kept, (probs, found)  # a full beam reaches every kept modality
        # Without the codes the decoder's own scores already weigh the modalities: nothing is dropped.
        assert set(decoder_only.codes[q, np.isfinite(decoder_only.scores[q]), 0].tolist()) == set(range(3))
    with pytest.raises(ValueError, match="min_modality_prob"):
        beam_search(decoder, trie, queries, codebook_scores=scores, codebook_weight=2.0, min_modality_prob=1.5)


def test_codebook_scores_must_match_the_trie():
    codes, _, trie, decoder, queries = make_case(3)
    wrong = (torch.zeros(len(queries), 3), torch.zeros(len(queries), codes.shape[1] + 1, trie.codec.codebook_size))
    with pytest.raises(ValueError, match="codebook scores"):
        beam_search(decoder, trie, queries, codebook_scores=wrong, codebook_weight=1.0)


def test_trace_holds_every_steps_prefixes_ending_in_the_result():
    codes, modality, trie, decoder, queries = make_case(5, max_items=60)
    trace: list[np.ndarray] = []
    result = beam_search(decoder, trie, queries, beam_size=6, trace=trace)
    assert len(trace) == codes.shape[1] + 1
    for step, prefixes in enumerate(trace):
        assert prefixes.shape[0] == len(queries) and prefixes.shape[2] == step + 1
    np.testing.assert_array_equal(trace[-1], result.codes[:, : trace[-1].shape[1]])
    # every live prefix of a step extends a live prefix of the step before
    for before, after in zip(trace, trace[1:]):
        for q in range(len(queries)):
            earlier = {tuple(p) for p in before[q].tolist()}
            assert all(tuple(p[:-1]) in earlier for p in after[q].tolist() if p[0] >= 0)


@pytest.mark.parametrize("seed", range(6))
def test_exhaustive_early_widths_find_the_brute_force_best_with_a_beam_of_one(seed):
    # Every prefix kept up to the last level: the last step scores every valid ID, so even a
    # final beam of one returns the brute-force best of the combined score.
    codes, modality, trie, decoder, queries = make_case(400 + seed, max_items=40)
    ids = sorted({(int(m),) + tuple(int(c) for c in row) for m, row in zip(modality, codes)})
    scores = random_codebook_scores(queries, codes.shape[1], trie.codec.codebook_size, seed)
    widths = [len(ids)] * codes.shape[1]
    result = beam_search(decoder, trie, queries, beam_size=1, codebook_scores=scores, codebook_weight=2.0,
                         level_widths=widths, min_modality_prob=0.0)
    assert result.codes.shape == (len(queries), 1, 1 + codes.shape[1])
    with torch.no_grad():
        for q in range(len(queries)):
            combined = brute_force_scores(decoder, queries[q : q + 1], ids, "allowed") + 2.0 * codebook_total(
                scores, q, ids)
            assert tuple(result.codes[q, 0].tolist()) == ids[int(combined.argmax())]
            assert result.scores[q, 0] == pytest.approx(float(combined.max()), abs=1e-4)


@pytest.mark.parametrize("seed", range(8))
def test_level_widths_keep_that_many_prefixes_and_emit_only_valid_ids(seed):
    codes, modality, trie, decoder, queries = make_case(500 + seed, max_items=200)
    valid = {(int(m),) + tuple(int(c) for c in row) for m, row in zip(modality, codes)}
    widths = [9, 4, 12][: codes.shape[1]]
    trace: list[np.ndarray] = []
    result = beam_search(decoder, trie, queries, beam_size=5, level_widths=widths, trace=trace)
    ids = [tuple(row) for row in codes_with_modality(codes, modality).tolist()]
    for step in range(1, len(trace)):
        wanted = widths[step - 1] if step < codes.shape[1] else 5  # the last level keeps beam_size
        for q in range(len(queries)):
            before = {tuple(p) for p in trace[step - 1][q].tolist() if p[0] >= 0}
            children = {i[: step + 1] for i in ids if i[:step] in before}
            live = {tuple(p) for p in trace[step][q].tolist() if p[0] >= 0}
            assert live <= children and len(live) == min(wanted, len(children))
    live = np.isfinite(result.scores)
    assert {tuple(int(c) for c in row) for row in result.codes[live]} <= valid
    assert result.codes.shape[1] == 5


def codes_with_modality(codes: np.ndarray, modality: np.ndarray) -> np.ndarray:
    return np.concatenate([modality[:, None], codes], axis=1)


def test_rejects_bad_level_widths():
    _, _, trie, decoder, queries = make_case(3)
    with pytest.raises(ValueError, match="level_widths"):
        beam_search(decoder, trie, queries, level_widths=[4, 0])


@pytest.mark.parametrize("max_rows", [1, 2, 1000])
def test_best_completion_is_the_best_remaining_score_of_a_prefixs_rows(max_rows):
    from genius.beam_search import best_completion
    from genius.trie import TrieState

    codes, modality, trie, decoder, queries = make_case(21, max_items=70)
    levels = codes.shape[1]
    rest = np.random.default_rng(0).normal(size=(2, levels, trie.codec.codebook_size))
    part = trie.partitions[0]
    ids = trie.codec.unpack(np.asarray(part.ids))
    for level in range(1, levels):
        prefixes = sorted({tuple(row[:level]) for row in ids.tolist()})
        lo = np.array([min(i for i, r in enumerate(ids.tolist()) if tuple(r[:level]) == p) for p in prefixes])
        hi = np.array([max(i for i, r in enumerate(ids.tolist()) if tuple(r[:level]) == p) + 1 for p in prefixes])
        state = TrieState(np.zeros(len(lo), np.int64), lo, hi, np.zeros(len(lo), np.int64))
        query_of = np.arange(len(lo)) % 2
        got = best_completion(trie, state, level, rest, query_of, max_rows)
        for i in range(len(lo)):
            rows = range(lo[i], hi[i]) if hi[i] - lo[i] <= max_rows else \
                [lo[i] + j * (hi[i] - lo[i]) // max_rows for j in range(max_rows)]
            want = max(sum(rest[query_of[i], l, ids[r, l]] for l in range(level, levels)) for r in rows)
            assert got[i] == pytest.approx(want)
    assert (best_completion(trie, state, levels, rest, query_of, max_rows) == 0).all()  # complete IDs


@pytest.mark.parametrize("seed", range(6))
def test_exact_lookahead_finds_the_codes_best_id_with_a_beam_of_one(seed):
    # Every row read and every candidate estimated: each level keeps the prefix holding the
    # best complete ID, so a beam of one ends on the codes' brute-force best.
    codes, modality, trie, decoder, queries = make_case(500 + seed, max_items=60)
    if codes.shape[1] < 2:
        codes, modality, trie, decoder, queries = make_case(600 + seed, max_items=60)
    scores = random_codebook_scores(queries, codes.shape[1], trie.codec.codebook_size, seed)
    ids = sorted({(int(m),) + tuple(int(c) for c in row) for m, row in zip(modality, codes)})
    m = ids[0][0]
    of_m = [i for i in ids if i[0] == m]
    ahead = beam_search(decoder, trie, queries, beam_size=1, target_modalities=[Modality(m)],
                        codebook_scores=scores, codebook_weight=1e4, lookahead_rows=10**6, lookahead_pool=10**6)
    for q in range(len(queries)):
        best = of_m[int(codebook_total(scores, q, of_m).argmax())]
        assert tuple(ahead.codes[q, 0].tolist()) == best
    valid = {tuple(i) for i in of_m}
    assert {tuple(int(c) for c in row) for row in ahead.codes[:, 0]} <= valid


def test_lookahead_options_are_checked():
    codes, _, trie, decoder, queries = make_case(3)
    with pytest.raises(ValueError, match="lookahead"):
        beam_search(decoder, trie, queries, lookahead_rows=-1)
    with pytest.raises(ValueError, match="lookahead"):
        beam_search(decoder, trie, queries, lookahead_pool=0)


@pytest.mark.parametrize("seed", range(8))
def test_a_partial_lookahead_emits_valid_ids_carrying_their_own_items(seed):
    # A few rows read per prefix: the kept prefixes' trie positions come from the lookahead's
    # own estimate, so every result must still carry exactly the items of its ID.
    codes, modality, trie, decoder, queries = make_case(700 + seed)
    items_of: dict[tuple, set] = {}
    for i, key in enumerate((int(m),) + tuple(int(c) for c in row) for m, row in zip(modality, codes)):
        items_of.setdefault(key, set()).add(i)
    scores = random_codebook_scores(queries, codes.shape[1], trie.codec.codebook_size, seed)
    result = beam_search(decoder, trie, queries, beam_size=3, codebook_scores=scores, codebook_weight=2.0,
                         min_modality_prob=0.0, lookahead_rows=2, lookahead_pool=2)
    for q in range(len(queries)):
        live = np.isfinite(result.scores[q])
        assert live.sum() == min(3, len(items_of))
        for w in np.flatnonzero(live):
            key = tuple(int(c) for c in result.codes[q, w])
            assert set(result.items[q][w].tolist()) == items_of[key]


def early_unique_case(seed: int):
    """Six levels of 32 codes, 30 distinct IDs (some carried by several items): most
    prefixes hold a single ID after two or three codes."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    levels, size = 6, 32
    codes = rng.integers(0, size, (30, levels))
    codes[:10, :2] = codes[0, :2]  # a shared branch, resolved deeper
    codes = np.concatenate([codes, codes[:5]])  # IDs with two items
    modality = rng.integers(0, 3, len(codes))
    codec = IdCodec(levels, size)
    trie = Trie.build(codec, codec.pack(codes), modality)
    decoder = GeniusDecoder(TINY, embed_dim=16, num_levels=levels, codebook_size=size).eval()
    return codes, trie, decoder, torch.randn(4, 16)


@pytest.mark.parametrize("options", [
    {"beam_size": 5},
    {"beam_size": 1},
    {"beam_size": 4, "level_widths": [8, 6]},
    {"beam_size": 3, "codebook_weight": 2.0, "min_modality_prob": 0.0},
    {"beam_size": 3, "codebook_weight": 2.0, "lookahead_rows": 2, "lookahead_pool": 2},
])
@pytest.mark.parametrize("seed", range(4))
def test_skipping_forced_steps_changes_no_result(seed, options):
    codes, trie, decoder, queries = early_unique_case(seed)
    if "codebook_weight" in options:
        options = {**options, "codebook_scores": random_codebook_scores(queries, 6, 32, seed)}
    full = beam_search(decoder, trie, queries, skip_forced=False, **options)
    fast = beam_search(decoder, trie, queries, **options)
    assert (full.decoder_steps == 7).all()
    assert (fast.decoder_steps < 7).all(), "30 IDs in 32**6 codes are unique long before the leaves"
    assert (fast.decoder_rows.sum(1) < full.decoder_rows.sum(1)).all()
    assert (fast.decoder_rows <= full.decoder_rows).all()
    assert np.array_equal(fast.codes, full.codes)
    # The decoder runs on fewer queries once some are forced: scores agree to float rounding.
    np.testing.assert_allclose(fast.scores, full.scores, rtol=0, atol=1e-5)
    for q in range(len(queries)):
        assert len(fast.items[q]) == len(full.items[q])
        for a, b in zip(fast.items[q], full.items[q]):
            assert np.array_equal(a, b)


def test_level_normalisation_runs_the_decoder_at_every_step():
    # Under "level" a forced code's log-probability is the decoder's: nothing may be skipped.
    codes, trie, decoder, queries = early_unique_case(0)
    assert (beam_search(decoder, trie, queries, beam_size=3, normalize="level").decoder_steps == 7).all()
