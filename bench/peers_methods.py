"""The methods `bench/peers.py` compares, behind one interface: build on a pool, search a batch.

faiss (`faiss-cpu`), all by inner product on the same unit-norm embeddings:
  flat    exact search (IndexFlatIP), 4·D bytes per item;
  pq12    product quantizer, 12 sub-vectors x 8 bits = 12 bytes;
  opq12   OPQ rotation + the same PQ, 12 bytes;
  ivfpq   inverted file (nlist ~ 4·sqrt(N) cells) + PQ12 codes, nprobe cells searched;
          12 bytes of code + 8 of item number in the lists;
  rq8x12  residual quantizer, 8 levels x 12 bits = 12 bytes (the code of the paper's IDs:
          8 x 4096), searched with look-up tables.
Each compressed one also as `<name>_rr100`: its top 100, re-scored exactly with the stored
vectors (fp16, 2·D bytes per item more), as GENIUS+R re-scores its beam.

GENIUS: `GeniusIndex.fit` on the pool and the task's training pairs; `genius` ranks in beam
order, `genius_r` re-scores the beam's items with the stored vectors.

faiss codebooks are trained on `train_vectors` (the full corpus's pool vectors, sampled): on
a small pool the 4096-code levels of RQ8x12 would have fewer points than codes.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("bench.peers")

FAISS_METHODS = ("flat", "pq12", "opq12", "ivfpq", "rq8x12")
RERANK_DEPTH = 100


@dataclass
class Built:
    """A method ready to search: `search(queries (Q, D), k)` -> (Q, k) pool rows (-1 = none)."""

    name: str
    search: Any
    build_s: float
    bytes_per_item: float
    info: dict[str, Any] = field(default_factory=dict)
    pool_share_rescored: Any = None  # callable () -> float, GENIUS+R only


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


# ----------------------------------------------------------------------------- faiss


RQ_BITS = 12  # bits per RQ level: 8 x 12 bits = 12 bytes (tests lower it: 4096-code k-means are slow)


def faiss_index(name: str, dim: int, num_items: int, nprobe: int):
    """An untrained faiss index for one of FAISS_METHODS (inner-product metric)."""
    import faiss

    ip = faiss.METRIC_INNER_PRODUCT
    if name == "flat":
        return faiss.IndexFlatIP(dim)
    if name == "pq12":
        return faiss.IndexPQ(dim, 12, 8, ip)
    if name == "opq12":
        return faiss.index_factory(dim, "OPQ12,PQ12np", ip)  # np: no polysemous training (unused here, slow)
    if name == "ivfpq":
        nlist = ivf_lists(num_items)
        index = faiss.index_factory(dim, f"IVF{nlist},PQ12np", ip)
        index.nprobe = min(nprobe, nlist)
        return index
    if name == "rq8x12":
        return residual_quantizer(dim, 8, RQ_BITS, encode_beam=5)  # faiss's default encoding beam
    raise ValueError(f"unknown faiss method {name!r}: choose from {FAISS_METHODS}")


def residual_quantizer(dim: int, levels: int, bits: int, encode_beam: int):
    """An untrained faiss residual quantizer (inner product): `levels` codebooks of 2**bits."""
    import faiss

    index = faiss.IndexResidualQuantizer(dim, levels, bits, faiss.METRIC_INNER_PRODUCT,
                                         faiss.AdditiveQuantizer.ST_LUT_nonorm)
    index.rq.max_beam_size = encode_beam
    index.rq.cp.niter = 10  # k-means iterations per level (faiss: 25): the 4096-code levels dominate the build
    return index


def ivf_lists(num_items: int) -> int:
    """nlist: the power of two nearest 4·sqrt(N), at least 16 (faiss's rule of thumb)."""
    return max(16, 2 ** round(math.log2(4 * math.sqrt(num_items))))


def build_faiss(name: str, pool: np.ndarray, train_vectors: np.ndarray, nprobe: int = 32,
                trained: dict[str, Any] | None = None) -> Built:
    """A faiss method holding `pool`. With `trained` (name -> a trained index, filled here),
    a method whose training does not depend on the pool size (PQ, OPQ, RQ: not IVF, whose
    list count follows N) reuses that training: the recall curve's smaller pools are then
    coded by the full pool's codebooks, and only IVF-PQ retrains."""
    import faiss

    dim = pool.shape[1]
    reuse = trained is not None and name in trained and name != "ivfpq"
    t0 = time.perf_counter()
    if reuse:
        index = faiss.clone_index(trained[name])
        index.reset()
    else:
        index = faiss_index(name, dim, len(pool), nprobe)
        if not index.is_trained:
            index.train(np.ascontiguousarray(train_vectors, dtype=np.float32))
        if trained is not None:
            trained[name] = faiss.clone_index(index)
    index.add(np.ascontiguousarray(pool, dtype=np.float32))
    build_s = time.perf_counter() - t0
    code = {"flat": 4 * dim, "pq12": 12, "opq12": 12, "ivfpq": 12 + 8, "rq8x12": 12}[name]

    def search(queries: np.ndarray, k: int) -> np.ndarray:
        return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)[1]

    info = {"trained_on": len(train_vectors), "training_reused": reuse}
    if name == "ivfpq":
        info.update(nlist=int(index.nlist), nprobe=int(index.nprobe))
    return Built(name, search, build_s, float(code), info)


