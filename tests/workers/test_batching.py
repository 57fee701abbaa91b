"""DecodeBatcher: concurrent queries decoded together give each query what it gets alone."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from genius.index import GeniusIndex
from genius.items import Items
from workers.batching import DecodeBatcher

from .conftest import WORDS


def test_batched_candidates_equal_single_ones_and_errors_reach_every_waiter(index_root):
    index = GeniusIndex.load(index_root)
    queries = index.embed(Items(texts=[f"a {w}" for w in WORDS]))
    modalities = [None if i % 2 else [1] for i in range(len(queries))]
    alone = [index.candidates(q[None], 10, None if m is None else [m])[0] for q, m in zip(queries, modalities)]
    batcher = DecodeBatcher(max_batch=8)
    got: dict[int, tuple] = {}
    barrier = threading.Barrier(len(queries))

    def ask(i: int) -> None:
        barrier.wait()
        got[i] = batcher.candidates(index, queries[i], 10, modalities[i], timeout=60)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(queries))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for i, (items, scores) in enumerate(alone):
        assert np.array_equal(got[i][0], items)
        assert np.allclose(got[i][1], scores, atol=1e-4)
    with pytest.raises(ValueError, match="query embeddings have shape"):
        batcher.candidates(index, np.zeros(7, dtype=np.float32), 10, None, timeout=60)  # wrong dimension
    # ... and the decoding thread lives on.
    after = batcher.candidates(index, queries[0], 10, None, timeout=60)
    assert np.array_equal(after[0], index.candidates(queries[:1], 10)[0][0])
    batcher.close()
