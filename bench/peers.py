"""GENIUS against vector search at full corpus size: accuracy, speed, bytes per item, scale.

    python bench/peers.py                      # every task whose corpus is installed
    python bench/peers.py --tasks wordnet      # the measuring stick of accuracy work

Tasks (bench/peers_data.py), every record of the corpus in the pool:
  wordnet      definition -> synset over all ~117k synsets (Debian package wordnet-base)
  fashion      image -> image, instance-level: an augmented view finds its own image among
               all 70k Fashion-MNIST images (dataset-fashion-mnist)
  openclipart  text -> image and image -> text over all records (openclipart-png)
Methods (bench/peers_methods.py): genius, genius_r, faiss flat, pq12, opq12, ivfpq, rq8x12
and the compressed ones re-ranked (`*_rr100`), all on the same embeddings and queries.

Also: the recall curve (WordNet pools of 2k, 10k and all synsets, `--curve`) and the latency
curve (10^4 .. 10^7 items: WordNet's items plus distractor IDs and vectors, GENIUS on the
store's memory-mapped index, `--scale`). Results: bench/results/peers.{json,md} and PNG plots.
Embeddings are cached under --cache, so a second run starts at the fits.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import logging
import os
import platform
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers_data  # noqa: E402
import peers_methods  # noqa: E402
import peers_paired  # noqa: E402
import peers_report  # noqa: E402

log = logging.getLogger("bench.peers")
TASKS = ("wordnet", "fashion", "openclipart")
PACKAGES = {"wordnet": "wordnet-base", "fashion": "dataset-fashion-mnist", "openclipart": "openclipart-png"}
KS = (1, 5, 10)
# Stage 1 epochs per image task: Openclipart has ~4.8k training pairs (flat recall@10 0.014
# after 2 epochs, 0.104 after 30), Fashion-MNIST ~69k image pairs (270 steps, ~10 min here).
STAGE1_EPOCHS = {"openclipart": 30, "fashion": 1}


# ----------------------------------------------------------------------------- data


def records(kind: str, cache: Path) -> list[Any]:
    """All records of a corpus, converted once to shards under the cache."""
    from genius.data.shards import iter_shards

    folder = cache / "shards" / kind
    if not (folder / "shards.json").exists():
        shutil.rmtree(folder, ignore_errors=True)
        log.info("converting %s to shards in %s", kind, folder)
        if kind == "wordnet":
            from genius.data import wordnet as corpus
        elif kind == "fashion":
            from genius.data import fashion_mnist as corpus
        else:
            from genius.data import openclipart as corpus
        corpus.convert(folder)
    return list(iter_shards(sorted(folder.glob("*.tar"))))


def available(kind: str) -> str | None:
    """None, or why the corpus is missing."""
    from genius.data.shards import MissingSourceError

    try:
        if kind == "wordnet":
            from genius.data.wordnet import find_files
        elif kind == "fashion":
            from genius.data.fashion_mnist import find_files
        else:
            from genius.data.openclipart import find_entries

            def find_files(_):  # noqa: ANN001
                return find_entries(Path("/usr/share/openclipart"))
        find_files(None)
    except (MissingSourceError, FileNotFoundError, OSError) as e:
        return f"{e} (apt-get install {PACKAGES[kind]})"
    return None


def default_encoder(seed: int):
    import torch

    from genius.encoders import EncoderConfig, MultimodalEncoder

    torch.manual_seed(seed)  # the untrained image tower: its weights are part of the cache fingerprint
    return MultimodalEncoder.from_config(EncoderConfig()).eval()


def load_tasks(kind: str, args: argparse.Namespace) -> list[peers_data.PoolTask]:
    recs = records(kind, args.cache)[: args.max_records]
    log.info("%s: %d records", kind, len(recs))
    if kind == "wordnet":
        embed = peers_data.CachedEmbedder(default_encoder(args.seed), args.cache / "emb-default.parquet")
        return [peers_data.wordnet_task(recs, embed, args.test_queries, args.seed)]
    encoder, name = image_encoder(kind, recs, args)
    embed = peers_data.CachedEmbedder(encoder, args.cache / f"emb-{name}.parquet")
    if kind == "fashion":
        return [peers_data.instance_image_task(recs, embed, args.test_queries, args.seed, "fashion-mnist")]
    return peers_data.titled_image_tasks(recs, embed, args.test_queries, args.seed, "openclipart")


def image_encoder(kind: str, recs: list[Any], args: argparse.Namespace):
    """--encoder, or stage 1 trained once (and cached) on the task's training pairs only."""
    from genius.encoders import MultimodalEncoder

    if args.encoder:
        return MultimodalEncoder.load(args.encoder).eval(), Path(args.encoder).name
    epochs = args.stage1_epochs or STAGE1_EPOCHS[kind]
    name = f"stage1-{kind}-{epochs}ep"  # an encoder trained otherwise is not reused
    folder = args.cache / f"encoder-{name}"
    if not folder.exists():
        peers_data.train_stage1(kind, recs, default_encoder(args.seed), args.test_queries, args.seed, folder,
                                epochs=epochs)
    return MultimodalEncoder.load(folder).eval(), name


