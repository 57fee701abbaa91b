"""The `genius` command line: one entry point, a subcommand per job.

    genius demo                      the whole system on Fashion-MNIST: build on Ray, serve, query (--mode eval)
    genius fit    --corpus C --queries Q --out DIR
    genius search --index DIR --text "a red bicycle"
    genius info   INDEX
    genius search-batch --index DIR --queries TABLE|SHARDS --out DIR   on a Ray cluster
    genius serve  shard|replica|local --index DIR     gRPC servers;  genius query --address HOST:PORT --text ...
    genius ui     --address HOST:PORT [--shards DIR]  a search web page for the replicas
    genius index  verify|versions|add|delete|compact|gc INDEX ...
    genius data   fashion-mnist|openclipart|wordnet|folder|table|inspect ...
    genius train  encoder --shards DIR --out DIR   stage 1: align the encoders
    genius eval   --shards DIR --corpus-kind fashion-mnist|openclipart|wordnet

Every subcommand has --help.
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

log = logging.getLogger("genius")


def _fit(args: argparse.Namespace) -> int:
    from genius.encoders import EncoderConfig, MultimodalEncoder
    from genius.index import GeniusIndex, IndexConfig
    from genius.tables import TableError, read_items

    corpus = read_items(args.corpus).items
    queries = read_items(args.queries, require_target=True)
    position: dict[str, int] = {}
    for row, key in enumerate(corpus.keys):
        if key in position:
            raise TableError(args.corpus, row, f"key {key!r} repeats row {position[key]}: keys must be unique")
        position[key] = row
    missing = [(row, t) for row, t in enumerate(queries.targets) if t not in position]
    if missing:
        row, key = missing[0]
        raise TableError(args.queries, row, f"target {key!r} is not a key of {args.corpus} ({len(missing)} such rows)")
    targets = np.array([position[t] for t in queries.targets])
    overrides = {k: v for k, v in (("num_levels", args.levels), ("codebook_size", args.codebook_size),
                                   ("epochs", args.quantizer_epochs),
                                   ("holdout_share", args.quantizer_holdout)) if v is not None}
    if args.size == "paper":
        config = IndexConfig.paper()
        config.quantizer = replace(config.quantizer, **overrides)
    else:  # K and L given here also size the dead-code threshold (QuantizerConfig.for_corpus)
        config = IndexConfig.for_corpus(len(corpus), **overrides)
    if args.decoder_epochs is not None:
        config.decoder_training = replace(config.decoder_training, epochs=args.decoder_epochs)
    config.beam_size = args.beam
    if args.codebook_weight is not None:
        config.codebook_weight = args.codebook_weight
    if args.level_widths is not None:
        config.level_widths = list(args.level_widths)
    if args.lookahead_rows is not None:
        config.lookahead_rows = args.lookahead_rows
    config.device = args.device
    needs_encoder = corpus.embeddings is None or queries.items.embeddings is None
    encoder = None
    if args.encoder:
        encoder = MultimodalEncoder.load(args.encoder, device=args.device)  # a stage-1 encoder
    elif needs_encoder:
        enc_cfg = EncoderConfig(device=args.device)
        if args.encoder_model:
            enc_cfg = replace(enc_cfg, model_name=args.encoder_model, pretrained=args.encoder_pretrained)
        encoder = MultimodalEncoder.from_config(enc_cfg)
    index = GeniusIndex.fit(corpus, queries.items, targets, config, encoder=encoder, progress=not args.quiet)
    index.save(args.out)
    log.info("index of %d items written to %s", len(index), args.out)
    return 0


def _search(args: argparse.Namespace) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from genius.index import GeniusIndex
    from genius.items import Items
    from genius.tables import read_items

    index = GeniusIndex.load(args.index, device=args.device).set_decode_precision(args.decode_precision)
    if args.queries:
        queries = read_items(args.queries).items
    elif args.text or args.image:
        image = Path(args.image).read_bytes() if args.image else None
        queries = Items(texts=[args.text] if args.text else None, images=[image] if image else None)
    else:
        raise SystemExit("genius search: give --text and/or --image, or --queries FILE")
    result = index.search(queries, k=args.k, beam_size=args.beam, rerank=not args.no_rerank,
                          target_modalities=args.modality or None, rerank_with=args.rerank_with,
                          codebook_weight=args.codebook_weight, level_widths=args.level_widths,
                          lookahead_rows=args.lookahead_rows)
    if args.out:
        rows = [(q, rank, key, int(item), float(score), modality.name.lower())
                for q, (items, scores, keys, modalities) in enumerate(
                    zip(result.items, result.scores, result.keys, result.modalities))
                for rank, (item, score, key, modality) in enumerate(zip(items, scores, keys, modalities))]
        table = pa.table({
            "query": pa.array([r[0] for r in rows], pa.int64()),
            "rank": pa.array([r[1] for r in rows], pa.int32()),
            "key": pa.array([r[2] for r in rows], pa.string()),
            "item": pa.array([r[3] for r in rows], pa.int64()),
            "score": pa.array([r[4] for r in rows], pa.float64()),
            "modality": pa.array([r[5] for r in rows], pa.string()),
        })
        pq.write_table(table, args.out)
        log.info("%d results for %d queries written to %s", len(rows), len(result.items), args.out)
    else:
        for q, (keys, scores, modalities) in enumerate(zip(result.keys, result.scores, result.modalities)):
            print(f"query {q}:")
            for rank, (key, score, modality) in enumerate(zip(keys, scores, modalities)):
                print(f"  {rank + 1:3d}. {key}  [{modality.name.lower()}]  {score:.4f}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from cluster.index_cli import info

    if not (args.index_path or args.index):
        raise ValueError("genius info: give the index folder (genius info INDEX)")
    return info(args)


def _demo(args: argparse.Namespace) -> int:
    from cluster import demo

    demo.run(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from cluster import demo
    from cluster.data_cli import add_data_commands
    from cluster.eval_cli import add_eval_commands
    from cluster.index_cli import add_index_commands
    from cluster.search_batch import add_search_batch_command
    from cluster.serve_cli import DECODE_PRECISION_HELP, DECODE_PRECISIONS, add_serve_commands
    from cluster.train_cli import add_train_commands
    from cluster.ui_cli import add_ui_command

    parser = argparse.ArgumentParser(prog="genius", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="the whole system on Fashion-MNIST: Ray build, gRPC servers, queries, recall",
                       description=demo.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_arguments(p)
    p.set_defaults(run=_demo)

    p = sub.add_parser("fit", help="train quantizer and decoder and build an index from tables",
                       description="Train GENIUS on (query -> corpus item) pairs and index the corpus.\n\n"
                       "Tables are Parquet or CSV. Corpus columns: key, text, image (file path), or\n"
                       "embedding + modality. Query columns: the same plus target (a corpus key).",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True, help="corpus table (.parquet/.csv)")
    p.add_argument("--queries", required=True, help="training queries table with a target column")
    p.add_argument("--out", required=True, help="folder to write the index to")
    p.add_argument("--size", choices=["cpu", "paper"], default="cpu",
                   help="cpu: codebooks sized to the corpus and a small decoder (default); "
                        "paper: 8 x 4096 codes, t5-small decoder, 31 epochs (GPU work)")
    p.add_argument("--levels", type=int, help="semantic levels L (overrides --size)")
    p.add_argument("--codebook-size", type=int, help="codes per level K (overrides --size)")
    p.add_argument("--quantizer-epochs", type=int, help="stage-2 epochs")
    p.add_argument("--quantizer-holdout", type=float, metavar="SHARE",
                   help="share of the training pairs held out for stage 2's early stopping: the epoch whose "
                   "codes rank their targets best is kept, the untrained projection included (default: 0.1, "
                   "at most 1,000 pairs; 0: train every epoch on every pair)")
    p.add_argument("--decoder-epochs", type=int, help="stage-3 epochs")
    p.add_argument("--beam", type=int, default=50, help="default beam size stored with the index (default: 50)")
    p.add_argument("--codebook-weight", type=float,
                   help="weight of the codes' own score (query . the ID's code vectors) beside the decoder's "
                        "log-probabilities in the beam, stored with the index (default: 300, best on full-pool "
                        "WordNet; 0: the decoder alone, as in the paper; not applied where fit finds the codes "
                        "rank far below the unquantized projection)")
    p.add_argument("--level-widths", type=int, nargs="*", metavar="W",
                   help="beam widths of the first code levels, then --beam, stored with the index (default: "
                        "256 400 200 from 2,000 items, which keep more prefixes where the first codes' scores "
                        "cannot yet tell the target from its neighbours, else --beam throughout; no value: "
                        "--beam throughout)")
    p.add_argument("--lookahead-rows", type=int, metavar="N",
                   help="with the codes scoring the beam, prune each level by score plus a prefix's best "
                        "completion read from up to N of its items' codes, stored with the index (default: 4; "
                        "0: by score alone)")
    p.add_argument("--encoder", help="a stage-1 encoder folder (what `genius train encoder` writes); "
                                     "overrides --encoder-model")
    p.add_argument("--encoder-model", help="open_clip model name (default: the offline MiniLM + small CNN model)")
    p.add_argument("--encoder-pretrained", help="open_clip pretrained tag or local checkpoint path")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_fit)

    p = sub.add_parser("search", help="search an index with a text/image query or a table of queries")
    p.add_argument("--index", required=True, help="index folder written by `genius fit`")
    p.add_argument("--text", help="query text")
    p.add_argument("--image", help="query image file (with --text: an image-text query)")
    p.add_argument("--queries", help="table of queries (.parquet/.csv) instead of --text/--image")
    p.add_argument("--out", help="write results to this Parquet file (query, rank, key, item, score, modality)")
    p.add_argument("-k", "--k", type=int, default=10, help="results per query (default: 10)")
    p.add_argument("--beam", type=int, help="beam size (default: the index's)")
    p.add_argument("--codebook-weight", type=float, help="weight of the codes' own score in the beam "
                                                          "(default: the index's)")
    p.add_argument("--level-widths", type=int, nargs="*", metavar="W",
                   help="beam widths of the first code levels, then --beam (default: the index's; no value: "
                        "--beam throughout)")
    p.add_argument("--lookahead-rows", type=int, metavar="N",
                   help="rows read to estimate a prefix's best completion (default: the index's; 0: none)")
    p.add_argument("--modality", action="append", choices=["image", "text", "image_text"],
                   help="only return items of this modality (repeatable)")
    p.add_argument("--no-rerank", action="store_true", help="rank by beam score only")
    p.add_argument("--rerank-with", choices=["vectors", "codes"], default="vectors",
                   help="re-rank with stored item vectors or with vectors rebuilt from the IDs")
    p.add_argument("--decode-precision", choices=DECODE_PRECISIONS, default="fp32", help=DECODE_PRECISION_HELP)
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.set_defaults(run=_search)

    p = sub.add_parser("info", help="describe an index folder (its current version)")
    p.add_argument("index_path", nargs="?", metavar="INDEX", help="index folder")
    p.add_argument("--index", help="index folder (same as INDEX)")
    p.add_argument("--json", action="store_true", help="print the manifest (without the file list) as JSON")
    p.set_defaults(run=_info)

    add_index_commands(sub)
    add_search_batch_command(sub)
    add_serve_commands(sub)
    add_ui_command(sub)
    add_data_commands(sub)
    add_train_commands(sub)
    add_eval_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as exc:
        # Input errors are the user's to fix: one plain line naming file and row, no traceback.
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
