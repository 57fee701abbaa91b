"""`genius index build`: embed -> pairs -> train quantizer -> quantize -> merge -> train decoder -> publish.

Every stage works unit by unit (a shard, a partition) on the Ray cluster at `address` (or a
local one started here), writes each output atomically to a path fixed by the unit and
records it in the job manifest (`JOB/job.json`, cluster.build.job); `resume` skips what the
manifest says is done. Job folder (default INDEX/.build, shared storage on a real cluster):

    job.json            settings, units (status, output, rows, skipped by reason), stages
    embeddings/<u>.parquet  key, modality, vector fp16, source, metadata (one per shard)
    pairs.parquet       training pairs: query vector -> target key
    model/              quantizer.pt, decoder.pt as training writes them
    ids/<u>.parquet     the embeddings tables with IDs (genius.store.merge's input)
    merge/              scratch buckets of the merge
    train/              Ray Train run folders
The merged trie, item tables and vectors go straight into the new version's staging folder
(INDEX/.staging-build-<job>), published at the end by atomic swap of INDEX/CURRENT.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cluster.build.job import JobManifest
from cluster.build.scheduler import run_on_actors, run_tasks

log = logging.getLogger("genius.build")


@dataclass
class BuildConfig:
    shards: str  # folder, glob, brace pattern or one file
    out: str  # index folder
    work: str | None = None  # job folder (default OUT/.build)
    address: str | None = None  # Ray cluster; None: start a local one
    resume: bool = False
    actors: int = 2
    cpus_per_actor: float = 1.0
    num_gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0
    batch_size: int = 256
    encoder: str | None = None  # stage-1 encoder folder (genius train encoder)
    pairs: str | None = None  # training pairs table (query columns + target), else shard metadata "queries"
    size: str = "cpu"  # cpu | paper
    levels: int | None = None
    codebook_size: int | None = None
    quantizer_epochs: int | None = None
    quantizer_holdout: float | None = None  # share of the pairs held out for stage 2's early stopping
    decoder_epochs: int | None = None
    decoder: str | None = None  # small | medium | paper
    ranges_per_modality: int = 1
    train_workers: int = 1
    item_sample: int = 100_000  # items in stage 2's k-means init and EMA sample
    seed: int = 0
    timeout_s: float = 3600.0
    progress: bool = True
    ray_init: dict[str, Any] = field(default_factory=dict)  # extra ray.init kwargs (local clusters)

    def settings(self, shards: list[str]) -> dict[str, Any]:
        """What a resumed job must agree on: the inputs and everything that shapes the index."""
        keep = ("encoder", "pairs", "size", "levels", "codebook_size", "quantizer_epochs", "quantizer_holdout",
                "decoder_epochs", "decoder", "ranges_per_modality", "item_sample", "seed", "batch_size")
        return {"shards": shards, **{k: getattr(self, k) for k in keep}}


def unit_name(position: int, shard: str) -> str:
    return f"{position:06d}-{Path(shard).name.replace('/', '_')}"


@dataclass
class BuildResult:
    version: Path
    items: int
    skipped: dict[str, int]
    unreadable_shards: list[str]
    stage_seconds: dict[str, float]


class Build:
    """One build job; `run()` does every stage that is not done yet."""

    def __init__(self, config: BuildConfig):
        from cluster.train_cli import resolve_shards

        self.config = config
        self.out = Path(config.out)
        self.work = Path(config.work) if config.work else self.out / ".build"
        self.shards = [str(p) for p in resolve_shards(config.shards)]
        self.units = [unit_name(i, s) for i, s in enumerate(self.shards)]
        self.shard_of = dict(zip(self.units, self.shards))
        settings = config.settings(self.shards)
        if not config.resume:
            self._clear_job_outputs()
        self.job_id = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
        self.job = JobManifest.open(self.work, settings, config.resume)
        self.stage_seconds: dict[str, float] = dict(self.job.data.get("stage_seconds", {}))

    JOB_OUTPUTS = ("embeddings", "ids", "model", "merge", "train", "encoder", "pairs.parquet")

    def _clear_job_outputs(self) -> None:
        """A fresh (not resumed) job starts from nothing: no stale outputs or checkpoints."""
        for name in self.JOB_OUTPUTS:
            path = self.work / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    # ------------------------------------------------------------------ helpers
    def _time(self, stage: str, started: float) -> None:
        self.stage_seconds[stage] = round(self.stage_seconds.get(stage, 0.0) + time.perf_counter() - started, 3)
        self.job.data["stage_seconds"] = self.stage_seconds
        self.job.save()

    def _gpus_per_actor(self) -> float:
        import ray

        if self.config.num_gpus_per_actor is not None:
            return self.config.num_gpus_per_actor
        return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0

    def _embeddings(self, unit: str) -> Path:
        return self.work / "embeddings" / f"{unit}.parquet"

    def _ids(self, unit: str) -> Path:
        return self.work / "ids" / f"{unit}.parquet"

    def _good_units(self) -> list[str]:
        """Units whose shard produced an embeddings table (an unreadable shard gives an empty one)."""
        return [u for u in self.units if self.job.is_done(f"embed:{u}")]

    # ------------------------------------------------------------------ stages
    def run(self) -> BuildResult:
        import ray

        if not ray.is_initialized():
            ray.init(address=self.config.address, **self.config.ray_init)
        self.encoder_dir = self._encoder()
        log.info("build %s: %d shards -> %s (job folder %s%s)", self.job_id, len(self.shards), self.out, self.work,
                 ", resumed" if self.job.data.get("resumed") else "")
        self.embed()
        self.training_pairs()
        self.train_quantizer()
        self.quantize()
        self.merge()
        self.train_decoder()
        return self.publish()

    def embed(self) -> None:
        from workers.embed import EmbedWorker

        todo = [u for u in self.units if not self.job.is_done(f"embed:{u}")]
        if not todo:
            return
        started = time.perf_counter()
        cfg = self.config
        actors = [EmbedWorker.options(num_cpus=cfg.cpus_per_actor, num_gpus=self._gpus_per_actor()).remote(
                      self.encoder_dir, cfg.cpus_per_actor) for _ in range(min(cfg.actors, len(todo)))]

        def on_result(unit: str, report: dict) -> None:
            if report["shard_errors"]:
                log.error("%s: %s", report["shard"], report["shard_errors"])
            self.job.done(f"embed:{unit}", report["output"], rows=report["rows"], skipped=report["skipped"],
                          shard_errors=report["shard_errors"], shard=report["shard"], node=report.get("node"),
                          seconds=report["seconds"])

        run_on_actors(actors, todo, lambda a, u: a.embed.remote(self.shard_of[u], str(self._embeddings(u)),
                                                                cfg.batch_size),
                      on_result, "embed", cfg.timeout_s, progress=cfg.progress)
        self._kill(actors)
        self._time("embed", started)

    def _encoder(self) -> str:
        """The encoder every actor loads: --encoder, or the default model built once here and
        saved in the job folder (its untrained image tower is random: actors must share it)."""
        if self.config.encoder:
            return str(Path(self.config.encoder).resolve())
        from genius.encoders import CONFIG_FILE, EncoderConfig, MultimodalEncoder

        folder = self.work / "encoder"
        if not (folder / CONFIG_FILE).exists():  # written last by save: present means complete
            import torch

            torch.manual_seed(self.config.seed)
            MultimodalEncoder.from_config(EncoderConfig()).save(folder)
        return str(folder.resolve())

    def _kill(self, actors) -> None:
        import ray

        for actor in actors:
            ray.kill(actor)

    def _total_items(self) -> int:
        return sum(self.job.unit(f"embed:{u}")["rows"] for u in self._good_units())

    def index_config(self):
        """The IndexConfig of this build (sized by the items embedded, like `genius fit`)."""
        from genius.decoder import DecoderConfig
        from genius.index import IndexConfig

        cfg = self.config
        overrides = {k: v for k, v in (("num_levels", cfg.levels), ("codebook_size", cfg.codebook_size),
                                       ("epochs", cfg.quantizer_epochs),
                                       ("holdout_share", cfg.quantizer_holdout)) if v is not None}
        if cfg.size == "paper":
            index = IndexConfig.paper()
            index.quantizer = dataclasses.replace(index.quantizer, **overrides)
        else:
            index = IndexConfig.for_corpus(max(self._total_items(), 1), **overrides)
        if cfg.decoder:
            index.decoder = DecoderConfig.named(cfg.decoder)
        if cfg.decoder_epochs is not None:
            index.decoder_training = dataclasses.replace(index.decoder_training, epochs=cfg.decoder_epochs)
        index.quantizer = dataclasses.replace(index.quantizer, seed=cfg.seed)
        index.decoder_training = dataclasses.replace(index.decoder_training, seed=cfg.seed)
        index.ranges_per_modality = cfg.ranges_per_modality
        return index

    def _embed_dim(self) -> int:
        for u in self._good_units():
            schema = pq.read_schema(self._embeddings(u))
            return schema.field("vector").type.list_size
        raise ValueError("no shard could be read: nothing to index")

    def training_pairs(self) -> None:
        """pairs.parquet: (query vector, query modality, target key), from --pairs or shard metadata."""
        from cluster.build.training import PAIRS_FILE

        if self.job.is_done("pairs"):
            return
        started = time.perf_counter()
        out = self.work / PAIRS_FILE
        if self.config.pairs:
            vectors, modality, targets = self._pairs_from_table(self.config.pairs)
        else:
            vectors, modality, targets = self._pairs_from_metadata()
        if not targets:
            raise ValueError("no training pairs: give --pairs TABLE (query columns + target key) or put a "
                             "\"queries\" list in the shards' JSON metadata")
        table = pa.table({"query_vector": pa.array(list(vectors.astype(np.float32)), pa.list_(pa.float32())),
                          "query_modality": pa.array(modality, pa.string()), "target": pa.array(targets, pa.string())})
        from genius.atomic import write_atomic

        write_atomic(out, lambda f: pq.write_table(table, f))
        self.job.done("pairs", out, rows=len(targets))
        self._time("pairs", started)

    def _embed_queries(self, texts: list | None, images: list | None) -> np.ndarray:
        """Training queries (text, image bytes or both per row), embedded by one actor."""
        import ray

        from workers.embed import EmbedWorker

        actor = EmbedWorker.options(num_cpus=self.config.cpus_per_actor, num_gpus=self._gpus_per_actor()).remote(
            self.encoder_dir, self.config.cpus_per_actor)
        try:
            return ray_get(actor.embed_queries.remote(texts, images), self.config.timeout_s)
        finally:
            ray.kill(actor)

    def _pairs_from_table(self, path: str) -> tuple[np.ndarray, list[str], list[str]]:
        from genius.modality import Modality
        from genius.tables import read_items

        table = read_items(path, require_target=True)
        items = table.items
        if items.embeddings is not None:
            vectors = items.embeddings
        else:  # texts, images (file paths in the table) or both per row
            vectors = self._embed_queries(None if items.texts is None else list(items.texts),
                                          None if items.images is None else list(items.images))
        return vectors, [Modality(int(m)).name.lower() for m in items.modality], list(table.targets)

    def _pairs_from_metadata(self) -> tuple[np.ndarray, list[str], list[str]]:
        texts, targets = [], []
        for u in self._good_units():
            table = pq.read_table(self._embeddings(u), columns=["key", "metadata"])
            for key, meta in zip(table.column("key").to_pylist(), table.column("metadata").to_pylist()):
                if not meta:
                    continue
                for query in json.loads(meta).get("queries", []) or []:
                    if isinstance(query, str) and query.strip():
                        texts.append(query)
                        targets.append(key)
        if not texts:
            return np.zeros((0, 0), np.float32), [], []
        return self._embed_queries(texts, None), ["text"] * len(texts), targets

    def _trainer_config(self, index) -> dict[str, Any]:
        return {
            "work": str(self.work.resolve()), "model_dir": str((self.work / "model").resolve()),
            "threads": self.config.cpus_per_actor, "quantizer": dataclasses.asdict(index.quantizer),
            "decoder": dataclasses.asdict(index.decoder), "decoder_training": dataclasses.asdict(index.decoder_training),
            "embed_dim": self._embed_dim(), "item_sample": self.config.item_sample,
            "embeddings": [str(self._embeddings(u).resolve()) for u in self._good_units()],
            "id_tables": [str(self._ids(u).resolve()) for u in self._good_units()],
        }

    def train_quantizer(self) -> None:
        from cluster.build.training import prepare_pair_arrays, quantizer_loop, run_trainer

        if self.job.is_done("train:quantizer"):
            return
        started = time.perf_counter()
        index = self.index_config()
        pairs = self.work / "train" / "pairs-for-quantizer"
        if not self.job.is_done("pairs-for-quantizer"):
            kept = prepare_pair_arrays(self.work, [self._embeddings(u) for u in self._good_units()], pairs)
            self.job.done("pairs-for-quantizer", pairs / "pair-queries.npy", rows=kept)
        config = {**self._trainer_config(index), "pair_arrays": str(pairs.resolve())}
        run_trainer(quantizer_loop, config, 1, self._gpus_per_actor() > 0, self.work / "train",
                    f"quantizer-{self.job_id}")
        self.job.done("train:quantizer", self.work / "model" / "quantizer.pt")
        self._time("train_quantizer", started)

    def quantize(self) -> None:
        from workers.quantize import QuantizeWorker

        todo = [u for u in self._good_units() if not self.job.is_done(f"quantize:{u}")]
        if not todo:
            return
        started = time.perf_counter()
        index = self.index_config()
        actors = [QuantizeWorker.options(num_cpus=self.config.cpus_per_actor).remote(
                      str((self.work / "model").resolve()), dataclasses.asdict(index.quantizer), self._embed_dim(),
                      self.config.cpus_per_actor)
                  for _ in range(min(self.config.actors, len(todo)))]
        run_on_actors(actors, todo, lambda a, u: a.quantize.remote(str(self._embeddings(u)), str(self._ids(u))),
                      lambda u, r: self.job.done(f"quantize:{u}", r["output"], rows=r["rows"]),
                      "quantize", self.config.timeout_s, progress=self.config.progress)
        self._kill(actors)
        self._time("quantize", started)

    def _writer(self):
        from genius.store.publish import VersionWriter

        return VersionWriter(self.out, name=f"build-{self.job_id}")

    def merge(self) -> None:
        import ray

        from genius.store import merge as m

        if self.job.stage_done("merge"):
            return
        started = time.perf_counter()
        index = self.index_config()
        q = index.quantizer
        config = m.MergeConfig(q.num_levels, q.codebook_size, index.ranges_per_modality, q.use_modality_code,
                               index.items_per_file)
        writer = self._writer()
        for sub in ("trie", "items", "vectors"):  # the merge restarts whole: drop a killed attempt's files
            shutil.rmtree(writer.path / sub, ignore_errors=True)
            (writer.path / sub).mkdir()
        scratch = self.work / "merge"
        units = self._good_units()
        buckets: dict[str, m.BucketResult] = {}
        bucket = ray.remote(max_retries=3)(m.bucket_shard)
        run_tasks([(u, (lambda u=u: bucket.remote(str(self._ids(u)), u, config, str(scratch)))) for u in units],
                  lambda u, r: buckets.__setitem__(u, r), "merge: buckets", self.config.timeout_s,
                  progress=self.config.progress)
        # Keys repeated across (or within) shards: the first occurrence is kept, the others are
        # skipped and counted, and the shards holding them are bucketed again without them.
        found = ray.remote(max_retries=3)(m.duplicate_keys)
        duplicates: list[m.DuplicateKey] = []
        run_tasks([(f"keys-{k}", (lambda k=k: found.remote(sorted(b.key_files[k] for b in buckets.values()
                                                                   if k in b.key_files))))
                   for k in range(config.key_buckets)], lambda _, found: duplicates.extend(found), "merge: keys",
                  self.config.timeout_s, progress=self.config.progress)
        drop: dict[str, list[int]] = {}
        for d in duplicates:
            drop.setdefault(d.shard, []).append(d.row)
        if drop:
            log.warning("%d duplicate keys skipped (first occurrence kept), e.g. %r in %s", len(duplicates),
                        duplicates[0].key, self.shard_of[duplicates[0].shard])
            shutil.rmtree(scratch, ignore_errors=True)  # rebucket everything: no stale bucket files
            run_tasks([(u, (lambda u=u: bucket.remote(str(self._ids(u)), u, config, str(scratch), drop.get(u, []))))
                       for u in units], lambda u, r: buckets.__setitem__(u, r), "merge: buckets again",
                      self.config.timeout_s, progress=self.config.progress)
        results = [buckets[u] for u in units]
        tasks = m.plan_partitions(results, config)
        outputs: dict[str, m.PartitionOutput] = {}
        part = ray.remote(max_retries=3)(m.merge_partition)
        run_tasks([(t.partition.name, (lambda t=t: part.remote(t, config, str(writer.path)))) for t in tasks],
                  lambda name, r: outputs.__setitem__(name, r), "merge: partitions", self.config.timeout_s,
                  progress=self.config.progress)
        merged = m.combine_outputs(tasks, [outputs[t.partition.name] for t in tasks], results)
        self.job.finish_stage("merge", staging=str(writer.path), result=_jsonable(dataclasses.asdict(merged)),
                              duplicate_keys={u: len(rows) for u, rows in drop.items()},
                              dropped_rows={u: sorted(int(r) for r in rows) for u, rows in drop.items()})
        shutil.rmtree(scratch, ignore_errors=True)
        self._time("merge", started)

    def train_decoder(self) -> None:
        from cluster.build.training import decoder_loop, prepare_item_arrays, prepare_pair_arrays, run_trainer
        from genius.idcodec import IdCodec

        if self.job.is_done("train:decoder"):
            return
        started = time.perf_counter()
        index = self.index_config()
        arrays = self.work / "train" / "items"
        if not self.job.is_done("items-for-training"):
            q = index.quantizer
            dropped = self.job.data["stages"]["merge"].get("dropped_rows", {})  # skipped duplicate keys
            units = self._good_units()
            prepare_item_arrays([self._ids(u) for u in units], q.num_levels, q.codebook_size,
                                q.use_modality_code, arrays, [dropped.get(u, []) for u in units])
            self.job.done("items-for-training", arrays / "item-codes.npy")
        pairs = self.work / "train" / "pairs-for-decoder"
        if not self.job.is_done("pairs-for-decoder"):
            q = index.quantizer
            kept = prepare_pair_arrays(self.work, [self._ids(u) for u in self._good_units()], pairs,
                                       IdCodec(q.num_levels, q.codebook_size), q.use_modality_code)
            self.job.done("pairs-for-decoder", pairs / "pair-codes.npy", rows=kept)
        config = {**self._trainer_config(index), "item_arrays": str(arrays.resolve()),
                  "pair_arrays": str(pairs.resolve())}
        run_trainer(decoder_loop, config, self.config.train_workers, self._gpus_per_actor() > 0,
                    self.work / "train", f"decoder-{self.job_id}")
        self.job.done("train:decoder", self.work / "model" / "decoder.pt")
        self._time("train_decoder", started)

    def publish(self) -> BuildResult:
        from genius.store import data_files
        from genius.store.layout import MODEL_DIR
        from genius.store.manifest import Manifest, RangeFile

        started = time.perf_counter()
        index = self.index_config()
        merged = self.job.data["stages"]["merge"]["result"]
        writer = self._writer()
        model = writer.path / MODEL_DIR
        for name in ("quantizer.pt", "decoder.pt"):
            shutil.copyfile(self.work / "model" / name, model / name)
        shutil.copytree(self.encoder_dir, model / "encoder", dirs_exist_ok=True)
        q = index.quantizer
        from genius.idcodec import IdCodec

        manifest = Manifest(
            version=-1, parent=None, config=index.to_dict(), embed_dim=self._embed_dim(),
            **data_files.codec_fields(IdCodec(q.num_levels, q.codebook_size)), num_items=merged["num_items"],
            num_deleted=0, modality_counts=merged["modality_counts"], partitions=merged["partitions"],
            item_tables=[RangeFile(**r) for r in merged["item_tables"]],
            vector_shards=[RangeFile(**r) for r in merged["vector_shards"]], deletes=None, has_encoder=True,
        )
        version = writer.publish(manifest, check_parent=False)
        self._time("publish", started)
        skipped: dict[str, int] = {}
        unreadable = []
        for u in self.units:
            unit = self.job.unit(f"embed:{u}") or {}
            for reason, count in unit.get("skipped", {}).items():
                skipped[reason] = skipped.get(reason, 0) + count
            if unit.get("shard_errors"):
                unreadable.append(self.shard_of[u])
            dupes = self.job.data["stages"]["merge"].get("duplicate_keys", {}).get(u, 0)
            if dupes:
                skipped["duplicate_key"] = skipped.get("duplicate_key", 0) + dupes
        self.job.finish_stage("publish", version=str(version), skipped=skipped, unreadable=unreadable)
        return BuildResult(version, merged["num_items"], skipped, unreadable, dict(self.stage_seconds))


def ray_get(ref, timeout_s: float):
    import ray

    return ray.get(ref, timeout=timeout_s)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, Path):
        return str(value)
    return value


def build_index(config: BuildConfig) -> BuildResult:
    return Build(config).run()
