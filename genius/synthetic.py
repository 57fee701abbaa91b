"""A generated corpus with known structure, for tests, benchmarks and smoke checks.

Queries are text-like views of an item (modality gap swapped, noise added); the relevant
item of a query is the item it was made from.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from genius.items import Items
from genius.modality import Modality


@dataclass
class SyntheticRetrieval:
    corpus: Items
    train_queries: Items
    train_targets: np.ndarray
    test_queries: np.ndarray  # embeddings
    test_targets: np.ndarray


def make_synthetic(
    num_items: int = 600, dim: int = 32, clusters: int = 24, queries_per_item: int = 3,
    held_out_items: float = 0.25, query_noise: float = 0.35, seed: int = 0,
) -> SyntheticRetrieval:
    rng = np.random.default_rng(seed)
    unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)  # noqa: E731
    centers = unit(rng.normal(size=(clusters, dim)))
    gap = 0.4 * unit(rng.normal(size=(3, dim)))  # a per-modality offset, like CLIP's modality gap
    label = rng.integers(0, clusters, num_items)
    modality = rng.choice([int(Modality.IMAGE), int(Modality.IMAGE_TEXT)], num_items)
    semantic = unit(centers[label] + 0.6 * unit(rng.normal(size=(num_items, dim))))
    items = unit(semantic + gap[modality])

    def queries_for(targets: np.ndarray) -> np.ndarray:
        noise = query_noise * unit(rng.normal(size=(len(targets), dim)))
        return unit(semantic[targets] + noise + gap[int(Modality.TEXT)]).astype(np.float32)

    held_out = rng.random(num_items) < held_out_items  # never training targets
    seen = np.flatnonzero(~held_out)
    train_targets = np.repeat(seen, queries_per_item)
    test_targets = np.flatnonzero(held_out)
    return SyntheticRetrieval(
        corpus=Items.from_embeddings(items.astype(np.float32), modality),
        train_queries=Items.from_embeddings(queries_for(train_targets), Modality.TEXT),
        train_targets=train_targets,
        test_queries=queries_for(test_targets),
        test_targets=test_targets,
    )
