"""The per-shard units of an index build, as plain functions (the Ray actors in `workers/` call them).

    embed_shard(encoder, shard, out)      WebDataset shard -> embeddings table (one output per shard)
    quantize_shard(quantizer, table, out) embeddings table -> ID table (genius.store.merge's input)

Embeddings table (Parquet): key, modality (image | text | image_text), vector
(list<halffloat>), source ("<shard file>/<key>"), metadata (the record's JSON, as text).
An ID table adds `id` (binary W). Each output is written atomically, so a retried unit
overwrites it with the same rows, and a unit counts what it skipped by reason.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from genius.atomic import write_atomic
from genius.data.shards import ReadStats, Record, ShardReader
from genius.errors import InvalidInputError
from genius.idcodec import IdCodec
from genius.modality import Modality

log = logging.getLogger(__name__)


@dataclass
class ShardReport:
    """What one unit did: rows written, records skipped by reason, and shard-level errors."""

    shard: str
    output: str
    rows: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    shard_errors: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def unreadable(self) -> bool:
        return bool(self.shard_errors) and self.rows == 0

    def to_dict(self) -> dict[str, Any]:
        return {"shard": self.shard, "output": self.output, "rows": self.rows, "skipped": self.skipped,
                "shard_errors": self.shard_errors, "seconds": round(self.seconds, 3)}


def embeddings_schema(dim: int) -> pa.Schema:
    return pa.schema([
        pa.field("key", pa.string(), nullable=False),
        pa.field("modality", pa.string(), nullable=False),
        pa.field("vector", pa.list_(pa.float16(), dim), nullable=False),
        pa.field("source", pa.string()),
        pa.field("metadata", pa.string()),
    ])


def _write_parquet(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: pq.write_table(table, f))


def _encode(encoder, modality: Modality, records: list[Record]) -> np.ndarray:
    if modality == Modality.TEXT:
        return encoder.encode_text([r.text for r in records]).numpy()
    if modality == Modality.IMAGE:
        return encoder.encode_image([r.image for r in records]).numpy()
    return encoder.encode_pair([r.image for r in records], [r.text for r in records]).numpy()


def _encode_skipping(encoder, modality: Modality, records: list[Record], skipped: Counter,
                     shard: str) -> tuple[list[Record], np.ndarray]:
    """Encode; a record the encoder refuses (corrupt image, bad text) is counted and left out."""
    records = list(records)
    while records:
        try:
            return records, _encode(encoder, modality, records)
        except InvalidInputError as err:
            if err.index is None or not 0 <= err.index < len(records):
                raise
            bad = records.pop(err.index)
            reason = "bad_image" if "image" in err.reason else "bad_text"
            skipped[reason] += 1
            log.warning("%s: skipped record %r (%s): %s", shard, bad.key, reason, err.reason)
    return [], np.zeros((0, encoder.embed_dim), dtype=np.float32)


def embed_shard(encoder, shard: str | os.PathLike, out: str | os.PathLike, batch_size: int = 256,
                max_pixels: int | None = None) -> ShardReport:
    """Embed every good record of one shard into `out` (Parquet, written atomically)."""
    t0 = time.perf_counter()
    shard, out = str(shard), Path(out)  # a shard may be a URL: not a Path
    stats = ReadStats()
    reader = ShardReader([shard], check_images="none", max_pixels=max_pixels, stats=stats)
    skipped: Counter[str] = Counter()
    keys, modalities, vectors, sources, metadata = [], [], [], [], []
    pending: dict[Modality, list[Record]] = {m: [] for m in Modality}
    shard_name = shard.rstrip("/").rsplit("/", 1)[-1]

    def flush(modality: Modality) -> None:
        good, emb = _encode_skipping(encoder, modality, pending[modality], skipped, str(shard))
        pending[modality] = []
        for record, vector in zip(good, emb):
            keys.append(record.key)
            modalities.append(modality.name.lower())
            vectors.append(vector)
            sources.append(f"{shard_name}/{record.key}")
            metadata.append(json.dumps(record.meta, sort_keys=True, ensure_ascii=False) if record.meta else None)

    for record in reader:
        try:
            modality = record.modality
        except ValueError:
            skipped["no_content"] += 1
            continue
        pending[modality].append(record)
        if len(pending[modality]) >= batch_size:
            flush(modality)
    for modality in Modality:
        if pending[modality]:
            flush(modality)
    dim = encoder.embed_dim
    array = np.asarray(vectors, dtype=np.float16).reshape(len(vectors), dim)
    table = pa.table({
        "key": pa.array(keys, pa.string()),
        "modality": pa.array(modalities, pa.string()),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(array.reshape(-1), pa.float16()), dim),
        "source": pa.array(sources, pa.string()),
        "metadata": pa.array(metadata, pa.string()),
    }, schema=embeddings_schema(dim))
    _write_parquet(out, table)
    counts = Counter(stats.skipped) + skipped
    return ShardReport(str(shard), str(out), len(keys), dict(sorted(counts.items())),
                       dict(sorted(stats.shard_errors.items())), time.perf_counter() - t0)


def read_vectors(table: pa.Table) -> np.ndarray:
    """(n, D) float32 vectors of an embeddings or ID table."""
    column = table.column("vector").combine_chunks()
    if len(column) == 0:
        dim = column.type.list_size if pa.types.is_fixed_size_list(column.type) else 0
        return np.zeros((0, dim), dtype=np.float32)
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(len(column), -1).astype(np.float32)


def read_modality(table: pa.Table) -> np.ndarray:
    return np.array([int(Modality.parse(m)) for m in table.column("modality").to_pylist()], dtype=np.int64)


def quantize_shard(quantizer, embeddings: str | os.PathLike, out: str | os.PathLike,
                   keep_vectors: bool = True) -> ShardReport:
    """IDs for one embeddings table with the trained codebooks -> an ID table at `out`."""
    t0 = time.perf_counter()
    table = pq.read_table(embeddings)
    vectors = read_vectors(table)
    modality = read_modality(table)
    codec = IdCodec(quantizer.num_levels, quantizer.codebook_size)
    if len(table):
        codes = quantizer.encode(vectors, modality).cpu().numpy()
        ids = codec.pack(codes[:, 1:])
    else:
        ids = np.zeros((0, codec.width), dtype=np.uint8)
    columns = {
        "key": table.column("key"),
        "modality": table.column("modality"),
        "id": pa.FixedSizeBinaryArray.from_buffers(pa.binary(codec.width), len(ids),
                                                   [None, pa.py_buffer(np.ascontiguousarray(ids))]),
        "source": table.column("source"),
        "metadata": table.column("metadata"),
    }
    if keep_vectors:
        columns["vector"] = table.column("vector")
    _write_parquet(Path(out), pa.table(columns))
    return ShardReport(str(embeddings), str(out), len(table), {}, {}, time.perf_counter() - t0)
