"""gRPC serving under load beside the in-process library, same queries, same index, same run.

    python bench/serve.py                       # 10,000 Fashion-MNIST items, 10 s per load level
    python bench/serve.py --duration 30 --limit 30000

1. Index: Fashion-MNIST image-text items (`genius data fashion-mnist`), `GeniusIndex.fit` with
   the default encoder (caption -> item pairs for a fifth of the items), published twice with the
   same model: with one vector shard and with two (cached in --work).
2. In-process: `GeniusIndex.search` of one text query at a time (k=10, the index's beam), one
   torch thread; wall and CPU milliseconds per query. Run before and after the served runs.
3. Served: `genius serve local` as its own process (one torch thread; a replica plus one shard
   server per vector shard, on 127.0.0.1), and 1, 4 and 16 concurrent clients (one channel
   each) sending the same queries for a fixed duration after a warm-up: QPS, p50/p99 latency,
   errors, server CPU ms per query. Configurations: 1 shard server, 2 shard servers, and 1 shard
   server with request batching off (--max-batch 1) to measure what batching gives.
overhead_ratio = served p50 / in-process p50 at 1 client (target <= 1.2): the median over
--rounds rounds that alternate an in-process run and a served run, so that the drift of a shared
machine falls on both sides alike.
Results: bench/results/serve.json (`inprocess_p50_ms`, `served_p50_ms`, `overhead_ratio`, `qps`,
`errors`, `p99_ms`: by concurrency, for 1 shard server with batching; every configuration under
`configs`) and serve.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
log = logging.getLogger("bench.serve")
CONCURRENCY = (1, 4, 16)


def build_indexes(work: Path, limit: int, epochs: int, seed: int) -> tuple[dict[int, Path], list[str]]:
    """{vector shards: index folder} with one model, and the query texts (test-split captions)."""
    from dataclasses import replace

    from build import make_shards, read_records, write_pairs
    from genius.encoders import EncoderConfig, MultimodalEncoder
    from genius.index import GeniusIndex, IndexConfig
    from genius.items import Items

    shards = work / "shards"
    make_shards(shards, limit, 1000)
    records = read_records(shards)
    queries = [r.text for r in records if r.meta.get("split") == "test"][:500] or [r.text for r in records[:500]]
    roots = {1: work / "index-1shard", 2: work / "index-2shards"}
    if all((r / "CURRENT").exists() for r in roots.values()):
        return roots, queries
    pair_texts, pair_rows = write_pairs(records, work / "pairs.parquet", seed)
    config = IndexConfig.for_corpus(len(records))
    config.quantizer = replace(config.quantizer, epochs=epochs)
    config.decoder_training = replace(config.decoder_training, epochs=epochs)
    config.items_per_file = len(records)
    corpus = Items(texts=[r.text for r in records], images=[r.image for r in records], keys=[r.key for r in records])
    log.info("fitting an index of %d items", len(records))
    encoder = MultimodalEncoder.from_config(EncoderConfig())
    index = GeniusIndex.fit(corpus, Items(texts=pair_texts), np.array(pair_rows), config, encoder=encoder,
                            progress=False)
    index.save(roots[1])
    index.config.items_per_file = (len(records) + 1) // 2
    index.save(roots[2])
    return roots, queries


def percentiles(ms: list[float]) -> dict:
    a = np.asarray(ms) if ms else np.zeros(1)
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean())}


def inprocess(root: Path, queries: list[str], duration: float) -> dict:
    """One query at a time through GeniusIndex.search, for `duration` seconds."""
    from genius.index import GeniusIndex
    from genius.items import Items

    index = GeniusIndex.load(root)
    for q in queries[:5]:  # warm-up
        index.search(Items(texts=[q]), k=10)
    wall, cpu = [], []
    end = time.perf_counter() + duration
    i = 0
    while time.perf_counter() < end:
        t0, c0 = time.perf_counter(), time.process_time()
        index.search(Items(texts=[queries[i % len(queries)]]), k=10)
        wall.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
        i += 1
    return {**percentiles(wall), "queries": len(wall), "qps": len(wall) / duration, "cpu_ms_per_query": float(np.mean(cpu))}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Server:
    """`genius serve local` in its own process."""

    def __init__(self, root: Path, max_batch: int):
        self.port = _free_port()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cluster.cli", "serve", "local", "--index", str(root), "--listen",
             f"127.0.0.1:{self.port}", "--max-batch", str(max_batch), "--reload-interval", "0",
             "--drain-seconds", "0", "--max-concurrent", "64"],
            stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        line = self.process.stdout.readline()
        if "search replica on" not in line:
            raise RuntimeError(f"serve local did not start: {line!r}")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


def load(address: str, queries: list[str], clients: int, duration: float, warmup: float, pid: int) -> dict:
    """`clients` threads, each with its own channel, sending queries back to back."""
    import grpc

    from proto.genius.v1 import search_pb2, search_pb2_grpc

    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: dict[str, int] = {}
    lock = threading.Lock()
    start = time.perf_counter() + warmup
    end = start + duration

    def client(c: int) -> None:
        with grpc.insecure_channel(address) as channel:
            stub = search_pb2_grpc.SearchServiceStub(channel)
            i = c * 37
            while (now := time.perf_counter()) < end:
                request = search_pb2.SearchRequest(query=search_pb2.Query(text=queries[i % len(queries)]), k=10)
                i += 1
                try:
                    stub.Search(request, timeout=30)
                    if now >= start:
                        latencies[c].append((time.perf_counter() - now) * 1e3)
                except grpc.RpcError as err:
                    if now >= start:
                        with lock:
                            errors[err.code().name] = errors.get(err.code().name, 0) + 1

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    time.sleep(max(0.0, start - time.perf_counter()))
    cpu0 = _cpu_seconds(pid)
    time.sleep(max(0.0, end - time.perf_counter()))
    cpu1 = _cpu_seconds(pid)
    for t in threads:
        t.join(timeout=60)
    done = [x for per in latencies for x in per]
    return {"clients": clients, **percentiles(done), "queries": len(done), "qps": len(done) / duration,
            "errors": sum(errors.values()), "errors_by_code": errors,
            "server_cpu_ms_per_query": (cpu1 - cpu0) * 1e3 / max(1, len(done))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=10_000, help="Fashion-MNIST records (default: 10000)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per load level (default: 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring (default: 2)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds for overhead_ratio (default: 5)")
    parser.add_argument("--epochs", type=int, default=5, help="quantizer and decoder epochs (default: 5)")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "genius-serve-bench"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import torch

    torch.set_num_threads(1)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    roots, queries = build_indexes(work, args.limit, args.epochs, args.seed)
    from genius.index import GeniusIndex

    num_items = len(GeniusIndex.load(roots[1]))
    runs = {"inprocess_before": inprocess(roots[1], queries, args.duration)}
    log.info("in-process: %s", runs["inprocess_before"])
    configs = {"1 shard server": (roots[1], 32), "2 shard servers": (roots[2], 32),
               "1 shard server, no batching": (roots[1], 1)}
    served: dict[str, dict[str, dict]] = {}
    paired: list[dict] = []
    for name, (root, max_batch) in configs.items():
        server = Server(root, max_batch)
        try:
            if not paired:  # the overhead: in-process and served at 1 client, alternating (drift-proof)
                for _ in range(args.rounds):
                    local = inprocess(roots[1], queries, args.duration / 2)
                    remote = load(server.address, queries, 1, args.duration / 2, args.warmup / 2, server.process.pid)
                    paired.append({"inprocess_p50_ms": local["p50_ms"], "served_p50_ms": remote["p50_ms"],
                                   "ratio": remote["p50_ms"] / local["p50_ms"]})
                    log.info("paired round: %s", paired[-1])
            served[name] = {}
            for clients in CONCURRENCY:
                served[name][str(clients)] = load(server.address, queries, clients, args.duration, args.warmup,
                                                  server.process.pid)
                log.info("%s, %d clients: %s", name, clients, served[name][str(clients)])
        finally:
            server.stop()
    runs["inprocess_after"] = inprocess(roots[1], queries, args.duration)
    log.info("in-process again: %s", runs["inprocess_after"])

    main_runs = served["1 shard server"]
    middle = sorted(paired, key=lambda r: r["ratio"])[len(paired) // 2]  # the round with the median ratio
    results = {
        "meta": {"command": "python " + " ".join(["bench/serve.py", *sys.argv[1:]]),
                 "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "corpus": "fashion-mnist",
                 "items": num_items, "query": "text (test-split captions), k=10, the index's beam, re-ranked",
                 "duration_s": args.duration, "torch_threads": 1},
        "inprocess_p50_ms": middle["inprocess_p50_ms"],
        "served_p50_ms": middle["served_p50_ms"],
        "overhead_ratio": middle["ratio"],
        "overhead_rounds": paired,
        "qps": {c: r["qps"] for c, r in main_runs.items()},
        "p99_ms": {c: r["p99_ms"] for c, r in main_runs.items()},
        "errors": sum(r["errors"] for runs_ in served.values() for r in runs_.values()),
        "inprocess": runs,
        "configs": served,
    }
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["# gRPC serving vs in-process search (`python bench/serve.py`)", "",
             f"{results['meta']['machine']}; Fashion-MNIST, {num_items:,} image-text items; text queries, k=10, "
             f"the index's beam, re-ranked; 1 torch thread on both sides; {args.duration:.0f} s per load level "
             "after a warm-up; loopback only.", "",
             "| run | clients | QPS | p50 ms | p99 ms | errors | CPU ms/query |", "|---|---|---|---|---|---|---|"]
    for key in ("inprocess_before", "inprocess_after"):
        r = runs[key]
        lines.append(f"| in-process ({key.split('_')[1]}) | 1 | {r['qps']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} "
                     f"| 0 | {r['cpu_ms_per_query']:.1f} |")
    for name, by_clients in served.items():
        for clients, r in by_clients.items():
            lines.append(f"| served, {name} | {clients} | {r['qps']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                         f"{r['errors']} | {r['server_cpu_ms_per_query']:.1f} (server) |")
    lines += ["", f"overhead_ratio (served p50 / in-process p50, 1 client, 1 shard server; median of {len(paired)} "
              f"rounds alternating the two, {args.duration / 2:.0f} s each, so that drift of this shared machine "
              f"hits both): **{results['overhead_ratio']:.2f}** (target <= 1.2); rounds: "
              + ", ".join(f"{r['served_p50_ms']:.1f}/{r['inprocess_p50_ms']:.1f} ms = {r['ratio']:.2f}" for r in paired)]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
