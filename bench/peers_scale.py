"""The latency curve of `bench/peers.py`: ms per query as the corpus grows 10^4 -> 10^7.

Up to the real corpus size the items are a random subset of the task's pool; beyond it,
distractors are added: each copies a random real item's ID down to a random level and
draws the rest of its codes uniformly (so the trie keeps the real prefix structure and
grows denser below it), and its vector is that item's vector plus Gaussian noise, put back
on the unit sphere. GENIUS (the WordNet-trained model) searches the index published to the
store and opened memory-mapped (`GeniusIndex.load`); faiss flat and IVF-PQ hold the same
vectors. One query per call (batch 1), the same queries for every method and size.

Memory: flat at 10^7 x 384 dims would need 15 GB of fp32 beside the store's 7.7 GB of
fp16 vectors, so above --flat-chunk items flat runs over chunks of that size (one
IndexFlatIP each) and its time is their sum plus the top-k merge: the same arithmetic.
IVF-PQ places a distractor in its base item's list (`add_core` with the list precomputed),
as assigning 10^7 vectors to 16k centroids would take hours here.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from peers_methods import ivf_lists

log = logging.getLogger("bench.peers")
NOISE = 0.05  # per-dimension sd of a distractor's vector offset, before renormalising
CHUNK = 1_000_000


def distractor_block(rng: np.random.Generator, base: np.ndarray, codes: np.ndarray, vectors: np.ndarray,
                     codebook_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(codes (n, 1+L), fp16 vectors (n, D)) of distractors derived from real items `base`."""
    out = codes[base].copy()
    levels = out.shape[1] - 1
    keep = rng.integers(1, levels, size=len(base))  # keep the modality code and 1..L-1 semantic codes
    fresh = rng.integers(0, codebook_size, size=(len(base), levels))
    tail = np.arange(1, levels + 1)[None, :] > keep[:, None]
    out[:, 1:] = np.where(tail, fresh, out[:, 1:])
    vec = vectors[base].astype(np.float32) + rng.normal(0, NOISE, size=(len(base), vectors.shape[1])).astype(np.float32)
    vec /= np.maximum(np.linalg.norm(vec, axis=1, keepdims=True), 1e-12)
    return out, vec.astype(np.float16)


