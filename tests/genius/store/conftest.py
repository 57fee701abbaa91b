"""A small trained index shared by the store tests (a few seconds to fit)."""
from dataclasses import replace

import numpy as np
import pytest

from genius.index import GeniusIndex, IndexConfig
from genius.items import Items
from genius.synthetic import make_synthetic


@pytest.fixture(scope="session")
def synthetic():
    return make_synthetic(num_items=300, seed=3)


@pytest.fixture(scope="session")
def fitted(synthetic):
    corpus = synthetic.corpus
    keyed = Items.from_embeddings(corpus.embeddings, corpus.modality, keys=[f"item-{i:04d}" for i in range(len(corpus))])
    cfg = IndexConfig.for_corpus(len(keyed))
    cfg.quantizer = replace(cfg.quantizer, epochs=3)
    cfg.decoder_training = replace(cfg.decoder_training, epochs=3)
    cfg.items_per_file = 64  # several item tables and vector shards even at this size
    return GeniusIndex.fit(keyed, synthetic.train_queries, synthetic.train_targets, cfg, progress=False)


def same_results(a, b, queries: np.ndarray, **kwargs) -> None:
    """Two indexes answer alike: the same keys with the same scores, query by query."""
    ra, rb = a.search(queries, **kwargs), b.search(queries, **kwargs)
    assert ra.keys == rb.keys
    assert np.allclose(ra.scores, rb.scores, equal_nan=True)
