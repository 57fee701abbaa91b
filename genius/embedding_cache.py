"""A persistent cache of embeddings by content, for one encoder.

Embedding is the slow part of repeated evaluations on a CPU (e.g. ~40k WordNet texts take
minutes with MiniLM): the cache keeps every vector under a hash of what was embedded (the
modality, the text and the image bytes), so a changed record is simply a miss. The file
is Parquet (`content_id` string, `embedding` list<float>) readable by pandas and DuckDB;
its schema metadata holds the encoder's fingerprint, and a cache written by another encoder
is ignored (with a warning) and then overwritten.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from genius.atomic import write_atomic

log = logging.getLogger(__name__)

FINGERPRINT_KEY = b"genius.encoder_fingerprint"


def encoder_fingerprint(encoder: Any) -> str:
    """sha256 of the encoder's config and every tensor of its state (weights and buffers)."""
    h = hashlib.sha256()
    cfg = getattr(encoder, "cfg", None)
    if cfg is not None and hasattr(cfg, "to_dict"):
        # The device does not change the vectors (beyond float noise).
        h.update(json.dumps({k: v for k, v in cfg.to_dict().items() if k != "device"}, sort_keys=True).encode())
    module = getattr(encoder, "clip", encoder)
    modules = [module] + ([encoder.fusion] if hasattr(encoder, "fusion") and encoder.fusion is not module else [])
    for m in modules:
        for name, tensor in m.state_dict().items():
            h.update(name.encode())
            # reshape(-1): 0-dim tensors (e.g. CLIP's logit_scale) cannot be viewed as bytes.
            h.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _image_bytes(image: Any) -> bytes:
    if image is None:
        return b""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        return Path(image).read_bytes()
    if hasattr(image, "tobytes"):  # PIL image: mode and size matter as much as the pixels
        return f"{image.mode}:{image.size}".encode() + image.tobytes()
    buf = io.BytesIO()
    np.save(buf, np.asarray(image))
    return buf.getvalue()


def content_id(modality: int, image: Any, text: str | None) -> str:
    """What was embedded, hashed: modality, text and image bytes."""
    h = hashlib.sha1(f"{int(modality)}\x00".encode())
    h.update((text or "").encode("utf-8", "surrogatepass"))
    h.update(b"\x00")
    h.update(_image_bytes(image))
    return h.hexdigest()


class EmbeddingCache:
    """content_id -> vector for one encoder, loaded from and saved to one Parquet file."""

    def __init__(self, path: str | os.PathLike, fingerprint: str) -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.vectors: dict[str, np.ndarray] = {}
        self.hits = self.misses = 0
        self._dirty = False
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        table = pq.read_table(self.path)
        meta = table.schema.metadata or {}
        found = meta.get(FINGERPRINT_KEY, b"").decode()
        if found != self.fingerprint:
            log.warning("embedding cache %s was written by another encoder (fingerprint %s..., this one %s...): "
                        "ignoring it; it will be overwritten", self.path, found[:12], self.fingerprint[:12])
            return
        ids = table.column("content_id").to_pylist()
        flat = table.column("embedding").combine_chunks()
        dim = len(flat[0]) if len(flat) else 0
        values = np.asarray(flat.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, dim)
        self.vectors = dict(zip(ids, values))
        log.info("embedding cache %s: %d vectors", self.path, len(self.vectors))

    def __len__(self) -> int:
        return len(self.vectors)

    def get(self, cid: str) -> np.ndarray | None:
        vec = self.vectors.get(cid)
        if vec is None:
            self.misses += 1
        else:
            self.hits += 1
        return vec

    def put(self, cid: str, vector: np.ndarray) -> None:
        self.vectors[cid] = np.asarray(vector, dtype=np.float32)
        self._dirty = True

    def save(self) -> None:
        """Write the file (atomically) if anything was added."""
        if not self._dirty:
            return
        ids = list(self.vectors)
        dim = len(next(iter(self.vectors.values()))) if ids else 0
        values = np.stack([self.vectors[i] for i in ids]) if ids else np.zeros((0, dim), np.float32)
        embedding = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), pa.float32()), dim)
        table = pa.table({"content_id": pa.array(ids, pa.string()), "embedding": embedding.cast(pa.list_(pa.float32()))})
        table = table.replace_schema_metadata({FINGERPRINT_KEY: self.fingerprint.encode()})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, lambda f: pq.write_table(table, f))
        self._dirty = False
        log.info("embedding cache %s: saved %d vectors (%d hits, %d misses this run)",
                 self.path, len(ids), self.hits, self.misses)
