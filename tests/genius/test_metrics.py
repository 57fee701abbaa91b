import numpy as np
import pytest

from genius.metrics import exact_knn, recall_at_k, recall_table


def test_recall_counts_a_hit_anywhere_in_the_top_k():
    ranked = [[5, 3, 1], [2, 4, 6], [7, -1, -1]]
    relevant = [{1}, {9}, {7, 8}]
    assert recall_at_k(ranked, relevant, 1) == pytest.approx(1 / 3)
    assert recall_at_k(ranked, relevant, 3) == pytest.approx(2 / 3)
    assert recall_table(ranked, relevant, ks=(1, 3)) == {"recall@1": pytest.approx(1 / 3), "recall@3": pytest.approx(2 / 3)}


def test_padding_is_never_a_hit_and_lengths_must_match():
    assert recall_at_k([[-1, -1]], [{-1}], 2) == 0.0
    with pytest.raises(ValueError, match="rankings"):
        recall_at_k([[1]], [{1}, {2}], 1)


def test_exact_knn_matches_brute_force():
    rng = np.random.default_rng(0)
    items, queries = rng.normal(size=(300, 8)), rng.normal(size=(40, 8))
    top = exact_knn(queries, items, 7, batch=16)
    expected = np.argsort(-(queries @ items.T), axis=1, kind="stable")[:, :7]
    assert np.array_equal(top, expected)
