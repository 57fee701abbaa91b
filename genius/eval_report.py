"""The report of `genius.evaluation.evaluate`: result rows, beam curves and fits, written as
JSON, Markdown and a PNG plot, and a one-screen summary (`describe`)."""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from genius.atomic import write_atomic
from genius.index import GeniusIndex

__all__ = ["KS", "EvalReport", "describe", "recall_line"]

KS = (1, 5, 10)


@dataclass
class EvalReport:
    """Results of `evaluate`. `results` rows: task, method, model, pool, fit, ablation, beam,
    recall@1/5/10, ratio@1/5/10 (to exact kNN on the same pool), ms_per_query, and for
    mixed pools top1_modality (share of queries whose top item has the task's modality).
    Methods: "exact kNN", "GENIUS", "GENIUS+R", "GENIUS+R (codes)" and, on mixed pools,
    "GENIUS+R (decoded modality)" (see `_search`)."""

    tasks: list[dict[str, Any]]
    results: list[dict[str, Any]]
    beam_curves: dict[str, dict[str, dict[str, float]]]  # task -> curve label -> {beam: recall@10}
    fits: list[dict[str, Any]]
    timings: dict[str, Any]
    meta: dict[str, Any]
    universal: dict[str, Any] | None = None
    indexes: dict[str, GeniusIndex] = field(default_factory=dict, repr=False)  # fit name -> pool index (not saved)

    def to_dict(self) -> dict[str, Any]:
        return {"meta": self.meta, "tasks": self.tasks, "universal": self.universal, "results": self.results,
                "beam_curves": self.beam_curves, "fits": self.fits, "timings": self.timings}

    def to_json(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(path, json.dumps(self.to_dict(), indent=2, default=_json_default) + "\n")
        return path

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "EvalReport":
        d = json.loads(Path(path).read_text())
        return cls(tasks=d["tasks"], results=d["results"], beam_curves=d["beam_curves"], fits=d["fits"],
                   timings=d["timings"], meta=d["meta"], universal=d.get("universal"))

    def rows(self, task: str, **where: Any) -> list[dict[str, Any]]:
        return [r for r in self.results if r["task"] == task and all(r.get(k) == v for k, v in where.items())]

    def get(self, task: str, method: str, model: str = "task", pool: str = "task", ablation: str = "full",
            beam: int | None = None) -> dict[str, Any]:
        """One result row (beam: the main beam unless given; kNN rows have beam None)."""
        if beam is None and method != "exact kNN":
            beam = self.meta["main_beam"]
        for r in self.results:
            if (r["task"], r["method"], r["model"], r["pool"], r["ablation"], r["beam"]) == (
                    task, method, model, pool, ablation, beam):
                return r
        raise KeyError((task, method, model, pool, ablation, beam))

    # --- Markdown ----------------------------------------------------------------------
    def to_markdown(self, path: str | os.PathLike | None = None) -> str:
        m = self.meta
        lines = [f"# GENIUS evaluation: {m.get('title') or ', '.join(t['name'] for t in self.tasks)}", ""]
        lines += [
            f"- encoder: {m.get('encoder')}",
            f"- main beam {m['main_beam']}, beams {m['beams']}, k = 10, seed {m['seed']}; "
            f"GENIUS = beam order; GENIUS+R = beam items re-ranked by cosine similarity with the stored "
            f"item embeddings; GENIUS+R (codes) = re-ranked in the quantizer's learned space (projected "
            f"query vs vectors rebuilt from the IDs); GENIUS+R (decoded modality, mixed pools) = "
            f"items of the best beam's modality re-ranked first; exact kNN = flat inner product over "
            f"the same pool and embeddings; ratio = recall / kNN recall on the same pool.",
            f"- {m.get('created')}, {m.get('machine')}, torch threads {m.get('torch_threads')}; "
            f"total {self.timings.get('total_seconds', 0):.0f} s (embedding {self.timings.get('embed_seconds', 0):.0f} s)",
            "",
        ]
        if self.universal:
            u = self.universal
            lines += [f"Universal pool `{u['name']}`: {u['candidates']} candidates {u['by_modality']}, "
                      f"{u['train_queries']} training pairs from {len(u['tasks'])} tasks; searched with no "
                      f"modality filter (the first decoded code chooses the modality); queries "
                      + ("carry an instruction naming the target modality (text queries: a prefix such as "
                         f"'{u['instruction_templates']['text query prefix']['image']}'; image queries become "
                         f"(image, '{u['instruction_templates']['image query text']['text']}')-style pairs)."
                         if u.get("instructions") else "carry no instruction."), ""]
        for t in self.tasks:
            name = t["name"]
            lines += [f"## {name}", "",
                      f"{t['query_modality']} → {t['candidate_modality']}; pool {t['candidates']}, "
                      f"{t['test_queries']} test queries, {t['train_queries']} training pairs "
                      f"({t['train_candidates']} training candidates); relevant per query: mean "
                      f"{t['relevant_per_query']['mean']:.1f}; recall@1/5/10 of a random ranking "
                      f"{_chance(t)}.", "",
                      f"Relevance: {t['relevance_rule']}", ""]
            main = [r for r in self.rows(name, ablation="full")
                    if r["beam"] in (None, m["main_beam"])]
            lines += ["| method | model | pool | beam | R@1 | R@5 | R@10 | R@1/kNN | R@5/kNN | R@10/kNN "
                      "| top-1 modality | ms/query |",
                      "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for r in main:
                lines.append("| " + " | ".join([
                    r["method"], r["model"], r["pool"], "" if r["beam"] is None else str(r["beam"]),
                    *(f"{r[f'recall@{k}']:.3f}" for k in KS),
                    *(_fmt(r.get(f"ratio@{k}")) for k in KS),
                    _fmt(r.get("top1_modality")), _fmt(r.get("ms_per_query"), 1)]) + " |")
            lines.append("")
            curves = self.beam_curves.get(name, {})
            if curves:
                beams = sorted({int(b) for c in curves.values() for b in c})
                labels = list(curves)
                lines += ["Recall@10 against beam size:", "",
                          "| beam | " + " | ".join(labels) + " |", "|---:|" + "---:|" * len(labels)]
                for b in beams:
                    lines.append(f"| {b} | " + " | ".join(_fmt(curves[lb].get(str(b))) for lb in labels) + " |")
                lines.append("")
            abl = [r for r in self.results if r["task"] == name and r["method"] != "exact kNN"
                   and r["beam"] == m["main_beam"] and r["model"] in ("task", "universal")]
            if self._has_ablations() and abl:
                lines += [f"Ablations (refit, beam {m['main_beam']}):", "",
                          "| ablation | method | model | pool | R@1 | R@5 | R@10 | R@10/kNN |",
                          "|---|---|---|---|---:|---:|---:|---:|"]
                order = ["full", *m.get("ablations", [])]
                for a in order:
                    for r in abl:
                        if r["ablation"] == a:
                            lines.append(f"| {a} | {r['method']} | {r['model']} | {r['pool']} | "
                                         + " | ".join(f"{r[f'recall@{k}']:.3f}" for k in KS)
                                         + f" | {_fmt(r.get('ratio@10'))} |")
                lines.append("")
        lines += ["## Fits", "",
                  "| fit | items | pairs | L × K | ID bytes | decoder (layers/d/heads/ff/P) | epochs (q/d) "
                  "| flags | code 0 values | pool IDs | fit s |",
                  "|---|---:|---:|---|---:|---|---|---|---|---:|---:|"]
        for f in self.fits:
            s = f["sizes"]
            d = s["decoder"]
            flags = ", ".join(x for x, on in (
                ("contrastive", s["use_contrastive"]), ("modality code", s["use_modality_code"]),
                ("mse", s["mse_weight"] > 0), ("q-aug quantizer", s["quantizer_query_augmentation"]),
                ("q-aug decoder", s["decoder_query_augmentation"]), ("index task", s["index_task"])) if on)
            lines.append(f"| {f['name']} | {f['items_indexed']} | {f['train_pairs']} | {s['levels']} × "
                         f"{s['codebook_size']} | {s['id_bytes']} | {d['layers']}/{d['d_model']}/{d['heads']}/"
                         f"{d['d_ff']}/{d['prefix_len']} | {s['quantizer_epochs']}/{s['decoder_epochs']} | {flags} | "
                         f"{f['code0_values']} | {f['pool_distinct_ids']} / {f['pool_items']} | {f['fit_seconds']:.0f} |")
        lines.append("")
        text = "\n".join(lines)
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            _atomic_write_text(Path(path), text)
        return text

    def _has_ablations(self) -> bool:
        return bool(self.meta.get("ablations"))

    # --- plot --------------------------------------------------------------------------
    def plot_beam(self, path: str | os.PathLike) -> Path:
        """recall@10 against beam size, one panel per task (kNN as dashed lines)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = [t["name"] for t in self.tasks]
        cols = min(3, max(1, len(names)))
        rows = -(-len(names) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
        for ax, name in zip(axes.flat, names):
            for label, curve in self.beam_curves.get(name, {}).items():
                beams = sorted(int(b) for b in curve)
                ax.plot(beams, [curve[str(b)] for b in beams], marker="o", label=label,
                        linestyle="-" if "+R" in label else "--")
            for r in self.rows(name, method="exact kNN", ablation="full"):
                ax.axhline(r["recall@10"], color="grey", linestyle=":", linewidth=1)
                who = "" if r["model"] == "-" else f", {r['model']}"
                ax.annotate(f"kNN ({r['pool']} pool{who})", (1, r["recall@10"]), fontsize=7, color="grey",
                            xytext=(2, 2), textcoords="offset points")
            ax.set_xscale("log")
            ticks = sorted({int(b) for c in self.beam_curves.get(name, {}).values() for b in c})
            if ticks:
                ax.set_xticks(ticks)
                ax.set_xticklabels([str(b) for b in ticks])
                ax.minorticks_off()
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("beam size")
            ax.set_ylabel("recall@10")
            ax.set_ylim(0, 1.02)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7, loc="lower right")
        for ax in list(axes.flat)[len(names):]:
            ax.set_visible(False)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110))
        plt.close(fig)
        return path


def _chance(task: Mapping[str, Any]) -> str:
    return " / ".join(_fmt(task.get(f"chance_recall@{k}")) or "?" for k in KS)


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return ""
    return f"{v:.{digits}f}"


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _atomic_write_text(path: Path, text: str) -> None:
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def recall_line(table: Mapping[str, float]) -> str:
    """{"recall@1": 0.5, ...} -> "R@1 0.500, ..." for logs."""
    return ", ".join(f"R@{k.split('@')[1]} {v:.3f}" for k, v in table.items())


def describe(report: EvalReport) -> str:
    """A one-screen text summary (main beam, full configs) for logs and the CLI."""
    lines = []
    for t in report.tasks:
        for r in report.rows(t["name"], ablation="full"):
            if r["beam"] in (None, report.meta["main_beam"]):
                lines.append(f"{t['name']:32s} {r['method']:27s} {r['model']:22s} {r['pool']:9s} "
                             f"R@1 {r['recall@1']:.3f} R@5 {r['recall@5']:.3f} R@10 {r['recall@10']:.3f}")
    return "\n".join(lines)
