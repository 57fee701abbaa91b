"""`genius search-batch`: top-k for a large query set across a pool of Ray actors, resumable.

Queries come from a table (Parquet/CSV/TSV with the columns of `genius search --queries`: text,
image, or embedding + modality; `key` names a query, default its row number), split into units
of --unit-rows rows, or from WebDataset shards (one unit per shard, the record key names the
query). Each unit's results go to OUT/results-<unit>.parquet (query, rank, key, item, score,
modality, version), written atomically and recorded in OUT/job.json; --resume skips done units.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger("genius.search_batch")

TABLE_SUFFIXES = (".parquet", ".csv", ".tsv")
_TABLES: dict[str, Any] = {}


def plan_units(queries: str, unit_rows: int) -> list[dict[str, Any]]:
    """Units of work: row ranges of a table, or one per shard."""
    path = Path(queries)
    if path.suffix.lower() in TABLE_SUFFIXES and path.is_file():
        from genius.tables import read_table

        n = read_table(path).num_rows
        return [{"name": f"rows-{a:09d}", "table": str(path.resolve()), "start": a, "stop": min(a + unit_rows, n)}
                for a in range(0, n, unit_rows)]
    from cluster.train_cli import resolve_shards

    return [{"name": f"{i:06d}-{Path(str(p)).name}", "shard": p if isinstance(p, str) else str(Path(p).resolve())}
            for i, p in enumerate(resolve_shards(queries))]


def read_unit(unit: dict[str, Any]):
    """(query ids, Items) of one unit."""
    from genius.data.shards import ShardReader, to_items
    from genius.items import Items
    from genius.tables import read_items

    if "table" in unit:
        if unit["table"] not in _TABLES:  # an actor reads its table once, however many units it serves
            _TABLES.clear()
            _TABLES[unit["table"]] = read_items(unit["table"]).items
        items = _TABLES[unit["table"]]
        rows = np.arange(unit["start"], unit["stop"])
        subset = items.subset(rows)
        ids = list(items.keys[unit["start"] : unit["stop"]]) if items.keys is not None else [str(r) for r in rows]
        return ids, subset
    records = list(ShardReader([unit["shard"]], check_images="decode"))
    if not records:
        return [], Items(embeddings=np.zeros((0, 1), np.float32), modality=np.zeros(0, np.int64))
    return [r.key for r in records], to_items(records)


def write_results(out: Path, query_ids: list[str], result, version: str) -> int:
    from genius.atomic import write_atomic

    rows: dict[str, list] = {"query": [], "rank": [], "key": [], "item": [], "score": [], "modality": []}
    if result is not None:
        for q, (items, scores, keys, modalities) in enumerate(zip(result.items, result.scores, result.keys,
                                                                  result.modalities)):
            for rank, (item, score, key, modality) in enumerate(zip(items, scores, keys, modalities)):
                rows["query"].append(query_ids[q])
                rows["rank"].append(rank)
                rows["key"].append(key)
                rows["item"].append(int(item))
                rows["score"].append(float(score))
                rows["modality"].append(modality.name.lower())
    table = pa.table({
        "query": pa.array(rows["query"], pa.string()), "rank": pa.array(rows["rank"], pa.int32()),
        "key": pa.array(rows["key"], pa.string()), "item": pa.array(rows["item"], pa.int64()),
        "score": pa.array(rows["score"], pa.float64()), "modality": pa.array(rows["modality"], pa.string()),
        "version": pa.array([version] * len(rows["query"]), pa.string()),
    })
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, lambda f: pq.write_table(table, f))
    return table.num_rows


def run(args: argparse.Namespace) -> int:
    import ray

    from cluster.build.job import JobManifest
    from cluster.build.scheduler import run_on_actors
    from genius.store.layout import resolve_version
    from workers.search import SearchWorker

    out = Path(args.out)
    version = resolve_version(args.index)
    units = plan_units(args.queries, args.unit_rows)
    options = {"k": args.k, "beam_size": args.beam, "rerank": not args.no_rerank,
               "target_modalities": args.modality or None}
    settings = {"index": str(version.resolve()), "queries": args.queries, "unit_rows": args.unit_rows,
                "decode_precision": args.decode_precision, **options}
    job = JobManifest.open(out, settings, args.resume)
    todo = [u for u in units if not job.is_done(u["name"])]
    by_name = {u["name"]: u for u in units}
    if not ray.is_initialized():
        ray.init(address=args.address)
    started = time.perf_counter()
    if todo:
        actors = [SearchWorker.options(num_cpus=args.cpus_per_actor).remote(str(version), args.cpus_per_actor,
                                                                            args.decode_precision)
                  for _ in range(min(args.actors, len(todo)))]
        run_on_actors(actors, [u["name"] for u in todo],
                      lambda a, name: a.search.remote(by_name[name], str(out / f"results-{name}.parquet"), options),
                      lambda name, r: job.done(name, r["output"], rows=r["rows"], results=r["results"],
                                               version=r["version"]),
                      "search-batch", args.timeout, progress=not args.quiet)
        for actor in actors:
            ray.kill(actor)
    queries = sum(job.unit(u["name"])["rows"] for u in units)
    log.info("%d queries in %d units -> %s (%.1f s)", queries, len(units), out, time.perf_counter() - started)
    print(f"{queries} queries searched against {version}: results in {out}/results-*.parquet")
    return 0


def add_search_batch_command(sub: argparse._SubParsersAction) -> None:
    from cluster.serve_cli import DECODE_PRECISION_HELP, DECODE_PRECISIONS

    p = sub.add_parser("search-batch", help="search a large query set on a Ray cluster; top-k per query to Parquet",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", required=True, help="index folder (its CURRENT version) or a version folder")
    p.add_argument("--queries", required=True, help="a query table (.parquet/.csv/.tsv) or shards (folder, glob, braces)")
    p.add_argument("--out", required=True, help="output folder (results-*.parquet and job.json)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else the cluster `ray start` runs "
                                     "here, else a new local one)")
    p.add_argument("--resume", action="store_true", help="skip the units job.json says are done")
    p.add_argument("--actors", type=int, default=2, help="search actors (default: 2)")
    p.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs (= torch threads) per actor")
    p.add_argument("--unit-rows", type=int, default=10_000, help="table rows per unit of work (default: 10000)")
    p.add_argument("-k", "--k", type=int, default=10, help="results per query (default: 10)")
    p.add_argument("--beam", type=int, help="beam size (default: the index's)")
    p.add_argument("--modality", action="append", choices=["image", "text", "image_text"],
                   help="only return items of this modality (repeatable)")
    p.add_argument("--no-rerank", action="store_true", help="rank by beam score only")
    p.add_argument("--decode-precision", choices=DECODE_PRECISIONS, default="fp32", help=DECODE_PRECISION_HELP)
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds without any unit finishing before giving up")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)
