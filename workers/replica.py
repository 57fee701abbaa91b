"""SearchService: a stateless search replica.

encode the query -> trie-constrained beam search (memory-mapped trie) -> group the beam's items
by vector shard -> Score on the shard servers in parallel (each call with its own timeout,
bounded by the request's deadline) -> gather -> top-k. A shard that does not answer makes the
response partial (its items are left out of the ranking and named in missing_shards); a shard
listed with several addresses fails over to the next.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import torch

from genius.client import MODALITY_TO_PROTO, PROTO_TO_MODALITY
from genius.modality import Modality
from proto.genius.v1 import search_pb2, search_pb2_grpc

log = logging.getLogger(__name__)


@dataclass
class Limits:
    max_k: int = 1000
    max_beam: int = 1000
    max_text_chars: int = 4096
    max_image_bytes: int = 20 << 20
    max_image_pixels: int = 40_000_000
    shard_timeout_s: float = 2.0


class ShardClient:
    """One vector shard (an item range), reachable at one or more addresses (tried in order)."""

    def __init__(self, start: int, end: int, addresses: list[str]):
        self.start, self.end = start, end
        self.name = f"{start}-{end}"
        self.stubs = [search_pb2_grpc.ShardServiceStub(grpc.insecure_channel(a)) for a in addresses]

    def score(self, query: np.ndarray, items: np.ndarray, version: str, timeout: float) -> np.ndarray:
        last: Exception | None = None
        for stub in self.stubs:
            try:
                reply = stub.Score(search_pb2.ScoreRequest(query=query.tolist(), items=items.tolist(),
                                                           index_version=version), timeout=timeout)
                return np.asarray(reply.scores, dtype=np.float64)
            except grpc.RpcError as err:  # down, slow or refusing: the next address, if any
                last = err
        raise RuntimeError(f"shard {self.name}: no address answered ({last})")


class SearchServicer(search_pb2_grpc.SearchServiceServicer):
    def __init__(self, index: str | Path, shard_map: dict[str, list[str]], limits: Limits | None = None):
        from genius.index import GeniusIndex

        self.index = GeniusIndex.load(index)
        self.version = self.index.path.name
        self.limits = limits or Limits()
        self.shards = sorted((ShardClient(*map(int, name.split("-")), addresses) for name, addresses in shard_map.items()),
                             key=lambda s: s.start)
        self._starts = np.array([s.start for s in self.shards], dtype=np.int64)
        self.pool = ThreadPoolExecutor(max_workers=max(4, 2 * len(self.shards)))

    # ----------------------------------------------------------------- validation
    def _query(self, request, context):
        from genius.encoders import load_image
        from genius.errors import InvalidInputError
        from genius.items import Items

        limits = self.limits
        text, image = request.query.text, request.query.image
        if not text.strip() and not image:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty query: give text, an image, or both")
        if len(text) > limits.max_text_chars:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"text of {len(text)} characters is over the limit of "
                                                            f"{limits.max_text_chars}")
        if image:
            if len(image) > limits.max_image_bytes:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"image of {len(image)} bytes is over the limit of "
                                                                f"{limits.max_image_bytes}")
            try:
                load_image(image, max_pixels=limits.max_image_pixels)
            except InvalidInputError as err:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"image: {err.reason}")
        k = request.k or 10
        if not 1 <= k <= limits.max_k:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"k must lie in [1, {limits.max_k}], got {k}")
        beam = request.beam_size or self.index.config.beam_size
        if not 1 <= beam <= limits.max_beam:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"beam_size must lie in [1, {limits.max_beam}], got {beam}")
        modalities = []
        for m in request.target_modalities:
            if m not in PROTO_TO_MODALITY:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown modality {m}: use IMAGE, TEXT or IMAGE_TEXT")
            modalities.append(int(PROTO_TO_MODALITY[m]))
        items = Items(texts=[text] if text.strip() else None, images=[image] if image else None)
        return items, k, beam, modalities or None

    # ----------------------------------------------------------------- search
    def Search(self, request, context):
        from genius.beam_search import beam_search

        items, k, beam, modalities = self._query(request, context)
        index = self.index
        query = index.embed(items)
        wanted = None
        if modalities is not None:
            wanted = np.zeros((1, 3), dtype=bool)
            wanted[0, modalities] = True
        first_step = [modalities] if modalities is not None and index.quantizer.use_modality_code else None
        with torch.no_grad():
            beams = beam_search(index.decoder, index.trie, torch.from_numpy(query), beam, first_step)
        ranked = beams.ranked_items(0)
        found = np.array([i for i, _ in ranked], dtype=np.int64)
        beam_scores = np.array([s for _, s in ranked], dtype=np.float64)
        keep = index.item_filter(wanted)
        if keep is not None and len(found):
            mask = keep(0, found)
            found, beam_scores = found[mask], beam_scores[mask]
        missing: list[str] = []
        if request.no_rerank or len(found) == 0:
            order = np.arange(min(k, len(found)))
            scores = beam_scores
        else:
            scores, missing = self._scatter(query[0], found, context)
            scored = np.flatnonzero(~np.isnan(scores))
            order = scored[np.argsort(-scores[scored], kind="stable")][:k]
        return self._response(found[order], scores[order], missing)

    def _scatter(self, query: np.ndarray, items: np.ndarray, context) -> tuple[np.ndarray, list[str]]:
        """Scores of the items from their shards (NaN where a shard did not answer)."""
        scores = np.full(len(items), np.nan)
        shard_of = np.searchsorted(self._starts, items, side="right") - 1
        remaining = context.time_remaining()
        timeout = self.limits.shard_timeout_s if remaining is None else max(0.01, min(self.limits.shard_timeout_s,
                                                                                      remaining - 0.05))
        futures = {}
        for s in np.unique(shard_of):
            rows = np.flatnonzero(shard_of == s)
            futures[int(s)] = (rows, self.pool.submit(self.shards[s].score, query, items[rows], self.version, timeout))
        missing = []
        for s, (rows, future) in futures.items():
            try:
                scores[rows] = future.result(timeout=timeout + 1.0)
            except Exception as err:  # noqa: BLE001 - any failure of one shard: partial results
                log.warning("%s", err)
                missing.append(self.shards[s].name)
        return scores, missing

    def _response(self, items: np.ndarray, scores: np.ndarray, missing: list[str]):
        rows = self.index.items.rows(items).to_pylist() if len(items) else []
        hits = [search_pb2.Hit(key=r["key"], modality=MODALITY_TO_PROTO[Modality.parse(r["modality"])], score=float(s),
                               id=r["id"], metadata=r["metadata"] or "", item=int(r["item"]))
                for r, s in zip(rows, scores)]
        return search_pb2.SearchResponse(hits=hits, index_version=self.version, partial=bool(missing),
                                         missing_shards=missing)

    def SearchStream(self, request_iterator, context):
        for request in request_iterator:
            yield self.Search(request, context)

