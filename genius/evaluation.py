"""Evaluate GENIUS on retrieval tasks (`genius.tasks`) against exact kNN on the same embeddings.

    report = evaluate(tasks, encoder, beams=(1, 5, 10, 20, 50), ablations=("no_modality_code",))
    report.to_json("eval.json"); report.to_markdown("eval.md"); report.plot_beam("beam.png")

What `evaluate` does:

1. Embeds every distinct query and candidate once (by item key; equal texts once), or
   uses the embeddings the tasks' `Items` already carry (or a key -> vector mapping).
2. Per task (`per_task=True`): fits a `GeniusIndex` on the task's training pairs over the
   task's pool plus its training candidates (so the DSI indexing task covers the pool,
   while no pool item is ever a training target), then searches a trie of the pool only.
3. Several tasks (`universal`, default when there are several): one index over the
   universal pool (the union of the pools, all modalities in one trie) trained on all
   tasks' pairs; searched without a modality filter, so the first decoded code must
   choose the modality. Also reported: the same model searched over each task's own pool.
4. Reports recall@1/5/10 of GENIUS (beam order), GENIUS+R (beam items re-ranked by cosine
   similarity with the stored item vectors), GENIUS+R (codes) (re-ranked in the
   quantizer's learned space, vectors rebuilt from the IDs) and exact kNN (flat inner
   product over the same pool and embeddings), their ratios to kNN, recall@10 against
   beam size, and the share of queries whose top item has the task's candidate modality.
5. Ablations by name refit every fitted index with the changed config and are searched
   at the main beam: the quantizer's `with_ablation` names (`no_contrastive`,
   `no_modality_code`, `no_mse`), `no_query_augmentation` (quantizer and decoder), and
   `no_index_task` (the decoder trained on query pairs only).

Every result names its fit; every fit records its config (levels, codes, decoder shape,
epochs, flags), the modality codes its items got, and its wall time.
"""
from __future__ import annotations

import copy
import datetime as _dt
import logging
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from genius.embedding_cache import EmbeddingCache
from genius.eval_embedding import embed_tasks
from genius.eval_report import KS, EvalReport, recall_line, describe
from genius.index import GeniusIndex, IndexConfig
from genius.items import Items
from genius.metrics import exact_knn, recall_table
from genius.modality import Modality
from genius.rerank import rank
from genius.tasks import RetrievalTask, UniversalPool, concat_items, universal_pool

log = logging.getLogger(__name__)

__all__ = ["ABLATIONS", "EvalReport", "evaluate", "embed_tasks", "describe", "apply_ablation", "restrict_index"]

ABLATIONS = ("no_contrastive", "no_modality_code", "no_query_augmentation", "no_mse", "no_index_task")
IndexConfigLike = IndexConfig | Callable[[int], IndexConfig] | None


# ----------------------------------------------------------------------------- fitting


def apply_ablation(config: IndexConfig, name: str) -> IndexConfig:
    """A copy of `config` with one ablation applied (see the module docstring)."""
    config = copy.deepcopy(config)
    if name in ("full", "", None):
        return config
    if name not in ABLATIONS:
        raise ValueError(f"unknown ablation {name!r}: choose from {list(ABLATIONS)}")
    if name == "no_index_task":
        config.decoder_training = replace(config.decoder_training, index_task=False)
        return config
    config.quantizer = config.quantizer.with_ablation(name)
    if name == "no_query_augmentation":
        config.decoder_training = replace(config.decoder_training, query_augmentation=False)
    return config


def _resolve_config(index_config: IndexConfigLike, num_items: int, seed: int) -> IndexConfig:
    if isinstance(index_config, IndexConfig):
        cfg = copy.deepcopy(index_config)
    elif index_config is None:
        cfg = IndexConfig.for_corpus(num_items)
    else:
        cfg = index_config(num_items)
    cfg.quantizer = replace(cfg.quantizer, seed=seed)
    cfg.decoder_training = replace(cfg.decoder_training, seed=seed)
    return cfg


