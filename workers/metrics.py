"""Prometheus metrics of the gRPC servers, and the interceptor that counts every RPC.

    genius_requests_total{method, code}        RPCs answered, by status code
    genius_request_seconds{method}             latency of whole RPCs (histogram)
    genius_stage_seconds{stage}                search stages: encode, decode, scatter, rerank
    genius_decode_batch_size                   queries per beam search (request batching)
    genius_in_flight_requests{method}          RPCs being handled now
    genius_index_version{server}               the version number each server answers with

One ServerMetrics per process (its own registry, so tests and `serve local` can hold several);
`serve(port)` exposes it over HTTP at /metrics.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Not counted: health checks and reflection, which probes call all the time.
UNCOUNTED = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class ServerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("genius_requests", "RPCs answered, by method and status code", ["method", "code"],
                                registry=r)
        self.latency = Histogram("genius_request_seconds", "Latency of whole RPCs", ["method"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.stages = Histogram("genius_stage_seconds", "Time per search stage (encode, decode, scatter, rerank)",
                                ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("genius_decode_batch_size", "Queries decoded together in one beam search",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.in_flight = Gauge("genius_in_flight_requests", "RPCs being handled now", ["method"], registry=r)
        self.version = Gauge("genius_index_version", "Number of the index version (v-<n>) a server answers with",
                             ["server"], registry=r)

    def set_version(self, server: str, version: str) -> None:
        from genius.store.layout import version_number

        self.version.labels(server).set(version_number(version) if version_number(version) is not None else -1)

    def stage(self, name: str) -> "_Timer":
        return _Timer(self.stages.labels(name))

    def serve(self, port: int, address: str = "0.0.0.0") -> int:
        """Expose /metrics over HTTP; returns the port (an ephemeral one for port 0)."""
        server, _ = start_http_server(port, address, registry=self.registry)
        return server.server_port


class _Timer:
    def __init__(self, histogram):
        self.histogram = histogram

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.histogram.observe(time.perf_counter() - self.t0)
        return False


class LimitAndCount(grpc.ServerInterceptor):
    """Counts every RPC (by final status code), times it, tracks the in-flight ones, and refuses
    work past `max_concurrent` in-flight RPCs with RESOURCE_EXHAUSTED (so refusals are counted
    too; health checks and reflection are neither limited nor counted)."""

    def __init__(self, metrics: ServerMetrics | None, max_concurrent: int):
        self.metrics = metrics
        self.max_concurrent = max_concurrent
        self._in_flight = 0
        self._lock = threading.Lock()

    def _enter(self) -> bool:
        with self._lock:
            if self._in_flight >= self.max_concurrent:
                return False
            self._in_flight += 1
            return True

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(UNCOUNTED):
            return handler
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(self._wrap_unary(method, handler.unary_unary),
                                                       handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(self._wrap_stream(method, handler.unary_stream),
                                                        handler.request_deserializer, handler.response_serializer)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(self._wrap_stream(method, handler.stream_stream),
                                                         handler.request_deserializer, handler.response_serializer)
        return handler

    def _refuse(self, context) -> None:
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                      f"{self.max_concurrent} requests in flight, the server's limit (--max-concurrent): retry later")

    def _record(self, method: str, context, t0: float, error: BaseException | None) -> None:
        if self.metrics is None:
            return
        code = _code(context, error)
        self.metrics.requests.labels(method, code).inc()
        self.metrics.latency.labels(method).observe(time.perf_counter() - t0)

    @contextmanager
    def _tracked(self, method: str, context):
        """Around one RPC: refuse it past the limit, else count it in flight, time it and record
        its final status code."""
        t0 = time.perf_counter()
        if not self._enter():
            self._record(method, None, t0, _Refused())
            self._refuse(context)
        gauge = self.metrics.in_flight.labels(method) if self.metrics is not None else None
        if gauge is not None:
            gauge.inc()
        error = None
        try:
            yield
        except BaseException as err:
            error = err
            raise
        finally:
            if gauge is not None:
                gauge.dec()
            self._leave()
            self._record(method, context, t0, error)

    def _wrap_unary(self, method: str, behavior):
        def wrapped(request, context):
            with self._tracked(method, context):
                return behavior(request, context)
        return wrapped

    def _wrap_stream(self, method: str, behavior):
        def wrapped(request, context):
            with self._tracked(method, context):
                yield from behavior(request, context)
        return wrapped


class _Refused(Exception):
    pass


def _code(context, error: BaseException | None) -> str:
    """The status code an RPC ended with: what context.abort/set_code set, else OK or UNKNOWN."""
    if isinstance(error, _Refused):
        return grpc.StatusCode.RESOURCE_EXHAUSTED.name
    code = None
    if context is not None:
        try:
            code = context.code()
        except Exception:  # noqa: BLE001 - older grpcio without ServicerContext.code()
            code = None
    if isinstance(code, grpc.StatusCode):
        return code.name
    return grpc.StatusCode.OK.name if error is None else grpc.StatusCode.UNKNOWN.name
