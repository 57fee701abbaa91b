"""ShardService: the re-ranking vectors (and item rows) of one item-number range of an index.

    genius serve shard --index INDEX --range N     N: the vector shard number in the manifest

Score: cosine similarity of a query vector with items of the range (the same arithmetic as
genius.rerank.rank); Fetch: the items' table rows. Memory-mapped; read-only.
"""
from __future__ import annotations

import logging
from pathlib import Path

import grpc
import numpy as np

from genius.client import MODALITY_TO_PROTO
from genius.modality import Modality
from genius.rerank import cosine
from proto.genius.v1 import search_pb2, search_pb2_grpc

log = logging.getLogger(__name__)


class ShardServicer(search_pb2_grpc.ShardServiceServicer):
    def __init__(self, index: str | Path, shard: int):
        from genius.store.item_table import ItemTables
        from genius.store.manifest import Manifest
        from genius.store.vector_shards import VectorShards
        from genius.store.layout import resolve_version

        version = resolve_version(index)
        manifest = Manifest.read(version)
        if not 0 <= shard < len(manifest.vector_shards):
            raise ValueError(f"{version}: vector shard {shard} does not exist (0..{len(manifest.vector_shards) - 1})")
        self.range = manifest.vector_shards[shard]
        self.version = version.name
        self.vectors = VectorShards.open(version, [self.range], manifest.embed_dim)
        tables = [r for r in manifest.item_tables if r.start < self.range.end and r.end > self.range.start]
        self.items = ItemTables.open(version, tables, manifest.id_width)
        self.dim = manifest.embed_dim
        log.info("shard %d of %s: items %d..%d", shard, version, self.range.start, self.range.end - 1)

    def _items(self, items, context) -> np.ndarray:
        items = np.asarray(items, dtype=np.int64)
        outside = (items < self.range.start) | (items >= self.range.end)
        if outside.any():
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"item {int(items[outside][0])} is not in this shard ({self.range.start}..{self.range.end - 1})")
        return items

    def Score(self, request, context):
        if request.index_version and request.index_version != self.version:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"this shard serves {self.version}, the request is for {request.index_version}")
        query = np.asarray(request.query, dtype=np.float32)
        if query.shape != (self.dim,):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"query has {len(query)} values, the index embeds {self.dim}")
        items = self._items(request.items, context)
        sims = cosine(query, self.vectors[items])
        return search_pb2.ScoreResponse(items=items.tolist(), scores=sims.tolist())

    def Fetch(self, request, context):
        items = self._items(request.items, context)
        rows = self.items.rows(items).to_pylist() if len(items) else []
        return search_pb2.FetchResponse(items=[
            search_pb2.Item(item=r["item"], key=r["key"], modality=MODALITY_TO_PROTO[Modality.parse(r["modality"])],
                            id=r["id"], source=r["source"] or "", metadata=r["metadata"] or "") for r in rows])

