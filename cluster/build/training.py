"""Stages 2 and 3 of a cluster build as Ray Train jobs (TorchTrainer; gloo on CPUs, nccl on GPUs).

Both read the build's per-shard outputs from the job folder (a shared file system on a real
cluster): the training pairs (`pairs.parquet`: query vector -> target key), the embeddings
tables (stage 2: the pairs' targets and a sample of items for the k-means init and EMA) and
the ID tables (stage 3: the targets' codes and, for the indexing task, every item).

Stage 2 runs on one worker: its EMA codebooks, k-means init and dead-code restarts are not
data-parallel (each rank would restart different codes); it trains on a sample of pairs, which
is cheap. Stage 3 (the decoder) runs data-parallel on `train_workers` workers (DDP via
ray.train.torch.prepare_model) and checkpoints every epoch into the job's model folder, from
which a rerun continues. Rank 0 writes the weights atomically into the job's model folder.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

PAIRS_FILE = "pairs.parquet"
ITEM_VECTORS, ITEM_CODES, MODALITY_MEANS = "item-vectors.npy", "item-codes.npy", "modality-means.npy"


def prepare_item_arrays(id_tables: list[Path], num_levels: int, codebook_size: int, use_modality_code: bool,
                        out: Path) -> None:
    """Stream the ID tables (one at a time) into memory-mapped arrays for stage 3: fp16 vectors,
    codes (code 0 first), and the mean vector of each modality (the decoder's token init)."""
    from genius.atomic import write_atomic
    from genius.idcodec import IdCodec
    from genius.shard_jobs import read_modality, read_vectors
    from genius.store.item_table import id_view

    codec = IdCodec(num_levels, codebook_size)
    n = sum(pq.ParquetFile(t).metadata.num_rows for t in id_tables)
    dim = pq.read_schema(id_tables[0]).field("vector").type.list_size
    out.mkdir(parents=True, exist_ok=True)
    tmp_vectors, tmp_codes = out / f".{ITEM_VECTORS}.tmp", out / f".{ITEM_CODES}.tmp"
    vectors = np.lib.format.open_memmap(tmp_vectors, mode="w+", dtype=np.float16, shape=(n, dim))
    codes = np.lib.format.open_memmap(tmp_codes, mode="w+", dtype=np.int32, shape=(n, 1 + num_levels))
    sums, counts = np.zeros((3, dim)), np.zeros(3)
    row = 0
    for path in id_tables:
        table = pq.read_table(path, columns=["modality", "id", "vector"])
        v, m = read_vectors(table), read_modality(table)
        ids = id_view(table.column("id"), codec.width)
        code0 = m if use_modality_code else np.zeros_like(m)
        vectors[row : row + len(table)] = v
        codes[row : row + len(table)] = np.concatenate([code0[:, None], codec.unpack(ids)], 1)
        for k in range(3):
            sums[k] += v[m == k].sum(0)
            counts[k] += (m == k).sum()
        row += len(table)
    vectors.flush()
    codes.flush()
    del vectors, codes
    tmp_vectors.replace(out / ITEM_VECTORS)
    tmp_codes.replace(out / ITEM_CODES)
    write_atomic(out / MODALITY_MEANS, lambda f: np.save(f, (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)))


def _lookup(tables: list[Path], keys: list[str], columns: list[str]) -> dict[str, dict[str, Any]]:
    """Rows of the given keys found in any of the tables, by key (a scan, one table at a time)."""
    wanted = pa.array(sorted(set(keys)), pa.string())
    found: dict[str, dict[str, Any]] = {}
    for path in tables:
        table = pq.read_table(path, columns=["key", *columns])
        hit = table.filter(pc.is_in(table.column("key"), value_set=wanted))
        for row in hit.to_pylist():
            found.setdefault(row["key"], row)
    return found


def _vectors(rows: list[dict[str, Any]], name: str = "vector") -> np.ndarray:
    return np.asarray([r[name] for r in rows], dtype=np.float32)


def load_pairs(work: Path, tables: list[Path], extra: list[str]) -> dict[str, np.ndarray]:
    """Query vectors, their modality, and the targets' vectors, modality and `extra` columns."""
    from genius.modality import Modality

    pairs = pq.read_table(work / PAIRS_FILE).to_pylist()
    targets = _lookup(tables, [p["target"] for p in pairs], ["modality", "vector", *extra])
    kept = [p for p in pairs if p["target"] in targets]
    if len(kept) < len(pairs):
        log.warning("%d training pairs point to keys that were not indexed (skipped records?): left out",
                    len(pairs) - len(kept))
    if not kept:
        raise ValueError("no training pair has a target among the indexed items")
    rows = [targets[p["target"]] for p in kept]
    out = {
        "query": _vectors(kept, "query_vector"),
        "query_modality": np.array([int(Modality.parse(p["query_modality"])) for p in kept], dtype=np.int64),
        "target": _vectors(rows),
        "target_modality": np.array([int(Modality.parse(r["modality"])) for r in rows], dtype=np.int64),
    }
    for name in extra:
        out[name] = [r[name] for r in rows]
    return out


def sample_items(tables: list[Path], limit: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to `limit` items' (vectors, modality), the same fraction from every table."""
    from genius.shard_jobs import read_modality, read_vectors

    total = sum(pq.ParquetFile(t).metadata.num_rows for t in tables)
    rng = np.random.default_rng(seed)
    keep = min(1.0, limit / max(total, 1))
    vectors, modality = [], []
    for path in tables:
        table = pq.read_table(path, columns=["modality", "vector"])
        rows = np.flatnonzero(rng.random(len(table)) < keep)
        part = table.take(pa.array(rows))
        vectors.append(read_vectors(part))
        modality.append(read_modality(part))
    return np.concatenate(vectors), np.concatenate(modality)


def quantizer_loop(config: dict[str, Any]) -> None:
    """Ray Train worker: stage 2 on the pairs and an item sample; rank 0 saves quantizer.pt."""
    import ray.train
    import torch

    from genius.atomic import write_atomic
    from genius.quantizer import ModalResidualQuantizer, QuantizerConfig, train_quantizer

    torch.set_num_threads(max(1, int(config["threads"])))
    work = Path(config["work"])
    tables = [Path(p) for p in config["embeddings"]]
    qcfg = QuantizerConfig(**config["quantizer"])
    torch.manual_seed(qcfg.seed)
    pairs = load_pairs(work, tables, [])
    items, item_modality = sample_items(tables, config["item_sample"], qcfg.seed)
    quantizer = ModalResidualQuantizer.from_config(pairs["query"].shape[1], qcfg)
    history = train_quantizer(quantizer, pairs["query"], pairs["target"], pairs["target_modality"],
                              item_emb=items, item_modality=item_modality, config=qcfg, progress=False,
                              query_modality=pairs["query_modality"])
    if ray.train.get_context().get_world_rank() == 0:
        out = Path(config["model_dir"])
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "quantizer.pt", lambda f: torch.save(quantizer.state_dict(), f))
    ray.train.report({"epochs": len(history), "loss": float(history[-1]["loss"]) if history else 0.0})


def decoder_loop(config: dict[str, Any]) -> None:
    """Ray Train worker: stage 3 (DDP over the workers) on pairs + every item; rank 0 saves decoder.pt."""
    import ray.train
    import ray.train.torch
    import torch

    from genius.atomic import write_atomic
    from genius.decoder import DecoderConfig, GeniusDecoder
    from genius.decoder_training import DecoderTrainConfig, train_decoder
    from genius.idcodec import IdCodec
    from genius.quantizer import QuantizerConfig
    from genius.store.model_files import load_quantizer

    torch.set_num_threads(max(1, int(config["threads"])))
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    work = Path(config["work"])
    id_tables = [Path(p) for p in config["id_tables"]]
    qcfg = QuantizerConfig(**config["quantizer"])
    codec = IdCodec(qcfg.num_levels, qcfg.codebook_size)
    quantizer = load_quantizer(Path(config["model_dir"]), qcfg, config["embed_dim"])

    def codes_of(modality: np.ndarray, ids: np.ndarray) -> np.ndarray:
        code0 = modality if qcfg.use_modality_code else np.zeros_like(modality)
        return np.concatenate([code0[:, None], codec.unpack(ids)], axis=1)

    pairs = load_pairs(work, id_tables, ["id"])
    target_ids = np.frombuffer(b"".join(pairs["id"]), dtype=np.uint8).reshape(-1, codec.width)
    # Every item's vector and codes, memory-mapped (written by prepare_item_arrays): the indexing
    # task reads them a batch at a time instead of holding the corpus in each worker's memory.
    arrays = Path(config["item_arrays"])
    item_vectors = np.load(arrays / ITEM_VECTORS, mmap_mode="r")
    item_codes = np.load(arrays / ITEM_CODES, mmap_mode="r")
    means = torch.from_numpy(np.load(arrays / MODALITY_MEANS)).float()
    tcfg = DecoderTrainConfig(**config["decoder_training"])
    torch.manual_seed(tcfg.seed)  # the same initial weights on every rank and every rerun
    decoder = GeniusDecoder(DecoderConfig(**config["decoder"]), config["embed_dim"], qcfg.num_levels, qcfg.codebook_size)
    decoder.init_token_embeddings(quantizer.codebooks.detach().cpu(), means)
    model = ray.train.torch.prepare_model(decoder) if world > 1 else decoder
    # Epoch checkpoints in the job folder: a rerun (driver killed, --resume) or a restarted
    # worker group continues from the last finished epoch with the same result.
    ckpt = Path(config["model_dir"]) / f"decoder-checkpoint-w{world}.pt"
    resume = torch.load(ckpt, map_location="cpu", weights_only=False) if ckpt.exists() else None

    def save_checkpoint(state: dict) -> None:
        if rank == 0:
            write_atomic(ckpt, lambda f: torch.save(state, f))

    history = train_decoder(
        decoder, torch.from_numpy(pairs["query"]), torch.from_numpy(pairs["target"]),
        torch.from_numpy(codes_of(pairs["target_modality"], target_ids)), tcfg,
        item_emb=item_vectors, item_codes=item_codes, progress=False, rank=rank, world_size=world, model=model if world > 1 else None,
        checkpoint=save_checkpoint, resume=resume,
    )
    if rank == 0:
        out = Path(config["model_dir"])
        write_atomic(out / "decoder.pt", lambda f: torch.save(decoder.state_dict(), f))
    ray.train.report({"epochs": len(history), "loss": float(history[-1]["loss"]),
                      "id_accuracy": float(history[-1]["id_accuracy"])})


def run_trainer(loop, config: dict[str, Any], workers: int, use_gpu: bool, storage: Path, name: str) -> None:
    """One Ray Train job; a worker lost to a node failure restarts the job (FailureConfig)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        loop, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": max(1, int(config["threads"]))}),
        run_config=RunConfig(name=name, storage_path=str(storage.resolve()), failure_config=FailureConfig(max_failures=2)),
    )
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"{name} failed: {result.error}")
    log.info("%s: %s", name, result.metrics)
