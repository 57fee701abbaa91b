"""Ray actor that maps embeddings tables to ID tables with the trained codebooks."""
from __future__ import annotations

from pathlib import Path

import ray

from workers.embed import set_threads


@ray.remote(max_restarts=-1, max_task_retries=3)
class QuantizeWorker:
    """Holds the trained quantizer; `quantize` turns one embeddings table into one ID table."""

    def __init__(self, model_dir: str, quantizer_config: dict, embed_dim: int, num_cpus: float):
        from genius.quantizer import QuantizerConfig
        from genius.store.model_files import load_quantizer

        set_threads(num_cpus)
        self.quantizer = load_quantizer(Path(model_dir), QuantizerConfig(**quantizer_config), embed_dim)

    def quantize(self, embeddings: str, out: str) -> dict:
        from genius.shard_jobs import quantize_shard

        report = quantize_shard(self.quantizer, embeddings, out)
        return {**report.to_dict(), "node": ray.get_runtime_context().get_node_id()}
