"""Serving as an operated service: hot swap of the index version under load, shard fail-over,
request batching, the concurrency limit, Prometheus metrics, graceful shutdown on SIGTERM."""
from __future__ import annotations

import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.serve import ServerOptions, serve_local, serve_replica, serve_shard
from genius.index import GeniusIndex
from genius.items import Items
from proto.genius.v1 import search_pb2, search_pb2_grpc
from workers.replica import Limits, ReplicaConfig

from .conftest import WORDS


def request(text: str, k: int = 5, **kwargs) -> search_pb2.SearchRequest:
    return search_pb2.SearchRequest(query=search_pb2.Query(text=text), k=k, **kwargs)


def test_hot_swap_under_load_fails_no_request(index_root, tmp_path):
    root = tmp_path / "index"
    shutil.copytree(index_root, root)
    cluster = serve_local(str(root), config=ReplicaConfig(Limits(), reload_interval_s=0.2))
    failures: list[str] = []
    versions: list[list[str]] = [[] for _ in range(3)]
    stop = threading.Event()

    def load(worker: int) -> None:
        with grpc.insecure_channel(cluster.address) as channel:
            stub = search_pb2_grpc.SearchServiceStub(channel)
            i = 0
            while not stop.is_set():
                try:
                    reply = stub.Search(request(f"a photo of a {WORDS[i % len(WORDS)]}", beam_size=10), timeout=30)
                    if reply.partial:
                        failures.append(f"partial: {list(reply.missing_shards)}")
                    versions[worker].append(reply.index_version)
                except grpc.RpcError as err:
                    failures.append(f"{err.code().name}: {err.details()}")
                i += 1

    threads = [threading.Thread(target=load, args=(w,)) for w in range(3)]
    try:
        for t in threads:
            t.start()
        time.sleep(1.0)
        # Publish v-1 with 20 new items: their own vector shard, which gets a shard server first.
        new = [f"a drawing of a zeppelin number {i}" for i in range(20)]
        GeniusIndex.load(root).add(Items(texts=new, keys=[f"zeppelin-{i}" for i in range(20)]))
        deadline = time.time() + 60
        while not any(v and v[-1] == "v-1" for v in versions) and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    try:
        assert failures == []
        for seen in versions:
            assert seen and seen[0] == "v-0" and seen[-1] == "v-1"
            assert seen == sorted(seen)  # never back to the old version
        assert len(cluster.shards) == 4
        with grpc.insecure_channel(cluster.address) as channel:
            reply = search_pb2_grpc.SearchServiceStub(channel).Search(request("a drawing of a zeppelin number 3",
                                                                              beam_size=20), timeout=30)
        expected = GeniusIndex.load(root).search(Items(texts=["a drawing of a zeppelin number 3"]), k=5, beam_size=20)
        assert reply.index_version == "v-1" and not reply.partial
        assert [h.key for h in reply.hits] == expected.keys[0] and any(k.startswith("zeppelin") for k in expected.keys[0])
    finally:
        cluster.stop(0)


def test_a_shard_with_two_addresses_fails_over(index_root):
    """Shard 0 served twice: with its first server stopped, results stay complete."""
    from genius.store.layout import resolve_version
    from genius.store.manifest import Manifest

    count = len(Manifest.read(resolve_version(index_root)).vector_shards)
    shards = [serve_shard(str(index_root), n) for n in range(count)]
    spare, spare_port = serve_shard(str(index_root), 0)
    shard_map = {n: [f"127.0.0.1:{port}"] for n, (_, port) in enumerate(shards)}
    shard_map[0].append(f"127.0.0.1:{spare_port}")
    replica, port = serve_replica(str(index_root), shard_map)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = search_pb2_grpc.SearchServiceStub(channel)
            query = request("a photo of a apple number 0", k=10, beam_size=30)
            before = stub.Search(query, timeout=30)
            shards[0][0].stop(0).wait()
            after = stub.Search(query, timeout=30)
        assert not after.partial and [h.key for h in after.hits] == [h.key for h in before.hits]
        assert any(h.item < 25 for h in after.hits)  # shard 0's items still scored
    finally:
        replica.stop(0).wait()
        replica.servicer.close()
        for server, _ in [*shards, (spare, 0)]:
            server.stop(0).wait()


