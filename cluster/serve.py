"""Start gRPC servers: shard servers, search replicas, or both on this machine (`serve local`).

Every server also answers the standard health service (grpc.health.v1) and server reflection.
"""
from __future__ import annotations

import json
import logging
import signal
import threading
import time
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
    """Transport options of a server: TLS, bearer tokens, limits, metrics."""

    tls_cert: str | None = None  # PEM certificate chain file
    tls_key: str | None = None  # PEM private key file
    tokens: tuple[str, ...] = ()  # accepted bearer tokens; empty: no authentication
    max_concurrent: int = 64  # in-flight RPCs; past it: RESOURCE_EXHAUSTED
    metrics: object | None = None  # workers.metrics.ServerMetrics: count and time every RPC

    @classmethod
    def from_args(cls, args, metrics=None) -> "ServerOptions":
        tokens: tuple[str, ...] = ()
        if getattr(args, "token_file", None):
            tokens = read_tokens(args.token_file)
        if bool(getattr(args, "tls_cert", None)) != bool(getattr(args, "tls_key", None)):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        return cls(getattr(args, "tls_cert", None), getattr(args, "tls_key", None), tokens,
                   getattr(args, "max_concurrent", 64), metrics)


def read_tokens(path: str) -> tuple[str, ...]:
    tokens = tuple(t.strip() for t in Path(path).read_text(encoding="utf-8").splitlines() if t.strip())
    if not tokens:
        raise ValueError(f"{path}: no token in the file")
    return tokens


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


