"""bench/peers.py's outputs: peers.json, peers.md and the plots (recall against QPS per task,
recall@10 against pool size, latency against corpus size).

    python bench/peers_report.py bench/results/peers.json   # re-render .md and plots from the JSON
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import peers_paired

METHOD_ORDER = ("flat", "genius", "genius_r", "pq12", "pq12_rr100", "opq12", "opq12_rr100", "ivfpq", "ivfpq_rr100",
                "rq8x12", "rq8x12_rr100")


ACCURACY_KEYS = ("r1", "r5", "r10", "pool_share_rescored")


def write(results: dict[str, Any], out: Path, name: str,
          extra_runs: dict[str, dict[str, Any]] | None = None) -> None:
    """name.json, name.md and the plots; accuracy.json from the main run (name "peers") or
    when GENIUS-only `extra_runs` join it (see `accuracy`)."""
    out.mkdir(parents=True, exist_ok=True)
    _atomic(out / f"{name}.json", json.dumps(results, indent=2, default=_default) + "\n")
    _atomic(out / f"{name}.md", markdown(results, name))
    if name == "peers" or extra_runs:
        write_accuracy(results, out, extra_runs)
    plots(results, out, name)


def write_accuracy(results: dict[str, Any], out: Path, extra_runs: dict[str, dict[str, Any]] | None = None) -> Path:
    path = out / "accuracy.json"
    _atomic(path, json.dumps(accuracy(results, extra_runs), indent=2, default=_default) + "\n")
    return path


def accuracy(results: dict[str, Any], extra_runs: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The accuracy issue's record: per task, GENIUS's variants and the faiss rows for reference,
    each {r1, r5, r10, pool_share_rescored}. extra_runs ({run name: its results}): GENIUS-only
    runs on the same split (e.g. another fit shape, searched from a saved fit); their variants
    join as "RUN/variant", with each run's command and fit under "runs"; a task the base run did
    not measure joins with the first run that did (its faiss rows too). Per task, "paired" holds
    that run's paired comparisons of genius and genius_r with each faiss row (peers_paired)."""
    out: dict[str, Any] = {"command": results["meta"]["command"], "created": results["meta"]["created"], "tasks": {}}
    summaries: dict[str, Any] = {}

    def add_task(task: str, t: dict[str, Any], variants: dict[str, Any], run: str | None = None) -> None:
        rows = t["methods"]
        summaries[task] = t["summary"]
        out["tasks"][task] = {
            "pool": t["summary"]["pool"],
            "variants": variants,
            "faiss": {m: {k: rows[m][k] for k in ACCURACY_KEYS[:3]} for m in _ordered(rows)
                      if not m.startswith("genius")},
        }
        # GENIUS against each faiss row on the same queries, from the run the faiss rows come from
        paired = {row: by_peer for row, by_peer in t.get("paired", {}).items() if row in ("genius", "genius_r")}
        if paired:
            out["tasks"][task]["paired"] = {f"{run}/{row}" if run else row: by_peer for row, by_peer in paired.items()}

    for task, t in results["tasks"].items():
        add_task(task, t, _variants(t["methods"]))
    for run, extra in (extra_runs or {}).items():
        out.setdefault("runs", {})[run] = {"command": extra["meta"]["command"], "created": extra["meta"]["created"]}
        for task, t in extra["tasks"].items():
            if task not in out["tasks"]:
                add_task(task, t, {}, run)
            elif t["summary"] != summaries[task]:
                raise ValueError(f"{run}: task {task!r} is not the same split as the base run's")
            variants = _variants(t["methods"])
            out["tasks"][task]["variants"].update({f"{run}/{m}": v for m, v in variants.items()})
            genius = t["methods"].get("genius", {})  # the run's main GENIUS row: its fit and beam
            out["runs"][run].update({k: genius.get(k) for k in ("fit_config", "beam", "codebook_weight",
                                                                  "level_widths")})
    return out


def _variants(rows: dict[str, Any]) -> dict[str, Any]:
    return {m: {k: rows[m].get(k) for k in ACCURACY_KEYS} for m in _ordered(rows) if m.startswith("genius")}