def with_rerank(base: Built, pool_fp16: np.ndarray, depth: int = RERANK_DEPTH) -> Built:
    """`base`'s top `depth`, re-scored exactly against the stored fp16 vectors."""

    def search(queries: np.ndarray, k: int) -> np.ndarray:
        top = base.search(queries, depth)
        out = np.full((len(queries), k), -1, dtype=np.int64)
        for q, rows in enumerate(top):
            rows = rows[rows >= 0]
            scores = pool_fp16[rows].astype(np.float32) @ queries[q]
            order = np.argsort(-scores, kind="stable")[:k]
            out[q, : len(order)] = rows[order]
        return out

    return Built(f"{base.name}_rr{depth}", search, base.build_s, base.bytes_per_item + 2 * pool_fp16.shape[1],
                 {**base.info, "rerank_depth": depth})


# ----------------------------------------------------------------------------- GENIUS


def build_genius(pool: np.ndarray, modality: np.ndarray, train_queries: np.ndarray, train_targets: np.ndarray,
                 query_modality: int, config: Any, beam: int, progress: bool = False,
                 saved: Path | None = None) -> tuple[Built, Built, Any]:
    """(genius, genius_r, the fitted GeniusIndex): the beam scored as config.codebook_weight says.

    saved: an index folder; a fit of the same pool and config found there is loaded
    (memory-mapped) with its recorded build time instead of refitting, otherwise the fit is
    saved there (a full-pool WordNet fit takes over half an hour on 2 cores)."""
    from genius.index import GeniusIndex
    from genius.items import Items

    stamp = {"pool": len(pool), "train_pairs": len(train_targets), "config": _config_summary(config)}
    record = saved / "peers-fit.json" if saved is not None else None
    if record is not None and record.exists():
        previous = json.loads(record.read_text(encoding="utf-8"))
        if {k: previous.get(k) for k in stamp} == json.loads(json.dumps(stamp)):
            index = GeniusIndex.load(saved)
            index.config.codebook_weight = config.codebook_weight
            index.config.beam_size = config.beam_size
            index.config.level_widths = list(config.level_widths)
            index.config.lookahead_rows = config.lookahead_rows
            log.info("GENIUS: loaded the fit saved in %s (fitted in %.0f s)", saved, previous["build_s"])
            plain, reranked = genius_methods(index, beam, previous["build_s"])
            return plain, reranked, index
        log.warning("GENIUS: %s holds a fit of another pool or config: refitting", saved)
    corpus = Items.from_embeddings(pool, modality, keys=[str(i) for i in range(len(pool))])
    queries = Items.from_embeddings(train_queries, np.full(len(train_queries), query_modality, dtype=np.int64))
    index, build_s = _timed(lambda: GeniusIndex.fit(corpus, queries, train_targets, config, progress=progress))
    if saved is not None:
        index.save(saved)
        record.write_text(json.dumps({**stamp, "build_s": build_s}, indent=2) + "\n", encoding="utf-8")
    plain, reranked = genius_methods(index, beam, build_s)
    return plain, reranked, index


