"""Does DSI's indexing task (every item's own embedding -> its ID) help GENIUS generalise?

Trains the same index twice on a generated corpus whose test queries target items never
seen as training targets, with and without the indexing task, and reports recall@10.

    python bench/index_task.py [--seeds 0 1] [--out bench/results/index_task.json]
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import torch

from genius.index import GeniusIndex, IndexConfig
from genius.metrics import exact_knn, recall_at_k
from genius.synthetic import make_synthetic

log = logging.getLogger("bench.index_task")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--beam", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: robust on a shared machine)")
    parser.add_argument("--out", default="bench/results/index_task.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    rows = []
    for seed in args.seeds:
        data = make_synthetic(seed=seed)
        relevant = [{int(t)} for t in data.test_targets]
        knn = recall_at_k(exact_knn(data.test_queries, data.corpus.embeddings, 10).tolist(), relevant, 10)
        for index_task in (True, False):
            cfg = IndexConfig.for_corpus(len(data.corpus))
            cfg.quantizer = replace(cfg.quantizer, epochs=15)
            cfg.decoder_training = replace(cfg.decoder_training, epochs=30, index_task=index_task)
            start = time.time()
            index = GeniusIndex.fit(data.corpus, data.train_queries, data.train_targets, cfg, progress=False)
            fit_s = time.time() - start
            recall = {name: recall_at_k(index.search(data.test_queries, k=10, beam_size=args.beam, rerank=rr).as_lists(),
                                        relevant, 10) for name, rr in (("genius", False), ("genius_rerank", True))}
            rows.append({"seed": seed, "index_task": index_task, "knn": knn, "fit_seconds": fit_s, **recall})
            log.info("%s", rows[-1])
    print(f"\n{'seed':>4s} {'index task':>10s} {'GENIUS R@10':>12s} {'GENIUS+R R@10':>14s} {'kNN R@10':>9s}")
    for r in rows:
        print(f"{r['seed']:4d} {str(r['index_task']):>10s} {r['genius']:12.3f} {r['genius_rerank']:14.3f} {r['knn']:9.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "python bench/index_task.py", "beam": args.beam, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