# ----------------------------------------------------------------------------- measuring


def timed_search(method: peers_methods.Built, queries: np.ndarray, k: int, batch: int) -> tuple[np.ndarray, float, float]:
    """(rankings, wall s, CPU s) of searching `queries` in batches of `batch`."""
    out = []
    w0, c0 = time.perf_counter(), time.process_time()
    for a in range(0, len(queries), batch):
        out.append(method.search(queries[a : a + batch], k))
    return np.concatenate(out), time.perf_counter() - w0, time.process_time() - c0


def recall(ranked: np.ndarray, relevance: list[np.ndarray], k: int) -> float:
    return float(np.mean([bool(np.isin(r[:k][r[:k] >= 0], rel).any()) for r, rel in zip(ranked, relevance)]))


def ranked_recall(scores_of, queries: np.ndarray, relevance: list[np.ndarray], chunk: int = 100) -> dict[str, float]:
    """Recall@1/5/10 of ranking the whole pool by `scores_of(query chunk) -> (q, N)` scores."""
    top = []
    for a in range(0, len(queries), chunk):
        scores = scores_of(queries[a : a + chunk])
        best = np.argpartition(-scores, 10, axis=1)[:, :10]
        top.append(np.take_along_axis(best, np.argsort(-np.take_along_axis(scores, best, axis=1), axis=1), axis=1))
    ranked = np.concatenate(top)
    return {f"r{k}": round(recall(ranked, relevance, k), 4) for k in KS}


