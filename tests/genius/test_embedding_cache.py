"""The embedding cache: by content, per encoder, plain Parquet."""
import logging

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from genius.embedding_cache import EmbeddingCache, content_id, encoder_fingerprint


def test_round_trip_and_parquet_readable(tmp_path):
    path = tmp_path / "emb.parquet"
    cache = EmbeddingCache(path, "fp-a")
    vecs = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)
    ids = [content_id(0, None, t) for t in ("a", "b", "c")]
    for cid, v in zip(ids, vecs):
        cache.put(cid, v)
    cache.save()
    again = EmbeddingCache(path, "fp-a")
    assert len(again) == 3
    for cid, v in zip(ids, vecs):
        np.testing.assert_array_equal(again.get(cid), v)
    assert again.get(content_id(0, None, "d")) is None and again.hits == 3 and again.misses == 1
    table = pq.read_table(path)  # plain columns: string and list<float>
    assert table.column_names == ["content_id", "embedding"] and len(table.column("embedding")[0]) == 5


def test_another_encoder_cache_is_ignored(tmp_path, caplog):
    path = tmp_path / "emb.parquet"
    cache = EmbeddingCache(path, "fp-a")
    cache.put("x", np.ones(4, np.float32))
    cache.save()
    with caplog.at_level(logging.WARNING):
        other = EmbeddingCache(path, "fp-b")
    assert len(other) == 0 and "another encoder" in caplog.text


def test_content_id_depends_on_what_is_embedded():
    img = Image.new("RGB", (4, 4), (10, 20, 30))
    other = Image.new("RGB", (4, 4), (10, 20, 31))
    assert content_id(0, None, "a") != content_id(1, None, "a")  # modality
    assert content_id(2, img, "a") != content_id(2, other, "a")  # pixels
    assert content_id(1, b"png-bytes", None) == content_id(1, b"png-bytes", None)
    assert content_id(0, None, "a") != content_id(0, None, "b")


def test_fingerprint_changes_with_weights():
    model = torch.nn.Linear(3, 2)
    model.register_buffer("scale", torch.tensor(2.0))  # 0-dim, like CLIP's logit_scale
    model.register_buffer("empty", torch.zeros(0))
    before = encoder_fingerprint(model)
    with torch.no_grad():
        model.weight[0, 0] += 1
    assert encoder_fingerprint(model) != before
