"""The cluster build against the bare encoder and against `genius fit`, on a real corpus.

    python bench/build.py                          # Fashion-MNIST, 10,000 items, 1 and 2 actors
    python bench/build.py --limit 70000 --actors 1 2

1. Shards: `genius data fashion-mnist` (10 classes, image + caption records: image-text items).
2. Bare encoder: the build's encoder in this process, one thread, encoding the records already
   in memory, batch by batch as the embed actors do (two runs: mean and spread).
3. Pipeline: the embed stage of `genius index build` on a local Ray cluster with 1 and 2 actors
   (1 CPU = 1 torch thread each): items / stage seconds, actor start-up and shard reading
   included. pipeline_efficiency = pipeline items/s / (actors x bare items/s) (target >= 0.9).
4. End to end: `genius index build` (every stage, 2 actors) against `GeniusIndex.fit` in one
   process on the same records, pairs (caption -> item, for a fifth of the items), encoder and
   config; seconds by stage.
Results: bench/results/build.json (`pipeline_items_per_s`, `bare_items_per_s`,
`pipeline_efficiency`, `stage_seconds`, `items`, `actors` per run) and build.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
log = logging.getLogger("bench.build")


def make_shards(folder: Path, limit: int, shard_size: int) -> None:
    if (folder / "shards.json").exists():
        return
    subprocess.run([sys.executable, "-m", "cluster.cli", "data", "fashion-mnist", "--out", str(folder),
                    "--limit", str(limit), "--shard-size", str(shard_size), "--quiet"], check=True, cwd=ROOT)


def read_records(folder: Path):
    from genius.data.shards import ShardReader

    return list(ShardReader(folder, check_images="none"))


def bare_rate(encoder, records, batch: int, repeats: int = 2) -> tuple[float, float]:
    """Items/s of encode_pair over in-memory records (mean, spread over repeats)."""
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for a in range(0, len(records), batch):
            part = records[a : a + batch]
            encoder.encode_pair([r.image for r in part], [r.text for r in part])
        rates.append(len(records) / (time.perf_counter() - t0))
    return float(np.mean(rates)), float(np.max(rates) - np.min(rates))


def write_pairs(records, path: Path, seed: int) -> tuple[list[str], list[int]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(records), size=max(1, len(records) // 5), replace=False).tolist())
    texts = [f"a photo of a {records[i].meta.get('class_name', 'thing').lower()}" for i in chosen]
    pq.write_table(pa.table({"text": texts, "target": [records[i].key for i in chosen]}), path)
    return texts, chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=10_000, help="Fashion-MNIST records (default: 10000)")
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=5, help="quantizer and decoder epochs (both runs)")
    parser.add_argument("--work", default=None)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "build"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--encoder", help="encoder folder (default: the build's offline model)")
    parser.add_argument("--num-gpus-per-actor", type=float, default=None, help="GPU share per actor (GPU machines)")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0)
    parser.add_argument("--size", choices=["cpu", "paper"], default="cpu")
    parser.add_argument("--train-workers", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import ray
    import torch

    from cluster.build.pipeline import Build, BuildConfig
    from genius.encoders import MultimodalEncoder
    from genius.index import GeniusIndex
    from genius.items import Items

    torch.set_num_threads(1)
    work = Path(args.work or tempfile.mkdtemp(prefix="genius-build-bench-"))
    shards = work / "shards"
    make_shards(shards, args.limit, args.shard_size)
    records = read_records(shards)
    n = len(records)
    results = {"meta": {"command": "python " + " ".join(["bench/build.py", *sys.argv[1:]]),
                        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "corpus": "fashion-mnist",
                        "batch_size": args.batch_size}, "runs": []}
    pairs_path = work / "pairs.parquet"
    pair_texts, pair_rows = write_pairs(records, pairs_path, args.seed)

    for actors in args.actors:
        out = work / f"index-{actors}"
        shutil.rmtree(out, ignore_errors=True)
        ray.init(num_cpus=int(actors * args.cpus_per_actor) + 1, include_dashboard=False)
        cfg = BuildConfig(shards=str(shards), out=str(out), actors=actors, batch_size=args.batch_size,
                          pairs=str(pairs_path), quantizer_epochs=args.epochs, decoder_epochs=args.epochs,
                          seed=args.seed, progress=False, encoder=args.encoder, size=args.size,
                          num_gpus_per_actor=args.num_gpus_per_actor, cpus_per_actor=args.cpus_per_actor,
                          train_workers=args.train_workers)
        build = Build(cfg)
        build.encoder_dir = build._encoder()
        build.embed()
        embed_s = build.stage_seconds["embed"]
        encoder = MultimodalEncoder.load(build.encoder_dir)  # the very model the actors used
        bare, spread = bare_rate(encoder, records, args.batch_size)
        # Steady state: the units' own seconds (reading, embedding, writing), without actor start-up.
        unit_seconds = sum(u["seconds"] for u in build.job.units("embed:").values())
        steady = n / (unit_seconds / actors)
        run = {"actors": actors, "items": n, "pipeline_items_per_s": n / embed_s, "bare_items_per_s": bare,
               "bare_spread_items_per_s": spread, "pipeline_efficiency": n / embed_s / (actors * bare),
               "steady_items_per_s": steady, "steady_efficiency": steady / (actors * bare),
               "embed_seconds": embed_s, "startup_seconds": embed_s - unit_seconds / actors}
        if actors == max(args.actors):  # the rest of the build, end to end
            t0 = time.perf_counter()
            result = build.run()
            run["stage_seconds"] = result.stage_seconds
            run["build_seconds"] = sum(result.stage_seconds.values())
            run["build_wall_seconds_after_embed"] = time.perf_counter() - t0
            index = build.index_config()
            t0 = time.perf_counter()
            corpus = Items(texts=[r.text for r in records], images=[r.image for r in records],
                           keys=[r.key for r in records])
            GeniusIndex.fit(corpus, Items(texts=pair_texts), np.array(pair_rows), index, encoder=encoder, progress=False)
            run["fit_seconds"] = time.perf_counter() - t0
        ray.shutdown()
        log.info("%s", run)
        results["runs"].append(run)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["# Cluster build vs bare encoder and genius fit (`python bench/build.py`)", "",
             f"{results['meta']['machine']}; Fashion-MNIST, {n:,} image-text items; default encoder; batch "
             f"{args.batch_size}; 1 CPU = 1 torch thread per actor; bare encoder: 1 thread, records in memory.", "",
             "| actors | pipeline items/s | bare items/s (spread) | pipeline_efficiency | embed s | "
             "steady items/s (efficiency) | actor start-up s |",
             "|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        lines.append(f"| {r['actors']} | {r['pipeline_items_per_s']:,.0f} | {r['bare_items_per_s']:,.0f} "
                     f"(±{r['bare_spread_items_per_s']:,.0f}) | {r['pipeline_efficiency']:.2f} | {r['embed_seconds']:.1f} | "
                     f"{r['steady_items_per_s']:,.0f} ({r['steady_efficiency']:.2f}) | {r['startup_seconds']:.1f} |")
    for r in results["runs"]:
        if "stage_seconds" in r:
            lines += ["", f"End to end with {r['actors']} actors: `genius index build` "
                      f"{r['build_seconds']:.0f} s ({', '.join(f'{k} {v:.1f}' for k, v in r['stage_seconds'].items())}) "
                      f"vs `GeniusIndex.fit` in one process {r['fit_seconds']:.0f} s."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
