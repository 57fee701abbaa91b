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


def _server(workers: int) -> tuple[grpc.Server, health.HealthServicer]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers),
                         options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                  ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    return server, health_servicer


def _start(server: grpc.Server, health_servicer, service_name: str, address: str) -> int:
    names = (service_name, reflection.SERVICE_NAME, health.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    server.start()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set(service_name, health_pb2.HealthCheckResponse.SERVING)
    return port


def serve_shard(index: str, shard: int, address: str = "127.0.0.1:0", workers: int = 8) -> tuple[grpc.Server, int]:
    from workers.shard_server import ShardServicer

    server, health_servicer = _server(workers)
    search_pb2_grpc.add_ShardServiceServicer_to_server(ShardServicer(index, shard), server)
    name = search_pb2.DESCRIPTOR.services_by_name["ShardService"].full_name
    return server, _start(server, health_servicer, name, address)


def serve_replica(index: str, shard_map: dict[str, list[str]], address: str = "127.0.0.1:0",
                  workers: int = 8) -> tuple[grpc.Server, int]:
    from workers.replica import SearchServicer

    server, health_servicer = _server(workers)
    search_pb2_grpc.add_SearchServiceServicer_to_server(SearchServicer(index, shard_map), server)
    name = search_pb2.DESCRIPTOR.services_by_name["SearchService"].full_name
    return server, _start(server, health_servicer, name, address)


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


def serve_local(index: str, address: str = "127.0.0.1:0") -> LocalCluster:
    from genius.store.layout import resolve_version
    from genius.store.manifest import Manifest

    manifest = Manifest.read(resolve_version(index))
    shards, shard_map = [], {}
    for number, r in enumerate(manifest.vector_shards):
        server, port = serve_shard(index, number)
        shards.append(server)
        shard_map[f"{r.start}-{r.end}"] = [f"127.0.0.1:{port}"]
    replica, port = serve_replica(index, shard_map, address)
    return LocalCluster(replica, port, shards, shard_map)


def wait_for_termination(servers: list[grpc.Server]) -> None:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    for s in servers:
        s.stop(5.0).wait()


def read_shard_map(path: str) -> dict[str, list[str]]:
    """{"<start>-<end>": ["host:port", ...]} (several addresses: fail over in order)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return {str(k): [v] if isinstance(v, str) else list(v) for k, v in data.items()}
