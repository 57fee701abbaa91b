"""How often does the stage-2 quantizer give a query the code prefix of its target?

GENIUS can only find a target whose ID the decoder generates; the decoder is trained to
imitate the quantizer's codes of (augmented) queries and of items. When even the quantizer
puts a test query in another first-level cell than its target, the beam must recover the
target from a low-probability branch, and recall falls below exact kNN. This measures, per
task and per codebook shape, the share of test queries (and, for reference, training
queries) whose quantized code agrees with their target's on the first l semantic levels,
plus exact kNN recall on the raw and on the quantizer's projected embeddings.

    python bench/code_alignment.py --shards data/wordnet --corpus-kind wordnet \\
        --max-candidates 2000 --max-queries 300 --max-train 20000 --shapes auto 32x6 \\
        --embedding-cache emb.parquet

Stage 2 only (no decoder), so it runs in minutes. Results: a table, and JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from genius.data.shards import iter_shards
from genius.embedding_cache import EmbeddingCache, encoder_fingerprint
from genius.encoders import EncoderConfig, MultimodalEncoder
from genius.evaluation import embed_tasks
from genius.metrics import exact_knn, recall_at_k
from genius.quantizer import ModalResidualQuantizer, QuantizerConfig, train_quantizer
from genius.tasks import build_tasks

log = logging.getLogger("bench.code_alignment")


def prefix_agreement(a: np.ndarray, b: np.ndarray) -> list[float]:
    """Share of rows whose semantic codes (columns 1..) agree on the first l levels, per l."""
    return [float((a[:, 1 : l + 1] == b[:, 1 : l + 1]).all(1).mean()) for l in range(1, a.shape[1])]


def measure(task, shape: str, seed: int) -> dict:
    pool, train = task.candidates, task.train_candidates
    items = np.concatenate([pool.embeddings, train.embeddings])
    modality = np.concatenate([pool.modality, train.modality])
    overrides = {}
    if shape != "auto":
        k, levels = (int(v) for v in shape.split("x"))
        overrides = {"codebook_size": k, "num_levels": levels}
    cfg = QuantizerConfig.for_corpus(len(items), seed=seed, **overrides)
    quantizer = ModalResidualQuantizer.from_config(items.shape[1], cfg)
    targets = task.train_targets
    t0 = time.perf_counter()
    train_quantizer(quantizer, task.train_queries.embeddings, train.embeddings[targets], train.modality[targets],
                    item_emb=items, item_modality=modality, config=cfg, progress=False)
    fit_s = time.perf_counter() - t0
    # A query is quantized as an item of its target's modality (as in training).
    own = np.array([min(rel) for rel in task.relevance])
    n_train = min(len(targets), 2000)

    def codes(x: np.ndarray, m: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return quantizer.encode(torch.from_numpy(x), torch.from_numpy(m)).numpy()

    test_q = codes(task.test_queries.embeddings, pool.modality[own])
    test_t = codes(pool.embeddings[own], pool.modality[own])
    train_q = codes(task.train_queries.embeddings[:n_train], train.modality[targets[:n_train]])
    train_t = codes(train.embeddings[targets[:n_train]], train.modality[targets[:n_train]])
    with torch.no_grad():
        projected_q = quantizer.project(torch.from_numpy(task.test_queries.embeddings)).numpy()
        projected_p = quantizer.project(torch.from_numpy(pool.embeddings)).numpy()
    knn = {name: {k: recall_at_k(exact_knn(q, p, 10).tolist(), task.relevance, k) for k in (1, 10)}
           for name, q, p in (("raw", task.test_queries.embeddings, pool.embeddings),
                              ("projected", projected_q, projected_p))}
    return {"task": task.name, "shape": f"{cfg.codebook_size}x{cfg.num_levels}", "fit_seconds": round(fit_s, 1),
            "test_prefix_agreement": prefix_agreement(test_q, test_t),
            "train_prefix_agreement": prefix_agreement(train_q, train_t), "knn": knn}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", nargs="+", required=True)
    parser.add_argument("--corpus-kind", required=True, choices=["fashion-mnist", "openclipart", "wordnet"])
    parser.add_argument("--encoder", help="saved MultimodalEncoder (default: the offline default encoder)")
    parser.add_argument("--max-candidates", type=int, default=2000)
    parser.add_argument("--max-queries", type=int, default=300)
    parser.add_argument("--max-train", type=int)
    parser.add_argument("--shapes", nargs="+", default=["auto"], help="'auto' (for_corpus) or KxL, e.g. 32x6")
    parser.add_argument("--embedding-cache", help="Parquet embedding cache (see genius eval)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench/results/code_alignment.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    records = list(iter_shards(args.shards))
    tasks = build_tasks(args.corpus_kind, records, max_candidates=args.max_candidates, max_queries=args.max_queries,
                        max_train=args.max_train, seed=args.seed)
    torch.manual_seed(args.seed)
    encoder = MultimodalEncoder.load(args.encoder) if args.encoder else MultimodalEncoder.from_config(EncoderConfig())
    encoder.eval()
    cache = EmbeddingCache(args.embedding_cache, encoder_fingerprint(encoder)) if args.embedding_cache else None
    tasks, _ = embed_tasks(tasks, encoder, cache=cache)
    rows = [measure(task, shape, args.seed) for task in tasks for shape in args.shapes]
    print(f"\n{'task':34s} {'K x L':>7s} {'test: prefix agreement by level':>40s} {'train: level 1/2':>17s} "
          f"{'kNN R@10 raw/proj':>18s}")
    for r in rows:
        test = " ".join(f"{v:.2f}" for v in r["test_prefix_agreement"])
        train = "/".join(f"{v:.2f}" for v in r["train_prefix_agreement"][:2])
        knn = f"{r['knn']['raw'][10]:.3f}/{r['knn']['projected'][10]:.3f}"
        print(f"{r['task']:34s} {r['shape']:>7s} {test:>40s} {train:>17s} {knn:>18s}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
