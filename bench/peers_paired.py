"""Paired comparisons of bench/peers.py's methods on the same held-out queries.

Two methods' recalls on the same 1,000 queries differ by a few queries at a time; whether
GENIUS is "above" a faiss row is a question about those queries, so each comparison is
paired: per query, did each method put a relevant item in its top k? The difference of the
two recalls gets a 95 % confidence interval from a bootstrap over queries (resampling the
query set, both methods together), plus the counts of queries only one method found.

    python bench/peers_paired.py bench/results/peers-wordnet-dec12_hits.npz \
        bench/results/peers-wordnet-paired_hits.npz     # an ablation's GENIUS against the defaults'
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

KS = (1, 5, 10)
PEERS = ("flat", "pq12", "opq12", "ivfpq", "rq8x12")  # compared against; flat is exact search
RESAMPLES = 2000
QUERIES_KEY = "__queries__"  # a saved hits file's fingerprint of a task's held-out queries ("task::__queries__")


def hits(ranked: np.ndarray, relevance: Sequence[np.ndarray], ks: Iterable[int] = KS) -> np.ndarray:
    """(Q, len(ks)) bool: whether query q's top k (ranked[q], -1 = nothing) holds a relevant item."""
    ks = list(ks)
    out = np.zeros((len(ranked), len(ks)), dtype=bool)
    for q, (row, rel) in enumerate(zip(ranked, relevance)):
        found = np.isin(row[: max(ks)], rel) & (row[: max(ks)] >= 0)
        first = int(np.argmax(found)) if found.any() else max(ks)  # not found: in no top k
        out[q] = [first < k for k in ks]
    return out


