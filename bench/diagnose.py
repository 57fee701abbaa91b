"""Where does GENIUS lose the target? A diagnosis on a task of bench/peers.py.

    python bench/diagnose.py                          # WordNet, a 10k-synset pool, ~15 min on 2 cores
    python bench/diagnose.py --pool 0 --grid-epochs   # the full pool, one fit
    python bench/diagnose.py --task openclipart --pool 0 --direction 0   # text -> image, all records

On the held-out queries of one of `bench/peers.py`'s tasks (same split, same cached
embeddings; WordNet definition -> synset by default), for one fitted index:

* beam survival: after each level, the share of queries with a relevant item's ID prefix
  still in the beam (is the target lost at level 1 or at level 5?), for the decoder's beam
  and for the beam scored by the codes alone (a dominant codebook weight);
* code agreement: the share whose own quantizer code (the query projected and quantized
  like an item) shares the target's first l codes;
* the codes' ceiling: recall of ranking every indexed ID by the codes' own score
  (projected query . reconstruction, exhaustive): what a perfect decoder of these codes gets;
  beside it the projection's (projected query . projected item, unquantized) and flat search's,
  which split what the learned projection loses from what quantizing it loses;
  and the re-rank ceiling: the codes' exhaustive top 50/100/200 re-scored exactly, beside
  flat search (what GENIUS+R could reach with a beam that never lost the target);
* memorisation against generalisation: GENIUS recall on training definitions (their targets
  seen in training) against held-out ones;
* optionally (`--grid-epochs`, `--grid-pairs`), recall@10 after refitting with fewer decoder
  epochs or a share of the training pairs.

Results: bench/results/diagnose.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import logging
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

log = logging.getLogger("bench.diagnose")
DOMINANT = 1e4  # a codebook weight beside which the decoder's log-probabilities do not matter


def relevant_codes(index: Any, relevance: list[np.ndarray]) -> list[np.ndarray]:
    """Per query, the (r, 1+L) IDs of its relevant items."""
    return [index.item_codes(np.asarray(rel, dtype=np.int64)) for rel in relevance]


def beam_survival(index: Any, queries: np.ndarray, targets: list[np.ndarray], beam: int,
                  codebook_weight: float) -> list[float]:
    """Per step (modality, then each level): share of queries with a target prefix in the beam."""
    import torch

    alive_by_step: list[list[bool]] = []
    for a in range(0, len(queries), index.config.query_batch):
        trace: list[np.ndarray] = []
        chunk = torch.from_numpy(np.ascontiguousarray(queries[a : a + index.config.query_batch]))
        index.beam(chunk, beam, settings=index.beam_settings(codebook_weight), trace=trace)
        for step, prefixes in enumerate(trace):
            if len(alive_by_step) <= step:
                alive_by_step.append([])
            for q in range(len(chunk)):
                wanted = {tuple(t[: step + 1]) for t in targets[a + q].tolist()}
                alive_by_step[step].append(any(tuple(p) in wanted for p in prefixes[q].tolist()))
    return [round(float(np.mean(s)), 4) for s in alive_by_step]


def code_agreement(index: Any, queries: np.ndarray, query_modality: int, targets: list[np.ndarray]) -> list[float]:
    """Per number of semantic levels l = 1..L: share of queries whose own code shares some
    target's first l semantic codes."""
    codes = index.quantizer.encode(queries, np.full(len(queries), query_modality)).cpu().numpy()
    levels = codes.shape[1] - 1
    out = []
    for depth in range(1, levels + 1):
        hits = [bool((t[:, 1 : 1 + depth] == c[1 : 1 + depth]).all(axis=1).any()) for c, t in zip(codes, targets)]
        out.append(round(float(np.mean(hits)), 4))
    return out


def code_scorer(index: Any):
    """scores_of(query chunk) -> (q, N): every indexed item's codes' own score (exhaustive)."""
    import torch

    codes = index.item_codes(np.arange(len(index)))

    def scores_of(chunk: np.ndarray) -> np.ndarray:
        modality, levels = (t.numpy() for t in index.quantizer.code_scores(torch.from_numpy(chunk)))
        score = modality[:, codes[:, 0]]
        for level in range(levels.shape[1]):
            score = score + levels[:, level, codes[:, 1 + level]]
        return score

    return scores_of


def code_ceiling(index: Any, queries: np.ndarray, relevance: list[np.ndarray]) -> dict[str, float]:
    """Recall of an exhaustive ranking of every indexed item by the codes' own score."""
    return peers.ranked_recall(code_scorer(index), queries, relevance, chunk=64)


