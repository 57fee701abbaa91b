"""Ray actor that embeds WebDataset shards: one encoder per actor, GPU when it has one."""
from __future__ import annotations

import logging
import os
import socket

import numpy as np
import ray
import torch

log = logging.getLogger(__name__)


def _device() -> str:
    return "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"


def set_threads(num_cpus: float) -> None:
    # torch with more threads than the actor's CPUs is 10-50x slower on a shared node.
    torch.set_num_threads(max(1, int(num_cpus)))


@ray.remote(max_restarts=-1, max_task_retries=3)
class EmbedWorker:
    """Holds one encoder; `embed` turns one shard into one embeddings table (genius.shard_jobs)."""

    def __init__(self, encoder_dir: str | None, num_cpus: float, max_pixels: int | None = None):
        from genius.encoders import EncoderConfig, MultimodalEncoder

        set_threads(num_cpus)
        device = _device()
        if encoder_dir:
            self.encoder = MultimodalEncoder.load(encoder_dir, device=device)
        else:
            self.encoder = MultimodalEncoder.from_config(EncoderConfig(device=device))
        self.max_pixels = max_pixels
        log.info("embed worker on %s (%s, %d threads)", socket.gethostname(), device, torch.get_num_threads())

    def embed(self, shard: str, out: str, batch_size: int) -> dict:
        from genius.shard_jobs import embed_shard

        report = embed_shard(self.encoder, shard, out, batch_size=batch_size, max_pixels=self.max_pixels)
        return {**report.to_dict(), "node": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    def embed_queries(self, texts: list | None, images: list | None) -> np.ndarray:
        """Training queries with text, image bytes or both per row -> (n, D) float32."""
        from genius.index import embed_items
        from genius.items import Items

        return embed_items(Items(texts=texts, images=images), self.encoder)
