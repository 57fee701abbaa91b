"""gRPC serving on 127.0.0.1: a replica and shard servers on ephemeral ports, a real index."""
from __future__ import annotations

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.serve import serve_local
from genius.index import GeniusIndex
from genius.items import Items
from proto.genius.v1 import search_pb2, search_pb2_grpc

@pytest.fixture
def served(index_root):
    cluster = serve_local(str(index_root))
    channel = grpc.insecure_channel(cluster.address)
    yield cluster, search_pb2_grpc.SearchServiceStub(channel), channel
    channel.close()
    cluster.stop(0)


def request(text: str, k: int = 5, **kwargs) -> search_pb2.SearchRequest:
    return search_pb2.SearchRequest(query=search_pb2.Query(text=text), k=k, **kwargs)


def test_served_results_equal_the_library(served, index_root):
    cluster, stub, _ = served
    assert len(cluster.shards) == 3
    index = GeniusIndex.load(index_root)
    for text in ["a picture of an apple", "violin music", "a boat on the river"]:
        for no_rerank in (False, True):
            reply = stub.Search(request(text, beam_size=20, no_rerank=no_rerank), timeout=30)
            expected = index.search(Items(texts=[text]), k=5, beam_size=20, rerank=not no_rerank)
            assert [h.key for h in reply.hits] == expected.keys[0]
            assert np.allclose([h.score for h in reply.hits], expected.scores[0][: len(reply.hits)], atol=1e-5)
            assert reply.index_version == "v-0" and not reply.partial
    stream = list(stub.SearchStream(iter([request("apple"), request("globe")]), timeout=30))
    assert [r.hits[0].key for r in stream] == [stub.Search(request(t), timeout=30).hits[0].key for t in ("apple", "globe")]


def test_a_shard_down_gives_flagged_partial_results(served):
    cluster, stub, _ = served
    end = 25  # vector shard 0: items 0..24
    query = request("a photo of a apple number 0", k=10, beam_size=30)
    full = stub.Search(query, timeout=30)
    assert not full.partial and any(h.item < end for h in full.hits)
    cluster.shards[0].stop(0).wait()
    reply = stub.Search(query, timeout=30)
    assert reply.partial and list(reply.missing_shards) == [f"0:0-{end}"]
    assert reply.hits and all(h.item >= end for h in reply.hits)


@pytest.mark.parametrize("req, message", [
    (search_pb2.SearchRequest(), "empty query"),
    (search_pb2.SearchRequest(query=search_pb2.Query(text="   ")), "empty query"),
    (search_pb2.SearchRequest(query=search_pb2.Query(image=b"\x89PNG\r\n\x1a\n broken")), "image: cannot decode"),
    (search_pb2.SearchRequest(query=search_pb2.Query(text="x" * 5000)), "over the limit"),
    (search_pb2.SearchRequest(query=search_pb2.Query(text="apple"), k=100000), "k must lie in"),
    (search_pb2.SearchRequest(query=search_pb2.Query(text="apple"), beam_size=5000), "beam_size must lie in"),
    (search_pb2.SearchRequest(query=search_pb2.Query(text="apple"), target_modalities=[7]), "unknown modality"),
])
def test_bad_requests_are_invalid_argument(served, req, message):
    _, stub, _ = served
    with pytest.raises(grpc.RpcError) as err:
        stub.Search(req, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()
    assert stub.Search(request("apple"), timeout=30).hits  # the server is still fine


def test_health_and_modality_filter(served):
    _, stub, channel = served
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(service="genius.v1.SearchService"), timeout=5).status == \
        health_pb2.HealthCheckResponse.SERVING
    reply = stub.Search(request("apple", target_modalities=[search_pb2.IMAGE]), timeout=30)
    assert list(reply.hits) == []  # a text-only index has no image items
    reply = stub.Search(request("apple", target_modalities=[search_pb2.TEXT]), timeout=30)
    assert reply.hits and all(h.modality == search_pb2.TEXT for h in reply.hits)


def test_committed_stubs_are_current(tmp_path):
    from proto.generate import ROOT, generate

    generate(tmp_path)
    for name in ("search_pb2.py", "search_pb2_grpc.py", "search_pb2.pyi"):
        fresh = (tmp_path / "proto" / "genius" / "v1" / name).read_text()
        assert fresh == (ROOT / "proto" / "genius" / "v1" / name).read_text(), f"{name}: run python proto/generate.py"


