"""Client of the genius gRPC search service (sync and asyncio), returning the library's types.

    from genius.client import SearchClient
    with SearchClient("dns:///search.genius.svc:50051", token="...") as client:
        hits = client.search(text="a red bicycle", k=10)     # genius.client.ServedResult
        print(hits.keys[0], hits.version, hits.partial)

`AsyncSearchClient` has the same methods as coroutines. Several replicas behind one DNS name
are balanced per request with gRPC's `round_robin` policy (the default here). grpc and the
generated stubs are imported when a client is created, not when this module is: the rest of
`genius` stays free of gRPC.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from genius.index import SearchResult
from genius.modality import Modality

# genius.v1.Modality numbers (proto/genius/v1/search.proto; 0 is MODALITY_UNSPECIFIED).
MODALITY_TO_PROTO = {Modality.IMAGE: 1, Modality.TEXT: 2, Modality.IMAGE_TEXT: 3}
PROTO_TO_MODALITY = {v: k for k, v in MODALITY_TO_PROTO.items()}


@dataclass
class ServedResult(SearchResult):
    """A SearchResult for one query, plus what the service says about it."""

    version: str = ""
    partial: bool = False
    missing_shards: list[str] = field(default_factory=list)
    ids: list[list[bytes]] = field(default_factory=list)
    metadata: list[list[str]] = field(default_factory=list)
    sources: list[list[str]] = field(default_factory=list)


def _channel_args(round_robin: bool, max_message_bytes: int) -> list[tuple[str, object]]:
    args: list[tuple[str, object]] = [("grpc.max_receive_message_length", max_message_bytes),
                                      ("grpc.max_send_message_length", max_message_bytes)]
    if round_robin:
        args.append(("grpc.lb_policy_name", "round_robin"))
    return args


def _request(text: str | None, image: bytes | None, k: int, beam_size: int | None, rerank: bool,
             target_modalities: Sequence | None):
    from proto.genius.v1 import search_pb2

    return search_pb2.SearchRequest(
        query=search_pb2.Query(text=text or "", image=image or b""), k=k, beam_size=beam_size or 0,
        no_rerank=not rerank, target_modalities=[MODALITY_TO_PROTO[Modality.parse(m)] for m in target_modalities or []])


def _result(reply) -> ServedResult:
    hits = list(reply.hits)
    return ServedResult(
        items=np.array([[h.item for h in hits]], dtype=np.int64).reshape(1, len(hits)),
        scores=np.array([[h.score for h in hits]], dtype=np.float64).reshape(1, len(hits)),
        keys=[[h.key for h in hits]], modalities=[[PROTO_TO_MODALITY[h.modality] for h in hits]],
        version=reply.index_version, partial=reply.partial, missing_shards=list(reply.missing_shards),
        ids=[[h.id for h in hits]], metadata=[[h.metadata for h in hits]], sources=[[h.source for h in hits]])


class _Base:
    def __init__(self, target: str, *, tls_ca: bytes | None = None, token: str | None = None,
                 timeout: float = 30.0, round_robin: bool = True, max_message_bytes: int = 32 << 20):
        self.target, self.timeout = target, timeout
        self._metadata = [("authorization", f"Bearer {token}")] if token else None
        self._tls_ca, self._args = tls_ca, _channel_args(round_robin, max_message_bytes)


class SearchClient(_Base):
    """Blocking client; errors are grpc.RpcError with the service's status code and message."""

    def __init__(self, target: str, **kwargs):
        import grpc

        from proto.genius.v1 import search_pb2_grpc

        super().__init__(target, **kwargs)
        if self._tls_ca is not None:
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(self._tls_ca), options=self._args)
        else:
            self.channel = grpc.insecure_channel(target, options=self._args)
        self.stub = search_pb2_grpc.SearchServiceStub(self.channel)

    def search(self, text: str | None = None, image: bytes | None = None, k: int = 10, beam_size: int | None = None,
               rerank: bool = True, target_modalities: Sequence | None = None,
               timeout: float | None = None) -> ServedResult:
        reply = self.stub.Search(_request(text, image, k, beam_size, rerank, target_modalities),
                                 timeout=timeout or self.timeout, metadata=self._metadata)
        return _result(reply)

    def search_many(self, queries: Sequence[dict], timeout: float | None = None) -> list[ServedResult]:
        """Several queries over one SearchStream call; each dict holds search()'s keywords."""
        requests = iter([_request(q.get("text"), q.get("image"), q.get("k", 10), q.get("beam_size"),
                                  q.get("rerank", True), q.get("target_modalities")) for q in queries])
        return [_result(r) for r in self.stub.SearchStream(requests, timeout=timeout or self.timeout,
                                                           metadata=self._metadata)]

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "SearchClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncSearchClient(_Base):
    """asyncio client (grpc.aio); create and use it inside a running event loop."""

    def __init__(self, target: str, **kwargs):
        from grpc import aio, ssl_channel_credentials

        from proto.genius.v1 import search_pb2_grpc

        super().__init__(target, **kwargs)
        if self._tls_ca is not None:
            self.channel = aio.secure_channel(target, ssl_channel_credentials(self._tls_ca), options=self._args)
        else:
            self.channel = aio.insecure_channel(target, options=self._args)
        self.stub = search_pb2_grpc.SearchServiceStub(self.channel)

    async def search(self, text: str | None = None, image: bytes | None = None, k: int = 10,
                     beam_size: int | None = None, rerank: bool = True, target_modalities: Sequence | None = None,
                     timeout: float | None = None) -> ServedResult:
        reply = await self.stub.Search(_request(text, image, k, beam_size, rerank, target_modalities),
                                       timeout=timeout or self.timeout, metadata=self._metadata)
        return _result(reply)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncSearchClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