def genius_methods(index: Any, beam: int, build_s: float, codebook_weight: float | None = None,
                   suffix: str = "", distinct_ids: int | None = None,
                   level_widths: list[int] | None = None, lookahead_rows: int | None = None,
                   skip_forced: bool = True, normalize: str = "allowed") -> tuple[Built, Built]:
    """(genius, genius_r) searching a fitted index; codebook_weight, level_widths and
    lookahead_rows override the config's; skip_forced=False runs the decoder at every step
    (the same results, for timing what skipping forced steps saves); normalize: beam_search's
    ("level": the decoder's softmax over the whole level, not renormalised over the codes the
    trie allows). distinct_ids: the index's count of distinct IDs when known (a unique over
    every ID)."""
    from genius.rerank import cosine

    pool_size = len(index)
    trie_bytes = float(index.trie.bytes_per_item())
    model_bytes = sum(p.numel() * p.element_size() for m in (index.decoder, index.quantizer) for p in m.parameters())
    vectors = index.vectors
    rescored: list[int] = []

    def beam_candidates(queries: np.ndarray) -> list[np.ndarray]:
        return [items for items, _ in index.candidates(np.ascontiguousarray(queries, dtype=np.float32), beam,
                                                       codebook_weight=codebook_weight, level_widths=level_widths,
                                                       lookahead_rows=lookahead_rows, skip_forced=skip_forced,
                                                       normalize=normalize)]

    def search_plain(queries: np.ndarray, k: int) -> np.ndarray:
        out = np.full((len(queries), k), -1, dtype=np.int64)
        for q, items in enumerate(beam_candidates(queries)):
            out[q, : min(k, len(items))] = items[:k]
        return out

    def search_rerank(queries: np.ndarray, k: int) -> np.ndarray:
        out = np.full((len(queries), k), -1, dtype=np.int64)
        for q, items in enumerate(beam_candidates(queries)):
            rescored.append(len(items))
            if len(items):
                sims = cosine(queries[q], vectors[items])
                order = np.argsort(-sims, kind="stable")[:k]
                out[q, : len(order)] = items[order]
        return out

    settings = index.beam_settings(codebook_weight, level_widths, lookahead_rows)
    info = {"fit_config": _config_summary(index.config), "trie_bytes_per_item": round(trie_bytes, 2),
            "model_bytes": int(model_bytes), "beam": beam, "level_widths": list(settings.level_widths),
            "codebook_weight": settings.codebook_weight, "lookahead_rows": settings.lookahead_rows,
            "skip_forced": skip_forced, "normalize": normalize,
            "distinct_ids": int(len(np.unique(index.item_codes(np.arange(pool_size)), axis=0))
                                if distinct_ids is None else distinct_ids)}
    plain = Built("genius" + suffix, search_plain, build_s, trie_bytes, info)
    reranked = Built("genius_r" + suffix, search_rerank, build_s, trie_bytes + 2 * index.decoder.embed_dim, info,
                     pool_share_rescored=lambda: float(np.mean(rescored)) / pool_size if rescored else None)
    return plain, reranked


def _config_summary(cfg: Any) -> dict[str, Any]:
    q, d, t = cfg.quantizer, cfg.decoder, cfg.decoder_training
    return {"levels": q.num_levels, "codebook_size": q.codebook_size, "quantizer_epochs": q.epochs,
            "kmeans_progressive_steps": q.kmeans_progressive_steps, "refit_codebooks": q.refit_codebooks,
            "decoder": f"{d.num_layers}x{d.d_model} ff{d.d_ff} P{d.prefix_len}", "decoder_epochs": t.epochs,
            "decoder_batch": t.batch_size, "decoder_lr": t.lr, "index_task": t.index_task}
