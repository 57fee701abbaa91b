"""`genius data ...`: convert corpora to WebDataset shards and inspect shard folders.

    genius data fashion-mnist --out shards/fmnist            (Debian: dataset-fashion-mnist)
    genius data openclipart   --out shards/ocal --workers 2   (Debian: openclipart-png, -svg)
    genius data wordnet       --out shards/wordnet           (Debian: wordnet-base)
    genius data folder        --source DIR   --out shards/mine
    genius data table         --source T.csv --out shards/mine
    genius data inspect shards/fmnist [--verify]

Every converter takes --source (where its files are), --limit (a sample), --shard-size,
and writes <prefix>-NNNNNN.tar plus shards.json. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("genius.data")


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _progress(args: argparse.Namespace):
    from tqdm import tqdm

    return functools.partial(tqdm, unit="rec", dynamic_ncols=True, disable=args.quiet or None)


def _report(manifest: dict[str, Any], out: str, started: float) -> int:
    skipped = manifest["skipped"]
    log.info("%s: %d records (%s) in %d shards written to %s in %.1f s%s", manifest["dataset"], manifest["items"],
             ", ".join(f"{k} {v}" for k, v in manifest["modalities"].items()), len(manifest["shards"]), out,
             time.monotonic() - started, f"; skipped {skipped}" if skipped else "")
    return 0


def _fashion_mnist(args: argparse.Namespace) -> int:
    from genius.data import fashion_mnist

    started = time.monotonic()
    splits = tuple(args.split) if args.split else fashion_mnist.SPLITS
    manifest = fashion_mnist.convert(args.out, source=args.source, limit=args.limit, shard_size=args.shard_size,
                                     splits=splits, seed=args.seed, progress=_progress(args))
    return _report(manifest, args.out, started)


def _openclipart(args: argparse.Namespace) -> int:
    from genius.data import openclipart

    started = time.monotonic()
    manifest = openclipart.convert(args.out, source=args.source, svg_source=args.svg_source, limit=args.limit,
                                   shard_size=args.shard_size, max_side=args.max_side, **_pixels(args),
                                   workers=args.workers, progress=_progress(args))
    return _report(manifest, args.out, started)


def _wordnet(args: argparse.Namespace) -> int:
    from genius.data import wordnet

    started = time.monotonic()
    manifest = wordnet.convert(args.out, source=args.source, limit=args.limit, shard_size=args.shard_size,
                               progress=_progress(args))
    return _report(manifest, args.out, started)


def _folder(args: argparse.Namespace) -> int:
    from genius.data import generic

    started = time.monotonic()
    manifest = generic.convert_folder(args.out, args.source, prefix=args.prefix, limit=args.limit,
                                      shard_size=args.shard_size, max_side=args.max_side, **_pixels(args),
                                      require_caption=args.require_caption, progress=_progress(args))
    return _report(manifest, args.out, started)


def _table(args: argparse.Namespace) -> int:
    from genius.data import generic

    started = time.monotonic()
    manifest = generic.convert_table(args.out, args.source, image_column=args.image_column,
                                     text_column=args.text_column, key_column=args.key_column, prefix=args.prefix,
                                     limit=args.limit, shard_size=args.shard_size, max_side=args.max_side,
                                     **_pixels(args), require_caption=args.require_caption,
                                     progress=_progress(args))
    return _report(manifest, args.out, started)


def _inspect(args: argparse.Namespace) -> int:
    """Print a shard folder's manifest summary; with --verify (or without a manifest),
    read every record and print what was read and skipped. Exit 1 when records are lost."""
    from genius.data.shards import ReadStats, ShardReader, read_manifest

    manifest = read_manifest(args.path[0]) if len(args.path) == 1 and Path(args.path[0]).is_dir() else None
    if manifest is not None:
        print(f"dataset: {manifest['dataset']}   source: {manifest['source']}   created: {manifest['created']}")
        print(f"items: {manifest['items']}   modalities: {json.dumps(manifest['modalities'])}")
        print(f"skipped while converting: {json.dumps(manifest['skipped'])}")
        print(f"shards: {len(manifest['shards'])} ({sum(s['bytes'] for s in manifest['shards']) / 1e6:.1f} MB)")
        for shard in manifest["shards"]:
            print(f"  {shard['file']}  {shard['items']:7d} items  {shard['bytes'] / 1e6:8.1f} MB  "
                  f"{json.dumps(shard['modalities'])}")
        if manifest.get("notes"):
            print(f"notes: {json.dumps(manifest['notes'], ensure_ascii=False)}")
        if not args.verify and not args.show:
            return 0
    else:
        print("no shards.json manifest: reading the shards")
    verify = args.verify or manifest is None
    from tqdm import tqdm

    stats = ReadStats()
    reader = ShardReader(args.path, check_images=args.check_images, stats=stats)
    shown = 0
    for record in tqdm(reader, unit="rec", disable=args.quiet or None, desc="reading"):
        if shown < args.show:
            shown += 1
            print(f"  {record.key}  {record.modality.name.lower()}  {record.image_ext or '-'}  "
                  f"{(record.text or '')[:60]!r}  {json.dumps(record.meta, ensure_ascii=False)[:120]}")
        if not verify and shown >= args.show:
            return 0
    print(f"read: {stats.records} records from {stats.shards} shards")
    print(f"skipped records: {json.dumps(dict(stats.skipped))}   shard errors: {json.dumps(dict(stats.shard_errors))}")
    if stats.failed_shards:
        print("damaged shards: " + ", ".join(stats.failed_shards))
    lost = not stats.ok or (manifest is not None and stats.records != manifest["items"])
    if manifest is not None and stats.records != manifest["items"]:
        print(f"MISMATCH: the manifest lists {manifest['items']} records")
    return 1 if lost else 0


def _common(p: argparse.ArgumentParser, *, source_required: bool = False, source_help: str) -> None:
    p.add_argument("--out", required=True, help="folder to write the shards and shards.json to")
    p.add_argument("--source", required=source_required, help=source_help)
    p.add_argument("--limit", type=_positive, help="convert at most N records (a sample)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _image_options(p: argparse.ArgumentParser, max_side: int | None) -> None:
    p.add_argument("--max-side", type=_positive, default=max_side,
                   help=f"shrink images to at most this many pixels on the long side (default: {max_side})")
    # No default here: importing genius.encoders (torch) would slow down every `genius --help`.
    p.add_argument("--max-pixels", type=_positive,
                   help="skip images with more pixels than this (default: the encoders' bound, 36 MP)")


def _pixels(args: argparse.Namespace) -> dict[str, int]:
    return {"max_pixels": args.max_pixels} if args.max_pixels else {}


def add_data_commands(subparsers: Any) -> None:
    """Register `genius data <dataset>` on the `genius` CLI's subparsers."""
    data = subparsers.add_parser("data", help="convert corpora to WebDataset shards; inspect shard folders",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = data.add_subparsers(dest="data_command", required=True, metavar="DATASET")

    p = sub.add_parser("fashion-mnist", help="Fashion-MNIST: 70k 28x28 images, captions from class names")
    _common(p, source_help="folder of the idx .gz files (default: /usr/share/datasets/fashion-mnist, "
                           "from apt-get install dataset-fashion-mnist)")
    p.add_argument("--shard-size", type=_positive, default=10_000, help="records per shard (default: 10000)")
    p.add_argument("--split", action="append", choices=["train", "test"], help="only this split (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="seed of the caption templates (default: 0)")
    p.set_defaults(run=_fashion_mnist)

    p = sub.add_parser("openclipart", help="Openclipart: ~6,900 clip-art PNGs, captions from their titles")
    _common(p, source_help="folder of the PNGs (default: /usr/share/openclipart/png, "
                           "from apt-get install openclipart-png)")
    p.add_argument("--svg-source", help="folder of the matching SVGs, for keywords (default: the PNG folder's "
                                        "sibling svg/, from apt-get install openclipart-svg)")
    p.add_argument("--shard-size", type=_positive, default=10_000, help="records per shard (default: 10000)")
    _image_options(p, 256)
    p.add_argument("--workers", type=_positive, default=1, help="processes decoding images (default: 1)")
    p.set_defaults(run=_openclipart)

    p = sub.add_parser("wordnet", help="WordNet: ~117k synsets, text only (lemmas; definitions in metadata)")
    _common(p, source_help="folder of data.noun, data.verb, data.adj, data.adv (default: /usr/share/wordnet, "
                           "from apt-get install wordnet-base)")
    p.add_argument("--shard-size", type=_positive, default=20_000, help="records per shard (default: 20000)")
    p.set_defaults(run=_wordnet)

    for name, help_text, source_help in (
        ("folder", "a folder of images with optional <stem>.txt captions and <stem>.json metadata",
         "the image folder (searched recursively)"),
        ("table", "a Parquet/CSV/TSV table of image paths, captions and metadata columns",
         "the table file (.parquet, .csv, .tsv); image paths are relative to its folder"),
    ):
        p = sub.add_parser(name, help=help_text)
        _common(p, source_required=True, source_help=source_help)
        p.add_argument("--shard-size", type=_positive, default=10_000, help="records per shard (default: 10000)")
        p.add_argument("--prefix", help="shard name prefix (default: the folder's or table's name)")
        _image_options(p, None)
        p.add_argument("--require-caption", action="store_true", help="skip images without a caption")
        if name == "table":
            p.add_argument("--image-column", help="column of image paths or bytes (default: image, image_path, path, ...)")
            p.add_argument("--text-column", help="column of captions (default: text, caption or title)")
            p.add_argument("--key-column", help="column of record keys (default: key or id; else the row number)")
        p.set_defaults(run=_folder if name == "folder" else _table)

    p = sub.add_parser("inspect", help="print a shard folder's manifest; --verify reads every record")
    p.add_argument("path", nargs="+", help="a shard folder, or shard files")
    p.add_argument("--verify", action="store_true", help="read every record and count what is skipped")
    p.add_argument("--show", type=int, default=0, metavar="N", help="print the first N records")
    p.add_argument("--check-images", choices=["verify", "decode", "none"], default="verify",
                   help="how to check images while reading (default: verify, no pixel decoding)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_inspect)
