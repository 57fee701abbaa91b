"""Ranking of the items a beam search found: in beam order, or re-ranked by cosine similarity."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from genius.beam_search import BeamResult


@dataclass
class Ranking:
    items: np.ndarray  # (Q, k) item numbers, -1 where fewer than k were found
    scores: np.ndarray  # (Q, k): beam log-probabilities, or cosine similarities when re-ranked

    def as_lists(self) -> list[list[int]]:
        return [[int(i) for i in row if i >= 0] for row in self.items]


def rank(
    beams: BeamResult,
    k: int,
    query_vectors: np.ndarray | None = None,
    item_vectors: Callable[[np.ndarray], np.ndarray] | None = None,
    keep: Callable[[int, np.ndarray], np.ndarray] | None = None,
) -> Ranking:
    """Top-k items per query.

    Without vectors, items come in beam order. With `query_vectors` (Q, D) and
    `item_vectors` (a function from item numbers to (n, D) vectors: stored embeddings or
    vectors rebuilt from codes), every item of the beam is scored by cosine similarity.
    `keep(query, items)` -> bool mask drops items first (deleted ones, unwanted modalities).
    """
    Q = len(beams.items)
    out_items = np.full((Q, k), -1, dtype=np.int64)
    out_scores = np.full((Q, k), -np.inf, dtype=np.float64)
    rerank = query_vectors is not None and item_vectors is not None
    for q in range(Q):
        items, beam_scores = candidates(beams, q, keep)
        if not len(items):
            continue
        if rerank:
            sims = cosine(query_vectors[q], item_vectors(items))
            order = np.argsort(-sims, kind="stable")[:k]
            out_items[q, : len(order)] = items[order]
            out_scores[q, : len(order)] = sims[order]
        else:
            n = min(k, len(items))
            out_items[q, :n] = items[:n]
            out_scores[q, :n] = beam_scores[:n]
    return Ranking(out_items, out_scores)


def candidates(beams: BeamResult, query: int, keep: Callable[[int, np.ndarray], np.ndarray] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """The items one query's beams found, in beam order without repeats, and their beam
    log-probabilities; `keep` drops items (deleted ones, unwanted modalities)."""
    ranked = beams.ranked_items(query)
    items = np.array([i for i, _ in ranked], dtype=np.int64)
    scores = np.array([s for _, s in ranked], dtype=np.float64)
    if keep is not None and len(items):
        mask = keep(query, items)
        items, scores = items[mask], scores[mask]
    return items, scores


def cosine(query: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Cosine similarity of one query with each row of `vectors`, in float32 (the re-ranking
    score, here and on the shard servers)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    query = np.asarray(query, dtype=np.float32)
    return _normalize(vectors) @ (query / max(np.linalg.norm(query), 1e-12))


def _normalize(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
