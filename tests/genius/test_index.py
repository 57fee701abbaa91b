"""End to end in one process: fit -> search -> save -> load -> search, on a generated corpus."""
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pytest
import torch

from genius.codes_check import check_codes
from genius.index import WIDE_BEAM_WIDTHS, GeniusIndex, IndexConfig
from genius.metrics import exact_knn, recall_at_k
from genius.modality import Modality

from genius.synthetic import make_synthetic

BEAM = 20


@pytest.fixture(scope="module")
def data():
    return make_synthetic(seed=0)


@pytest.fixture(scope="module")
def index(data):
    cfg = IndexConfig.for_corpus(len(data.corpus))
    cfg.quantizer = replace(cfg.quantizer, epochs=15)
    cfg.decoder_training = replace(cfg.decoder_training, epochs=30)
    return GeniusIndex.fit(data.corpus, data.train_queries, data.train_targets, cfg, progress=False)


def relevant(data):
    return [{int(t)} for t in data.test_targets]


def test_recall_close_to_exact_knn_on_items_never_seen_as_targets(data, index):
    knn = exact_knn(data.test_queries, data.corpus.embeddings, 10).tolist()
    knn_recall = recall_at_k(knn, relevant(data), 10)
    assert knn_recall > 0.5, "the generated task must be solvable by exact search"
    plain = index.search(data.test_queries, k=10, beam_size=BEAM, rerank=False)
    reranked = index.search(data.test_queries, k=10, beam_size=BEAM, rerank=True)
    genius_recall = recall_at_k(plain.as_lists(), relevant(data), 10)
    genius_r_recall = recall_at_k(reranked.as_lists(), relevant(data), 10)
    chance = 10 / len(data.corpus)
    assert genius_recall >= 0.8 * knn_recall, (genius_recall, knn_recall)
    assert genius_r_recall >= 0.8 * knn_recall, (genius_r_recall, knn_recall)
    assert genius_recall > 10 * chance


def test_rebuilt_vectors_rerank_beats_chance(data, index):
    result = index.search(data.test_queries, k=10, beam_size=BEAM, rerank=True, rerank_with="codes")
    assert recall_at_k(result.as_lists(), relevant(data), 10) > 0.5


def test_results_are_indexed_items_of_the_requested_modality(data, index):
    for modality in (Modality.IMAGE, Modality.IMAGE_TEXT):
        result = index.search(data.test_queries[:20], k=5, beam_size=BEAM, target_modalities=[modality])
        found = result.items[result.items >= 0]
        assert len(found) > 0
        assert (data.corpus.modality[found] == modality).all()
    # No text items exist: asking only for text finds nothing, and says so with -1.
    empty = index.search(data.test_queries[:3], k=5, beam_size=BEAM, target_modalities=[Modality.TEXT])
    assert (empty.items == -1).all()


def test_codebook_weighted_beam_finds_the_best_code_and_keeps_recall(data, index):
    import torch

    queries = data.test_queries[:20]
    codes = index.item_codes(np.arange(len(index)))
    ids = np.unique(codes, axis=0)
    # A dominant weight with a beam over every ID of a modality ranks by the codes' own score:
    # its top ID is the one whose reconstruction (less the modality centroid) has the largest
    # inner product with the projected query. The decoder's log-probabilities still break
    # near-ties: a code score within (their spread) / weight of the best one may win.
    weight = 1e4
    for m in np.unique(ids[:, 0]):
        of_m = ids[ids[:, 0] == m]
        dominant = index.search(queries, k=1, beam_size=len(of_m), rerank=False, codebook_weight=weight,
                                target_modalities=[Modality(int(m))])
        with torch.no_grad():
            semantic = index.quantizer.decode(torch.from_numpy(of_m)) - index.quantizer.modality_centroids[int(m)]
            code_score = (index.quantizer.project(queries) @ semantic.T).numpy()
        position = {tuple(row): i for i, row in enumerate(of_m.tolist())}
        got = np.array([position[tuple(codes[dominant.items[q, 0]].tolist())] for q in range(len(queries))])
        best = code_score.argmax(1)
        assert np.mean(got == best) >= 0.9
        assert np.all(code_score[np.arange(len(queries)), got] >= code_score.max(1) - 20 / weight)
    # Mixed scores keep recall above chance and return indexed items only.
    mixed = index.search(data.test_queries, k=10, beam_size=BEAM, rerank=False, codebook_weight=30.0)
    assert ((mixed.items >= 0) & (mixed.items < len(index))).all()
    assert recall_at_k(mixed.as_lists(), relevant(data), 10) > 0.5


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_low_precision_decoding_keeps_recall(data, index, tmp_path, precision):
    from genius.decoder_precision import precision_support

    ok, why = precision_support(precision)
    if not ok:
        pytest.skip(why)
    index.save(tmp_path)
    low = GeniusIndex.load(tmp_path).set_decode_precision(precision)
    assert low.decode_precision == precision and low.decoder.lm_head.weight.dtype == torch.float32
    exact = recall_at_k(index.search(data.test_queries, k=10, beam_size=BEAM, rerank=False).as_lists(),
                        relevant(data), 10)
    approx = recall_at_k(low.search(data.test_queries, k=10, beam_size=BEAM, rerank=False).as_lists(),
                         relevant(data), 10)
    assert approx >= exact - 0.05, (approx, exact)
    with pytest.raises(ValueError, match="unknown decode precision"):
        low.set_decode_precision("fp8")


