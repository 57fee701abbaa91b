"""ShardService: the re-ranking vectors (and item rows) of one vector shard of an index.

    genius serve shard --index INDEX --range N     N: the vector shard number in the manifest

Score: cosine similarity of a query vector with items of the shard (the same arithmetic as
genius.rerank.rank); Fetch: the items' table rows. Memory-mapped; read-only.

Given an index folder, the server answers for shard N of whichever published version a request
names (opened on first use, the `keep_versions` most recently used kept open), so replicas can
move to a newly published version one by one without a failed request. Given a version folder
(INDEX/v-<n>), it serves that version only.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from genius.client import MODALITY_TO_PROTO
from genius.modality import Modality
from genius.rerank import cosine
from proto.genius.v1 import search_pb2, search_pb2_grpc

log = logging.getLogger(__name__)


@dataclass
class ShardVersion:
    """Shard N of one published version, memory-mapped."""

    name: str
    start: int
    end: int
    dim: int
    vectors: object  # genius.store.vector_shards.VectorShards
    items: object  # genius.store.item_table.ItemTables

    @classmethod
    def open(cls, version: Path, shard: int) -> "ShardVersion":
        from genius.store.item_table import ItemTables
        from genius.store.manifest import Manifest
        from genius.store.vector_shards import VectorShards

        manifest = Manifest.read(version)
        if not 0 <= shard < len(manifest.vector_shards):
            raise LookupError(f"{version.name} has no vector shard {shard} "
                              f"(it has {len(manifest.vector_shards)}: 0..{len(manifest.vector_shards) - 1})")
        r = manifest.vector_shards[shard]
        tables = [t for t in manifest.item_tables if t.start < r.end and t.end > r.start]
        return cls(version.name, r.start, r.end, manifest.embed_dim,
                   VectorShards.open(version, [r], manifest.embed_dim),
                   ItemTables.open(version, tables, manifest.id_width))


class ShardServicer(search_pb2_grpc.ShardServiceServicer):
    def __init__(self, index: str | Path, shard: int, keep_versions: int = 3, metrics=None):
        from genius.store.layout import resolve_version

        version = resolve_version(index)
        self.root = None if version == Path(index) else Path(index)  # None: pinned to one version
        self.shard = shard
        self.keep_versions = keep_versions
        self.metrics = metrics
        self._versions: OrderedDict[str, ShardVersion] = OrderedDict()
        self._lock = threading.Lock()
        self.current = self._open(version)  # raises for a shard number the version lacks
        log.info("shard %d of %s: items %d..%d", shard, version, self.current.start, self.current.end - 1)

    @property
    def version(self) -> str:
        return self.current.name

    def _open(self, version: Path) -> ShardVersion:
        with self._lock:
            opened = self._versions.get(version.name)
            if opened is None:
                opened = ShardVersion.open(version, self.shard)
                self._versions[version.name] = opened
                while len(self._versions) > self.keep_versions:
                    self._versions.popitem(last=False)  # open maps stay valid for requests holding them
                if self.metrics is not None:
                    self.metrics.set_version(f"shard-{self.shard}", version.name)
            self._versions.move_to_end(version.name)
            return opened

    def _version(self, name: str, context) -> ShardVersion:
        """The version a request names (empty: the newest this server has opened)."""
        if not name:
            return self.current
        opened = self._versions.get(name)
        if opened is not None:
            return opened
        from genius.store.layout import version_number

        if self.root is None or version_number(name) is None or not (self.root / name).is_dir():
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"shard {self.shard} serves {self.version}, the request is for {name}")
        try:
            opened = self._open(self.root / name)
        except LookupError as err:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))
        if self.current.name != name and version_number(name) > version_number(self.current.name):
            self.current = opened
        return opened

    @staticmethod
    def _items(shard: ShardVersion, items, context) -> np.ndarray:
        items = np.asarray(items, dtype=np.int64)
        outside = (items < shard.start) | (items >= shard.end)
        if outside.any():
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"item {int(items[outside][0])} is not in shard "
                                                            f"{shard.name}/{shard.start}..{shard.end - 1}")
        return items

    def Score(self, request, context):
        shard = self._version(request.index_version, context)
        query = np.asarray(request.query, dtype=np.float32)
        if len(request.items) and query.shape != (shard.dim,):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"query has {len(query)} values, the index embeds {shard.dim}")
        items = self._items(shard, request.items, context)
        sims = cosine(query, shard.vectors[items]) if len(items) else np.zeros(0)
        return search_pb2.ScoreResponse(items=items.tolist(), scores=sims.tolist())

    def Fetch(self, request, context):
        shard = self._version(request.index_version, context)
        items = self._items(shard, request.items, context)
        rows = shard.items.rows(items).to_pylist() if len(items) else []
        return search_pb2.FetchResponse(items=[
            search_pb2.Item(item=r["item"], key=r["key"], modality=MODALITY_TO_PROTO[Modality.parse(r["modality"])],
                            id=r["id"], source=r["source"] or "", metadata=r["metadata"] or "") for r in rows])