def rerank_ceiling(index: Any, task: peers_data.PoolTask, depths: tuple[int, ...]) -> list[dict[str, float]]:
    """What GENIUS+R could reach with a perfect beam: per depth d, the share of queries with a
    relevant item in the codes' exhaustive top d (the bound of any re-ranking of them), and
    recall@1/5/10 after re-scoring that top d exactly with the pool's vectors."""
    scores_of = code_scorer(index)
    depths = tuple(sorted({min(d, len(task.pool)) for d in depths}))
    tops = []
    for a in range(0, len(task.test_queries), 64):
        scores = scores_of(task.test_queries[a : a + 64])
        top = np.argpartition(-scores, max(depths) - 1, axis=1)[:, : max(depths)]
        tops.append(np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1), axis=1))
    ranked_by_codes = np.concatenate(tops)
    out = []
    for depth in depths:
        top = ranked_by_codes[:, :depth]
        exact = np.einsum("qd,qkd->qk", task.test_queries, task.pool[top])
        reranked = np.take_along_axis(top, np.argsort(-exact, axis=1), axis=1)
        out.append({"depth": depth, "pool_share": round(depth / len(task.pool), 6),
                    "holds_relevant": round(peers.recall(top, task.relevance, depth), 4),
                    **{f"r{k}": round(peers.recall(reranked, task.relevance, k), 4) for k in peers.KS}})
    return out


def projection_ceiling(index: Any, task: peers_data.PoolTask) -> dict[str, float]:
    """Recall of ranking the pool by the quantizer's unquantized projection (projected query .
    projected item): the codes' ceiling before quantization."""
    import torch

    with torch.no_grad():
        items = index.quantizer.project(torch.from_numpy(np.ascontiguousarray(task.pool))).numpy()

        def scores_of(chunk: np.ndarray) -> np.ndarray:
            return index.quantizer.project(torch.from_numpy(np.ascontiguousarray(chunk))).numpy() @ items.T

        return peers.ranked_recall(scores_of, task.test_queries, task.relevance)


def flat_recall(task: peers_data.PoolTask) -> dict[str, float]:
    """Exact inner-product search over the pool: the reference of the re-rank ceiling."""
    return peers.ranked_recall(lambda chunk: chunk @ task.pool.T, task.test_queries, task.relevance)


def genius_recall(index: Any, queries: np.ndarray, relevance: list[np.ndarray], beam: int,
                  codebook_weight: float = 0.0) -> dict[str, float]:
    plain, _ = peers_methods.genius_methods(index, beam, 0.0, codebook_weight)
    ranked = plain.search(queries, 10)
    return {f"r{k}": round(peers.recall(ranked, relevance, k), 4) for k in peers.KS}


