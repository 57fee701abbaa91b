"""`genius index ...`: look after an index folder (format v2, genius.store).

    genius index verify DIR          sizes and sha256 of every file of the current version
    genius index versions DIR        the published versions, which one is CURRENT
    genius index add DIR --corpus T  quantize and add items (keys must be new)
    genius index delete DIR --key K  remove items by key (tombstones; search skips them)
    genius index compact DIR         drop tombstones, renumber items
    genius index gc DIR --keep N     remove old versions and abandoned staging folders
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger("genius")


def _verify(args: argparse.Namespace) -> int:
    from genius.store.verify import verify_all, verify_version

    reports = verify_all(args.index) if args.all else [verify_version(args.index)]
    for report in reports:
        for line in report.lines():
            print(line)
    if not reports:
        print(f"{args.index}: no published versions")
        return 1
    return 0 if all(r.ok for r in reports) else 1


def _versions(args: argparse.Namespace) -> int:
    from genius.store.layout import list_versions, read_current, version_name
    from genius.store.manifest import Manifest

    current = read_current(args.index)
    for number in list_versions(args.index):
        name = version_name(number)
        try:
            m = Manifest.read(Path(args.index) / name)
            detail = f"{m.num_live} items ({m.num_deleted} deleted), parent {m.parent}, created {m.created}"
        except (ValueError, FileNotFoundError) as exc:
            detail = f"unreadable: {exc}"
        print(f"{'*' if name == current else ' '} {name}  {detail}")
    return 0


def _add(args: argparse.Namespace) -> int:
    from genius.index import GeniusIndex
    from genius.tables import read_items

    index = GeniusIndex.load(args.index, device=args.device)
    items = read_items(args.corpus).items
    new = index.add(items)
    log.info("added %d items: %s now holds %d items (%s)", len(items), args.index, len(new), new.path.name)
    return 0


def _delete(args: argparse.Namespace) -> int:
    from genius.store.update import delete_keys

    keys = list(args.key or [])
    if args.keys_file:
        keys += [line.rstrip("\n") for line in Path(args.keys_file).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not keys:
        raise ValueError("genius index delete: give --key KEY (repeatable) or --keys-file FILE")
    path = delete_keys(args.index, keys, missing_ok=args.missing_ok)
    log.info("published %s", path)
    return 0


def _compact(args: argparse.Namespace) -> int:
    from genius.store.update import compact

    path = compact(args.index)
    log.info("published %s" % path if path else "nothing to compact")
    return 0


def _gc(args: argparse.Namespace) -> int:
    from genius.store.publish import gc

    for path in gc(args.index, keep=args.keep, staging_age_s=args.staging_age):
        print(f"removed {path}")
    return 0


def info(args: argparse.Namespace) -> int:
    """`genius info`: what an index folder holds (its current version's manifest)."""
    from genius.store.layout import resolve_version
    from genius.store.manifest import Manifest

    version_dir = resolve_version(args.index_path or args.index)
    m = Manifest.read(version_dir)
    if args.json:
        print(json.dumps({k: v for k, v in m.to_dict().items() if k != "files"}, indent=2))
        return 0
    q = m.config.get("quantizer", {})
    size = sum(e["size"] for e in m.files.values())
    print(f"version: {version_dir.name} (format {m.format_version}, parent {m.parent}, created {m.created})")
    print(f"items: {m.num_live} live, {m.num_deleted} deleted   by modality: "
          + ", ".join(f"{k} {v}" for k, v in sorted(m.modality_counts.items())))
    print(f"IDs: {m.num_levels} levels x {m.codebook_size} codes = {m.id_width} bytes   "
          f"modality code: {q.get('use_modality_code', True)}   embedding dim: {m.embed_dim}")
    for p in m.partitions:
        print(f"  partition {p['modality']:10s} first codes [{p['code_lo']}, {p['code_hi']}): {p['count']} items")
    print(f"item tables: {len(m.item_tables)}   vector shards: {len(m.vector_shards)}   "
          f"encoder stored: {m.has_encoder}   files: {len(m.files)}, {size:,} bytes")
    return 0


def add_index_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("index", help="verify, update and look after an index folder",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cmds = p.add_subparsers(dest="index_command", required=True, metavar="ACTION")

    c = cmds.add_parser("verify", help="check every file's size and sha256 against the manifest; exit 1 if damaged")
    c.add_argument("index", help="index folder (or one version folder INDEX/v-<n>)")
    c.add_argument("--all", action="store_true", help="check every published version, not only CURRENT's")
    c.set_defaults(run=_verify)

    c = cmds.add_parser("versions", help="list the published versions (* marks CURRENT)")
    c.add_argument("index", help="index folder")
    c.set_defaults(run=_versions)

    c = cmds.add_parser("add", help="quantize items with the index's codebooks and publish a version holding them",
                        description="Add items from a table (the columns of `genius fit --corpus`; keys must be new). "
                                    "Texts and images are embedded with the index's stored encoder.")
    c.add_argument("index", help="index folder")
    c.add_argument("--corpus", required=True, help="table of new items (.parquet/.csv/.tsv)")
    c.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    c.set_defaults(run=_add)

    c = cmds.add_parser("delete", help="publish a version without the items of these keys")
    c.add_argument("index", help="index folder")
    c.add_argument("--key", action="append", help="key of an item to delete (repeatable)")
    c.add_argument("--keys-file", help="file with one key per line")
    c.add_argument("--missing-ok", action="store_true", help="ignore keys that are not in the index")
    c.set_defaults(run=_delete)

    c = cmds.add_parser("compact", help="publish a version with deleted items dropped and the rest renumbered")
    c.add_argument("index", help="index folder")
    c.set_defaults(run=_compact)

    c = cmds.add_parser("gc", help="remove all but the newest versions (never CURRENT) and abandoned staging folders")
    c.add_argument("index", help="index folder")
    c.add_argument("--keep", type=int, default=2, help="versions to keep (default: 2)")
    c.add_argument("--staging-age", type=float, default=3600.0,
                   help="remove staging folders untouched for this many seconds (default: 3600)")
    c.set_defaults(run=_gc)
