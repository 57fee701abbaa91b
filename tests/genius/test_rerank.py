import numpy as np

from genius.beam_search import BeamResult
from genius.rerank import rank


def beams():
    # Two beams for one query: ID A holds items 4 and 1, ID B holds item 7.
    return BeamResult(codes=np.zeros((1, 2, 2), dtype=np.int64), scores=np.array([[-0.1, -0.5]]),
                      items=[[np.array([1, 4]), np.array([7])]])


def test_beam_order_without_vectors():
    ranking = rank(beams(), k=5)
    assert ranking.items.tolist() == [[1, 4, 7, -1, -1]]
    assert ranking.scores[0, :3].tolist() == [-0.1, -0.1, -0.5]


def test_rerank_by_cosine_similarity():
    vectors = {1: [0.0, 1.0], 4: [1.0, 1.0], 7: [1.0, 0.0]}
    ranking = rank(beams(), k=2, query_vectors=np.array([[2.0, 0.0]]),
                   item_vectors=lambda items: np.array([vectors[i] for i in items]))
    assert ranking.items.tolist() == [[7, 4]]
    assert np.allclose(ranking.scores[0], [1.0, np.sqrt(0.5)])


def test_query_without_beams_gets_padding():
    empty = BeamResult(codes=np.full((1, 2, 2), -1), scores=np.full((1, 2), -np.inf), items=[[]])
    assert rank(empty, k=3).items.tolist() == [[-1, -1, -1]]
