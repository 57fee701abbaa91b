"""`genius eval`: M-BEIR-style retrieval tasks from shards, GENIUS against exact kNN.

    genius eval --shards data/fashion-mnist --corpus-kind fashion-mnist \\
        --max-candidates 3000 --max-queries 500 --universal --ablations no_modality_code

Reads the shards, builds the corpus kind's tasks (`genius.tasks`), embeds every query and
candidate once with the encoder, fits a GENIUS index per task (and, with --universal, one
over the union of the pools trained on all tasks' pairs), and writes to --out:

    eval.json   every number, the config of every fit, wall times
    eval.md     a table per task: method x R@1/5/10 x ratio to exact kNN, beam sweep, ablations
    beam.png    recall@10 against beam size, one panel per task

Relevance rules (reported with the numbers): fashion-mnist is class-level, openclipart
"same title", wordnet instance-level (definition -> its synset).
"""
from __future__ import annotations

import argparse
import logging
import time
from dataclasses import replace
from pathlib import Path

log = logging.getLogger("genius.eval")

CORPUS_KINDS = ("fashion-mnist", "openclipart", "wordnet")


def add_eval_commands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `eval` on the `genius` command's subparsers; returns its parser."""
    p = subparsers.add_parser("eval", help="evaluate GENIUS against exact kNN on retrieval tasks built from shards",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, nargs="+", help="shard folder(s) or .tar files")
    p.add_argument("--corpus-kind", required=True, choices=CORPUS_KINDS, help="how to build tasks from the records")
    p.add_argument("--tasks", nargs="+", metavar="TASK",
                   help="tasks to build (default: all of the kind), e.g. text->image image->text; fashion-mnist: "
                        "text->image image->text text->image_text image->image image_text->image; openclipart: "
                        "text->image image->text; wordnet: definition->synset")
    p.add_argument("--encoder", metavar="DIR",
                   help="a saved MultimodalEncoder (default: the offline default encoder: locked MiniLM text "
                        "tower, untrained image tower)")
    p.add_argument("--embedding-cache", metavar="FILE",
                   help="Parquet file of embeddings by content for this encoder: read, extended and rewritten, so "
                        "a rerun embeds only what changed (ignored if another encoder wrote it)")
    p.add_argument("--max-candidates", type=int, default=1000, help="pool size per task (default: 1000)")
    p.add_argument("--max-queries", type=int, default=200, help="test queries per task (default: 200)")
    p.add_argument("--max-train", type=int, help="training records (default: as many as --max-candidates)")
    p.add_argument("--max-per-title", type=int, default=20,
                   help="openclipart: records kept per title (default: 20; 0 = all)")
    p.add_argument("--max-records", type=int, help="read at most this many records from the shards")
    p.add_argument("--beams", type=int, nargs="+", default=[1, 5, 10, 20, 50], help="beam sizes (default: 1 5 10 20 50)")
    p.add_argument("--main-beam", type=int, help="beam of the main table and ablations (default: the largest)")
    # Names are checked by genius.evaluation.evaluate (importing it here would slow `genius --help`).
    p.add_argument("--ablations", nargs="*", default=[], metavar="NAME",
                   help="refit with each: no_contrastive, no_modality_code, no_query_augmentation, no_mse, "
                        "no_index_task")
    p.add_argument("--ablation-scope", choices=["all", "task", "universal"], default="all",
                   help="which indexes the ablations refit (default: all)")
    p.add_argument("--universal", action="store_true",
                   help="also one index over the union of the tasks' pools, trained on all tasks' pairs")
    p.add_argument("--no-instructions", action="store_true",
                   help="universal: queries without the instruction naming the target modality")
    p.add_argument("--no-per-task", action="store_true", help="skip the per-task indexes (needs --universal)")
    p.add_argument("--size", choices=["cpu", "paper"], default="cpu",
                   help="cpu: codebooks sized to each corpus and a small decoder (default); paper: 8 x 4096, t5-small")
    p.add_argument("--levels", type=int, help="semantic levels L (default: from --size)")
    p.add_argument("--codebook-size", type=int, help="codes per level K (default: from --size)")
    p.add_argument("--decoder", choices=["small", "medium", "paper"],
                   help="decoder shape (default: from --size; small: 2 layers d=128, medium: 4 layers d=256, "
                        "paper: t5-small)")
    p.add_argument("--quantizer-epochs", type=int, help="stage-2 epochs (default: from --size)")
    p.add_argument("--quantizer-holdout", type=float, metavar="SHARE",
                   help="share of the training pairs held out for stage 2's early stopping: the epoch whose "
                   "codes rank their targets best is kept, the untrained projection included (default: 0.1, "
                   "at most 1,000 pairs; 0: train every epoch on every pair)")
    p.add_argument("--decoder-epochs", type=int, help="stage-3 epochs (default: from --size)")
    p.add_argument("--codebook-weight", type=float,
                   help="weight of the codes' own score beside the decoder's in the beam (default: 300, best "
                        "on full-pool WordNet; 0: the decoder alone, as in the paper)")
    p.add_argument("--level-widths", type=int, nargs="*", metavar="W",
                   help="beam widths of the first code levels, then the beam (default: 256 400 200 from "
                        "2,000 items, else the beam throughout; no value: the beam throughout)")
    p.add_argument("--lookahead-rows", type=int, metavar="N",
                   help="prune the codes-scored beam with a prefix's best completion read from up to N of its "
                        "items (default: 4; 0: by score alone)")
    p.add_argument("--seed", type=int, default=0, help="split and training seed (default: 0)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default: 1, fastest for these small models on a shared CPU)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--progress", action="store_true", help="progress bars for training")
    p.add_argument("--split-out", metavar="FILE",
                   help="write the record keys of the split (JSON: held_out = test pools and queries, train) "
                        "for `genius train encoder --exclude-keys FILE`")
    p.add_argument("--split-only", action="store_true", help="stop after writing --split-out")
    p.add_argument("--out", help="output folder (default: bench/results/eval-<corpus-kind>)")
    p.set_defaults(run=run_eval)
    return p


