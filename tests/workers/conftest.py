"""A small served index (60 text items, three vector shards) shared by the serving tests."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from genius.encoders import EncoderConfig, MultimodalEncoder
from genius.index import GeniusIndex, IndexConfig
from genius.items import Items

WORDS = ["apple", "river", "candle", "mountain", "violin", "lantern", "cactus", "harbor", "meadow", "anchor",
         "bicycle", "teapot", "kayak", "compass", "windmill", "umbrella", "saxophone", "backpack", "hammock", "globe"]


@pytest.fixture(scope="session")
def index_root(tmp_path_factory):
    import torch

    torch.manual_seed(0)
    encoder = MultimodalEncoder.from_config(EncoderConfig())
    texts = [f"a photo of a {w} number {i}" for i in range(3) for w in WORDS]
    corpus = Items(texts=texts, keys=[f"{w}-{i}" for i in range(3) for w in WORDS])
    queries = Items(texts=[f"the {w} again, {i}" for i in range(3) for w in WORDS])
    cfg = IndexConfig.for_corpus(len(texts))
    cfg.quantizer = replace(cfg.quantizer, epochs=3)
    cfg.decoder_training = replace(cfg.decoder_training, epochs=3)
    cfg.items_per_file = 25  # three vector shards -> three shard servers
    index = GeniusIndex.fit(corpus, queries, np.arange(len(texts)), cfg, encoder=encoder, progress=False)
    root = tmp_path_factory.mktemp("served") / "index"
    index.save(root)
    return root  # read-only: a test that publishes works on a copy
