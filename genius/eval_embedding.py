"""Embed the items of retrieval tasks once: each key (equal texts once), with a content cache.

    tasks, seconds = embed_tasks(tasks, encoder, cache=EmbeddingCache(path, encoder_id))
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from genius.embedding_cache import EmbeddingCache, content_id
from genius.items import Items
from genius.modality import Modality
from genius.tasks import RetrievalTask

log = logging.getLogger(__name__)

__all__ = ["embed_tasks"]


def _item_fields(task: RetrievalTask) -> tuple[str, ...]:
    return ("train_queries", "train_candidates", "test_queries", "candidates")


def embed_tasks(
    tasks: Sequence[RetrievalTask],
    encoder: Any = None,
    embeddings: Mapping[str, np.ndarray] | None = None,
    log_every: int = 5000,
    cache: EmbeddingCache | None = None,
) -> tuple[list[RetrievalTask], float]:
    """The tasks with embeddings in all their `Items`; (tasks, seconds spent encoding).

    Each key is embedded once (equal texts once); `embeddings` (key -> vector) and vectors
    the Items already carry are used as they are. `cache` (by content, for this encoder)
    serves what an earlier run embedded and keeps what this one embeds (saved at the end).
    Needs `encoder` for anything else.
    """
    by_key: dict[str, np.ndarray] = {k: np.asarray(v, dtype=np.float32) for k, v in (embeddings or {}).items()}
    pending: dict[Modality, dict[str, tuple[Any, Any]]] = {m: {} for m in Modality}
    for task in tasks:
        for name in _item_fields(task):
            items: Items = getattr(task, name)
            if items.keys is None:
                raise ValueError(f"{task.name}: {name} have no keys")
            for i, key in enumerate(items.keys):
                if key in by_key:
                    continue
                if items.embeddings is not None:
                    by_key[key] = items.embeddings[i]
                    continue
                m = Modality(int(items.modality[i]))
                if key not in pending[m]:
                    text = items.texts[i] if items.texts is not None else None
                    image = items.images[i] if items.images is not None else None
                    pending[m][key] = (image, text)
    ids: dict[str, str] = {}  # key -> content id, hashed once (images can be large)
    if cache is not None:
        for m, rows in pending.items():
            ids.update((k, content_id(m, *rows[k])) for k in rows)
            for k in rows:
                vec = cache.get(ids[k])
                if vec is not None:
                    by_key[k] = vec
            pending[m] = {k: v for k, v in rows.items() if k not in by_key}
    todo = sum(len(p) for p in pending.values())
    seconds = 0.0
    if todo:
        if encoder is None:
            raise ValueError(f"{todo} items carry no embeddings: pass an encoder or embeddings")
        t0 = time.perf_counter()
        for m, rows in pending.items():
            if rows:
                vecs = _encode(encoder, m, list(rows.values()), log_every)
                by_key.update(zip(rows, vecs))
                if cache is not None:
                    for k, vec in zip(rows, vecs):
                        cache.put(ids[k], vec)
        seconds = time.perf_counter() - t0
        log.info("embedded %d items in %.1f s", todo, seconds)
    if cache is not None:
        cache.save()
    out = []
    for task in tasks:
        changes = {}
        for name in _item_fields(task):
            items: Items = getattr(task, name)
            if items.embeddings is None:
                emb = np.stack([by_key[k] for k in items.keys]).astype(np.float32)
                changes[name] = Items(texts=items.texts, images=items.images, embeddings=emb,
                                      modality=items.modality, keys=items.keys)
        out.append(replace(task, **changes) if changes else task)
    return out, seconds


def _encode(encoder: Any, modality: Modality, rows: list[tuple[Any, Any]], log_every: int) -> np.ndarray:
    """Embed (image, text) rows of one modality: (N, D) float32; equal texts once."""
    images = [r[0] for r in rows]
    texts = [r[1] for r in rows]
    if modality == Modality.TEXT:
        unique = list(dict.fromkeys(texts))
        log.info("embedding %d texts (%d distinct)", len(texts), len(unique))
        vecs = _batched(lambda a, b: encoder.encode_text(unique[a:b]), len(unique), log_every, "texts")
        where = {t: i for i, t in enumerate(unique)}
        return vecs[[where[t] for t in texts]]
    if modality == Modality.IMAGE:
        log.info("embedding %d images", len(images))
        return _batched(lambda a, b: encoder.encode_image(images[a:b]), len(images), log_every, "images")
    log.info("embedding %d image-text pairs", len(rows))
    return _batched(lambda a, b: encoder.encode_pair(images[a:b], texts[a:b]), len(rows), log_every, "pairs")


def _batched(fn: Callable[[int, int], Any], n: int, log_every: int, what: str) -> np.ndarray:
    parts, done = [], 0
    for a in range(0, n, log_every):
        b = min(n, a + log_every)
        v = fn(a, b)
        parts.append(v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v))
        done = b
        if n > log_every:
            log.info("  %s: %d/%d", what, done, n)
    return np.concatenate(parts).astype(np.float32)