def _index_config(args: argparse.Namespace):
    from genius.decoder import DecoderConfig
    from genius.index import IndexConfig

    def make(num_items: int) -> IndexConfig:
        shape = {k: v for k, v in (("num_levels", args.levels), ("codebook_size", args.codebook_size)) if v}
        if args.size == "paper":
            cfg = IndexConfig.paper()
            cfg.quantizer = replace(cfg.quantizer, **shape)
        else:
            cfg = IndexConfig.for_corpus(num_items, **shape)
        if args.decoder is not None:
            cfg.decoder = DecoderConfig.named(args.decoder)
        if args.quantizer_epochs is not None:
            cfg.quantizer = replace(cfg.quantizer, epochs=args.quantizer_epochs)
        if args.quantizer_holdout is not None:
            cfg.quantizer = replace(cfg.quantizer, holdout_share=args.quantizer_holdout)
        if args.decoder_epochs is not None:
            cfg.decoder_training = replace(cfg.decoder_training, epochs=args.decoder_epochs)
        if args.codebook_weight is not None:
            cfg.codebook_weight = args.codebook_weight
        if args.level_widths is not None:
            cfg.level_widths = list(args.level_widths)
        if args.lookahead_rows is not None:
            cfg.lookahead_rows = args.lookahead_rows
        cfg.device = args.device
        return cfg

    return make