def measure(method: peers_methods.Built, task: peers_data.PoolTask, args: argparse.Namespace,
            hits: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """The method's row: recall, speed, bytes, build time; `hits` receives its per-query hits."""
    ranked, wall, cpu = timed_search(method, task.test_queries, 10, args.batch)
    if hits is not None:
        hits[method.name] = peers_paired.hits(ranked, task.relevance, KS)
    single = task.test_queries[: args.single_queries]
    _, wall1, cpu1 = timed_search(method, single, 10, 1)
    row = {f"r{k}": round(recall(ranked, task.relevance, k), 4) for k in KS}
    row.update(
        qps_single=round(len(single) / wall1, 2), qps_batch=round(len(ranked) / wall, 2),
        cpu_ms_single=round(1000 * cpu1 / len(single), 3), cpu_ms_batch=round(1000 * cpu / len(ranked), 3),
        bytes_per_item=round(method.bytes_per_item, 2), build_s=round(method.build_s, 2), **method.info,
    )
    if method.pool_share_rescored is not None:
        row["pool_share_rescored"] = round(method.pool_share_rescored(), 6)
    log.info("  %-14s R@1 %.3f R@5 %.3f R@10 %.3f  %7.1f q/s single %8.1f q/s batch  %6.1f B/item  build %.1f s",
             method.name, row["r1"], row["r5"], row["r10"], row["qps_single"], row["qps_batch"],
             row["bytes_per_item"], row["build_s"])
    return row


def genius_config(num_items: int, args: argparse.Namespace):
    from genius.decoder import DecoderConfig
    from genius.index import IndexConfig

    shape = {k: v for k, v in (("num_levels", args.levels), ("codebook_size", args.codebook_size)) if v}
    cfg = IndexConfig.for_corpus(num_items, **shape)
    if args.decoder:
        cfg.decoder = DecoderConfig.named(args.decoder)
    if args.quantizer_epochs is not None:
        cfg.quantizer = replace(cfg.quantizer, epochs=args.quantizer_epochs)
    cfg.quantizer = replace(cfg.quantizer, batch_size=args.quantizer_batch,
                            dead_code_threshold=0.02 * args.quantizer_batch / cfg.quantizer.codebook_size)
    cfg.decoder_training = replace(cfg.decoder_training, epochs=args.decoder_epochs, batch_size=args.decoder_batch,
                                   lr=args.decoder_lr)
    cfg.quantizer = replace(cfg.quantizer, seed=args.seed, refit_codebooks=args.refit_codebooks)
    cfg.decoder_training = replace(cfg.decoder_training, seed=args.seed)
    cfg.beam_size = args.beam
    if args.codebook_weight is not None:
        cfg.codebook_weight = args.codebook_weight
    if args.level_widths is not None:
        cfg.level_widths = list(args.level_widths)
    if args.lookahead_rows is not None:
        cfg.lookahead_rows = args.lookahead_rows
    return cfg


def run_methods(task: peers_data.PoolTask, train_vectors: np.ndarray, args: argparse.Namespace,
                keep_index: bool = False, trained: dict[str, Any] | None = None,
                genius_saved: Path | None = None,
                hits: dict[str, np.ndarray] | None = None) -> tuple[dict[str, dict[str, Any]], Any]:
    """Every method of --methods on one task: {method: row}, and the GeniusIndex if kept.

    Every method builds with --build-threads and searches with --threads; `trained` shares
    faiss training between pool sizes (peers_methods.build_faiss); `hits` receives each
    method's per-query hits (peers_paired.hits)."""
    rows: dict[str, dict[str, Any]] = {}
    pool_fp16 = task.pool.astype(np.float16)
    index = None
    for name in args.methods:
        set_threads(args.build_threads)
        if name == "genius":
            cfg = genius_config(len(task.pool), args)
            plain, reranked, index = peers_methods.build_genius(
                task.pool, task.pool_modality, task.train_queries, task.train_targets, int(task.query_modality), cfg,
                args.beam, progress=args.progress, saved=genius_saved)
            set_threads(args.threads)
            rows["genius"] = measure(plain, task, args, hits)
            rows["genius_r"] = measure(reranked, task, args, hits)
            for weight in args.codebook_weights:  # ablation rows: the same model, the beam scored otherwise
                for variant in peers_methods.genius_methods(index, args.beam, plain.build_s, weight, f"_cb{weight:g}",
                                                            distinct_ids=plain.info["distinct_ids"]):
                    rows[variant.name] = measure(variant, task, args, hits)
            for widths in args.level_widths_rows:  # and the beam widened otherwise
                suffix = "_lw" + ("-".join(map(str, widths)) or "none")
                for variant in peers_methods.genius_methods(index, args.beam, plain.build_s, suffix=suffix,
                                                            distinct_ids=plain.info["distinct_ids"],
                                                            level_widths=widths):
                    rows[variant.name] = measure(variant, task, args, hits)
            for rows_read in args.lookahead_rows_rows:  # and pruned with a lookahead
                for variant in peers_methods.genius_methods(index, args.beam, plain.build_s, suffix=f"_la{rows_read}",
                                                            distinct_ids=plain.info["distinct_ids"],
                                                            lookahead_rows=rows_read):
                    rows[variant.name] = measure(variant, task, args, hits)
            if args.level_normalized_rows:  # and with the decoder's softmax over the whole level
                for variant in peers_methods.genius_methods(index, args.beam, plain.build_s, suffix="_levelnorm",
                                                            distinct_ids=plain.info["distinct_ids"],
                                                            normalize="level"):
                    rows[variant.name] = measure(variant, task, args, hits)
            if args.every_step_rows:  # and with the decoder run at every step (same results, slower)
                for variant in peers_methods.genius_methods(index, args.beam, plain.build_s, suffix="_every_step",
                                                            distinct_ids=plain.info["distinct_ids"],
                                                            skip_forced=False):
                    rows[variant.name] = measure(variant, task, args, hits)
            continue
        sample = train_vectors[: args.rq_train] if name == "rq8x12" else train_vectors
        built = peers_methods.build_faiss(name, task.pool, sample, nprobe=args.nprobe, trained=trained)
        set_threads(args.threads)
        rows[name] = measure(built, task, args, hits)
        if name != "flat":
            rr = peers_methods.with_rerank(built, pool_fp16)
            rows[rr.name] = measure(rr, task, args, hits)
    return rows, (index if keep_index else None)


def queries_digest(task: peers_data.PoolTask) -> np.ndarray:
    """SHA-256 of the held-out queries' vectors (uint8[32]): runs pair only on the same queries."""
    data = np.ascontiguousarray(task.test_queries, dtype=np.float32).tobytes()
    return np.frombuffer(hashlib.sha256(data).digest(), dtype=np.uint8)


def peers_from_runs(task_name: str, digest: np.ndarray, hits: dict[str, np.ndarray],
                    runs: list[tuple[str, dict[str, np.ndarray]]]) -> dict[str, tuple[str, np.ndarray]]:
    """Peers (peers_paired.PEERS) this run did not measure, from earlier runs' saved hits on the
    same queries (--pair-with): {method: (hits file, hits)}; the first run holding one wins."""
    out: dict[str, tuple[str, np.ndarray]] = {}
    for source, saved in runs:
        theirs = saved.get(f"{task_name}::{peers_paired.QUERIES_KEY}")
        if theirs is None:
            continue
        if not np.array_equal(theirs, digest):
            log.warning("%s: task %s was measured on other queries (seed, --test-queries or --max-records "
                        "differ): not paired", source, task_name)
            continue
        for method in peers_paired.PEERS:
            found = saved.get(f"{task_name}::{method}")
            if found is not None and method not in hits and method not in out:
                out[method] = (source, found)
    return out


def paired_record(task: peers_data.PoolTask, hits: dict[str, np.ndarray],
                  earlier_hits: list[tuple[str, dict[str, np.ndarray]]], task_hits: dict[str, np.ndarray],
                  seed: int) -> dict[str, Any]:
    """The task's "paired" comparisons (and "paired_from": the earlier runs that supplied faiss
    rows); adds its hits and query fingerprint to `task_hits`, the run's hits file."""
    digest = queries_digest(task)
    task_hits.update({f"{task.name}::{m}": h for m, h in hits.items()})
    task_hits[f"{task.name}::{peers_paired.QUERIES_KEY}"] = digest
    earlier = peers_from_runs(task.name, digest, hits, earlier_hits)
    record: dict[str, Any] = {
        "paired": peers_paired.compare({**hits, **{m: h for m, (_, h) in earlier.items()}}, KS, seed=seed)}
    if earlier:
        record["paired_from"] = {m: source for m, (source, _) in earlier.items()}
    return record


def set_threads(n: int) -> None:
    import faiss
    import torch

    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)


