"""Retrieval metrics as M-BEIR defines them."""
from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np


def recall_at_k(ranked: Sequence[Sequence[int]], relevant: Sequence[Collection[int]], k: int) -> float:
    """Fraction of queries with at least one relevant item among their top k (M-BEIR's recall@k)."""
    if len(ranked) != len(relevant):
        raise ValueError(f"{len(ranked)} rankings but {len(relevant)} relevance sets")
    if len(ranked) == 0:
        return 0.0
    hits = [bool(set(int(i) for i in r[:k] if i >= 0) & set(rel)) for r, rel in zip(ranked, relevant)]
    return float(np.mean(hits))


def recall_table(ranked: Sequence[Sequence[int]], relevant: Sequence[Collection[int]], ks=(1, 5, 10)) -> dict[str, float]:
    return {f"recall@{k}": recall_at_k(ranked, relevant, k) for k in ks}


def exact_knn(query_vectors: np.ndarray, item_vectors: np.ndarray, k: int, batch: int = 1024) -> np.ndarray:
    """Top-k items by inner product (flat exact search), (Q, k) item numbers."""
    k = min(k, len(item_vectors))
    out = np.empty((len(query_vectors), k), dtype=np.int64)
    items = item_vectors.astype(np.float32)
    for start in range(0, len(query_vectors), batch):
        scores = query_vectors[start : start + batch].astype(np.float32) @ items.T
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
        out[start : start + batch] = np.take_along_axis(top, order, axis=1)
    return out
