"""How good are GENIUS's codes? The quantizer alone, against faiss's residual quantizer.

    python bench/codebooks.py                                 # full WordNet pool, ~1 h on 2 cores
    python bench/codebooks.py --pool 10000 --shapes 4x128 8x256 12x256

GENIUS can rank no better than its IDs let it: with the codebook-scored beam an ID's score
is the projected query's inner product with the ID's reconstruction, so the codes' own
exhaustive ranking (every item by query . reconstruction) is the ceiling of a perfect
decoder. This fits stage 2 only (no decoder) on `bench/peers.py`'s WordNet task (same split,
same cached embeddings) for each codebook shape L x K and quantizer variant, and reports
that ceiling (recall@1/5/10 on the held-out definitions), the reconstruction error of the
pool, and the fit time; beside it faiss's `ResidualQuantizer` at the same shape (the same
bits per item, greedy encoding) and exact search (flat, and flat on the trained projection).

Variants (genius.quantizer.QuantizerConfig):
  plain        Lloyd k-means init, EMA codebooks as trained (the quantizer before 2026-12-03)
  progressive  progressive-dimension k-means init, EMA codebooks as trained (the default)
  refit        progressive k-means, then the codebooks refitted on the trained projection

Results: bench/results/codebooks.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # noqa: E402
import peers_data  # noqa: E402
import peers_methods  # noqa: E402

log = logging.getLogger("bench.codebooks")
VARIANTS = {
    "plain": {"kmeans_progressive_steps": 0, "refit_codebooks": False},
    "progressive": {"kmeans_progressive_steps": 10, "refit_codebooks": False},
    "refit": {"kmeans_progressive_steps": 10, "refit_codebooks": True},
}


def genius_codes(task: peers_data.PoolTask, levels: int, codebook_size: int, variant: str,
                 args: argparse.Namespace) -> dict[str, Any]:
    """Stage 2 of one shape and variant: the codes' exhaustive recall, MSE and fit time."""
    import torch

    from genius.quantizer import ModalResidualQuantizer, train_quantizer

    # Stage 2 exactly as bench/peers.py configures GENIUS (epochs, batch, seed), at this shape.
    options = ["--levels", str(levels), "--codebook-size", str(codebook_size),
               "--quantizer-batch", str(args.quantizer_batch), "--seed", str(args.seed)]
    if args.quantizer_epochs is not None:
        options += ["--quantizer-epochs", str(args.quantizer_epochs)]
    cfg = peers.genius_config(len(task.pool), peers.parse_args(options)).quantizer
    cfg = replace(cfg, **VARIANTS[variant])
    t0 = time.perf_counter()
    quantizer = ModalResidualQuantizer.from_config(task.pool.shape[1], cfg)
    train_quantizer(quantizer, task.train_queries, task.pool[task.train_targets],
                    task.pool_modality[task.train_targets], item_emb=task.pool, item_modality=task.pool_modality,
                    config=cfg, progress=False,
                    query_modality=np.full(len(task.train_queries), int(task.query_modality)))
    fit_s = time.perf_counter() - t0
    codes = quantizer.encode(task.pool, task.pool_modality)
    reconstruction = quantizer.decode(codes).numpy()
    codes = codes.numpy()

    def project(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return np.concatenate([quantizer.project(np.ascontiguousarray(x[a : a + 8192])).numpy()
                                   for a in range(0, len(x), 8192)])

    projected_pool = project(task.pool)
    mse = float(((projected_pool - reconstruction) ** 2).sum(1).mean())

    def code_scores(q: np.ndarray) -> np.ndarray:
        return project(q) @ reconstruction.T

    def projected_flat(q: np.ndarray) -> np.ndarray:
        return project(q) @ projected_pool.T

    row = {"method": f"genius_{variant}", "levels": levels, "codebook_size": codebook_size,
           "bits": levels * int(math.log2(codebook_size)), "epochs": cfg.epochs,
           **peers.ranked_recall(code_scores, task.test_queries, task.relevance),
           "mse": round(mse, 4), "fit_s": round(fit_s, 1), "distinct_ids": int(len(np.unique(codes, axis=0))),
           "projected_flat": peers.ranked_recall(projected_flat, task.test_queries, task.relevance)}
    log.info("%s", row)
    return row


def faiss_rq(task: peers_data.PoolTask, levels: int, codebook_size: int, args: argparse.Namespace) -> dict[str, Any]:
    """faiss's residual quantizer at the same shape, trained on the same pool, greedy encoding."""
    bits = int(math.log2(codebook_size))
    index = peers_methods.residual_quantizer(task.pool.shape[1], levels, bits, encode_beam=1)  # greedy, as GENIUS
    pool = np.ascontiguousarray(task.pool, dtype=np.float32)
    sample = peers.faiss_training_sample(pool, args.faiss_train, args.seed)
    t0 = time.perf_counter()
    index.train(sample)
    index.add(pool)
    fit_s = time.perf_counter() - t0
    reconstruction = index.rq.decode(index.rq.compute_codes(pool))
    row = {"method": "faiss_rq", "levels": levels, "codebook_size": codebook_size, "bits": levels * bits,
           **peers.ranked_recall(lambda q: np.ascontiguousarray(q, dtype=np.float32) @ reconstruction.T,
                           task.test_queries, task.relevance),
           "mse": round(float(((pool - reconstruction) ** 2).sum(1).mean()), 4), "fit_s": round(fit_s, 1),
           "trained_on": len(sample)}
    log.info("%s", row)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pool", type=int, default=0, help="pool size, a subset of all synsets (default 0: all)")
    p.add_argument("--shapes", nargs="+", default=["5x256", "8x256", "12x256"],
                   help="codebook shapes LxK (default 5x256 8x256 12x256; 5x256 is what IndexConfig.for_corpus "
                        "picks for the full pool)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                   help="quantizer variants (default all)")
    p.add_argument("--variants-shape", default="5x256",
                   help="the shape every variant runs at (default 5x256)")
    p.add_argument("--shape-variant", default="refit", choices=list(VARIANTS),
                   help="the variant other shapes run (default refit: the codes' best ceiling)")
    p.add_argument("--quantizer-epochs", type=int, help="stage-2 epochs (default: as bench/peers.py)")
    p.add_argument("--quantizer-batch", type=int, default=1024, help="stage-2 batch (default 1024, as bench/peers.py)")
    p.add_argument("--faiss-train", type=int, default=65536, help="faiss RQ training sample (default 65536)")
    p.add_argument("--no-faiss", action="store_true", help="skip the faiss rows")
    p.add_argument("--threads", type=int, default=2, help="torch and faiss threads (default 2)")
    p.add_argument("--test-queries", type=int, default=1000, help="held-out queries (default 1000, as bench/peers.py)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", type=Path, default=Path("bench/.cache/peers"), help="as bench/peers.py")
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="folder of codebooks.{json,md}")
    p.add_argument("--name", default="codebooks", help="file name stem of the results (default codebooks)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch

    torch.set_num_threads(args.threads)
    if not args.no_faiss:
        import faiss

        faiss.omp_set_num_threads(args.threads)
    t_start = time.perf_counter()
    task = peers.load_tasks("wordnet", argparse.Namespace(cache=args.cache, max_records=None, seed=args.seed,
                                                          test_queries=args.test_queries))[0]
    if args.pool:
        task = task.subset(args.pool, args.seed)
    result: dict[str, Any] = {
        "command": " ".join(["python bench/codebooks.py", *sys.argv[1:]]), "task": task.summary(),
        "flat": peers.ranked_recall(lambda q: q @ task.pool.T, task.test_queries, task.relevance), "rows": [],
    }

    def save() -> None:
        result["total_s"] = round(time.perf_counter() - t_start, 1)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        (args.out / f"{args.name}.md").write_text(markdown(result), encoding="utf-8")

    for shape in args.shapes:
        levels, codebook_size = (int(v) for v in shape.lower().split("x"))
        variants = args.variants if shape == args.variants_shape else [args.shape_variant]
        for variant in variants:
            result["rows"].append(genius_codes(task, levels, codebook_size, variant, args))
            save()
        if not args.no_faiss:
            result["rows"].append(faiss_rq(task, levels, codebook_size, args))
            save()
    save()
    log.info("wrote %s (%.0f s)", args.out / f"{args.name}.json", result["total_s"])
    return 0


def markdown(r: dict[str, Any]) -> str:
    s = r["task"]
    flat = r["flat"]
    lines = [f"# GENIUS's codes against faiss's residual quantizer (`{r['command']}`)", "",
             f"WordNet definition -> synset, pool {s['pool']:,}, {s['test_queries']} held-out queries, "
             f"{s['train_pairs']:,} training pairs. Recall of ranking every item by the query's inner product "
             "with its reconstruction (the ceiling of a perfect decoder of these codes); MSE: mean squared error "
             "of the pool's reconstructions. Exact search (flat): "
             f"R@1 {flat['r1']:.3f}, R@5 {flat['r5']:.3f}, R@10 {flat['r10']:.3f}.", "",
             "| codes | method | bits | R@1 | R@5 | R@10 | MSE | fit s | flat on the projection R@10 |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        proj = row.get("projected_flat", {}).get("r10")
        lines.append(f"| {row['levels']}x{row['codebook_size']} | {row['method']} | {row['bits']} | {row['r1']:.3f} | "
                     f"{row['r5']:.3f} | {row['r10']:.3f} | {row['mse']:.4f} | {row['fit_s']:.0f} | "
                     f"{'' if proj is None else f'{proj:.3f}'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
