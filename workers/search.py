"""Ray actor for batch search: one memory-mapped index per actor, a unit of queries per call."""
from __future__ import annotations

from pathlib import Path

import ray

from workers.embed import set_threads


@ray.remote(max_restarts=-1, max_task_retries=3)
class SearchWorker:
    def __init__(self, index: str, num_cpus: float, decode_precision: str = "fp32"):
        from genius.index import GeniusIndex

        set_threads(num_cpus)
        # The version CURRENT names when the actor starts.
        self.index = GeniusIndex.load(index).set_decode_precision(decode_precision)
        self.version = self.index.path.name

    def search(self, unit: dict, out: str, options: dict) -> dict:
        from cluster.search_batch import read_unit, write_results

        query_ids, items = read_unit(unit)
        result = self.index.search(items, **options) if len(query_ids) else None
        rows = write_results(Path(out), query_ids, result, self.version)
        return {"rows": len(query_ids), "results": rows, "output": out, "version": self.version}