def test_fit_save_load_search_is_identical(data, index, tmp_path):
    index.save(tmp_path)
    loaded = GeniusIndex.load(tmp_path)
    for rerank_with in ("vectors", "codes"):
        for rerank in (False, True):
            a = index.search(data.test_queries[:30], k=10, beam_size=BEAM, rerank=rerank, rerank_with=rerank_with)
            b = loaded.search(data.test_queries[:30], k=10, beam_size=BEAM, rerank=rerank, rerank_with=rerank_with)
            assert np.array_equal(a.items, b.items)
            assert np.array_equal(a.scores, b.scores)
    # Item tables are Arrow IPC files that pyarrow (and pandas.read_feather) read as they are.
    tables = sorted((tmp_path / "v-0" / "items").glob("*.arrow"))
    table = pa.concat_tables([feather.read_table(t) for t in tables])
    assert table.column_names == ["key", "modality", "id", "source", "metadata"]
    assert table.num_rows == len(data.corpus)
    assert table.column("modality").to_pylist() == [Modality(int(m)).name.lower() for m in data.corpus.modality]
    assert len(table.column("id")[0].as_py()) == index.codec.width


def test_modality_is_stored_per_item_not_read_from_code_0(data, tmp_path):
    """Without the modality code every code 0 is 0; results still carry the true modality."""
    cfg = IndexConfig.for_corpus(len(data.corpus))
    cfg.quantizer = replace(cfg.quantizer, epochs=2, use_modality_code=False)
    cfg.decoder_training = replace(cfg.decoder_training, epochs=2)
    index = GeniusIndex.fit(data.corpus, data.train_queries, data.train_targets, cfg, progress=False)
    index.save(tmp_path)
    loaded = GeniusIndex.load(tmp_path)
    assert (loaded.item_codes(np.arange(len(loaded)))[:, 0] == 0).all()
    result = loaded.search(data.test_queries[:20], k=10, beam_size=BEAM, target_modalities=[Modality.IMAGE_TEXT])
    found = result.items[result.items >= 0]
    assert len(found) and (data.corpus.modality[found] == Modality.IMAGE_TEXT).all()
    assert {m for row in result.modalities for m in row} == {Modality.IMAGE_TEXT}


def test_bad_requests_are_refused_clearly(data, index, tmp_path):
    with pytest.raises(ValueError, match="dim"):
        index.search(np.zeros((1, 7), dtype=np.float32))
    with pytest.raises(ValueError, match="k must be"):
        index.search(data.test_queries[:1], k=0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        GeniusIndex.load(tmp_path / "nowhere")


def test_configs_saved_before_the_codebook_weight_keep_the_decoder_only_beam():
    saved = IndexConfig.for_corpus(1000).to_dict()
    saved["codebook_weight"], saved["level_widths"], saved["lookahead_rows"] = 100.0, [8, 4], 2
    loaded = IndexConfig.from_dict(saved)
    assert (loaded.codebook_weight, loaded.level_widths, loaded.lookahead_rows) == (100.0, [8, 4], 2)
    del saved["codebook_weight"], saved["level_widths"], saved["lookahead_rows"]
    loaded = IndexConfig.from_dict(saved)
    assert (loaded.codebook_weight, loaded.level_widths, loaded.lookahead_rows) == (0.0, [], 0)


def test_large_corpora_get_the_widened_beam():
    assert IndexConfig.for_corpus(1000).level_widths == []
    assert IndexConfig.for_corpus(2000).level_widths == list(WIDE_BEAM_WIDTHS)
    assert IndexConfig.for_corpus(200_000).level_widths == list(WIDE_BEAM_WIDTHS)


def test_fit_finds_its_codes_usable_and_scrambled_codes_are_not(data, index):
    assert index.config.codes_usable
    items = np.arange(len(index))
    codes = index.item_codes(items)
    check = check_codes(index.quantizer, data.train_queries.embeddings, data.corpus.embeddings, codes,
                        data.train_targets)
    assert check.codes_usable and check.codes_recall > 10 * 10 / check.candidates, check
    scrambled = codes.copy()
    scrambled[:, 1:] = np.random.default_rng(0).permutation(codes[:, 1:])  # every item gets another's ID
    bad = check_codes(index.quantizer, data.train_queries.embeddings, data.corpus.embeddings, scrambled,
                      data.train_targets)
    assert bad.projected_recall == check.projected_recall and not bad.codes_usable, bad


def test_unusable_codes_leave_the_beam_to_the_decoder_unless_a_search_asks(data, index):
    queries = data.test_queries[:16]
    index.config.codes_usable = False
    try:
        assert index.beam_settings().codebook_weight == 0.0 and index.beam_settings(30.0).codebook_weight == 30.0
        plain = index.search(queries, k=5, beam_size=BEAM, rerank=False)
        asked = index.search(queries, k=5, beam_size=BEAM, rerank=False, codebook_weight=30.0)
    finally:
        index.config.codes_usable = True
    np.testing.assert_array_equal(plain.items, index.search(queries, k=5, beam_size=BEAM, rerank=False,
                                                            codebook_weight=0.0).items)
    np.testing.assert_array_equal(asked.items, index.search(queries, k=5, beam_size=BEAM, rerank=False,
                                                            codebook_weight=30.0).items)