def test_query_command_against_serve_local_in_a_subprocess(index_root):
    """`genius serve local` as a real process, `genius query` as a client, SIGTERM to stop."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve", "local", "--index", str(index_root),
                               "--listen", f"127.0.0.1:{port}"], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert "search replica on" in server.stdout.readline()
        run = subprocess.run([sys.executable, "-m", "cluster.cli", "query", "--address", f"127.0.0.1:{port}",
                              "--text", "a photo of a violin", "-k", "3"], capture_output=True, text=True, env=env,
                             timeout=120)
        assert run.returncode == 0, run.stderr
        assert run.stdout.startswith("index v-0") and "violin" in run.stdout
        bad = subprocess.run([sys.executable, "-m", "cluster.cli", "query", "--address", f"127.0.0.1:{port}",
                              "--text", "   "], capture_output=True, text=True, env=env, timeout=120)
        assert bad.returncode == 2 and "INVALID_ARGUMENT" in bad.stderr and "empty query" in bad.stderr
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0


def _self_signed(folder):
    """A self-signed certificate for 127.0.0.1 / localhost (PEM cert, PEM key)."""
    import datetime
    import ipaddress

    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .sign(key, hashes.SHA256()))
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    return folder / "cert.pem", folder / "key.pem"


def test_tls_and_bearer_tokens(index_root, tmp_path):
    from cluster.serve import ServerOptions

    cert, key = _self_signed(tmp_path)
    cluster = serve_local(str(index_root), options=ServerOptions(str(cert), str(key), tokens=("s3cret",)))
    try:
        credentials = grpc.ssl_channel_credentials(cert.read_bytes())
        with grpc.secure_channel(f"localhost:{cluster.replica_port}", credentials) as channel:
            stub = search_pb2_grpc.SearchServiceStub(channel)
            reply = stub.Search(request("apple"), timeout=30, metadata=[("authorization", "Bearer s3cret")])
            assert reply.hits
            for metadata in (None, [("authorization", "Bearer wrong")], [("authorization", "s3cret")]):
                with pytest.raises(grpc.RpcError) as err:
                    stub.Search(request("apple"), timeout=30, metadata=metadata)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            health = health_pb2_grpc.HealthStub(channel)  # probes need no token
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
        with grpc.insecure_channel(f"127.0.0.1:{cluster.replica_port}") as plain:  # TLS only
            with pytest.raises(grpc.RpcError):
                search_pb2_grpc.SearchServiceStub(plain).Search(request("apple"), timeout=5)
    finally:
        cluster.stop(0)


def test_fuzzed_requests_never_crash_the_replica(served):
    """10,000 random and mutated requests: every answer is a response or a status code, and the
    replica still answers a good query afterwards."""
    import io
    import random

    from PIL import Image

    _, stub, channel = served
    raw = channel.unary_unary("/genius.v1.SearchService/Search", request_serializer=lambda b: b,
                              response_deserializer=search_pb2.SearchResponse.FromString)
    rng = random.Random(0)
    buf = io.BytesIO()
    Image.new("RGB", (12, 9), (200, 10, 30)).save(buf, format="PNG")
    png = buf.getvalue()

    def mutate(data: bytes) -> bytes:
        data = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            op = rng.random()
            if op < 0.4 and data:
                data[rng.randrange(len(data))] = rng.randrange(256)
            elif op < 0.7 and data:
                del data[rng.randrange(len(data)):]
            else:
                data[rng.randrange(len(data) + 1):0] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        return bytes(data)

    def random_request() -> search_pb2.SearchRequest:
        text = "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0x80, 0x2FFF)]))
                       for _ in range(rng.choice([0, 1, 5, 40, 300])))
        image = rng.choice([b"", png, mutate(png), bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))])
        return search_pb2.SearchRequest(
            query=search_pb2.Query(text=text, image=image), k=rng.choice([0, 1, 5, 1000, 1001, 2**32 - 1]),
            beam_size=rng.choice([0, 1, 3, 10, 2000]), no_rerank=rng.random() < 0.5,
            target_modalities=[rng.randrange(-3, 9) for _ in range(rng.randint(0, 3))])

    codes = {}
    for i in range(10_000):
        req = random_request()
        wire = i % 4 == 3  # mutated wire bytes: what does not parse must be refused, not crash anything
        try:
            if wire:
                raw(mutate(req.SerializeToString()), timeout=30)
            else:
                stub.Search(req, timeout=30)
            codes["OK"] = codes.get("OK", 0) + 1
        except grpc.RpcError as err:
            allowed = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
            assert err.code() in allowed, (err.code(), err.details(), req)
            codes[err.code().name] = codes.get(err.code().name, 0) + 1
    assert sum(codes.values()) == 10_000 and codes.get("OK", 0) > 0 and codes.get("INVALID_ARGUMENT", 0) > 0
    with pytest.raises(grpc.RpcError) as err:  # bytes that are no SearchRequest at all
        raw(b"\xff\xff\xff", timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "does not parse" in err.value.details()
    assert stub.Search(request("apple"), timeout=30).hits


def test_python_clients_sync_and_async_return_library_results(served, index_root):
    import asyncio
    import subprocess
    import sys

    from genius.client import AsyncSearchClient, SearchClient

    cluster, _, _ = served
    index = GeniusIndex.load(index_root)
    expected = index.search(Items(texts=["a photo of a kayak"]), k=4, beam_size=20)
    with SearchClient(cluster.address) as client:
        got = client.search(text="a photo of a kayak", k=4, beam_size=20)
        assert got.keys == expected.keys and np.allclose(got.scores, expected.scores)
        assert np.array_equal(got.items, expected.items) and got.version == "v-0" and not got.partial
        many = client.search_many([{"text": "apple", "k": 2}, {"text": "globe", "k": 3, "rerank": False}])
        assert [len(r.keys[0]) for r in many] == [2, 3]

    async def run():
        async with AsyncSearchClient(cluster.address) as client:
            return await asyncio.gather(*[client.search(text="a photo of a kayak", k=4, beam_size=20)
                                          for _ in range(4)])
    assert all(r.keys == expected.keys for r in asyncio.run(run()))
    # The library itself stays free of gRPC: importing genius.client does not import grpc.
    probe = subprocess.run([sys.executable, "-c", "import sys, genius.client, genius.index; "
                            "print('grpc' in sys.modules)"], capture_output=True, text=True)
    assert probe.stdout.strip() == "False", probe.stderr