def faiss_training_sample(pool: np.ndarray, limit: int, seed: int) -> np.ndarray:
    if len(pool) <= limit:
        return pool
    return pool[np.sort(np.random.default_rng(seed).choice(len(pool), limit, replace=False))]


# ----------------------------------------------------------------------------- main


def widths_list(text: str) -> list[int]:
    """'256,400,200' -> [256, 400, 200]; '' -> []."""
    try:
        return [int(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"widths must be comma-separated integers, got {text!r}") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS),
                   help="corpora to run (default: all; one whose package is missing is skipped with the reason)")
    p.add_argument("--methods", nargs="+", default=["genius", *peers_methods.FAISS_METHODS],
                   choices=["genius", *peers_methods.FAISS_METHODS],
                   help="genius (also gives genius_r) and faiss methods; compressed ones also run re-ranked (_rr100)")
    p.add_argument("--test-queries", type=int, default=1000, help="held-out queries per task (default 1000)")
    p.add_argument("--beam", type=int, default=50, help="GENIUS beam size (default 50)")
    p.add_argument("--batch", type=int, default=32, help="queries per search call for every method (default 32)")
    p.add_argument("--single-queries", type=int, default=100, help="queries timed one at a time (default 100)")
    p.add_argument("--nprobe", type=int, default=32, help="IVF-PQ cells searched (default 32)")
    p.add_argument("--faiss-train", type=int, default=65536, help="faiss training sample (default 65536 vectors)")
    p.add_argument("--curve", type=int, nargs="*", default=[2000, 10000],
                   help="WordNet pool sizes for the recall curve besides the full pool (default 2000 10000; "
                        "none: skip)")
    p.add_argument("--curve-only", action="store_true",
                   help="WordNet: measure only the recall curve's smaller pools (no full-pool rows, no latency "
                        "curve): a curve at new settings without the full pool's hour-long GENIUS fit")
    p.add_argument("--scale", type=float, nargs="*", default=[1e4, 1e5, 1e6, 1e7],
                   help="corpus sizes of the latency curve (default 1e4 1e5 1e6 1e7; none: skip)")
    p.add_argument("--scale-queries", type=int, default=100, help="queries timed per size (default 100)")
    p.add_argument("--flat-chunk", type=int, default=2_000_000,
                   help="above this many items the latency curve's flat search runs over chunks (default 2e6)")
    p.add_argument("--max-records", type=int, help="use only the first N records of each corpus (quick runs)")
    p.add_argument("--decoder", help="GENIUS decoder size (genius.decoder.DecoderConfig.named; default: small)")
    p.add_argument("--levels", type=int, help="GENIUS code levels L (default: IndexConfig.for_corpus)")
    p.add_argument("--codebook-size", type=int, help="GENIUS codes per level K (default: IndexConfig.for_corpus)")
    p.add_argument("--quantizer-epochs", type=int, help="GENIUS stage-2 epochs (default: IndexConfig.for_corpus)")
    p.add_argument("--quantizer-batch", type=int, default=1024, help="GENIUS stage-2 batch (default 1024)")
    p.add_argument("--refit-codebooks", action="store_true",
                   help="GENIUS: re-run the codebooks' k-means on the trained projection "
                        "(QuantizerConfig.refit_codebooks)")
    p.add_argument("--decoder-epochs", type=int, default=6, help="GENIUS stage-3 epochs (default 6)")
    p.add_argument("--decoder-batch", type=int, default=512, help="GENIUS stage-3 batch (default 512)")
    p.add_argument("--decoder-lr", type=float, default=3e-3, help="GENIUS stage-3 peak learning rate (default 3e-3)")
    p.add_argument("--codebook-weight", type=float,
                   help="weight of the codes' own score in GENIUS's beam (default: IndexConfig's)")
    p.add_argument("--codebook-weights", type=float, nargs="*", default=[],
                   help="ablation: also search the same GENIUS model with these codebook weights "
                        "(rows genius_cbW, genius_r_cbW)")
    p.add_argument("--level-widths", type=int, nargs="*",
                   help="GENIUS beam widths of the first code levels, then --beam (default: IndexConfig's, "
                        "256 400 200 from 2,000 items; no value: --beam throughout)")
    p.add_argument("--level-widths-rows", type=widths_list, nargs="*", default=[],
                   help="ablation: also search the same GENIUS model with these first-level widths, each "
                        "comma-separated ('' for none; rows genius_lwA-B-C, genius_r_lwA-B-C)")
    p.add_argument("--lookahead-rows", type=int,
                   help="GENIUS beam pruned by score plus a prefix's best completion read from up to this many "
                        "of its items' codes (default: IndexConfig's; 0: by score alone)")
    p.add_argument("--lookahead-rows-rows", type=int, nargs="*", default=[],
                   help="ablation: also search the same GENIUS model with these lookahead rows "
                        "(rows genius_laN, genius_r_laN)")
    p.add_argument("--every-step-rows", action="store_true",
                   help="ablation: also search the same GENIUS model with the decoder run at every step instead "
                        "of stopping once the trie forces every beam's remaining codes (rows genius_every_step, "
                        "genius_r_every_step: the same results, timed)")
    p.add_argument("--level-normalized-rows", action="store_true",
                   help="ablation: also search the same GENIUS model with the decoder's log-probabilities "
                        "normalised over each whole level instead of over the codes the trie allows there "
                        "(rows genius_levelnorm, genius_r_levelnorm)")
    p.add_argument("--genius-index", type=Path,
                   help="folder of saved full-pool GENIUS fits (one per task): a fit of the same pool and "
                        "config found there is loaded instead of refitted, otherwise saved there")
    p.add_argument("--pair-with", type=Path, nargs="*", default=[],
                   help="earlier runs' per-query hits (<name>_hits.npz, written by every run) on the same queries: "
                        "the faiss rows they hold and this run lacks join the paired comparisons (e.g. a "
                        "GENIUS-only run paired with a full run's faiss rows)")
    p.add_argument("--rq-train", type=int, default=32768,
                   help="RQ8x12's training sample (default 32768: its 4096-code k-means dominate the build)")
    p.add_argument("--encoder", help="a saved MultimodalEncoder for the image tasks (default: stage 1 trained on "
                                     "each task's training pairs, cached)")
    p.add_argument("--stage1-epochs", type=int,
                   help="epochs of that stage 1 (default per task: " +
                        ", ".join(f"{k} {v}" for k, v in STAGE1_EPOCHS.items()) + ")")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch and faiss threads of every method's search (default 1)")
    p.add_argument("--build-threads", type=int, default=os.cpu_count() or 1,
                   help="torch and faiss threads of every method's build (default: all CPUs)")
    p.add_argument("--cache", type=Path, default=Path("bench/.cache/peers"),
                   help="converted shards, embeddings and encoders (default bench/.cache/peers)")
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="folder of peers.{json,md} and plots")
    p.add_argument("--name", default="peers", help="file name stem of the results (default peers)")
    p.add_argument("--progress", action="store_true", help="progress bars while GENIUS trains")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    set_threads(args.threads)
    t_start = time.perf_counter()
    results: dict[str, Any] = {"meta": meta(args), "tasks": {}, "skipped": {}, "curve": [], "scale": []}
    out_json = args.out / f"{args.name}.json"
    task_hits: dict[str, np.ndarray] = {}  # "task::method" -> per-query hits, for pairing across runs
    earlier_hits = [(str(path), peers_paired.load_hits(path)) for path in args.pair_with]

    def save() -> None:
        results["meta"]["total_s"] = round(time.perf_counter() - t_start, 1)
        peers_report.write(results, args.out, args.name)

    for kind in args.tasks:
        missing = available(kind)
        if missing:
            log.warning("skipping %s: %s", kind, missing)
            results["skipped"][kind] = missing
            continue
        for task in load_tasks(kind, args):
            log.info("task %s: %s", task.name, {k: v for k, v in task.summary().items() if k != "relevance_rule"})
            train_vectors = faiss_training_sample(task.pool, args.faiss_train, args.seed)
            trained: dict[str, Any] = {}
            rows, index, hits = {}, None, {}
            if not (kind == "wordnet" and args.curve_only):
                rows, index = run_methods(task, train_vectors, args, keep_index=kind == "wordnet", trained=trained,
                                          genius_saved=args.genius_index / task.name if args.genius_index else None,
                                          hits=hits)
                results["tasks"][task.name] = {"summary": task.summary(), "methods": rows,
                                               **paired_record(task, hits, earlier_hits, task_hits, args.seed)}
                peers_paired.save_hits(task_hits, args.out / f"{args.name}_hits.npz")
            if kind == "wordnet":
                for size in sorted(args.curve):
                    sub = task.subset(size, args.seed)
                    sub_rows, _ = run_methods(sub, train_vectors, args, trained=trained)
                    results["curve"] += [{"n": len(sub.pool), "method": m, **{f"r{k}": r[f"r{k}"] for k in KS}}
                                         for m, r in sub_rows.items()]
                    save()
                results["curve"] += [{"n": len(task.pool), "method": m, **{f"r{k}": r[f"r{k}"] for k in KS}}
                                     for m, r in rows.items()]
                if args.scale and index is not None:
                    import peers_scale

                    peers_scale.latency_curve(task, index, [int(n) for n in args.scale], args, results["scale"], save)
            save()
    save()
    log.info("wrote %s (%.0f s in all)", out_json, time.perf_counter() - t_start)
    return 0


def meta(args: argparse.Namespace) -> dict[str, Any]:
    import faiss
    import torch

    return {
        "command": " ".join(["python bench/peers.py", *sys.argv[1:]]),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "load_average_start": os.getloadavg(),
        "threads": args.threads, "build_threads": args.build_threads, "torch": torch.__version__, "faiss": faiss.__version__,
        "beam": args.beam, "batch": args.batch, "single_queries": args.single_queries, "nprobe": args.nprobe,
        "rerank_depth": peers_methods.RERANK_DEPTH, "seed": args.seed,
        "options": {k: (str(v) if isinstance(v, Path) else [str(p) for p in v] if k == "pair_with" else v)
                    for k, v in vars(args).items()},
    }


if __name__ == "__main__":
    sys.exit(main())