def _ordered(methods: dict[str, Any]) -> list[str]:
    """The table order; GENIUS's ablation rows (genius_cbW, genius_lwA-B, genius_laN, and their
    genius_r_) right after GENIUS+R, codebook weights first."""
    def key(m: str) -> tuple[float, bool, float, str]:
        if m in METHOD_ORDER:
            return METHOD_ORDER.index(m), False, 0.0, ""
        if m.startswith("genius") and "_cb" in m:
            base, weight = m.rsplit("_cb", 1)
            return METHOD_ORDER.index("genius_r") + 0.5, base == "genius_r", float(weight), m
        if m.startswith("genius") and "_lw" in m:
            return METHOD_ORDER.index("genius_r") + 0.6, m.startswith("genius_r_"), 0.0, m
        if m.startswith("genius") and "_la" in m:
            base, rows_read = m.rsplit("_la", 1)
            return METHOD_ORDER.index("genius_r") + 0.7, base == "genius_r", float(rows_read), m
        return len(METHOD_ORDER), False, 0.0, m
    return sorted(methods, key=key)


def markdown(results: dict[str, Any], name: str) -> str:
    m = results["meta"]
    lines = [f"# GENIUS against vector search at full corpus size (`{m['command']}`)", "",
             f"{m['created']}, {m['machine']}; every method searches with {m['threads']} thread(s) and builds with "
             f"{m.get('build_threads', m['threads'])} (torch {m['torch']}, "
             f"faiss {m['faiss']}); GENIUS beam {m['beam']}; batch {m['batch']} queries per call for every method, "
             f"single = one query per call ({m['single_queries']} queries); IVF-PQ nprobe {m['nprobe']}; "
             f"`_rr{m['rerank_depth']}` = top {m['rerank_depth']} re-scored exactly with the stored fp16 vectors. "
             f"Bytes per item: the search structure (faiss codes; IVF lists add 8 bytes of item number; GENIUS: "
             f"the trie's arrays incl. IDs) plus 2·D for stored vectors where a method re-scores. Total "
             f"{m.get('total_s', 0):.0f} s.", ""]
    for task, t in results["tasks"].items():
        s = t["summary"]
        lines += [f"## {task}", "",
                  f"{s['query_modality']} -> {s['candidate_modality']}; pool {s['pool']:,}, {s['test_queries']} "
                  f"held-out queries, {s['train_pairs']:,} training pairs; relevant per query {s['relevant_per_query']}; "
                  f"recall@1/5/10 of a random ranking {s['chance_r1']:.2g} / {s['chance_r5']:.2g} / {s['chance_r10']:.2g}.",
                  "", f"Relevance: {s['relevance_rule']}.", "",
                  "| method | R@1 | R@5 | R@10 | R@5 / flat | QPS single | QPS batch | CPU ms/q batch | bytes/item | build s | pool re-scored |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        rows = t["methods"]
        flat5 = rows.get("flat", {}).get("r5")
        for meth in _ordered(rows):
            r = rows[meth]
            ratio = f"{r['r5'] / flat5:.2f}" if flat5 else ""
            share = f"{100 * r['pool_share_rescored']:.3f} %" if r.get("pool_share_rescored") is not None else ""
            lines.append(f"| {meth} | {r['r1']:.3f} | {r['r5']:.3f} | {r['r10']:.3f} | {ratio} | {r['qps_single']:.1f} | "
                         f"{r['qps_batch']:.1f} | {r['cpu_ms_batch']:.2f} | {r['bytes_per_item']:.1f} | {r['build_s']:.1f} | {share} |")
        g = rows.get("genius", {})
        if "fit_config" in g:
            lines += ["", f"GENIUS fit: {g['fit_config']}; {g['distinct_ids']:,} distinct IDs; trie "
                          f"{g['trie_bytes_per_item']} bytes/item; model {g['model_bytes'] / 2**20:.1f} MiB."]
        lines.append("")
        lines += peers_paired.markdown(t.get("paired", {}))
        if t.get("paired_from"):
            sources: dict[str, list[str]] = {}
            for meth, src in t["paired_from"].items():
                sources.setdefault(src, []).append(meth)
            lines += ["Paired with faiss rows of earlier runs on the same queries: " +
                      "; ".join(f"{', '.join(ms)} from `{src}`" for src, ms in sources.items()) + ".", ""]
    if results.get("curve"):
        sizes = sorted({c["n"] for c in results["curve"]})
        methods = _ordered({c["method"]: 1 for c in results["curve"]})
        lines += ["## Recall@10 against pool size (WordNet)", "", "| method | " + " | ".join(f"{n:,}" for n in sizes) + " |",
                  "|---|" + "---:|" * len(sizes)]
        for meth in methods:
            by_n = {c["n"]: c["r10"] for c in results["curve"] if c["method"] == meth}
            lines.append(f"| {meth} | " + " | ".join(f"{by_n[n]:.3f}" if n in by_n else "" for n in sizes) + " |")
        lines.append("")
    if results.get("scale"):
        sizes = sorted({c["n"] for c in results["scale"]})
        methods = list(dict.fromkeys(c["method"] for c in results["scale"]))
        lines += ["## Latency against corpus size (ms per query, batch of 1)", "",
                  "WordNet's items plus distractors (IDs and vectors drawn near real items'); GENIUS searches the "
                  "store's memory-mapped index."
                  + (f" From a separate run: `{results['meta']['scale_command']}`."
                     if results["meta"].get("scale_command") else ""), "",
                  "| method | " + " | ".join(f"{n:,}" for n in sizes) + " |", "|---|" + "---:|" * len(sizes)]
        for meth in methods:
            by_n = {c["n"]: c["ms_per_query"] for c in results["scale"] if c["method"] == meth}
            lines.append(f"| {meth} | " + " | ".join(f"{by_n[n]:.2f}" if n in by_n else "" for n in sizes) + " |")
        lines.append("")
    if results.get("skipped"):
        lines += ["Skipped: " + "; ".join(f"{k}: {v}" for k, v in results["skipped"].items()), ""]
    lines += [f"Plots: `{name}_recall_qps.png`, `{name}_curve.png`, `{name}_scale.png`.", ""]
    return "\n".join(lines)


def plots(results: dict[str, Any], out: Path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = results["tasks"]
    if tasks:
        fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.2), squeeze=False)
        for ax, (task, t) in zip(axes[0], tasks.items()):
            for meth in _ordered(t["methods"]):
                r = t["methods"][meth]
                style = "*" if meth.startswith("genius") else ("s" if meth.endswith("_rr100") else "o")
                ax.scatter(r["qps_batch"], r["r10"], marker=style, s=60 if style == "*" else 30)
                ax.annotate(meth, (r["qps_batch"], r["r10"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
            ax.set_xscale("log")
            ax.set_xlabel("queries/s (batched)")
            ax.set_ylabel("recall@10")
            ax.set_title(task, fontsize=9)
            ax.grid(True, alpha=0.3)
        _save(fig, plt, out / f"{name}_recall_qps.png")
    for key, y, ylabel, fname, logy in (("curve", "r10", "recall@10", "curve", False),
                                         ("scale", "ms_per_query", "ms per query", "scale", True)):
        rows = results.get(key) or []
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for meth in list(dict.fromkeys(r["method"] for r in rows)):
            pts = sorted((r["n"], r[y]) for r in rows if r["method"] == meth)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=meth,
                    linestyle="-" if meth.startswith("genius") else "--")
        ax.set_xscale("log")
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel("items in the pool")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        _save(fig, plt, out / f"{name}_{fname}.png")


def _save(fig: Any, plt: Any, path: Path) -> None:
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, (np.ndarray, tuple, set)):
        return list(o)
    if isinstance(o, Path):  # options such as --pair-with
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Re-render a bench/peers.py result's Markdown and plots from its JSON; "
                                            "with --also, rewrite accuracy.json from it and GENIUS-only runs.")
    p.add_argument("source", nargs="?", type=Path, default=Path("bench/results/peers.json"),
                   help="a results JSON of bench/peers.py (default bench/results/peers.json)")
    p.add_argument("--also", type=Path, nargs="*", default=[],
                   help="GENIUS-only results JSONs on the same split: their variants join accuracy.json as "
                        "'<file stem>/<variant>'")
    p.add_argument("--scale-from", type=Path,
                   help="take the latency curve (\"scale\") from this run's JSON (a `--methods genius --scale` "
                        "run on a saved fit), recording its command as meta.scale_command")
    args = p.parse_args(argv)
    results = json.loads(args.source.read_text(encoding="utf-8"))
    if args.scale_from is not None:
        scaled = json.loads(args.scale_from.read_text(encoding="utf-8"))
        if not scaled.get("scale"):
            raise SystemExit(f"{args.scale_from} holds no latency curve")
        results["scale"] = scaled["scale"]
        results["meta"]["scale_command"] = scaled["meta"]["command"]
    extra = {path.stem: json.loads(path.read_text(encoding="utf-8")) for path in args.also}
    write(results, args.source.parent, args.source.stem, extra or None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
