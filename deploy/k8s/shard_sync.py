"""Copy one vector shard of a published index onto a shard server's own volume, and keep it current.

    python shard_sync.py --store /data/indexes/my-index --dest /shard/my-index --shard 3 --once
    python shard_sync.py --store /data/indexes/my-index --dest /shard/my-index --shard 3 --interval 5

A shard server (`genius serve shard --index DEST --range N`) reads, of each index version, the
manifest, vector shard N and the item tables that overlap its item range. This script copies
exactly those files of the versions the store publishes (index folder format v2: CURRENT,
v-<n>/manifest.json) into DEST: each version into a staging folder first, checked against the
manifest's sizes and sha256, then renamed into place; DEST/CURRENT follows the store's CURRENT
last (atomic rename). A damaged file in the store is reported and that version skipped, so the
shard server keeps answering for the versions it has. Local versions other than the store's
newest --keep and its CURRENT are removed. Standard library only; it runs in the genius image as
the shard pod's init container (--once: wait for a published version, copy it, exit) and as a
sidecar (a pass every --interval seconds).

Mounted from the ConfigMap genius-shard-sync (deploy/k8s/kustomization.yaml); exercised by
tests/deploy/test_manifests.py.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path

log = logging.getLogger("shard_sync")
VERSION = re.compile(r"^v-(\d+)$")
CHUNK = 1 << 22


class Damaged(Exception):
    """A file in the store does not match its manifest entry."""


def read_current(root: Path) -> str | None:
    try:
        name = (root / "CURRENT").read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    return name if VERSION.match(name) else None


def versions(root: Path) -> list[str]:
    found = [p.name for p in root.iterdir() if p.is_dir() and VERSION.match(p.name)] if root.is_dir() else []
    return sorted(found, key=lambda n: int(VERSION.match(n).group(1)))


def shard_files(manifest: dict, shard: int) -> list[str] | None:
    """Relative paths shard `shard` needs (None: the version has no such shard)."""
    shards = manifest["vector_shards"]
    if not 0 <= shard < len(shards):
        return None
    r = shards[shard]
    tables = [t["file"] for t in manifest["item_tables"] if t["start"] < r["end"] and t["end"] > r["start"]]
    return [r["file"], *tables]


def copy_checked(src: Path, dst: Path, entry: dict | None, verify: bool) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(CHUNK):
            fout.write(chunk)
            if verify:
                digest.update(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    if entry is None:
        raise Damaged(f"{src}: not listed in the manifest")
    size = dst.stat().st_size
    if size != entry["size"]:
        raise Damaged(f"{src}: {size} bytes, the manifest says {entry['size']}")
    if verify and digest.hexdigest() != entry["sha256"]:
        raise Damaged(f"{src}: sha256 differs from the manifest")


def sync_version(store: Path, dest: Path, name: str, shard: int, verify: bool) -> bool:
    """Copy shard `shard` of version `name`; False when the version has no such shard."""
    if (dest / name / "manifest.json").is_file():
        return True
    manifest_text = (store / name / "manifest.json").read_text(encoding="utf-8")
    manifest = json.loads(manifest_text)
    files = shard_files(manifest, shard)
    if files is None:
        log.warning("%s has %d vector shards: nothing to serve for shard %d", name,
                    len(manifest["vector_shards"]), shard)
        return False
    staging = dest / f".staging-{name}"
    shutil.rmtree(staging, ignore_errors=True)
    started = time.monotonic()
    try:
        for rel in files:
            copy_checked(store / name / rel, staging / rel, manifest["files"].get(rel), verify)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    (staging / "manifest.json").write_text(manifest_text, encoding="utf-8")  # last: marks the copy complete
    os.replace(staging, dest / name)
    log.info("%s: shard %d copied (%d files) in %.1f s", name, shard, len(files), time.monotonic() - started)
    return True


def set_current(dest: Path, name: str) -> None:
    if read_current(dest) == name:
        return
    tmp = dest / ".CURRENT.tmp"
    tmp.write_text(name, encoding="utf-8")
    os.replace(tmp, dest / "CURRENT")
    log.info("CURRENT -> %s", name)


def prune(dest: Path, wanted: set[str]) -> None:
    """Remove local versions the store no longer offers (never the local CURRENT), and leftovers."""
    current = read_current(dest)
    for name in versions(dest):
        if name != current and name not in wanted:
            shutil.rmtree(dest / name, ignore_errors=True)
            log.info("removed %s", name)
    for stale in dest.glob(".staging-*"):
        shutil.rmtree(stale, ignore_errors=True)


def sync_once(store: Path, dest: Path, shard: int, keep: int = 3, verify: bool = True) -> str | None:
    """One pass: copy what the store publishes (newest --keep versions, CURRENT included) and move
    DEST/CURRENT to the store's CURRENT. Returns the local CURRENT."""
    dest.mkdir(parents=True, exist_ok=True)
    current = read_current(store)
    if current is None:
        return read_current(dest)
    wanted = [v for v in versions(store)[-keep:] if v != current] + [current]
    for name in wanted:
        try:
            if sync_version(store, dest, name, shard, verify) and name == current:
                set_current(dest, name)
        except (Damaged, OSError, ValueError, KeyError) as err:
            log.error("%s: not copied, still serving %s: %s", name, read_current(dest), err)
    prune(dest, set(wanted))
    return read_current(dest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shard_sync.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--store", required=True, help="the published index folder (shared storage, read-only)")
    p.add_argument("--dest", required=True, help="index folder on this shard server's volume")
    p.add_argument("--shard", type=int, required=True, help="vector shard number (the pod's ordinal)")
    p.add_argument("--once", action="store_true", help="wait for a version, copy it, exit (init container)")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between passes (default: 5)")
    p.add_argument("--timeout", type=float, default=3600.0, help="--once: seconds to wait for a version")
    p.add_argument("--keep", type=int, default=3, help="versions kept on the volume (default: 3)")
    p.add_argument("--no-verify", action="store_true", help="check sizes only, not sha256")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s shard-sync %(levelname)s: %(message)s")
    store, dest = Path(args.store), Path(args.dest)
    deadline = time.monotonic() + args.timeout
    while True:
        current = sync_once(store, dest, args.shard, args.keep, not args.no_verify)
        if args.once and current is not None:
            return 0
        if args.once and time.monotonic() > deadline:
            log.error("no version of %s to serve after %.0f s", store, args.timeout)
            return 1
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())
