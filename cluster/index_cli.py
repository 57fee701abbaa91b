"""`genius index ...`: look after an index folder (format v2, genius.store).

    genius index build --shards P --out DIR   build on a Ray cluster (resumable)
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

    if bool(args.corpus) == bool(args.shards):
        raise ValueError("genius index add: give --corpus TABLE or --shards PATTERN")
    if args.shards:
        from cluster.build.add import add_shards

        version, counts = add_shards(args.index, args.shards, address=args.address, actors=args.actors,
                                     cpus_per_actor=args.cpus_per_actor, work=args.work, resume=args.resume,
                                     progress=not args.quiet)
        print(f"published {version}: {counts['added']} items added; skipped {counts['skipped'] or 'none'}; "
              f"unreadable shards {counts['unreadable_shards'] or 'none'}")
        return 0
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

    add_build_command(cmds)

    c = cmds.add_parser("verify", help="check every file's size and sha256 against the manifest; exit 1 if damaged")
    c.add_argument("index", help="index folder (or one version folder INDEX/v-<n>)")
    c.add_argument("--all", action="store_true", help="check every published version, not only CURRENT's")
    c.set_defaults(run=_verify)

    c = cmds.add_parser("versions", help="list the published versions (* marks CURRENT)")
    c.add_argument("index", help="index folder")
    c.set_defaults(run=_versions)

    c = cmds.add_parser("add", help="quantize items with the index's codebooks and publish a version holding them",
                        description="Add items from a table (the columns of `genius fit --corpus`) in this process, "
                                    "or from WebDataset shards on a Ray cluster (--shards: embed and quantize actor "
                                    "pools, resumable). Keys must be new. Texts and images are embedded with the "
                                    "index's stored encoder.")
    c.add_argument("index", help="index folder")
    c.add_argument("--corpus", help="table of new items (.parquet/.csv/.tsv)")
    c.add_argument("--shards", help="new WebDataset shards (folder, glob, brace pattern), embedded on the cluster")
    c.add_argument("--address", help="Ray cluster address for --shards (default: as for index build)")
    c.add_argument("--actors", type=int, default=2, help="actors for --shards (default: 2)")
    c.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs per actor for --shards (default: 1)")
    c.add_argument("--work", help="job folder for --shards (default: INDEX/.add)")
    c.add_argument("--resume", action="store_true", help="--shards: continue the job in the job folder")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    c.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    c.set_defaults(run=_add)

    c = cmds.add_parser("delete", help="publish a version without the items of these keys")
    c.add_argument("index", help="index folder")
    c.add_argument("--key", action="append", help="key of an item to delete (repeatable)")
    c.add_argument("--keys-file", "--keys", dest="keys_file", help="file with one key per line")
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


def _build(args: argparse.Namespace) -> int:
    from cluster.build.pipeline import BuildConfig, build_index

    config = BuildConfig(
        shards=args.shards, out=args.out, work=args.work, address=args.address, resume=args.resume,
        actors=args.actors, cpus_per_actor=args.cpus_per_actor, num_gpus_per_actor=args.num_gpus_per_actor,
        batch_size=args.batch_size, encoder=args.encoder, pairs=args.pairs, size=args.size, levels=args.levels,
        codebook_size=args.codebook_size, quantizer_epochs=args.quantizer_epochs,
        quantizer_holdout=args.quantizer_holdout, decoder_epochs=args.decoder_epochs,
        decoder=args.decoder, ranges_per_modality=args.ranges_per_modality, train_workers=args.train_workers,
        seed=args.seed, timeout_s=args.timeout, progress=not args.quiet,
    )
    result = build_index(config)
    print(f"published {result.version}: {result.items} items")
    if result.skipped:
        print("skipped records: " + ", ".join(f"{k} {v}" for k, v in sorted(result.skipped.items())))
    for shard in result.unreadable_shards:
        print(f"unreadable shard (reported, not indexed): {shard}")
    print("seconds by stage: " + ", ".join(f"{k} {v:.1f}" for k, v in result.stage_seconds.items()))
    return 0


def add_build_command(cmds: argparse._SubParsersAction) -> None:
    c = cmds.add_parser(
        "build", help="build an index from WebDataset shards on a Ray cluster (embed, train, quantize, merge, publish)",
        description="Build an index on the Ray cluster at --address (or a local one started here): embed every "
                    "shard (an actor pool), train the quantizer and the decoder (Ray Train), quantize, merge the "
                    "trie partitions (one Ray task each) and publish a new version of OUT. The job folder "
                    "records every unit; --resume skips what is done.")
    c.add_argument("--shards", required=True, help="shard folder, glob, brace pattern (data-{000..009}.tar) or file")
    c.add_argument("--out", required=True, help="index folder to publish into")
    c.add_argument("--work", help="job folder (default: OUT/.build; shared storage on a real cluster)")
    c.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else the cluster `ray start` "
                                     "runs on this machine, else a new local one; `local`: always a new one)")
    c.add_argument("--resume", action="store_true", help="continue the job in the job folder, skipping what is done")
    c.add_argument("--actors", type=int, default=2, help="embedding and quantization actors (default: 2)")
    c.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs per actor = its torch threads (default: 1)")
    c.add_argument("--num-gpus-per-actor", type=float, help="GPUs per actor, fractions allowed "
                                                              "(default: 1 when the cluster has GPUs, else 0)")
    c.add_argument("--batch-size", type=int, default=256, help="records embedded together (default: 256)")
    c.add_argument("--encoder", help="stage-1 encoder folder (genius train encoder); default: the offline model")
    c.add_argument("--pairs", help="training pairs table: query columns (text or embedding + modality) and target "
                                   "(an item key); default: the \"queries\" lists in the shards' JSON metadata")
    c.add_argument("--size", choices=["cpu", "paper"], default="cpu", help="as genius fit --size")
    c.add_argument("--levels", type=int, help="semantic levels L")
    c.add_argument("--codebook-size", type=int, help="codes per level K")
    c.add_argument("--quantizer-epochs", type=int, help="stage-2 epochs")
    c.add_argument("--quantizer-holdout", type=float, metavar="SHARE",
                   help="share of the training pairs held out for stage 2's early stopping: the epoch whose "
                   "codes rank their targets best is kept, the untrained projection included (default: 0.1, "
                   "at most 1,000 pairs; 0: train every epoch on every pair)")
    c.add_argument("--decoder-epochs", type=int, help="stage-3 epochs")
    c.add_argument("--decoder", choices=["small", "medium", "paper"], help="decoder size (default: by --size)")
    c.add_argument("--ranges-per-modality", type=int, default=1, help="trie partitions per modality (default: 1)")
    c.add_argument("--train-workers", type=int, default=1, help="data-parallel decoder training workers (default: 1)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--timeout", type=float, default=3600.0, help="seconds without any unit finishing before giving up")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    c.set_defaults(run=_build)
