"""Stages 2 and 3 of a cluster build as Ray Train jobs (TorchTrainer; gloo on CPUs, nccl on GPUs).

Both read from the job folder (a shared file system on a real cluster) arrays the driver
streams once out of the per-shard outputs and memory-maps: the training pairs joined with their
targets (`prepare_pair_arrays`: query vector and modality, target vector, modality and, for
stage 3, codes) and every item's vector and codes for stage 3's indexing task
(`prepare_item_arrays`); stage 2 also samples items from the embeddings tables.

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
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

PAIRS_FILE = "pairs.parquet"
ITEM_VECTORS, ITEM_CODES, MODALITY_MEANS = "item-vectors.npy", "item-codes.npy", "modality-means.npy"


def prepare_item_arrays(id_tables: list[Path], num_levels: int, codebook_size: int, use_modality_code: bool,
                        out: Path, drop_rows: list[list[int]] | None = None) -> None:
    """Stream the ID tables (one at a time) into memory-mapped arrays for stage 3: fp16 vectors,
    codes (code 0 first), and the mean vector of each modality (the decoder's token init).
    `drop_rows[t]`: rows of table t the merge left out (repeated keys), left out here too."""
    from genius.atomic import write_atomic
    from genius.idcodec import IdCodec
    from genius.shard_jobs import read_modality, read_vectors
    from genius.store.item_table import id_view

    codec = IdCodec(num_levels, codebook_size)
    drop_rows = drop_rows or [[] for _ in id_tables]
    n = sum(pq.ParquetFile(t).metadata.num_rows - len(set(d)) for t, d in zip(id_tables, drop_rows))
    dim = pq.read_schema(id_tables[0]).field("vector").type.list_size
    out.mkdir(parents=True, exist_ok=True)
    tmp_vectors, tmp_codes = out / f".{ITEM_VECTORS}.tmp", out / f".{ITEM_CODES}.tmp"
    vectors = np.lib.format.open_memmap(tmp_vectors, mode="w+", dtype=np.float16, shape=(n, dim))
    codes = np.lib.format.open_memmap(tmp_codes, mode="w+", dtype=np.int32, shape=(n, 1 + num_levels))
    sums, counts = np.zeros((3, dim)), np.zeros(3)
    row = 0
    for path, drop in zip(id_tables, drop_rows):
        table = pq.read_table(path, columns=["modality", "id", "vector"])
        if drop:
            keep = np.ones(len(table), dtype=bool)
            keep[np.asarray(drop, dtype=np.int64)] = False
            table = table.filter(pa.array(keep))
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


PAIR_QUERIES, PAIR_QUERY_MODALITY = "pair-queries.npy", "pair-query-modality.npy"
PAIR_TARGETS, PAIR_TARGET_MODALITY, PAIR_TARGET_CODES = "pair-targets.npy", "pair-target-modality.npy", "pair-codes.npy"


def _locate_targets(targets: pa.Array, tables: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """For every pair, the table and row holding its target key (-1: not indexed); the first
    table wins (as the merge keeps a duplicate key's first occurrence). Only key columns are read."""
    where_table = np.full(len(targets), -1, dtype=np.int32)
    where_row = np.zeros(len(targets), dtype=np.int64)
    pairs = pa.table({"target": targets, "pair": pa.array(np.arange(len(targets)))})
    for t, path in enumerate(tables):
        keys = pq.read_table(path, columns=["key"])
        keys = keys.append_column("row", pa.array(np.arange(len(keys))))
        hit = pairs.join(keys, keys="target", right_keys="key", join_type="inner", use_threads=False)
        pair = hit.column("pair").to_numpy()
        row = hit.column("row").to_numpy()
        fresh = where_table[pair] < 0
        where_table[pair[fresh]] = t
        where_row[pair[fresh]] = row[fresh]
    return where_table, where_row


def prepare_pair_arrays(work: Path, tables: list[Path], out: Path, codec=None, use_modality_code: bool = True) -> int:
    """Stream pairs.parquet and the target rows of `tables` into memory-mapped arrays: query
    vectors (float32) and modality, target vectors (fp16) and modality and, given the ID
    `codec` (ID tables), the targets' codes. Pairs whose target was not indexed are left out.
    Memory: the pairs' target keys and row numbers, one table at a time; returns the pairs kept."""
    from genius.modality import Modality
    from genius.shard_jobs import read_modality, read_vectors
    from genius.store.item_table import id_view

    pairs_file = pq.ParquetFile(work / PAIRS_FILE)
    targets = pq.read_table(work / PAIRS_FILE, columns=["target"]).column("target").combine_chunks()
    where_table, where_row = _locate_targets(targets, tables)
    kept = np.flatnonzero(where_table >= 0)
    if len(kept) < len(targets):
        log.warning("%d training pairs point to keys that were not indexed (skipped records?): left out",
                    len(targets) - len(kept))
    if len(kept) == 0:
        raise ValueError("no training pair has a target among the indexed items")
    slot = np.full(len(targets), -1, dtype=np.int64)
    slot[kept] = np.arange(len(kept))
    dim = pq.read_schema(tables[0]).field("vector").type.list_size
    out.mkdir(parents=True, exist_ok=True)
    arrays = {PAIR_QUERIES: (np.float32, (len(kept), dim)), PAIR_QUERY_MODALITY: (np.int64, (len(kept),)),
              PAIR_TARGETS: (np.float16, (len(kept), dim)), PAIR_TARGET_MODALITY: (np.int64, (len(kept),))}
    if codec is not None:
        arrays[PAIR_TARGET_CODES] = (np.int32, (len(kept), 1 + codec.num_levels))
    maps = {name: np.lib.format.open_memmap(out / f".{name}.tmp", mode="w+", dtype=dtype, shape=shape)
            for name, (dtype, shape) in arrays.items()}
    start = 0
    for batch in pairs_file.iter_batches(batch_size=65_536, columns=["query_vector", "query_modality"]):
        rows = slot[start : start + batch.num_rows]
        good = rows >= 0
        vectors = batch.column("query_vector").flatten().to_numpy(zero_copy_only=False).reshape(batch.num_rows, dim)
        modality = np.array([int(Modality.parse(m)) for m in batch.column("query_modality").to_pylist()])
        maps[PAIR_QUERIES][rows[good]] = vectors[good]
        maps[PAIR_QUERY_MODALITY][rows[good]] = modality[good]
        start += batch.num_rows
    columns = ["modality", "vector", *(["id"] if codec is not None else [])]
    for t, path in enumerate(tables):
        mine = np.flatnonzero(where_table == t)
        if len(mine) == 0:
            continue
        part = pq.read_table(path, columns=columns).take(pa.array(where_row[mine]))
        modality = read_modality(part)
        maps[PAIR_TARGETS][slot[mine]] = read_vectors(part)
        maps[PAIR_TARGET_MODALITY][slot[mine]] = modality
        if codec is not None:
            code0 = modality if use_modality_code else np.zeros_like(modality)
            codes = codec.unpack(id_view(part.column("id"), codec.width))
            maps[PAIR_TARGET_CODES][slot[mine]] = np.concatenate([code0[:, None], codes], 1)
    for name, array in maps.items():
        array.flush()
    maps.clear()
    for name in arrays:
        (out / f".{name}.tmp").replace(out / name)
    return int(len(kept))


def open_pair_arrays(folder: Path) -> dict[str, np.ndarray]:
    """The arrays prepare_pair_arrays wrote, memory-mapped (read a batch at a time by training)."""
    names = {"query": PAIR_QUERIES, "query_modality": PAIR_QUERY_MODALITY, "target": PAIR_TARGETS,
             "target_modality": PAIR_TARGET_MODALITY, "codes": PAIR_TARGET_CODES}
    return {key: np.load(folder / name, mmap_mode="r") for key, name in names.items() if (folder / name).exists()}


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
    tables = [Path(p) for p in config["embeddings"]]
    qcfg = QuantizerConfig(**config["quantizer"])
    torch.manual_seed(qcfg.seed)
    # A sample of the pairs (as of the items): stage 2's memory is bounded by --item-sample.
    pairs = open_pair_arrays(Path(config["pair_arrays"]))
    chosen = np.sort(np.random.default_rng(qcfg.seed).permutation(len(pairs["query"]))[: config["item_sample"]])
    sample = {name: np.asarray(array[chosen]) for name, array in pairs.items()}
    items, item_modality = sample_items(tables, config["item_sample"], qcfg.seed)
    quantizer = ModalResidualQuantizer.from_config(sample["query"].shape[1], qcfg)
    history = train_quantizer(quantizer, sample["query"], sample["target"].astype(np.float32),
                              sample["target_modality"], item_emb=items, item_modality=item_modality, config=qcfg,
                              progress=False, query_modality=sample["query_modality"])
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
    from genius.quantizer import QuantizerConfig
    from genius.store.model_files import load_quantizer

    torch.set_num_threads(max(1, int(config["threads"])))
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    qcfg = QuantizerConfig(**config["quantizer"])
    quantizer = load_quantizer(Path(config["model_dir"]), qcfg, config["embed_dim"])
    # The pairs and every item's vector and codes, memory-mapped (prepare_pair_arrays,
    # prepare_item_arrays): training gathers a batch at a time instead of holding them in each
    # worker's memory.
    pairs = open_pair_arrays(Path(config["pair_arrays"]))
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
        decoder, pairs["query"], pairs["target"], pairs["codes"], tcfg,
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
    log.info("%s finished%s", name, f": {result.metrics}" if result.metrics else "")
