"""Start gRPC servers: shard servers, search replicas, or both on this machine (`serve local`).

Every server also answers the standard health service (grpc.health.v1) and server reflection.
"""
from __future__ import annotations

import json
import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from proto.genius.v1 import search_pb2, search_pb2_grpc

log = logging.getLogger("genius.serve")
MAX_MESSAGE_BYTES = 32 << 20


@dataclass
class ServerOptions:
    """Transport options of a server: TLS, bearer tokens, limits."""

    tls_cert: str | None = None  # PEM certificate chain file
    tls_key: str | None = None  # PEM private key file
    tokens: tuple[str, ...] = ()  # accepted bearer tokens; empty: no authentication
    max_concurrent: int = 64  # in-flight RPCs; past it: RESOURCE_EXHAUSTED
    workers: int = 8

    @classmethod
    def from_args(cls, args) -> "ServerOptions":
        tokens: tuple[str, ...] = ()
        if getattr(args, "token_file", None):
            tokens = tuple(t.strip() for t in Path(args.token_file).read_text(encoding="utf-8").splitlines() if t.strip())
            if not tokens:
                raise ValueError(f"{args.token_file}: no token in the file")
        if bool(getattr(args, "tls_cert", None)) != bool(getattr(args, "tls_key", None)):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        return cls(getattr(args, "tls_cert", None), getattr(args, "tls_key", None), tokens,
                   getattr(args, "max_concurrent", 64))


class _BearerTokenAuth(grpc.ServerInterceptor):
    """UNAUTHENTICATED unless `authorization: Bearer <token>` names an accepted token; health
    checks and reflection stay open for probes."""

    OPEN = ("/grpc.health.v1.Health/", "/grpc.reflection.")

    def __init__(self, tokens: tuple[str, ...]):
        self.tokens = tuple(t.encode() for t in tokens)

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith(self.OPEN):
            return continuation(handler_call_details)
        import hmac

        header = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        given = header[len("Bearer "):].encode() if header.startswith("Bearer ") else b""
        if given and any(hmac.compare_digest(given, t) for t in self.tokens):
            return continuation(handler_call_details)
        return self._deny


def _server(options: ServerOptions) -> tuple[grpc.Server, health.HealthServicer]:
    interceptors = [_BearerTokenAuth(options.tokens)] if options.tokens else []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=options.workers), interceptors=interceptors,
                         maximum_concurrent_rpcs=options.max_concurrent,
                         options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                  ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.health = health_servicer  # for graceful shutdown
    return server, health_servicer


def _start(server: grpc.Server, health_servicer, service_name: str, address: str, options: ServerOptions) -> int:
    names = (service_name, reflection.SERVICE_NAME, health.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    if options.tls_cert:
        credentials = grpc.ssl_server_credentials([(Path(options.tls_key).read_bytes(),
                                                    Path(options.tls_cert).read_bytes())])
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    server.start()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set(service_name, health_pb2.HealthCheckResponse.SERVING)
    return port


def _serve(add_to_server, servicer, service: str, address: str, options: ServerOptions | None) -> tuple[grpc.Server, int]:
    options = options or ServerOptions()
    server, health_servicer = _server(options)
    add_to_server(servicer, server)
    name = search_pb2.DESCRIPTOR.services_by_name[service].full_name
    return server, _start(server, health_servicer, name, address, options)


def serve_shard(index: str, shard: int, address: str = "127.0.0.1:0",
                options: ServerOptions | None = None) -> tuple[grpc.Server, int]:
    from workers.shard_server import ShardServicer

    return _serve(search_pb2_grpc.add_ShardServiceServicer_to_server, ShardServicer(index, shard), "ShardService",
                  address, options)


def serve_replica(index: str, shard_map: dict[str, list[str]], address: str = "127.0.0.1:0",
                  options: ServerOptions | None = None) -> tuple[grpc.Server, int]:
    from workers.replica import SearchServicer

    return _serve(search_pb2_grpc.add_SearchServiceServicer_to_server, SearchServicer(index, shard_map),
                  "SearchService", address, options)


@dataclass
class LocalCluster:
    """A replica plus one shard server per vector shard, all on this machine."""

    replica: grpc.Server
    replica_port: int
    shards: list[grpc.Server] = field(default_factory=list)
    shard_map: dict[str, list[str]] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.replica_port}"

    def stop(self, grace: float = 1.0) -> None:
        self.replica.stop(grace).wait()
        for s in self.shards:
            s.stop(grace).wait()


def serve_local(index: str, address: str = "127.0.0.1:0", options: ServerOptions | None = None) -> LocalCluster:
    """Shard servers on 127.0.0.1 (plain, no token: this machine only), the replica at `address`
    with `options` (TLS, tokens, limits)."""
    from genius.store.layout import resolve_version
    from genius.store.manifest import Manifest

    manifest = Manifest.read(resolve_version(index))
    shards, shard_map = [], {}
    for number, r in enumerate(manifest.vector_shards):
        server, port = serve_shard(index, number)
        shards.append(server)
        shard_map[f"{r.start}-{r.end}"] = [f"127.0.0.1:{port}"]
    replica, port = serve_replica(index, shard_map, address, options)
    return LocalCluster(replica, port, shards, shard_map)


def wait_for_termination(servers: list[grpc.Server], grace_s: float = 10.0) -> None:
    """Until SIGTERM/SIGINT: then health turns NOT_SERVING (load balancers stop sending), the
    servers stop accepting, and in-flight requests get `grace_s` seconds to finish."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    for s in servers:
        if hasattr(s, "health"):
            s.health.enter_graceful_shutdown()
    events = [s.stop(grace_s) for s in servers]
    for event in events:
        event.wait()


def read_shard_map(path: str) -> dict[str, list[str]]:
    """{"<start>-<end>": ["host:port", ...]} (several addresses: fail over in order)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return {str(k): [v] if isinstance(v, str) else list(v) for k, v in data.items()}
