"""Index store at scale: merge rate against a plain numpy sort, bytes per item, open cost, expansion.

    python bench/store.py                       # N = 1e5, 1e6, 1e7, 1e8
    python bench/store.py --sizes 100000 1000000

For each N: synthetic 12-byte IDs (8 levels x 4096 codes) with skewed code usage like real RQ
codes (one first-level cell holds 10 % of the items, the rest Zipf-like), written as per-shard
ID tables (Parquet: key, modality, id); then, each in a fresh process:
- merge: `genius.index.publish_merged` (bucket pass, key check, per-partition sort and write,
  publish) with a small untrained model: IDs/s and peak RSS; beside it the raw numpy sort of
  the same 12-byte keys (the faster of np.lexsort on their big-endian words and np.sort on the
  keys as 12-byte void values) in the same process: merge_ratio = merge rate / sort rate;
- open: `GeniusIndex.load`: seconds and RSS (absolute and the increase over the process before
  the load), which must stay flat in N;
- expand: one trie expansion of 50 beams that all sit in the hot first-level cell (ms);
- hit lookup (at the N given by --lookup-n): keys and metadata of 100 random items from the
  memory-mapped Arrow IPC item tables vs Parquet with a row-group index.
Results: bench/results/store.json (one object per N under "runs") and store.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
log = logging.getLogger("bench.store")

LEVELS, CODES, DIM = 8, 4096, 16
HOT_CODE = 7
HOT_SHARE = 0.10


def make_codes(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 8) codes: level 0 has a hot cell (10 %) and Zipf-like usage, level 1 Zipf-like, the rest uniform."""
    ranks = np.arange(1, CODES + 1, dtype=np.float64)
    zipf = ranks ** -0.8
    zipf /= zipf.sum()
    codes = rng.integers(0, CODES, (n, LEVELS), dtype=np.int64)
    first = rng.choice(CODES, size=n, p=zipf)
    first[rng.random(n) < HOT_SHARE] = HOT_CODE
    codes[:, 0] = first
    codes[:, 1] = rng.choice(CODES, size=n, p=zipf)
    return codes