def paired_difference(ours: np.ndarray, theirs: np.ndarray, seed: int = 0,
                      resamples: int = RESAMPLES) -> dict[str, float | int | list[float]]:
    """Recall of `ours` minus `theirs` (per-query bools of one k) with a 95 % paired bootstrap
    interval; `wins`/`losses`: queries only ours / only theirs found."""
    ours, theirs = np.asarray(ours, dtype=bool), np.asarray(theirs, dtype=bool)
    if ours.shape != theirs.shape or ours.ndim != 1:
        raise ValueError(f"paired hits need the same queries: shapes {ours.shape} and {theirs.shape}")
    delta = ours.astype(np.int8) - theirs.astype(np.int8)
    n = len(delta)
    if n == 0:
        return {"diff": 0.0, "ci95": [0.0, 0.0], "wins": 0, "losses": 0}
    rng = np.random.default_rng(seed)
    chunk = max(1, 2_000_000 // n)  # resamples drawn together: ~2M indices at a time
    means = np.concatenate([delta[rng.integers(0, n, (min(chunk, resamples - a), n))].mean(axis=1)
                            for a in range(0, resamples, chunk)])
    lo, hi = np.quantile(means, [0.025, 0.975])
    return {"diff": round(float(delta.mean()), 4), "ci95": [round(float(lo), 4), round(float(hi), 4)],
            "wins": int((delta > 0).sum()), "losses": int((delta < 0).sum())}


def paired_by_k(ours: np.ndarray, theirs: np.ndarray, ks: Sequence[int] = KS, seed: int = 0,
                resamples: int = RESAMPLES) -> dict[str, dict]:
    """{"r1": paired_difference, "r5": ...} of two methods' hits() on the same queries."""
    return {f"r{k}": paired_difference(ours[:, i], theirs[:, i], seed, resamples) for i, k in enumerate(ks)}


def cell(d: dict) -> str:
    """A paired_difference as table text: difference [interval] (wins/losses)."""
    return f"{d['diff']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] ({d['wins']}/{d['losses']})"


def compare(method_hits: dict[str, np.ndarray], ks: Sequence[int] = KS, seed: int = 0,
            resamples: int = RESAMPLES) -> dict[str, dict[str, dict[str, dict]]]:
    """{genius row: {peer: {"r5": paired_difference, ...}}} for every GENIUS row (names starting
    "genius") against every peer of PEERS that ran; `method_hits`: per method, hits() of its
    rankings on the same queries."""
    out: dict[str, dict[str, dict[str, dict]]] = {}
    peers = [p for p in PEERS if p in method_hits]
    for name, ours in method_hits.items():
        if not name.startswith("genius") or not peers:
            continue
        out[name] = {peer: paired_by_k(ours, method_hits[peer], ks, seed, resamples) for peer in peers}
    return out


def significance(d: dict) -> str:
    """'above' / 'below' where the interval excludes 0, else 'tie'."""
    lo, hi = d["ci95"]
    return "above" if lo > 0 else "below" if hi < 0 else "tie"


def markdown(paired: dict[str, dict[str, dict[str, dict]]], rows: Sequence[str] = ("genius", "genius_r"),
             ks: Sequence[int] = (5, 10)) -> list[str]:
    """Lines of a table: per GENIUS row and k, the difference to each peer with its interval."""
    shown = [r for r in rows if r in paired]
    if not shown:
        return []
    peers = list(paired[shown[0]])
    lines = ["Paired against each peer on the same queries: GENIUS row's recall minus the peer's, 95 % bootstrap "
             "interval over queries (queries only GENIUS / only the peer found); **bold** where the interval "
             "excludes 0.", "",
             "| row | k | " + " | ".join(peers) + " |", "|---|---:|" + "---|" * len(peers)]
    for row in shown:
        for k in ks:
            cells = []
            for peer in peers:
                d = paired[row][peer][f"r{k}"]
                cells.append(f"**{cell(d)}**" if significance(d) != "tie" else cell(d))
            lines.append(f"| {row} | {k} | " + " | ".join(cells) + " |")
    return lines + [""]


def save_hits(task_hits: dict[str, np.ndarray], path: Path) -> None:
    """A run's hits file: per-query hits (bool, queries x KS) by "task::method", and each task's
    queries' fingerprint under "task::QUERIES_KEY": runs on the same queries pair with it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **task_hits)
    tmp.replace(path)


def load_hits(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def tasks(run: dict[str, np.ndarray]) -> list[str]:
    """The tasks a loaded hits file holds (those with a queries' fingerprint)."""
    suffix = "::" + QUERIES_KEY
    return [key[: -len(suffix)] for key in run if key.endswith(suffix)]


def compare_runs(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray], rows: Sequence[str],
                 ks: Sequence[int] = KS, seed: int = 0) -> dict[str, dict]:
    """Two runs' saved hits (bench/peers.py's <name>_hits.npz, loaded): for every task both
    measured on the same queries and each of `rows` both hold, {"task::row": {"r5": paired_difference}}
    of ours minus theirs: is an ablation's GENIUS better than the defaults', query by query?"""
    out: dict[str, dict] = {}
    for task in tasks(ours):
        key = f"{task}::{QUERIES_KEY}"
        if not np.array_equal(theirs.get(key, np.zeros(0, np.uint8)), ours[key]):
            continue
        for row in rows:
            a, b = ours.get(f"{task}::{row}"), theirs.get(f"{task}::{row}")
            if a is not None and b is not None:
                out[f"{task}::{row}"] = paired_by_k(a, b, ks, seed)
    return out


def compare_rows(run: dict[str, np.ndarray], rows: Sequence[str], against: str, ks: Sequence[int] = KS,
                 seed: int = 0) -> dict[str, dict]:
    """One run's saved hits: {"task::row": {"r5": paired_difference}} of each of `rows` minus the
    row `against` on every task holding both (an ablation row against the defaults' row)."""
    out: dict[str, dict] = {}
    for task in tasks(run):
        base = run.get(f"{task}::{against}")
        for row in rows:
            ours = run.get(f"{task}::{row}")
            if base is not None and ours is not None:
                out[f"{task}::{row}"] = paired_by_k(ours, base, ks, seed)
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Pair two bench/peers.py runs' saved hits (<name>_hits.npz) on the same "
                                            "queries: each row's recall in the first run minus the second's, with a "
                                            "95 % bootstrap interval.")
    p.add_argument("ours", help="hits file of the run to judge (e.g. an ablation)")
    p.add_argument("theirs", nargs="?", help="hits file of the run to compare with (e.g. the defaults)")
    p.add_argument("--rows", nargs="+", default=["genius", "genius_r"], help="methods to pair (default genius genius_r)")
    p.add_argument("--against", metavar="ROW",
                   help="instead of a second run: pair each of --rows with this row of the same run "
                        "(e.g. --rows genius_levelnorm --against genius)")
    args = p.parse_args(argv)
    if (args.theirs is None) == (args.against is None):
        p.error("give either a second hits file or --against ROW")
    ours = load_hits(args.ours)
    if args.against:
        result = compare_rows(ours, args.rows, args.against)
    else:
        result = compare_runs(ours, load_hits(args.theirs), args.rows)
    if not result:
        raise SystemExit("no task and row to pair: the rows were not measured (on the same queries)")
    other = f"row {args.against}" if args.against else f"{args.theirs}'s"
    print(f"Recall of each row minus {other}, 95 % bootstrap interval (queries only the row / only the other found)")
    print("| task::row | " + " | ".join(f"R@{k}" for k in KS) + " |")
    print("|---|" + "---|" * len(KS))
    for key, by_k in result.items():
        print(f"| {key} | " + " | ".join(cell(d) for d in by_k.values()) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