def restrict_index(index: GeniusIndex, rows: Sequence[int] | np.ndarray) -> GeniusIndex:
    """The same model (quantizer, decoder) searching only `rows` of the index's items:
    a trie of their IDs; item numbers are positions in `rows`."""
    rows = np.asarray(rows, dtype=np.int64)
    vectors = None if index.vectors is None else index.vectors[rows].astype(np.float32)
    return GeniusIndex.from_codes(index.config, index.quantizer, index.decoder, index.item_codes(rows),
                                  index.items.modality(rows), index.items.keys(rows), vectors, index.encoder)


def _config_sizes(cfg: IndexConfig) -> dict[str, Any]:
    q, d, t = cfg.quantizer, cfg.decoder, cfg.decoder_training
    width = -(-q.num_levels * int(np.ceil(np.log2(q.codebook_size))) // 8)
    return {
        "levels": q.num_levels, "codebook_size": q.codebook_size, "id_bytes": width,
        "decoder": {"layers": d.num_layers, "d_model": d.d_model, "heads": d.num_heads, "d_ff": d.d_ff,
                    "prefix_len": d.prefix_len},
        "quantizer_epochs": q.epochs, "quantizer_batch": q.batch_size,
        "decoder_epochs": t.epochs, "decoder_batch": t.batch_size, "decoder_lr": t.lr,
        "use_contrastive": q.use_contrastive, "use_modality_code": q.use_modality_code, "mse_weight": q.mse_weight,
        "quantizer_query_augmentation": q.query_augmentation, "decoder_query_augmentation": t.query_augmentation,
        "index_task": t.index_task, "beam_size": cfg.beam_size,
    }


@dataclass
class _Fitted:
    name: str
    full: GeniusIndex  # pool + training candidates
    pool: GeniusIndex  # searches the pool only
    record: dict[str, Any]


def _fit(name: str, scope: str, task_name: str, ablation: str, pool: Items, train_candidates: Items,
         train_queries: Items, train_targets: np.ndarray, index_config: IndexConfigLike, seed: int,
         progress: bool) -> _Fitted:
    emb = np.concatenate([pool.embeddings, train_candidates.embeddings]).astype(np.float32)
    corpus = Items.from_embeddings(emb, np.concatenate([pool.modality, train_candidates.modality]),
                                   keys=list(pool.keys) + list(train_candidates.keys))
    queries = Items.from_embeddings(train_queries.embeddings, train_queries.modality, keys=train_queries.keys)
    cfg = apply_ablation(_resolve_config(index_config, len(corpus), seed), ablation)
    log.info("fit %s: %d items (%d in the pool), %d training pairs, %d levels x %d codes, ablation %s",
             name, len(corpus), len(pool), len(train_targets), cfg.quantizer.num_levels,
             cfg.quantizer.codebook_size, ablation)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    index = GeniusIndex.fit(corpus, queries, np.asarray(train_targets) + len(pool), cfg, progress=progress)
    seconds = time.perf_counter() - t0
    pool_index = restrict_index(index, np.arange(len(pool)))
    pool_codes = pool_index.item_codes(np.arange(len(pool)))
    distinct = len(np.unique(pool_codes, axis=0))
    record = {
        "name": name, "scope": scope, "task": task_name, "ablation": ablation,
        "items_indexed": len(corpus), "pool_items": len(pool), "train_pairs": int(len(train_targets)),
        "sizes": _config_sizes(cfg), "config": cfg.to_dict(), "fit_seconds": round(seconds, 2),
        "code0_values": sorted(int(v) for v in np.unique(index.item_codes(np.arange(len(index)))[:, 0])),
        "pool_distinct_ids": distinct, "pool_items_per_id": round(len(pool) / max(distinct, 1), 3),
        "trie_bytes_per_item": round(float(pool_index.trie.bytes_per_item()), 2),
    }
    log.info("fit %s done in %.1f s: %d distinct IDs for %d pool items, code 0 values %s",
             name, seconds, distinct, len(pool), record["code0_values"])
    return _Fitted(name, index, pool_index, record)


# ----------------------------------------------------------------------------- searching


RERANK_CODES = "GENIUS+R (codes)"
RERANK_DECODED = "GENIUS+R (decoded modality)"


def _search(index: GeniusIndex, query_emb: np.ndarray, beam: int, k: int,
            item_modality: np.ndarray | None = None) -> tuple[dict[str, list[list[int]]], float]:
    """One trie-constrained beam search, ranked several ways ({method: rankings}, seconds):

    * "GENIUS": beam order (`GeniusIndex.search(rerank=False)`);
    * "GENIUS+R": the beam's items re-ranked by cosine similarity of query and stored item
      embeddings (`rerank=True`);
    * "GENIUS+R (codes)": re-ranked in the quantizer's learned space: projected query
      against vectors rebuilt from the IDs (`rerank_with="codes"`);
    * with `item_modality` (mixed pools), "GENIUS+R (decoded modality)": the beam's items
      of the modality of its best item re-ranked first (by stored embeddings), then the
      others: cosine similarity across modalities would undo the decoded modality.
    """
    out: dict[str, list[list[int]]] = {"GENIUS": [], "GENIUS+R": [], RERANK_CODES: []}
    if item_modality is not None:
        out[RERANK_DECODED] = []
    t0 = time.perf_counter()
    batch = index.config.query_batch
    device = index.config.device
    vectors = lambda items: index.vectors[items].astype(np.float32)  # noqa: E731
    with torch.no_grad():
        for start in range(0, len(query_emb), batch):
            chunk = query_emb[start : start + batch]
            beams = index.beam(torch.from_numpy(chunk).to(device), beam)
            out["GENIUS"].extend(rank(beams, k).as_lists())
            out["GENIUS+R"].extend(rank(beams, k, chunk, vectors).as_lists())
            projected = index.projected_queries(torch.from_numpy(chunk).to(device))
            out[RERANK_CODES].extend(rank(beams, k, projected, index.rebuilt_vectors).as_lists())
            if item_modality is not None:
                for q in range(len(chunk)):
                    items = np.array([i for i, _ in beams.ranked_items(q)], dtype=np.int64)
                    if len(items) == 0:
                        out[RERANK_DECODED].append([])
                        continue
                    v = vectors(items)
                    sims = (v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)) @ chunk[q]
                    same = item_modality[items] == item_modality[items[0]]
                    order = np.lexsort((-sims, ~same))  # decoded modality first, then by similarity
                    out[RERANK_DECODED].append(items[order[:k]].tolist())
    return out, time.perf_counter() - t0