def fit(task: peers_data.PoolTask, args: argparse.Namespace, epochs: int | None = None,
        pairs: float = 1.0, saved: Path | None = None) -> tuple[Any, float]:
    """(fitted index, training pairs used); `saved`: a folder to load the fit from or save it to
    (bench/peers.py's --genius-index)."""
    cfg = peers.genius_config(len(task.pool), args)
    if epochs is not None:
        cfg.decoder_training = replace(cfg.decoder_training, epochs=epochs)
    rows = np.arange(len(task.train_targets))
    if pairs < 1.0:
        rows = np.sort(np.random.default_rng(args.seed).choice(rows, int(pairs * len(rows)), replace=False))
    _, _, index = peers_methods.build_genius(task.pool, task.pool_modality, task.train_queries[rows],
                                             task.train_targets[rows], int(task.query_modality), cfg, args.beam,
                                             progress=args.progress, saved=saved)
    return index, len(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=peers.TASKS, default="wordnet", help="the corpus (default wordnet)")
    p.add_argument("--direction", type=int, default=0,
                   help="which of the corpus's tasks (Openclipart: 0 text -> image, 1 image -> text; default 0)")
    p.add_argument("--pool", type=int, default=10000,
                   help="pool size, a random subset of the task's pool (0: all; default 10000)")
    p.add_argument("--train-sample", type=int, default=500, help="training queries scored for memorisation (default 500)")
    p.add_argument("--grid-epochs", type=int, nargs="*", default=[],
                   help="also refit with these decoder epochs and report recall@10 (e.g. 2 12)")
    p.add_argument("--grid-pairs", type=float, nargs="*", default=[],
                   help="also refit with these shares of the training pairs (e.g. 0.25 0.5)")
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="folder of the results")
    p.add_argument("--name", default="diagnose", help="results file name, NAME.{json,md} (default diagnose)")
    p.add_argument("--genius-index", type=Path,
                   help="as in bench/peers.py: load the main fit from this folder (the same pool and config) "
                        "or save it there; a full-pool fit saved by bench/peers.py is diagnosed in minutes")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    # The task and the fit: bench/peers.py's options, with its defaults.
    defaults = peers.parse_args(["--tasks", "wordnet"])
    for name, kind in (("test_queries", int), ("beam", int), ("seed", int), ("cache", Path), ("decoder", str),
                       ("levels", int), ("codebook_size", int), ("quantizer_epochs", int),
                       ("quantizer_batch", int), ("decoder_epochs", int), ("decoder_batch", int),
                       ("decoder_lr", float), ("max_records", int), ("codebook_weight", float),
                       ("encoder", str), ("stage1_epochs", int)):
        value = getattr(defaults, name)
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=value,
                       help=f"as in bench/peers.py (default {value})")
    p.add_argument("--level-widths", type=int, nargs="*",
                   help="as in bench/peers.py: beam widths of the first levels (default: IndexConfig's; no "
                        "value: --beam throughout)")
    p.add_argument("--lookahead-rows", type=int,
                   help="as in bench/peers.py: rows read per prefix by the beam's lookahead (default: "
                        "IndexConfig's; 0: none)")
    p.add_argument("--refit-codebooks", action="store_true", help="as in bench/peers.py")
    p.add_argument("--progress", action="store_true", help="progress bars while GENIUS trains")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    task = peers.load_tasks(args.task, args)[args.direction]
    subset = bool(args.pool) and args.pool < len(task.pool)
    if subset:
        task = task.subset(args.pool, args.seed)
    saved = None
    if args.genius_index is not None:
        saved = args.genius_index / task.name  # where bench/peers.py saves a full-pool fit of the task
        if subset:
            saved = saved.with_name(f"{saved.name}-{args.pool}")
        saved.mkdir(parents=True, exist_ok=True)
    index, num_pairs = fit(task, args, saved=saved)
    targets = relevant_codes(index, task.relevance)
    rng = np.random.default_rng(args.seed)
    train_rows = np.sort(rng.choice(len(task.train_targets), min(args.train_sample, len(task.train_targets)),
                                    replace=False))
    train_q = task.train_queries[train_rows]
    train_rel = [np.array([t]) for t in task.train_targets[train_rows]]
    result: dict[str, Any] = {
        "command": " ".join(["python bench/diagnose.py", *sys.argv[1:]]), "task": task.summary(),
        "levels": int(index.quantizer.num_levels), "codebook_size": int(index.quantizer.codebook_size),
        "beam": args.beam, "level_widths": list(index.config.level_widths),
        "lookahead_rows": index.config.lookahead_rows, "train_pairs": num_pairs,
        "beam_survival": {
            "decoder": beam_survival(index, task.test_queries, targets, args.beam, 0.0),
            "codes_only": beam_survival(index, task.test_queries, targets, args.beam, DOMINANT),
            "decoder_train_queries": beam_survival(index, train_q, relevant_codes(index, train_rel), args.beam, 0.0),
        },
        "code_agreement_test": code_agreement(index, task.test_queries, int(task.query_modality), targets),
        "code_agreement_train": code_agreement(index, train_q, int(task.query_modality),
                                               relevant_codes(index, train_rel)),
        "codes_exhaustive": code_ceiling(index, task.test_queries, task.relevance),
        "projection_exhaustive": projection_ceiling(index, task),
        "codes_exhaustive_reranked": rerank_ceiling(index, task, (50, 100, 200)),
        "flat": flat_recall(task),
        "genius_test": genius_recall(index, task.test_queries, task.relevance, args.beam),
        "genius_train": genius_recall(index, train_q, train_rel, args.beam),
        "genius_codes_only_test": genius_recall(index, task.test_queries, task.relevance, args.beam, DOMINANT),
        "grid": [],
    }
    if args.codebook_weight:  # the beam as searched: decoder + codes, with the fit's level widths
        result["codebook_weight"] = args.codebook_weight
        result["beam_survival"]["combined"] = beam_survival(index, task.test_queries, targets, args.beam,
                                                            args.codebook_weight)
        result["genius_combined_test"] = genius_recall(index, task.test_queries, task.relevance, args.beam,
                                                       args.codebook_weight)
    log.info("%s", {k: v for k, v in result.items() if k not in ("task", "command")})
    for epochs in args.grid_epochs:
        refit, n = fit(task, args, epochs=epochs)
        result["grid"].append({"decoder_epochs": epochs, "pairs": n,
                               **genius_recall(refit, task.test_queries, task.relevance, args.beam)})
        log.info("grid: %s", result["grid"][-1])
    for share in args.grid_pairs:
        refit, n = fit(task, args, pairs=share)
        result["grid"].append({"decoder_epochs": args.decoder_epochs, "pairs": n,
                               **genius_recall(refit, task.test_queries, task.relevance, args.beam)})
        log.info("grid: %s", result["grid"][-1])
    if result["grid"]:
        result["grid"].append({"decoder_epochs": args.decoder_epochs, "pairs": num_pairs, **result["genius_test"]})
    result["total_s"] = round(time.perf_counter() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (args.out / f"{args.name}.md").write_text(markdown(result), encoding="utf-8")
    log.info("wrote %s (%.0f s)", args.out / f"{args.name}.json", result["total_s"])
    return 0


def markdown(r: dict[str, Any]) -> str:
    s = r["task"]
    levels = r["levels"]
    steps = ["modality"] + [f"level {i}" for i in range(1, levels + 1)]
    lines = [f"# Where GENIUS loses the target (`{r['command']}`)", "",
             f"{s['name']}, pool {s['pool']:,}, {s['test_queries']} held-out queries, "
             f"{r['train_pairs']:,} training pairs; {levels} levels x {r['codebook_size']} codes; beam {r['beam']}"
             + (f", widths {r['level_widths']} at the first levels" if r.get("level_widths") else "")
             + (f", lookahead {r['lookahead_rows']} rows (with the codes)" if r.get("lookahead_rows") else "") + ".",
             "",
             "## A relevant ID's prefix still in the beam after each step", "",
             "| beam | " + " | ".join(steps) + " |", "|---|" + "---:|" * len(steps)]
    names = {"decoder": "decoder, held-out queries", "codes_only": "codes alone, held-out queries",
             "decoder_train_queries": "decoder, training queries",
             "combined": f"decoder + {r.get('codebook_weight', 0):g} x codes, held-out queries"}
    for key, label in ((k, v) for k, v in names.items() if k in r["beam_survival"]):
        lines.append(f"| {label} | " + " | ".join(f"{v:.3f}" for v in r["beam_survival"][key]) + " |")
    lines += ["", "## The query's own code shares the target's first l codes", "",
              "| queries | " + " | ".join(f"l={i}" for i in range(1, levels + 1)) + " |", "|---|" + "---:|" * levels,
              "| held-out | " + " | ".join(f"{v:.3f}" for v in r["code_agreement_test"]) + " |",
              "| training | " + " | ".join(f"{v:.3f}" for v in r["code_agreement_train"]) + " |", "",
              "## Recall", "", "| ranking | R@1 | R@5 | R@10 |", "|---|---:|---:|---:|"]
    for key, label in (("genius_test", "GENIUS, held-out queries"), ("genius_train", "GENIUS, training queries"),
                       ("genius_codes_only_test", "beam scored by the codes alone, held-out"),
                       ("genius_combined_test", f"beam scored by decoder + {r.get('codebook_weight', 0):g} x codes, "
                                                "held-out"),
                       ("codes_exhaustive", "every ID ranked by the codes' score (exhaustive), held-out"),
                       ("projection_exhaustive", "every item ranked by the unquantized projection, held-out"),
                       ("flat", "flat (exact) search in the stage-1 space, held-out")):
        v = r.get(key)
        if v is None:
            continue
        lines.append(f"| {label} | {v['r1']:.3f} | {v['r5']:.3f} | {v['r10']:.3f} |")
    if r.get("codes_exhaustive_reranked"):
        flat = r["flat"]
        lines += ["", "## The re-rank ceiling: the codes' exhaustive top d re-scored exactly (held-out)", "",
                  f"Flat (exact) search: R@1/5/10 {flat['r1']:.3f} / {flat['r5']:.3f} / {flat['r10']:.3f}.", "",
                  "| top d | pool share | holds a relevant item | R@1 | R@5 | R@10 | R@5 / flat |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {c['depth']} | {100 * c['pool_share']:.3f} % | {c['holds_relevant']:.3f} | {c['r1']:.3f} | "
                  f"{c['r5']:.3f} | {c['r10']:.3f} | {c['r5'] / max(flat['r5'], 1e-9):.2f} |"
                  for c in r["codes_exhaustive_reranked"]]
    if r["grid"]:
        lines += ["", "## Recall against decoder epochs and training pairs (held-out)", "",
                  "| decoder epochs | pairs | R@1 | R@5 | R@10 |", "|---:|---:|---:|---:|---:|"]
        lines += [f"| {g['decoder_epochs']} | {g['pairs']:,} | {g['r1']:.3f} | {g['r5']:.3f} | {g['r10']:.3f} |"
                  for g in r["grid"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