class _RejectUndecodable(grpc.ServerInterceptor):
    """Bytes that do not parse as the method's request message get INVALID_ARGUMENT naming the
    parse error (gRPC's own deserializer would answer INTERNAL and log a stack trace)."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse = _lenient(handler.request_deserializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(_checked_unary(handler.unary_unary), parse,
                                                       handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(_checked_unary(handler.unary_stream), parse,
                                                        handler.response_serializer)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(_checked_stream(handler.stream_stream), parse,
                                                         handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(_checked_stream(handler.stream_unary), parse,
                                                        handler.response_serializer)
        return handler


class _Undecodable:
    def __init__(self, error: Exception):
        self.error = error


def _lenient(deserialize):
    def parse(data: bytes):
        try:
            return deserialize(data)
        except Exception as err:  # noqa: BLE001 - any parse failure is the client's
            return _Undecodable(err)
    return parse


def _reject(request, context):
    if isinstance(request, _Undecodable):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request does not parse as the method's message: "
                                                        f"{request.error}")
    return request


def _checked_unary(behavior):
    return lambda request, context: behavior(_reject(request, context), context)


def _checked_stream(behavior):
    return lambda requests, context: behavior((_reject(r, context) for r in requests), context)


def _server(options: ServerOptions) -> tuple[grpc.Server, health.HealthServicer]:
    from workers.metrics import LimitAndCount

    # Counting comes first so that refusals (limit, token) are counted too.
    interceptors = [LimitAndCount(options.metrics, options.max_concurrent)]
    if options.tokens:
        interceptors.append(_BearerTokenAuth(options.tokens))
    interceptors.append(_RejectUndecodable())
    # Threads beyond the limit, so that excess requests reach the interceptor and get a clear
    # RESOURCE_EXHAUSTED; gRPC's own cap (without a message) is only the backstop.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=options.max_concurrent + 8), interceptors=interceptors,
                         maximum_concurrent_rpcs=2 * options.max_concurrent + 8,
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

    servicer = ShardServicer(index, shard, metrics=options.metrics if options else None)
    return _serve(search_pb2_grpc.add_ShardServiceServicer_to_server, servicer, "ShardService", address, options)


def serve_replica(index: str, shard_map: dict[int, list[str]], address: str = "127.0.0.1:0",
                  options: ServerOptions | None = None, config=None,
                  on_new_version=None) -> tuple[grpc.Server, int]:
    """A search replica; `config` is a workers.replica.ReplicaConfig (limits, batching, reload
    interval, transport to the shard servers). The servicer is `server.servicer`."""
    from workers.replica import SearchServicer

    servicer = SearchServicer(index, shard_map, config, options.metrics if options else None, on_new_version)
    server, port = _serve(search_pb2_grpc.add_SearchServiceServicer_to_server, servicer, "SearchService", address,
                          options)
    server.servicer = servicer
    return server, port


@dataclass
class LocalCluster:
    """A replica plus one shard server per vector shard, all on this machine."""

    replica: grpc.Server
    replica_port: int
    shards: list[grpc.Server] = field(default_factory=list)
    shard_map: dict[int, list[str]] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.replica_port}"

    @property
    def servers(self) -> list[grpc.Server]:
        return [self.replica, *self.shards]

    def stop(self, grace: float = 1.0) -> None:
        self.replica.stop(grace).wait()
        self.replica.servicer.close()
        for s in self.shards:
            s.stop(grace).wait()


def serve_local(index: str, address: str = "127.0.0.1:0", options: ServerOptions | None = None,
                config=None) -> LocalCluster:
    """Shard servers on 127.0.0.1 (plain, no token: this machine only), the replica at `address`
    with `options` (TLS, tokens, limits). A newly published version with more vector shards gets
    shard servers for them before the replica moves to it."""
    from genius.store.layout import resolve_version
    from genius.store.manifest import Manifest

    shard_options = ServerOptions(metrics=options.metrics if options else None)
    cluster = LocalCluster(None, 0)  # type: ignore[arg-type]
    lock = threading.Lock()

    def start_shards(count: int) -> None:
        with lock:
            for number in range(len(cluster.shards), count):
                server, port = serve_shard(index, number, options=shard_options)
                cluster.shards.append(server)
                cluster.shard_map[number] = [f"127.0.0.1:{port}"]
                if cluster.replica is not None:
                    cluster.replica.servicer.add_shard(number, cluster.shard_map[number])

    start_shards(len(Manifest.read(resolve_version(index)).vector_shards))
    cluster.replica, cluster.replica_port = serve_replica(
        index, dict(cluster.shard_map), address, options, config,
        on_new_version=lambda served: start_shards(len(served.starts)))
    return cluster


def shutdown(servers: list[grpc.Server], drain_s: float = 0.0, grace_s: float = 10.0) -> None:
    """Health turns NOT_SERVING (load balancers and probes stop sending new requests) while the
    servers keep answering for `drain_s`; then they stop one after another in the order given
    (replicas before the shard servers they call): each stops accepting and gives its requests
    in flight `grace_s` seconds to finish."""
    for s in servers:
        if hasattr(s, "health"):
            s.health.enter_graceful_shutdown()
    if drain_s > 0:
        log.info("health NOT_SERVING; draining for %.1f s", drain_s)
        time.sleep(drain_s)
    for s in servers:  # in order: a replica's requests in flight still reach the shard servers after it
        s.stop(grace_s).wait()
        if hasattr(s, "servicer"):
            s.servicer.close()


def wait_for_termination(servers: list[grpc.Server], drain_s: float = 0.0, grace_s: float = 10.0) -> None:
    """Serve until SIGTERM/SIGINT, then shut down gracefully (see `shutdown`)."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("stopping")
    shutdown(servers, drain_s, grace_s)


def read_shard_map(path: str) -> dict[int, list[str]]:
    """{"<vector shard number>": ["host:port", ...]} (several addresses: fail over in order)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a shard map is a JSON object {{\"<shard number>\": [\"host:port\", ...]}}")
    shard_map = {}
    for key, value in data.items():
        if not str(key).isdigit():
            raise ValueError(f"{path}: shard map keys are vector shard numbers (genius info lists them), got {key!r}")
        addresses = [value] if isinstance(value, str) else value
        if not isinstance(addresses, list) or not addresses or not all(isinstance(a, str) for a in addresses):
            raise ValueError(f"{path}: shard {key}: give an address or a list of addresses, got {value!r}")
        shard_map[int(key)] = addresses
    return shard_map