def test_concurrent_queries_are_batched_and_answer_like_the_library(index_root):
    from workers.metrics import ServerMetrics

    metrics = ServerMetrics()
    cluster = serve_local(str(index_root), options=ServerOptions(metrics=metrics))
    index = GeniusIndex.load(index_root)
    texts = [f"the {w} once more" for w in WORDS[:16]]
    expected = {t: index.search(Items(texts=[t]), k=5, beam_size=20).keys[0] for t in texts}
    got: dict[str, list[str]] = {}
    barrier = threading.Barrier(len(texts))

    def ask(text: str) -> None:
        with grpc.insecure_channel(cluster.address) as channel:
            stub = search_pb2_grpc.SearchServiceStub(channel)
            barrier.wait()
            for _ in range(3):
                got[text] = [h.key for h in stub.Search(request(text, beam_size=20), timeout=60).hits]

    try:
        threads = [threading.Thread(target=ask, args=(t,)) for t in texts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert got == expected
        sizes = metrics.registry.get_sample_value("genius_decode_batch_size_sum")
        batches = metrics.registry.get_sample_value("genius_decode_batch_size_count")
        assert sizes == 3 * len(texts) and batches < sizes  # some beam searches decoded several queries
    finally:
        cluster.stop(0)


def test_past_the_concurrency_and_message_limits_requests_get_resource_exhausted(index_root):
    cluster = serve_local(str(index_root), options=ServerOptions(max_concurrent=1))
    pending: queue.Queue = queue.Queue()

    def requests():
        while (item := pending.get()) is not None:
            yield item

    try:
        with grpc.insecure_channel(cluster.address) as channel:
            stub = search_pb2_grpc.SearchServiceStub(channel)
            stream = stub.SearchStream(requests(), timeout=60)  # holds the one slot while open
            pending.put(request("apple"))
            assert next(stream).hits
            with pytest.raises(grpc.RpcError) as err:
                stub.Search(request("apple"), timeout=30)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "1 requests in flight" in err.value.details()
            pending.put(None)
            assert list(stream) == []
            assert stub.Search(request("apple"), timeout=30).hits  # the slot is free again
            with pytest.raises(grpc.RpcError) as err:  # past the 32 MiB message limit
                stub.Search(search_pb2.SearchRequest(query=search_pb2.Query(image=b"\0" * (33 << 20))), timeout=60)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        cluster.stop(0)


def _metrics(port: int) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_prometheus_metrics_count_requests_stages_and_version(index_root):
    from workers.metrics import ServerMetrics

    metrics = ServerMetrics()
    port = metrics.serve(0, "127.0.0.1")
    cluster = serve_local(str(index_root), options=ServerOptions(metrics=metrics))
    search = "/genius.v1.SearchService/Search"
    try:
        with grpc.insecure_channel(cluster.address) as channel:
            stub = search_pb2_grpc.SearchServiceStub(channel)
            for _ in range(3):
                stub.Search(request("apple"), timeout=30)
            stub.Search(request("apple", no_rerank=True), timeout=30)
            with pytest.raises(grpc.RpcError):
                stub.Search(request("apple", k=5000), timeout=30)
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        seen = _metrics(port)
    finally:
        cluster.stop(0)
    assert seen[("genius_requests_total", (("code", "OK"), ("method", search)))] == 4
    assert seen[("genius_requests_total", (("code", "INVALID_ARGUMENT"), ("method", search)))] == 1
    assert seen[("genius_requests_total", (("code", "OK"), ("method", "/genius.v1.ShardService/Score")))] >= 3
    assert not any("Health" in dict(labels).get("method", "") for _, labels in seen)  # probes not counted
    assert seen[("genius_request_seconds_count", (("method", search),))] == 5
    stage_seconds = 0.0
    for stage, count in (("encode", 4), ("decode", 4), ("scatter", 3), ("rerank", 4)):
        assert seen[("genius_stage_seconds_count", (("stage", stage),))] == count, stage
        stage_seconds += seen[("genius_stage_seconds_sum", (("stage", stage),))]
    # The stages are timed inside the (sequential) Search RPCs: together they take no longer.
    assert 0 < stage_seconds <= seen[("genius_request_seconds_sum", (("method", search),))]
    assert seen[("genius_in_flight_requests", (("method", search),))] == 0
    assert seen[("genius_index_version", (("server", "replica"),))] == 0  # v-0
    assert seen[("genius_index_version", (("server", "shard-2"),))] == 0


def test_sigterm_drains_then_finishes_requests_in_flight(index_root):
    """SIGTERM: health turns NOT_SERVING while requests are still answered (--drain-seconds),
    a stream in flight gets all its answers, and the process exits 0."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve", "local", "--index", str(index_root),
                               "--listen", f"127.0.0.1:{port}", "--drain-seconds", "3"],
                              stdout=subprocess.PIPE, text=True, env=env)
    sent: queue.Queue = queue.Queue()

    def requests():
        while (item := sent.get()) is not None:
            yield item

    try:
        assert "search replica on" in server.stdout.readline()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = search_pb2_grpc.SearchServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            stream = stub.SearchStream(requests(), timeout=60)
            sent.put(request("apple"))
            answers = [next(stream)]
            server.send_signal(signal.SIGTERM)
            deadline = time.time() + 10
            status = health_pb2.HealthCheckResponse.SERVING
            while status == health_pb2.HealthCheckResponse.SERVING and time.time() < deadline:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                time.sleep(0.05)
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert stub.Search(request("violin"), timeout=30).hits  # still answering while draining
            for text in ("globe", "kayak", "teapot"):  # the open stream keeps going past the drain
                time.sleep(1.0)
                sent.put(request(text))
                answers.append(next(stream))
            sent.put(None)
            answers.extend(stream)
        assert len(answers) == 4 and all(a.hits for a in answers)
        assert server.wait(timeout=30) == 0
    finally:
        if server.poll() is None:
            server.kill()


def test_a_replica_waits_for_shard_servers_that_lack_the_new_version(index_root, tmp_path):
    """Shard servers pinned to v-0 (as if still copying v-1): the replica keeps serving v-0,
    complete, instead of moving to v-1 with partial answers."""
    from genius.store.layout import resolve_version
    from genius.store.manifest import Manifest

    root = tmp_path / "index"
    shutil.copytree(index_root, root)
    count = len(Manifest.read(resolve_version(root)).vector_shards)
    shards = [serve_shard(str(root / "v-0"), n) for n in range(count)]
    replica, port = serve_replica(str(root), {n: [f"127.0.0.1:{p}"] for n, (_, p) in enumerate(shards)},
                                  config=ReplicaConfig(Limits(), reload_interval_s=0.2))
    try:
        GeniusIndex.load(root).delete(["apple-0"])  # publishes v-1
        time.sleep(2.0)  # ten reload intervals
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = search_pb2_grpc.SearchServiceStub(channel).Search(request("apple"), timeout=30)
        assert reply.index_version == "v-0" and not reply.partial and reply.hits
    finally:
        replica.stop(0).wait()
        replica.servicer.close()
        for server, _ in shards:
            server.stop(0).wait()


def test_a_replica_decoding_in_int8_answers_like_the_library_in_int8(index_root):
    from genius.decoder_precision import precision_support

    ok, why = precision_support("int8")
    if not ok:
        pytest.skip(why)
    cluster = serve_local(str(index_root), config=ReplicaConfig(Limits(), decode_precision="int8"))
    index = GeniusIndex.load(index_root).set_decode_precision("int8")
    try:
        with grpc.insecure_channel(cluster.address) as channel:
            stub = search_pb2_grpc.SearchServiceStub(channel)
            for text in (f"the {w} once more" for w in WORDS[:4]):
                hits = [h.key for h in stub.Search(request(text, beam_size=20), timeout=60).hits]
                assert hits == index.search(Items(texts=[text]), k=5, beam_size=20).keys[0]
    finally:
        cluster.stop(0)