def write_id_tables(folder: Path, n: int, shard_rows: int, seed: int) -> list[Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from genius.idcodec import IdCodec

    codec = IdCodec(LEVELS, CODES)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s, start in enumerate(range(0, n, shard_rows)):
        rows = min(shard_rows, n - start)
        rng = np.random.default_rng([seed, s])
        ids = codec.pack(make_codes(rng, rows))
        modality = rng.choice(np.array([0, 1, 2], dtype=np.int8), size=rows, p=[0.6, 0.3, 0.1])
        keys = pa.array(np.char.add("item-", np.arange(start, start + rows).astype(str)), pa.string())
        table = pa.table({
            "key": keys,
            "modality": pa.array(modality, pa.int8()),
            "id": pa.FixedSizeBinaryArray.from_buffers(pa.binary(codec.width), rows, [None, pa.py_buffer(ids)]),
            "source": pa.array(np.char.add(f"shard-{s:05d}.tar/", np.arange(rows).astype(str)), pa.string()),
        })
        path = folder / f"ids-{s:05d}.parquet"
        pq.write_table(table, path)
        paths.append(path)
    return paths


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def tiny_model():
    """An untrained model of the right shape (the store does not care what it learned)."""
    from genius.decoder import DecoderConfig, GeniusDecoder
    from genius.index import IndexConfig
    from genius.quantizer import ModalResidualQuantizer, QuantizerConfig

    config = IndexConfig(quantizer=QuantizerConfig(num_levels=LEVELS, codebook_size=CODES),
                         decoder=DecoderConfig.small())
    quantizer = ModalResidualQuantizer.from_config(DIM, config.quantizer)
    decoder = GeniusDecoder(config.decoder, DIM, LEVELS, CODES)
    return config, quantizer, decoder


# ----------------------------------------------------------------------------- child steps


def child_merge(args: argparse.Namespace) -> dict:
    import pyarrow.parquet as pq
    import torch

    from genius.idcodec import id_words
    from genius.index import publish_merged

    torch.set_num_threads(1)
    paths = sorted(Path(args.ids).glob("*.parquet"))
    config, quantizer, decoder = tiny_model()
    config.ranges_per_modality = args.ranges
    t0 = time.perf_counter()
    version = publish_merged(args.index, paths, config, quantizer, decoder, work_dir=args.work)
    merge_s = time.perf_counter() - t0
    merge_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    n = sum(pq.ParquetFile(p).metadata.num_rows for p in paths)
    # The same 12-byte keys, sorted by numpy in this process (after the merge: its peak RSS is apart).
    ids = np.concatenate([np.asarray(pq.read_table(p, columns=["id"]).column("id").combine_chunks().buffers()[1],
                                     dtype=np.uint8)[: pq.ParquetFile(p).metadata.num_rows * 12].reshape(-1, 12)
                          for p in paths])
    sorts = {}
    t0 = time.perf_counter()
    words = id_words(ids)
    np.lexsort(words[::-1])
    sorts["lexsort_words"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    np.sort(ids.view("V12").ravel())
    sorts["sort_void12"] = time.perf_counter() - t0
    best = min(sorts, key=sorts.get)
    trie_bytes = sum(f.stat().st_size for f in (Path(version) / "trie").iterdir())
    return {"n": n, "merge_s": merge_s, "merge_ids_per_s": n / merge_s, "numpy_sort": best,
            "numpy_sort_s": sorts[best], "numpy_sort_ids_per_s": n / sorts[best],
            "numpy_sort_all_s": sorts, "merge_peak_rss_bytes": merge_peak, "bytes_per_item": trie_bytes / n,
            "version": str(version)}


def child_open(args: argparse.Namespace) -> dict:
    import torch

    import genius.index  # noqa: F401  (imports counted in the baseline, not in the open)
    from genius.index import GeniusIndex
    from genius.modality import Modality

    torch.set_num_threads(1)
    before = rss_bytes()
    t0 = time.perf_counter()
    index = GeniusIndex.load(args.index)
    open_s = time.perf_counter() - t0
    after = rss_bytes()
    trie = index.trie
    # 50 beams in the hot first-level cell (image partition, first code HOT_CODE).
    state = trie.root_children(np.full(50, int(Modality.IMAGE)), np.full(50, HOT_CODE))
    cell_rows = int(state.hi[0] - state.lo[0])
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        expansion = trie.expand(1, state)
        beam, code = np.nonzero(expansion.mask)
        first = np.unique(beam, return_index=True)[1]
        expansion.children(beam[first], code[first])
        times.append(time.perf_counter() - t0)
    rng = np.random.default_rng(0)
    picks = rng.integers(0, index.items.num_items, 100)
    t0 = time.perf_counter()
    index.items.keys(picks)
    index.items.column("source", picks)
    lookup_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(10):
        index.items.keys(picks)
        index.items.column("source", picks)
    lookup = (time.perf_counter() - t0) / 10
    return {"open_s": open_s, "open_rss_bytes": after, "open_rss_increase_bytes": after - before,
            "rss_before_open_bytes": before, "expand_ms": float(np.median(times) * 1e3),
            "expand_ms_first": times[0] * 1e3, "hot_cell_rows": cell_rows,
            "hit_lookup_ms_arrow_first": lookup_first * 1e3, "hit_lookup_ms_arrow": lookup * 1e3,
            "open_rss_after_lookups_bytes": rss_bytes()}


def child_parquet_lookup(args: argparse.Namespace) -> dict:
    """The alternative layout: item tables as Parquet with row groups, looked up by row group."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from genius.store.manifest import Manifest
    from genius.store.layout import resolve_version

    version = resolve_version(args.index)
    manifest = Manifest.read(version)
    out = Path(args.work) / "parquet-items"
    out.mkdir(parents=True, exist_ok=True)
    group = 65536
    files = []
    for r in manifest.item_tables:
        table = pa.ipc.open_file(pa.memory_map(str(version / r.file), "r")).read_all()
        path = out / (Path(r.file).stem + ".parquet")
        pq.write_table(table.select(["key", "source"]), path, row_group_size=group)
        files.append((r.start, r.end, path))
    starts = np.array([f[0] for f in files])
    handles = {}
    rng = np.random.default_rng(0)
    picks = rng.integers(0, manifest.num_items, 100)

    def lookup() -> None:
        which = np.searchsorted(starts, picks, side="right") - 1
        for t in np.unique(which):
            start, _, path = files[t]
            handle = handles.setdefault(t, pq.ParquetFile(path, memory_map=True))
            rows = picks[which == t] - start
            for g in np.unique(rows // group):
                part = handle.read_row_group(int(g))
                part.take(pa.array(rows[rows // group == g] - g * group)).to_pylist()
    t0 = time.perf_counter()
    lookup()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(10):
        lookup()
    return {"hit_lookup_ms_parquet_first": first * 1e3, "hit_lookup_ms_parquet": (time.perf_counter() - t0) / 10 * 1e3}


def run_child(step: str, **kwargs) -> dict:
    cmd = [sys.executable, __file__, "--child", step] + [f"--{k.replace('_', '-')}={v}" for k, v in kwargs.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{step} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- driver


def markdown(results: dict) -> str:
    lines = [
        "# Index store at scale (`python bench/store.py`)", "",
        f"{results['meta']['machine']}; 1 thread; 8 x 4096 codes (12-byte IDs); one first-level cell holds "
        f"{HOT_SHARE:.0%} of the items; partitions per modality: one per 6M items (column `ranges`); "
        f"ID tables of {results['meta']['shard_rows']:,} rows.", "",
        "| N | ranges | merge IDs/s | numpy sort IDs/s | merge_ratio | trie bytes/item | merge peak RSS | open s | "
        "open RSS (increase) | expand ms (hot cell rows) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        lines.append(
            f"| {r['n']:,} | {r['ranges_per_modality']} | {r['merge_ids_per_s']:,.0f} | {r['numpy_sort_ids_per_s']:,.0f} ({r['numpy_sort']}) | "
            f"{r['merge_ratio']:.2f} | {r['bytes_per_item']:.2f} | {r['merge_peak_rss_bytes'] / 2**20:,.0f} MiB | "
            f"{r['open_s']:.3f} | {r['open_rss_bytes'] / 2**20:,.0f} MiB ({r['open_rss_increase_bytes'] / 2**20:+,.1f}) | "
            f"{r['expand_ms']:.2f} ({r['hot_cell_rows']:,}) |")
    look = results.get("hit_lookup")
    if look:
        lines += ["", f"Hit lookup (keys + source of 100 random items, N = {look['n']:,}, warm / first call): "
                  f"Arrow IPC memory-mapped {look['hit_lookup_ms_arrow']:.2f} / {look['hit_lookup_ms_arrow_first']:.2f} ms; "
                  f"Parquet with 64k-row groups {look['hit_lookup_ms_parquet']:.2f} / "
                  f"{look['hit_lookup_ms_parquet_first']:.2f} ms."]
    if results["meta"].get("notes"):
        lines += ["", *[f"- {n}" for n in results["meta"]["notes"]]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e5, 1e6, 1e7, 1e8])
    parser.add_argument("--shard-rows", type=int, default=1_000_000, help="rows per input ID table")
    parser.add_argument("--ranges", type=int, default=None,
                        help="trie partitions per modality (default: one per 6M items, at least 1)")
    parser.add_argument("--lookup-n", type=float, default=1e6, help="N at which Parquet lookups are compared")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temp folder)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "store"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--ids", help=argparse.SUPPRESS)
    parser.add_argument("--index", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        step = {"merge": child_merge, "open": child_open, "parquet": child_parquet_lookup}[args.child]
        print(json.dumps(step(args)))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    work = Path(args.work or tempfile.mkdtemp(prefix="genius-store-bench-"))
    results = {"meta": {"command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
                        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "levels": LEVELS,
                        "codebook_size": CODES, "shard_rows": args.shard_rows,
                        "hot_share": HOT_SHARE, "notes": []},
               "runs": []}
    for size in args.sizes:
        n = int(size)
        folder = work / f"n{n}"
        shutil.rmtree(folder, ignore_errors=True)
        t0 = time.perf_counter()
        write_id_tables(folder / "ids", n, args.shard_rows, args.seed)
        log.info("N=%d: ID tables written in %.1f s", n, time.perf_counter() - t0)
        ranges = args.ranges or max(1, min(64, n // 6_000_000))
        run = run_child("merge", ids=folder / "ids", index=folder / "index", ranges=ranges, work=folder)
        run["ranges_per_modality"] = ranges
        run["merge_ratio"] = run["merge_ids_per_s"] / run["numpy_sort_ids_per_s"]
        run.update(run_child("open", index=folder / "index"))
        if n == int(args.lookup_n):
            results["hit_lookup"] = {"n": n, **{k: v for k, v in run.items() if k.startswith("hit_lookup")},
                                     **run_child("parquet", index=folder / "index", work=folder)}
        log.info("N=%d: %s", n, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in run.items()})
        results["runs"].append(run)
        shutil.rmtree(folder, ignore_errors=True)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