def run_eval(args: argparse.Namespace) -> int:
    import torch

    from genius.data.shards import ReadStats, iter_shards
    from genius.encoders import EncoderConfig, MultimodalEncoder
    from genius.evaluation import describe, evaluate
    from genius.tasks import build_tasks

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.split_only and not args.split_out:
        raise ValueError("--split-only needs --split-out FILE")
    if args.no_per_task and not args.universal:
        raise ValueError("--no-per-task needs --universal (nothing else would be fitted)")
    t0 = time.perf_counter()
    stats = ReadStats()
    records = []
    for record in iter_shards(args.shards, stats=stats):
        records.append(record)
        if args.max_records and len(records) >= args.max_records:
            break
        if len(records) % 20000 == 0:
            log.info("read %d records", len(records))
    log.info("read %d records from %d shards in %.1f s%s", len(records), stats.shards, time.perf_counter() - t0,
             f" (skipped {dict(stats.skipped)})" if stats.skipped else "")
    if not records:
        raise ValueError(f"no records in {args.shards}")
    options = {"tasks": args.tasks, "max_candidates": args.max_candidates, "max_queries": args.max_queries,
               "max_train": args.max_train, "seed": args.seed}
    if args.corpus_kind == "openclipart":
        options["max_per_title"] = args.max_per_title or None
    tasks = build_tasks(args.corpus_kind, records, **options)
    del records
    if args.split_out:
        from genius.atomic import write_json_atomic
        from genius.tasks import split_record_keys

        split = split_record_keys(tasks)
        Path(args.split_out).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.split_out, {"corpus_kind": args.corpus_kind, "options": options, **split})
        log.info("wrote the split to %s: %d held-out records, %d training records", args.split_out,
                 len(split["held_out"]), len(split["train"]))
    if args.split_only:
        return 0
    for t in tasks:
        s = t.summary()
        log.info("task %s: pool %d, %d test queries, %d training pairs, chance R@10 %.3f",
                 t.name, s["candidates"], s["test_queries"], s["train_queries"], s["chance_recall@10"])

    torch.manual_seed(args.seed)  # the default encoder's untrained image tower
    if args.encoder:
        encoder = MultimodalEncoder.load(args.encoder, device=args.device)
        description = f"saved MultimodalEncoder {args.encoder} ({encoder.cfg.model_name})"
    else:
        encoder = MultimodalEncoder.from_config(EncoderConfig(device=args.device))
        description = ("offline default encoder: locked pretrained MiniLM text tower, untrained "
                       f"{encoder.cfg.image_timm_model or 'ModifiedResNet'} image tower (seed {args.seed}), "
                       "untrained fusion (average)")
    encoder.eval()
    cache = None
    if args.embedding_cache:
        from genius.embedding_cache import EmbeddingCache, encoder_fingerprint

        cache = EmbeddingCache(args.embedding_cache, encoder_fingerprint(encoder))
    out = Path(args.out or f"bench/results/eval-{args.corpus_kind}")
    report = evaluate(
        tasks, encoder, _index_config(args), beams=args.beams, ablations=args.ablations, seed=args.seed,
        main_beam=args.main_beam, per_task=not args.no_per_task, universal=args.universal,
        universal_instructions=not args.no_instructions, ablation_scope=args.ablation_scope, progress=args.progress,
        embedding_cache=cache,
        title=f"{args.corpus_kind} ({', '.join(t.short_name for t in tasks)})", encoder_description=description,
    )
    report.meta["command"] = {k: v for k, v in vars(args).items() if k != "run"}
    report.meta["read_stats"] = {"records": stats.records, "skipped": dict(stats.skipped)}
    report.to_json(out / "eval.json")
    report.to_markdown(out / "eval.md")
    report.plot_beam(out / "beam.png")
    print(describe(report))
    log.info("wrote %s, %s, %s (%.0f s in all)", out / "eval.json", out / "eval.md", out / "beam.png",
             time.perf_counter() - t0)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m cluster.eval_cli ARGS` = `genius eval ARGS` (before the command is registered)."""
    import sys

    parser = argparse.ArgumentParser(prog="genius")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    add_eval_commands(sub)
    args = parser.parse_args(["eval", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
