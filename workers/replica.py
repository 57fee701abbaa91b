"""SearchService: a stateless search replica.

encode the query -> trie-constrained beam search (memory-mapped trie; concurrent queries encoded
and decoded in batches) -> group the beam's items by vector shard -> Score on the shard servers in
parallel (each call with its own timeout, bounded by the request's deadline) -> gather -> top-k.
A shard that does not answer makes the response partial (its items are left out of the ranking
and named in missing_shards); a shard listed with several addresses fails over to the next.

Given an index folder, the replica reads its CURRENT every `reload_interval_s` and moves to a
newly published version without dropping a request: the new version is opened and the shard
servers are asked to open it while the old one keeps answering; then requests that arrive use
the new one, and requests in flight finish on the version they started with. Every response
names the version that answered it.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import grpc
import numpy as np

from genius.client import MODALITY_TO_PROTO, PROTO_TO_MODALITY
from genius.modality import Modality
from proto.genius.v1 import search_pb2, search_pb2_grpc
from workers.batching import QueryBatcher

log = logging.getLogger(__name__)


@dataclass
class Limits:
    max_k: int = 1000
    max_beam: int = 1000
    max_text_chars: int = 4096
    max_image_bytes: int = 20 << 20
    max_image_pixels: int = 40_000_000
    shard_timeout_s: float = 2.0


@dataclass
class ReplicaConfig:
    limits: Limits
    reload_interval_s: float = 2.0  # how often CURRENT is read; 0: stay on the version opened at start
    max_batch: int = 32  # queries per beam search; 1: decode each request in its own thread
    shard_tls_ca: str | None = None  # PEM CA file: reach the shard servers over TLS
    shard_token: str | None = None  # bearer token for the shard servers
    decode_precision: str = "fp32"  # the decoder's precision in search: fp32, bf16 or int8

    @classmethod
    def default(cls) -> "ReplicaConfig":
        return cls(Limits())


class ShardError(RuntimeError):
    """No address of a shard answered; `code` is the last gRPC status code (or None)."""

    def __init__(self, number: int, error: Exception | None):
        self.code = error.code() if isinstance(error, grpc.RpcError) else None
        detail = f"{self.code.name}: {error.details()}" if isinstance(error, grpc.RpcError) else str(error)
        super().__init__(f"shard {number}: no address answered ({detail})")


class VersionNotReady(RuntimeError):
    """A shard server cannot open a new version yet (e.g. still copying it)."""


class ShardClient:
    """Vector shard `number`, reachable at one or more addresses (tried in order)."""

    def __init__(self, number: int, addresses: list[str], config: ReplicaConfig):
        if not addresses:
            raise ValueError(f"shard {number}: no address")
        self.number = number
        self.addresses = list(addresses)
        if config.shard_tls_ca:
            credentials = grpc.ssl_channel_credentials(Path(config.shard_tls_ca).read_bytes())
            channels = [grpc.secure_channel(a, credentials) for a in addresses]
        else:
            channels = [grpc.insecure_channel(a) for a in addresses]
        self.stubs = [search_pb2_grpc.ShardServiceStub(c) for c in channels]
        self.metadata = [("authorization", f"Bearer {config.shard_token}")] if config.shard_token else None

    def score(self, query: np.ndarray, items: np.ndarray, version: str, timeout: float) -> np.ndarray:
        last: Exception | None = None
        for stub in self.stubs:
            try:
                reply = stub.Score(search_pb2.ScoreRequest(query=query.tolist(), items=items.tolist(),
                                                           index_version=version),
                                   timeout=timeout, metadata=self.metadata)
                return np.asarray(reply.scores, dtype=np.float64)
            except grpc.RpcError as err:  # down, slow or refusing: the next address, if any
                last = err
        raise ShardError(self.number, last)


@dataclass
class ServedVersion:
    """One opened index version and the item range of each of its vector shards."""

    index: object  # genius.index.GeniusIndex
    name: str
    starts: np.ndarray
    ends: np.ndarray

    @classmethod
    def open(cls, path: str | Path, decode_precision: str = "fp32") -> "ServedVersion":
        from genius.index import GeniusIndex

        index = GeniusIndex.load(path).set_decode_precision(decode_precision)
        ranges = index.vectors.ranges if index.vectors is not None else []
        return cls(index, index.path.name, np.array([r.start for r in ranges], dtype=np.int64),
                   np.array([r.end for r in ranges], dtype=np.int64))

    def shard_name(self, number: int) -> str:
        return f"{number}:{self.starts[number]}-{self.ends[number]}"


class SearchServicer(search_pb2_grpc.SearchServiceServicer):
    def __init__(self, index: str | Path, shard_map: dict[int, list[str]], config: ReplicaConfig | None = None,
                 metrics=None, on_new_version: Callable[[ServedVersion], None] | None = None):
        from genius.store.layout import resolve_version

        self.config = config or ReplicaConfig.default()
        self.limits = self.config.limits
        self.metrics = metrics
        self.on_new_version = on_new_version
        version = resolve_version(index)
        self.root = None if version == Path(index) else Path(index)  # None: pinned to one version
        self.shards: dict[int, ShardClient] = {}
        for number, addresses in shard_map.items():
            self.add_shard(number, addresses)
        self.pool = ThreadPoolExecutor(max_workers=max(4, 2 * len(self.shards)), thread_name_prefix="genius-scatter")
        self.batcher = QueryBatcher(self.config.max_batch, metrics) if self.config.max_batch > 1 else None
        self.served = ServedVersion.open(version, self.config.decode_precision)
        self._check_shard_map(self.served)
        self._set_version_metric()
        self._stop = threading.Event()
        self._watcher = None
        if self.root is not None and self.config.reload_interval_s > 0:
            self._watcher = threading.Thread(target=self._watch, name="genius-version-watch", daemon=True)
            self._watcher.start()

    @property
    def version(self) -> str:
        return self.served.name

    def add_shard(self, number: int, addresses: list[str]) -> None:
        self.shards[int(number)] = ShardClient(int(number), addresses, self.config)

    def close(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=10)
        if self.batcher is not None:
            self.batcher.close()
        self.pool.shutdown(wait=False)

    def _check_shard_map(self, served: ServedVersion) -> None:
        unknown = sorted(n for n in self.shards if n >= len(served.starts))
        absent = [n for n in range(len(served.starts)) if n not in self.shards]
        if unknown:
            log.warning("%s has vector shards 0..%d; the shard map also names %s", served.name,
                        len(served.starts) - 1, unknown)
        if absent:
            log.warning("%s: no shard server for vector shards %s: their items will be missing (partial results)",
                        served.name, absent)

    def _set_version_metric(self) -> None:
        if self.metrics is not None:
            self.metrics.set_version("replica", self.served.name)

    # ----------------------------------------------------------------- new versions
    def _watch(self) -> None:
        from genius.store.layout import resolve_version

        while not self._stop.wait(self.config.reload_interval_s):
            try:
                version = resolve_version(self.root)
                if version.name != self.served.name:
                    self.swap(version)
            except VersionNotReady as err:
                log.info("not moving yet, still serving %s: %s", self.served.name, err)
            except Exception:  # noqa: BLE001 - a bad publish must not stop the replica serving the old one
                log.exception("could not move to the version CURRENT names in %s; still serving %s",
                              self.root, self.served.name)

    def swap(self, version: str | Path) -> None:
        """Open `version`, have the shard servers open it, then answer new requests with it.
        Raises VersionNotReady (and keeps the old version) while a shard server that answers
        cannot open it yet; a shard server that is down does not hold the move up."""
        t0 = time.perf_counter()
        served = ServedVersion.open(version, self.config.decode_precision)
        if self.on_new_version is not None:
            self.on_new_version(served)
        self._check_shard_map(served)
        empty = np.zeros(0, dtype=np.float32)
        for number in range(len(served.starts)):
            if number in self.shards:
                try:  # an empty Score makes the shard server open the version before traffic needs it
                    self.shards[number].score(empty, np.zeros(0, dtype=np.int64), served.name,
                                              self.limits.shard_timeout_s * 5)
                except ShardError as err:
                    if err.code == grpc.StatusCode.FAILED_PRECONDITION:
                        # It answers but lacks the version (still copying it): moving now would
                        # make answers partial; the watcher tries again next interval.
                        raise VersionNotReady(f"{served.name}: {err}") from None
                    log.warning("%s: %s", served.name, err)  # down: partial either way
        previous, self.served = self.served, served
        self._set_version_metric()
        log.info("now serving %s (was %s; opened in %.2f s)", served.name, previous.name, time.perf_counter() - t0)

    # ----------------------------------------------------------------- validation
    def _query(self, request, context, served: ServedVersion):
        from genius.encoders import load_image
        from genius.errors import InvalidInputError

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
        beam = request.beam_size or served.index.config.beam_size
        if not 1 <= beam <= limits.max_beam:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"beam_size must lie in [1, {limits.max_beam}], got {beam}")
        modalities = []
        for m in request.target_modalities:
            if m not in PROTO_TO_MODALITY:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown modality {m}: use IMAGE, TEXT or IMAGE_TEXT")
            modalities.append(int(PROTO_TO_MODALITY[m]))
        return text if text.strip() else None, image or None, k, beam, sorted(set(modalities)) or None

    # ----------------------------------------------------------------- search
    def _stage(self, name: str):
        from contextlib import nullcontext

        return self.metrics.stage(name) if self.metrics is not None else nullcontext()

    def Search(self, request, context):
        served = self.served  # one version for the whole request, whatever is published meanwhile
        text, image, k, beam, modalities = self._query(request, context, served)
        if self.batcher is not None:  # encoded and decoded with whatever else is waiting
            query, found, beam_scores = self.batcher.search(served.index, text, image, beam, modalities,
                                                            timeout=context.time_remaining())
        else:
            from genius.items import Items

            with self._stage("encode"):
                query = served.index.embed(Items(texts=None if text is None else [text],
                                                 images=None if image is None else [image]))[0]
            with self._stage("decode"):
                found, beam_scores = served.index.candidates(query[None], beam,
                                                             None if modalities is None else [modalities])[0]
        missing: list[str] = []
        if request.no_rerank or len(found) == 0:
            with self._stage("rerank"):
                order = np.arange(min(k, len(found)))
                return self._response(served, found[order], beam_scores[order], missing)
        with self._stage("scatter"):
            scores, missing = self._scatter(served, query, found, context)
        with self._stage("rerank"):
            scored = np.flatnonzero(~np.isnan(scores))
            order = scored[np.argsort(-scores[scored], kind="stable")][:k]
            return self._response(served, found[order], scores[order], missing)

    def _scatter(self, served: ServedVersion, query: np.ndarray, items: np.ndarray,
                 context) -> tuple[np.ndarray, list[str]]:
        """Scores of the items from their shards (NaN where a shard did not answer)."""
        scores = np.full(len(items), np.nan)
        shard_of = np.searchsorted(served.starts, items, side="right") - 1
        remaining = context.time_remaining()
        timeout = self.limits.shard_timeout_s if remaining is None else max(0.01, min(self.limits.shard_timeout_s,
                                                                                      remaining - 0.05))
        futures, missing = {}, []
        for s in np.unique(shard_of).tolist():
            rows = np.flatnonzero(shard_of == s)
            client = self.shards.get(s)
            if client is None:
                missing.append(served.shard_name(s))
                continue
            try:
                futures[s] = (rows, self.pool.submit(client.score, query, items[rows], served.name, timeout))
            except RuntimeError:  # the replica is shutting down: a request still running gets partial results
                missing.append(served.shard_name(s))
        for s, (rows, future) in futures.items():
            try:
                scores[rows] = future.result(timeout=timeout + 1.0)
            except Exception as err:  # noqa: BLE001 - any failure of one shard: partial results
                log.warning("%s", err)
                missing.append(served.shard_name(s))
        return scores, sorted(missing, key=lambda name: int(name.split(":")[0]))

    @staticmethod
    def _response(served: ServedVersion, items: np.ndarray, scores: np.ndarray, missing: list[str]):
        rows = served.index.items.rows(items).to_pylist() if len(items) else []
        hits = [search_pb2.Hit(key=r["key"], modality=MODALITY_TO_PROTO[Modality.parse(r["modality"])], score=float(s),
                               id=r["id"], metadata=r["metadata"] or "", item=int(r["item"]), source=r["source"] or "")
                for r, s in zip(rows, scores)]
        return search_pb2.SearchResponse(hits=hits, index_version=served.name, partial=bool(missing),
                                         missing_shards=missing)

    def SearchStream(self, request_iterator, context):
        for request in request_iterator:
            yield self.Search(request, context)
