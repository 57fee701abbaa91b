"""`genius index add --shards`: embed and quantize new shards on the Ray cluster with the index's
own encoder and codebooks, then publish them as a new version (genius.store.update.add_items).

The embed and quantize units are the build's (one per shard, recorded in JOB/job.json,
resumable); the coordinator then reads the new ID tables and re-merges the partitions they
touch. Duplicate keys among the new shards are skipped and counted (first one kept); keys
already in the index are refused.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cluster.build.job import JobManifest
from cluster.build.pipeline import unit_name
from cluster.build.scheduler import run_on_actors

log = logging.getLogger("genius.build")


def add_shards(index: str, shards: str, address: str | None = None, actors: int = 2, cpus_per_actor: float = 1.0,
               batch_size: int = 256, work: str | None = None, resume: bool = False, timeout_s: float = 3600.0,
               progress: bool = True) -> tuple[Path, dict]:
    """Returns (the published version, counts: added, skipped by reason, unreadable shards)."""
    import ray

    from cluster.train_cli import resolve_shards
    from genius.shard_jobs import read_modality, read_vectors
    from genius.store.item_table import id_view
    from genius.store.layout import MODEL_DIR
    from genius.store.reader import open_version
    from genius.store.update import add_items
    from workers.embed import EmbedWorker
    from workers.quantize import QuantizeWorker

    version = open_version(index)
    model = version.path / MODEL_DIR
    if not version.manifest.has_encoder:
        raise ValueError(f"{version.path}: the index stores no encoder: new shards cannot be embedded like its items")
    paths = [str(p) for p in resolve_shards(shards)]
    units = [unit_name(i, p) for i, p in enumerate(paths)]
    work_dir = Path(work) if work else Path(index) / ".add"
    job = JobManifest.open(work_dir, {"index_version": version.path.name, "shards": paths, "batch_size": batch_size},
                           resume)
    if not ray.is_initialized():
        ray.init(address=address)
    started = time.perf_counter()
    emb = {u: work_dir / "embeddings" / f"{u}.parquet" for u in units}
    ids = {u: work_dir / "ids" / f"{u}.parquet" for u in units}
    shard_of = dict(zip(units, paths))

    todo = [u for u in units if not job.is_done(f"embed:{u}")]
    if todo:
        pool = [EmbedWorker.options(num_cpus=cpus_per_actor).remote(str(model / "encoder"), cpus_per_actor)
                for _ in range(min(actors, len(todo)))]
        run_on_actors(pool, todo, lambda a, u: a.embed.remote(shard_of[u], str(emb[u]), batch_size),
                      lambda u, r: job.done(f"embed:{u}", r["output"], rows=r["rows"], skipped=r["skipped"],
                                            shard_errors=r["shard_errors"]),
                      "embed", timeout_s, progress=progress)
        for actor in pool:
            ray.kill(actor)
    todo = [u for u in units if not job.is_done(f"quantize:{u}")]
    if todo:
        qcfg = version.manifest.config["quantizer"]
        pool = [QuantizeWorker.options(num_cpus=cpus_per_actor).remote(str(model), qcfg, version.manifest.embed_dim,
                                                                       cpus_per_actor)
                for _ in range(min(actors, len(todo)))]
        run_on_actors(pool, todo, lambda a, u: a.quantize.remote(str(emb[u]), str(ids[u])),
                      lambda u, r: job.done(f"quantize:{u}", r["output"], rows=r["rows"]),
                      "quantize", timeout_s, progress=progress)
        for actor in pool:
            ray.kill(actor)

    table = pa.concat_tables([pq.read_table(ids[u]) for u in units])
    keys = table.column("key").to_pylist()
    first: dict[str, int] = {}
    for row, key in enumerate(keys):
        first.setdefault(key, row)
    keep = np.array(sorted(first.values()), dtype=np.int64)
    duplicates = len(keys) - len(keep)
    table = table.take(pa.array(keep))
    width = version.codec.width
    published = add_items(index, table.column("key").to_pylist(), read_modality(table), id_view(table.column("id"), width),
                          read_vectors(table) if version.vectors is not None else None,
                          table.column("source").to_pylist(), table.column("metadata").to_pylist())
    skipped: dict[str, int] = {}
    unreadable = []
    for u in units:
        unit = job.unit(f"embed:{u}")
        for reason, count in unit.get("skipped", {}).items():
            skipped[reason] = skipped.get(reason, 0) + count
        if unit.get("shard_errors"):
            unreadable.append(shard_of[u])
    if duplicates:
        skipped["duplicate_key"] = duplicates
    counts = {"added": len(table), "skipped": skipped, "unreadable_shards": unreadable,
              "seconds": round(time.perf_counter() - started, 2)}
    job.finish_stage("publish", version=str(published), **counts)
    return published, counts
