"""QueryBatcher: concurrent queries encoded and decoded together give each query what it gets alone."""
from __future__ import annotations

import io
import threading

import numpy as np
import pytest

from genius.index import GeniusIndex
from genius.items import Items
from workers.batching import QueryBatcher

from .conftest import WORDS


def _png(shade: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (shade, 255 - shade, 40)).save(buf, format="PNG")
    return buf.getvalue()


def test_batched_queries_equal_single_ones_and_errors_reach_every_waiter(index_root):
    index = GeniusIndex.load(index_root)
    # Text, image and image-text queries mixed in one batch, half with a modality filter.
    queries = [(f"a {w}", None) for w in WORDS[:8]] + [(None, _png(30 * i)) for i in range(4)] + \
              [(f"a {w}", _png(60 * i)) for i, w in enumerate(WORDS[:4])]
    modalities = [None if i % 2 else [1] for i in range(len(queries))]
    alone = []
    for (text, image), m in zip(queries, modalities):
        emb = index.embed(Items(texts=None if text is None else [text], images=None if image is None else [image]))
        alone.append((emb[0], *index.candidates(emb, 10, None if m is None else [m])[0]))
    batcher = QueryBatcher(max_batch=8)
    got: dict[int, tuple] = {}
    barrier = threading.Barrier(len(queries))

    def ask(i: int) -> None:
        barrier.wait()
        got[i] = batcher.search(index, *queries[i], 10, modalities[i], timeout=60)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(queries))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for i, (query, items, scores) in enumerate(alone):
        assert np.allclose(got[i][0], query, atol=1e-5)
        assert np.array_equal(got[i][1], items)
        assert np.allclose(got[i][2], scores, atol=1e-4)
    with pytest.raises(Exception):  # an image that does not decode fails its batch, and only it
        batcher.search(index, None, b"not an image", 10, None, timeout=60)
    after = batcher.search(index, "a violin", None, 10, None, timeout=60)  # the thread lives on
    assert np.array_equal(after[1], index.candidates(index.embed(Items(texts=["a violin"])), 10)[0][0])
    batcher.close()