def corpus_of_size(n: int, codes: np.ndarray, vectors: np.ndarray, codebook_size: int, seed: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes, fp16 vectors, base real row per item) of an n-item corpus."""
    rng = np.random.default_rng(seed)
    real = len(codes)
    if n <= real:
        rows = np.sort(rng.choice(real, n, replace=False))
        return codes[rows], vectors[rows].astype(np.float16), rows
    all_codes = np.empty((n, codes.shape[1]), dtype=codes.dtype)
    all_vecs = np.empty((n, vectors.shape[1]), dtype=np.float16)
    base = np.empty(n, dtype=np.int64)
    all_codes[:real], all_vecs[:real], base[:real] = codes, vectors.astype(np.float16), np.arange(real)
    for a in range(real, n, CHUNK):
        b = min(n, a + CHUNK)
        base[a:b] = rng.integers(0, real, size=b - a)
        all_codes[a:b], all_vecs[a:b] = distractor_block(rng, base[a:b], codes, vectors, codebook_size)
    return all_codes, all_vecs, base


def _per_query_ms(search, queries: np.ndarray) -> float:
    search(queries[:1])  # warm-up (first page faults, lazy structures)
    t0 = time.perf_counter()
    for q in range(len(queries)):
        search(queries[q : q + 1])
    return 1000 * (time.perf_counter() - t0) / len(queries)


def latency_curve(task: Any, index: Any, sizes: list[int], args: Any, out: list[dict[str, Any]],
                  on_size: Any = None) -> list[dict[str, Any]]:
    """Appends {n, method, ms_per_query} rows to `out` (on_size() after each size)."""
    import faiss

    from genius.index import GeniusIndex

    queries = np.ascontiguousarray(task.test_queries[: args.scale_queries], dtype=np.float32)
    real_codes = index.item_codes(np.arange(len(index)))
    real_vectors = task.pool.astype(np.float32)
    k_codes = index.quantizer.codebook_size
    # IVF-PQ is trained once on the real vectors; every size adds to a fresh copy of it.
    nlist = ivf_lists(max(sizes))
    ivf_trained = faiss.index_factory(real_vectors.shape[1], f"IVF{nlist},PQ12np", faiss.METRIC_INNER_PRODUCT)
    t0 = time.perf_counter()
    ivf_trained.train(real_vectors[np.random.default_rng(args.seed).permutation(len(real_vectors))[:args.faiss_train]])
    real_lists = ivf_trained.quantizer.search(real_vectors, 1)[1][:, 0]
    log.info("scale: IVF%d,PQ12 trained in %.0f s", nlist, time.perf_counter() - t0)
    work = Path(tempfile.mkdtemp(prefix="peers-scale-", dir=args.cache))
    try:
        for n in sorted(sizes):
            t0 = time.perf_counter()
            codes, vectors, base = corpus_of_size(n, real_codes, real_vectors, k_codes, args.seed)
            keys = np.char.add("i", np.arange(n).astype(str)).tolist()
            built = GeniusIndex.from_codes(index.config, index.quantizer, index.decoder, codes,
                                           codes[:, 0] if index.quantizer.use_modality_code else
                                           np.full(n, int(task.candidate_modality)), keys, vectors)
            del keys
            folder = built.save(work / f"n{n}")
            del built
            stored = GeniusIndex.load(folder, mmap=True)
            log.info("scale %s items: corpus and store in %.0f s", f"{n:,}", time.perf_counter() - t0)
            beam = args.beam
            out.append({"n": n, "method": "genius", "ms_per_query": round(_per_query_ms(
                lambda q: stored.search(q, 10, beam, rerank=False), queries), 3)})
            out.append({"n": n, "method": "genius_r", "ms_per_query": round(_per_query_ms(
                lambda q: stored.search(q, 10, beam, rerank=True), queries), 3)})
            out.append({"n": n, "method": "flat", "ms_per_query": round(_flat_ms(vectors, queries, args.flat_chunk), 3)})
            ivf = faiss.clone_index(ivf_trained)
            ivf.nprobe = min(args.nprobe, nlist)
            for a in range(0, n, CHUNK):
                b = min(n, a + CHUNK)
                x = np.ascontiguousarray(vectors[a:b], dtype=np.float32)
                lists = np.ascontiguousarray(real_lists[base[a:b]], dtype=np.int64)
                ivf.add_core(b - a, faiss.swig_ptr(x), None, faiss.swig_ptr(lists))
            out.append({"n": n, "method": "ivfpq", "ms_per_query": round(_per_query_ms(
                lambda q: ivf.search(q, 10), queries), 3), "nlist": nlist, "nprobe": int(ivf.nprobe)})
            del ivf, stored, vectors, codes, base
            shutil.rmtree(work / f"n{n}", ignore_errors=True)
            log.info("scale %s: %s", f"{n:,}", {r["method"]: r["ms_per_query"] for r in out if r["n"] == n})
            if on_size is not None:
                on_size()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def _flat_ms(vectors: np.ndarray, queries: np.ndarray, chunk: int) -> float:
    """ms per query of exact inner-product search, one query per call (summed over chunks)."""
    import faiss

    total = 0.0
    tops = []
    for a in range(0, len(vectors), chunk):
        flat = faiss.IndexFlatIP(vectors.shape[1])
        flat.add(np.ascontiguousarray(vectors[a : a + chunk], dtype=np.float32))
        total += _per_query_ms(lambda q: tops.append(flat.search(q, 10)), queries)
        del flat
    # merging the chunks' top 10s is a 10 x chunks partial sort per query: negligible, not timed
    return total