def _ratios(row: dict[str, Any], knn: dict[str, float]) -> None:
    for k in KS:
        base = knn[f"recall@{k}"]
        row[f"ratio@{k}"] = round(row[f"recall@{k}"] / base, 4) if base > 0 else None


def _modality_hits(ranked: list[list[int]], modality: np.ndarray, wanted: Modality) -> float:
    tops = [r[0] for r in ranked if r]
    if not ranked:
        return 0.0
    return float(sum(int(modality[i]) == int(wanted) for i in tops) / len(ranked))


# ----------------------------------------------------------------------------- evaluate


def evaluate(
    task_or_tasks: RetrievalTask | Sequence[RetrievalTask],
    encoder: Any = None,
    index_config: IndexConfigLike = None,
    beams: Sequence[int] = (1, 5, 10, 20, 50),
    ablations: Sequence[str] = (),
    seed: int = 0,
    *,
    embeddings: Mapping[str, np.ndarray] | None = None,
    main_beam: int | None = None,
    per_task: bool = True,
    universal: bool | None = None,
    universal_task_pools: bool = True,
    universal_instructions: bool | None = None,
    ablation_scope: str = "all",
    k: int = 10,
    progress: bool = False,
    keep_indexes: bool = False,
    embedding_cache: EmbeddingCache | None = None,
    title: str | None = None,
    encoder_description: str | None = None,
) -> EvalReport:
    """Evaluate GENIUS, GENIUS+R and exact kNN on the tasks; see the module docstring.

    index_config: an IndexConfig used for every fit, a function num_items -> IndexConfig,
    or None for `IndexConfig.for_corpus(num_items)` (the CPU config). Seeds of quantizer
    and decoder are set to `seed`. main_beam: beam of the main table and the ablations
    (default: the largest of `beams`). universal: one index over the union of the pools
    (default: when there are several tasks); universal_instructions: its queries carry an
    instruction naming the target modality (M-BEIR style; default: when an encoder is given
    to embed them). ablation_scope: which fits the ablations refit: "all", "task" (the
    per-task indexes) or "universal". keep_indexes: keep the fitted pool indexes in
    `report.indexes` (by fit name). embedding_cache: vectors by content for this encoder
    (see `genius.embedding_cache`), read and extended.
    """
    t_start = time.perf_counter()
    tasks = [task_or_tasks] if isinstance(task_or_tasks, RetrievalTask) else list(task_or_tasks)
    if not tasks:
        raise ValueError("no tasks to evaluate")
    beams = sorted({int(b) for b in beams})
    if not beams or beams[0] < 1:
        raise ValueError(f"beams must be positive, got {beams}")
    main_beam = int(main_beam or beams[-1])
    if main_beam not in beams:
        beams = sorted(set(beams) | {main_beam})
    ablations = list(dict.fromkeys(ablations))
    for a in ablations:
        if a not in ABLATIONS:
            raise ValueError(f"unknown ablation {a!r}: choose from {list(ABLATIONS)}")
    universal = len(tasks) > 1 if universal is None else universal
    if ablation_scope not in ("all", "task", "universal"):
        raise ValueError(f"ablation_scope must be 'all', 'task' or 'universal', got {ablation_scope!r}")
    task_ablations = ablations if ablation_scope in ("all", "task") else []
    universal_ablations = ablations if ablation_scope in ("all", "universal") else []
    if not per_task and not universal:
        raise ValueError("nothing to fit: per_task and universal are both off")
    for t in tasks:
        t.validate()

    tasks, embed_seconds = embed_tasks(tasks, encoder, embeddings, cache=embedding_cache)
    results: list[dict[str, Any]] = []
    curves: dict[str, dict[str, dict[str, float]]] = {t.name: {} for t in tasks}
    fits: list[dict[str, Any]] = []
    kept: dict[str, GeniusIndex] = {}

    def knn_row(task: RetrievalTask, pool: Items, relevance: list, pool_name: str, model: str = "-",
                dedupe: bool = False) -> dict[str, float]:
        """Exact kNN of `task`'s test queries over `pool`; the row is filed under task.name
        (dedupe: the same row exists already, return its numbers without adding one)."""
        t0 = time.perf_counter()
        ranked = exact_knn(task.test_queries.embeddings, pool.embeddings, k).tolist()
        secs = time.perf_counter() - t0
        table = recall_table(ranked, relevance, KS)
        if dedupe:
            return table
        row = {"task": task.name, "method": "exact kNN", "model": model, "pool": pool_name, "fit": None,
               "ablation": "full", "beam": None, **table,
               "ms_per_query": round(1000 * secs / max(len(ranked), 1), 3)}
        _ratios(row, table)
        if pool_name == "universal":
            row["top1_modality"] = _modality_hits(ranked, pool.modality, task.candidate_modality)
        results.append(row)
        return table

    def genius_rows(task: RetrievalTask, fitted: _Fitted, index: GeniusIndex, relevance: list, knn: dict,
                    model: str, pool_name: str, ablation: str, beam_list: Sequence[int],
                    curve_label: str | None, pool_modality: np.ndarray | None = None) -> None:
        q = task.test_queries.embeddings
        for beam in beam_list:
            methods, secs = _search(index, q, beam, k, pool_modality)
            for method, ranked in methods.items():
                table = recall_table(ranked, relevance, KS)
                row = {"task": task.name, "method": method, "model": model, "pool": pool_name, "fit": fitted.name,
                       "ablation": ablation, "beam": beam, **table,
                       "ms_per_query": round(1000 * secs / max(len(q), 1), 3)}
                _ratios(row, knn)
                if pool_modality is not None:
                    row["top1_modality"] = _modality_hits(ranked, pool_modality, task.candidate_modality)
                results.append(row)
                if curve_label is not None:
                    curves[task.name].setdefault(f"{method} ({curve_label})", {})[str(beam)] = table["recall@10"]
            log.info("  %s [%s, %s pool, %s] beam %d: R@10 %s (kNN %.3f), %.1f ms/query",
                     task.name, model, pool_name, ablation, beam,
                     ", ".join(f"{m} {recall_table(r, relevance, (10,))['recall@10']:.3f}" for m, r in methods.items()),
                     knn["recall@10"], 1000 * secs / max(len(q), 1))

    # --- per-task indexes -----------------------------------------------------------
    if per_task:
        for task in tasks:
            knn = knn_row(task, task.candidates, task.relevance, "task")
            log.info("%s: exact kNN %s", task.name, recall_line(knn))
            for ablation in ["full", *task_ablations]:
                fit_name = task.name if ablation == "full" else f"{task.name} [{ablation}]"
                fitted = _fit(fit_name, "task", task.name, ablation, task.candidates, task.train_candidates,
                              task.train_queries, task.train_targets, index_config, seed, progress)
                fits.append(fitted.record)
                if keep_indexes:
                    kept[fit_name] = fitted.pool
                genius_rows(task, fitted, fitted.pool, task.relevance, knn, "task", "task", ablation,
                            beams if ablation == "full" else [main_beam],
                            "task model" if ablation == "full" else None)

    # --- universal pool ---------------------------------------------------------------
    universal_summary = None
    if universal:
        if universal_instructions is None:
            universal_instructions = encoder is not None
            if not universal_instructions:
                log.warning("universal pool without query instructions (no encoder to embed them): "
                            "queries of tasks that differ only in target modality are ambiguous")
        up: UniversalPool = universal_pool(tasks, instructions=universal_instructions)
        if universal_instructions:
            views, secs = embed_tasks(up.tasks, encoder, embeddings, cache=embedding_cache)
            embed_seconds += secs
            up = replace(up, tasks=views)
        universal_summary = up.summary()
        log.info("universal pool: %s", universal_summary)
        train_queries = concat_items([t.train_queries for t in up.tasks])
        train_targets = np.concatenate([t.train_targets for t in up.tasks])
        shown = {v.name: replace(v, name=orig.name) for orig, v in zip(tasks, up.tasks)}  # rows filed by task
        knns = {v.name: knn_row(shown[v.name], up.candidates, v.relevance, "universal") for v in up.tasks}
        # The universal model searched over each task's own pool, with the universal queries
        # (instructed, if so); its kNN baseline uses the same queries over the same pool.
        own_tasks = {t.name: replace(t, test_queries=v.test_queries, query_modality=v.query_modality)
                     for t, v in zip(tasks, up.tasks)}
        own_knn = {}
        if universal_task_pools:
            own_knn = {t.name: knn_row(own_tasks[t.name], t.candidates, t.relevance, "task",
                                       model="universal queries" if universal_instructions else "-",
                                       dedupe=not universal_instructions and per_task)
                       for t in tasks}
        for ablation in ["full", *universal_ablations]:
            fit_name = up.name if ablation == "full" else f"{up.name} [{ablation}]"
            fitted = _fit(fit_name, "universal", up.name, ablation, up.candidates, up.train_candidates,
                          train_queries, train_targets, index_config, seed, progress)
            fits.append(fitted.record)
            if keep_indexes:
                kept[fit_name] = fitted.pool
            for orig, view in zip(tasks, up.tasks):
                # Result rows are filed under the original task's name, pool "universal".
                genius_rows(shown[view.name], fitted, fitted.pool, view.relevance, knns[view.name], "universal", "universal",
                            ablation, beams if ablation == "full" else [main_beam],
                            "universal" if ablation == "full" else None, up.candidates.modality)
                if universal_task_pools and ablation == "full":
                    own = restrict_index(fitted.full, up.rows[orig.name])
                    genius_rows(own_tasks[orig.name], fitted, own, orig.relevance, own_knn[orig.name],
                                "universal (task pool)",
                                "task", ablation, [main_beam], None)

    total = time.perf_counter() - t_start
    meta = {
        "title": title, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "encoder": encoder_description or (type(encoder).__name__ if encoder is not None else "precomputed embeddings"),
        "beams": beams, "main_beam": main_beam, "k": k, "seed": seed, "ablations": ablations,
        "ablation_scope": ablation_scope,
        "per_task": per_task, "universal": universal, "universal_instructions": universal_instructions,
        "embed_dim": int(tasks[0].candidates.embeddings.shape[1]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs" + (
            f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
    }
    timings = {"total_seconds": round(total, 2), "embed_seconds": round(embed_seconds, 2),
               "fit_seconds": {f["name"]: f["fit_seconds"] for f in fits}}
    log.info("evaluation done in %.0f s", total)
    return EvalReport(tasks=[t.summary() for t in tasks], results=results, beam_curves=curves, fits=fits,
                      timings=timings, meta=meta, universal=universal_summary, indexes=kept)
