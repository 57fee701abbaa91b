"""Decode benchmark: our batched trie-constrained beam search vs the reference way to decode.

The reference GENIUS code decodes with transformers' `T5ForConditionalGeneration.generate`
and `prefix_allowed_tokens_fn` over a nested-dict trie (dict of dicts keyed by token id;
the function walks the dict along the decoded prefix and returns the allowed next tokens).
This script runs both on the very same weights (`genius.hf_t5.to_hf_t5`), the same query
prefix vectors, the same IDs, and reports:

* wall time per query of each (same run, same thread count, both under inference_mode,
  one warm-up call each), their ratio, and ours over a sweep of batch sizes;
* whether both return the same top-10 IDs, and the score differences;
* the decoder's FLOPs per query, this machine's measured fp32 matmul rate, and our time
  as a multiple of the arithmetic floor (FLOPs / rate).

Normalisation: ours runs with `normalize="allowed"` and HF with `renormalize_logits=True`.
HF takes log-softmax over the full vocabulary, adds the prefix constraint's -inf mask, then
renormalises (log-softmax again) over what is left, i.e. over the trie-allowed tokens; ours
takes log-softmax of the current level's logits over the trie-allowed codes. Both compute
the same distribution. `length_penalty=0.0` makes HF's `sequences_scores` plain sums of
log-probabilities, like ours.

    python bench/decode.py            # paper size (t5-small decoder, 8 x 4096, 100k IDs)
    python bench/decode.py --help
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from genius.beam_search import beam_search  # noqa: E402
from genius.decoder import (  # noqa: E402
    CODE_TOKEN_OFFSET,
    MODALITY_TOKEN_OFFSET,
    START_TOKEN,
    DecoderConfig,
    GeniusDecoder,
    level_token_offset,
)
from genius.idcodec import IdCodec  # noqa: E402
from genius.modality import NUM_MODALITIES, Modality  # noqa: E402
from genius.trie import Trie  # noqa: E402

log = logging.getLogger("bench.decode")

# Share of items per modality when IDs are spread over all three (image, text, image-text).
MODALITY_SHARES = (0.45, 0.35, 0.20)
HF_DEAD_SCORE = -1e8  # HF pads impossible beams with about -1e9 (or -inf)


# --------------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark genius.beam_search against transformers generate + prefix_allowed_tokens_fn.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--decoder", choices=("paper", "small"), default="paper",
                   help="paper: DecoderConfig() (t5-small: 6 layers, d=512, 8 heads, d_ff 2048, P=30); "
                        "small: DecoderConfig.small()")
    p.add_argument("--levels", type=int, default=8, help="L semantic levels")
    p.add_argument("--codebook-size", type=int, default=4096, help="K codes per level")
    p.add_argument("--num-ids", type=int, default=100_000, help="items in the trie")
    p.add_argument("--modalities", choices=("all", "one"), default="all",
                   help=f"all: items spread over image/text/image-text ({MODALITY_SHARES}); one: all images")
    p.add_argument("--id-structure", choices=("skewed", "balanced"), default="skewed",
                   help="skewed: Zipf-like code usage, prefixes shared deep; balanced: uniform code usage "
                        "(see make_codes)")
    p.add_argument("--embed-dim", type=int, default=384, help="query embedding size")
    p.add_argument("--beam", type=int, default=50, help="beam size (both methods)")
    p.add_argument("--top-k", type=int, default=10, help="compare this many best IDs (capped at the beam)")
    p.add_argument("--queries", type=int, default=24, help="queries decoded by each method")
    p.add_argument("--batch", type=int, default=8, help="queries per call, same for both methods")
    p.add_argument("--sweep", default="1,4,12,24",
                   help="comma-separated batch sizes to time ours at (capped at --queries)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for decode.json and decode.md")
    p.add_argument("--skip-sweep", action="store_true", help="time ours at --batch only")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- data
def make_codes(num_ids: int, levels: int, codebook_size: int, modalities: str, seed: int,
               structure: str = "skewed", dim: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Structured random IDs: residual quantization of a clustered point set.

    Points come from a Gaussian mixture whose cluster sizes follow a Zipf law (weight 1/rank),
    so some regions are dense. Each level quantizes the current residuals with a fixed random
    codebook (nearest codeword), and the residual goes to the next level:

    * skewed (default): codewords drawn from a Gaussian fitted to the residuals (per-dimension
      mean and std). Dense regions fall into few cells: code usage is Zipf-like with dead codes,
      and prefixes are shared deep into the ID (like an unbalanced quantizer).
    * balanced: codewords sampled from the residuals themselves (k-means-style initialisation):
      every code used about equally; with K = 4096 IDs become unique after about two levels.

    Returns (N, L) codes and (N,) modalities.
    """
    rng = np.random.default_rng(seed)
    clusters = max(8, num_ids // 250)
    weights = 1.0 / np.arange(1, clusters + 1)
    weights /= weights.sum()
    which = rng.choice(clusters, size=num_ids, p=weights)
    centres = rng.standard_normal((clusters, dim))
    x = torch.from_numpy((centres[which] + 0.35 * rng.standard_normal((num_ids, dim))).astype(np.float32))
    codes = np.empty((num_ids, levels), dtype=np.int64)
    residual = x
    for level in range(levels):
        if structure == "skewed":
            noise = torch.from_numpy(rng.standard_normal((codebook_size, dim)).astype(np.float32))
            book = residual.mean(0) + residual.std(0) * noise
        else:
            pick = rng.choice(num_ids, size=codebook_size, replace=num_ids < codebook_size)
            book = residual[torch.from_numpy(pick)].clone()
            book += 1e-3 * book.std() * torch.from_numpy(rng.standard_normal(book.shape).astype(np.float32))
        norms = (book * book).sum(1)
        assign = torch.empty(num_ids, dtype=torch.long)
        for lo in range(0, num_ids, 4096):
            chunk = residual[lo:lo + 4096]
            assign[lo:lo + 4096] = (norms[None, :] - 2 * chunk @ book.T).argmin(1)
        codes[:, level] = assign.numpy()
        residual = residual - book[assign]
    if modalities == "all":
        mods = rng.choice(NUM_MODALITIES, size=num_ids, p=np.array(MODALITY_SHARES))
    else:
        mods = np.full(num_ids, int(Modality.IMAGE), dtype=np.int64)
    return codes, mods.astype(np.int64)


def trie_stats(codes: np.ndarray, mods: np.ndarray) -> dict:
    """Distinct prefixes per depth (modality included) and mean children per internal node."""
    keys = np.concatenate([mods[:, None], codes], axis=1)
    distinct = []
    for depth in range(1, keys.shape[1] + 1):
        distinct.append(int(len(np.unique(keys[:, :depth], axis=0))))
    children = [distinct[0]] + [distinct[i] / distinct[i - 1] for i in range(1, len(distinct))]
    return {"distinct_prefixes_per_depth": distinct,
            "mean_children_per_node": [round(float(c), 3) for c in children],
            "distinct_ids": distinct[-1], "items": int(len(codes))}


def build_dict_trie(codes: np.ndarray, mods: np.ndarray, codebook_size: int) -> dict:
    """The reference's nested-dict trie over token ids (modality token, then one token per level)."""
    tokens = np.concatenate(
        [mods[:, None] + MODALITY_TOKEN_OFFSET,
         codes + np.array([level_token_offset(l, codebook_size) for l in range(1, codes.shape[1] + 1)])],
        axis=1,
    ).tolist()
    root: dict = {}
    for row in tokens:
        node = root
        for t in row:
            node = node.setdefault(t, {})
    return root


def make_prefix_allowed_tokens_fn(root: dict):
    """GENRE/GENIUS style: walk the dict along the prefix (after the start token)."""
    def prefix_allowed_tokens_fn(batch_id: int, sent: torch.Tensor) -> list[int]:
        node = root
        for t in sent.tolist()[1:]:
            node = node.get(t)
            if node is None:  # a dead beam (score -inf); any token keeps HF happy
                return [START_TOKEN]
        return list(node.keys()) if node else [START_TOKEN]
    return prefix_allowed_tokens_fn


# --------------------------------------------------------------------------- decoding
def run_ours(decoder: GeniusDecoder, trie: Trie, queries: torch.Tensor, beam: int, batch: int,
             top_k: int) -> dict:
    codes, scores, times, cpu = [], [], [], []
    with torch.inference_mode():
        for lo in range(0, len(queries), batch):
            q = queries[lo:lo + batch]
            t0, c0 = time.perf_counter(), time.process_time()
            res = beam_search(decoder, trie, q, beam_size=beam, normalize="allowed")
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            codes.append(res.codes[:, :top_k])
            scores.append(res.scores[:, :top_k])
    return {"codes": np.concatenate(codes), "scores": np.concatenate(scores), "batch_seconds": times,
            "batch_cpu_seconds": cpu}


def run_hf(model, decoder: GeniusDecoder, fn, queries: torch.Tensor, beam: int, batch: int, top_k: int) -> dict:
    from transformers.modeling_outputs import BaseModelOutput

    L, K = decoder.num_levels, decoder.codebook_size
    offsets = np.array([level_token_offset(l, K) for l in range(L + 1)])
    codes, scores, times, cpu = [], [], [], []
    with torch.inference_mode():
        for lo in range(0, len(queries), batch):
            q = queries[lo:lo + batch]
            t0, c0 = time.perf_counter(), time.process_time()
            prefix = decoder.prefix(q)
            out = model.generate(
                encoder_outputs=BaseModelOutput(last_hidden_state=prefix),
                decoder_start_token_id=START_TOKEN, eos_token_id=None, pad_token_id=START_TOKEN,
                max_new_tokens=1 + L, num_beams=beam, num_return_sequences=top_k, do_sample=False,
                prefix_allowed_tokens_fn=fn, renormalize_logits=True, length_penalty=0.0, early_stopping=False,
                return_dict_in_generate=True, output_scores=True,
            )
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            seq = out.sequences.view(len(q), top_k, -1)[:, :, 1:].numpy()
            s = out.sequences_scores.view(len(q), top_k).double().numpy()
            c = seq - offsets
            dead = ~(s > HF_DEAD_SCORE)
            c[dead] = -1
            s = np.where(dead, -np.inf, s)
            codes.append(c)
            scores.append(s)
    return {"codes": np.concatenate(codes), "scores": np.concatenate(scores), "batch_seconds": times,
            "batch_cpu_seconds": cpu}


def _merge_runs(parts: list[dict]) -> dict:
    return {"codes": np.concatenate([p["codes"] for p in parts]),
            "scores": np.concatenate([p["scores"] for p in parts]),
            "batch_seconds": [t for p in parts for t in p["batch_seconds"]],
            "batch_cpu_seconds": [t for p in parts for t in p["batch_cpu_seconds"]]}


def compare(ours: dict, hf: dict, tie_tol: float = 1e-4) -> dict:
    """Top-k agreement per query, and score differences."""
    Q = len(ours["codes"])
    identical, same_set, mismatches = 0, 0, []
    max_diff = 0.0
    for q in range(Q):
        a, b = ours["codes"][q], hf["codes"][q]
        sa, sb = ours["scores"][q], hf["scores"][q]
        valid = np.isfinite(sa) & np.isfinite(sb)
        if valid.any():
            max_diff = max(max_diff, float(np.abs(sa[valid] - sb[valid]).max()))
        if np.array_equal(a, b):
            identical += 1
            same_set += 1
            continue
        ta, tb = {tuple(r) for r in a.tolist()}, {tuple(r) for r in b.tolist()}
        same_set += ta == tb
        ranks = [int(r) for r in np.flatnonzero((a != b).any(1))]
        gaps = [abs(float(sa[r]) - float(sb[r])) for r in ranks]
        mismatches.append({
            "query": q, "ranks": ranks, "same_set": ta == tb,
            "ours": {"codes": a[ranks].tolist(), "scores": [float(sa[r]) for r in ranks]},
            "hf": {"codes": b[ranks].tolist(), "scores": [float(sb[r]) for r in ranks]},
            "max_score_gap": max(gaps),
            "near_tie": max(gaps) < tie_tol,
        })
    return {"queries": Q, "top_k": int(ours["codes"].shape[1]), "identical": identical,
            "identical_fraction": identical / max(1, Q), "same_set": same_set,
            "max_abs_score_diff": max_diff, "tie_tolerance": tie_tol, "mismatches": mismatches}


# --------------------------------------------------------------------------- FLOPs
def step_widths(beam: int, levels: int, codebook_size: int) -> list[int]:
    """Beams entering each step of our search: 1, then min(beam, width * tokens of the level)."""
    widths, w = [], 1
    for step in range(levels + 1):
        widths.append(w)
        n = NUM_MODALITIES if step == 0 else codebook_size
        w = min(beam, w * n)
    return widths


def decoder_flops(cfg: DecoderConfig, embed_dim: int, widths: list[int], out_tokens: list[int],
                  cross_kv_rows: int) -> dict:
    """Multiply-add FLOPs (2 per MAC) of decoding one query.

    widths[s]: beams run at step s; out_tokens[s]: logits computed per beam at step s;
    cross_kv_rows: how many copies of the cross-attention keys/values are computed
    (1 for ours, the beam for HF, which expands the encoder output per beam).
    Norms, softmax, embedding lookups and the top-k are left out (O(d) per beam).
    """
    d, inner, P, layers = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.prefix_len, cfg.num_layers
    prefix = 2 * embed_dim * d * P
    cross_kv = cross_kv_rows * layers * 2 * (2 * P * d * inner)
    per_layer_proj = 4 * 2 * d * inner + 2 * 2 * d * inner + 2 * 2 * d * cfg.d_ff
    steps_proj = steps_attn = steps_logits = 0
    for t, (w, n) in enumerate(zip(widths, out_tokens)):
        steps_proj += w * layers * per_layer_proj
        steps_attn += w * layers * (2 * 2 * inner * (t + 1) + 2 * 2 * inner * P)
        steps_logits += w * 2 * d * n
    total = prefix + cross_kv + steps_proj + steps_attn + steps_logits
    return {"prefix_projection": prefix, "cross_kv": cross_kv, "projections_ffn": steps_proj,
            "attention_products": steps_attn, "logits": steps_logits, "total": total}


def matmul_rate(m: int, k: int, n: int, min_seconds: float = 0.5) -> float:
    """GFLOP/s of F.linear((m, k), (n, k)) in fp32, best of a few timed rounds."""
    a = torch.randn(m, k)
    w = torch.randn(n, k)
    with torch.inference_mode():
        for _ in range(3):
            F.linear(a, w)
        best = 0.0
        rounds = 0
        t_end = time.perf_counter() + min_seconds
        while rounds < 3 or time.perf_counter() < t_end:
            iters = max(1, int(2e8 / (2 * m * k * n)) or 1)
            t0 = time.perf_counter()
            for _ in range(iters):
                F.linear(a, w)
            dt = time.perf_counter() - t0
            best = max(best, 2 * m * k * n * iters / dt / 1e9)
            rounds += 1
    return best


# --------------------------------------------------------------------------- reporting
def machine_info() -> dict:
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": model,
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "numpy_version": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def per_query_ms(times: list[float], queries: int) -> float:
    return 1000.0 * sum(times) / queries


def render_text(r: dict) -> str:
    c, m, t = r["config"], r["machine"], r["timing"]
    a, fl, mm = r["agreement"], r["flops"], r["matmul"]
    dec = c["decoder_config"]
    lines = [
        f"GENIUS decode benchmark: torch {m['torch_version']}, transformers {m['transformers_version']}, "
        f"{m['torch_threads']} torch threads, {m['cpus_usable']} CPUs ({m['cpu_model']})",
        f"decoder {c['decoder']} ({dec['num_layers']} layers, d={dec['d_model']}, {dec['num_heads']} heads, "
        f"d_ff {dec['d_ff']}, P={dec['prefix_len']}), L={c['levels']} x K={c['codebook_size']}, "
        f"{c['num_ids']} IDs ({c['modalities']} modalities, {r['trie']['distinct_ids']} distinct), "
        f"beam {c['beam']}, {c['queries']} queries, embed_dim {c['embed_dim']}",
        "normalisation: ours normalize='allowed', HF renormalize_logits=True (log-softmax over the "
        "trie-allowed tokens in both); HF length_penalty=0 (scores = summed log-probs)",
        "",
        f"{'method':<42}{'batch':>6}{'ms/query':>11}{'cpu ms/q':>10}{'GFLOP/q':>9}{'GFLOP/s':>9}{'x floor':>9}",
    ]
    def row(name, batch, ms, cpu_ms, gflop):
        floor_ms = 1000 * gflop / mm["rate_gflops"]
        lines.append(f"{name:<42}{batch:>6}{ms:>11.1f}{cpu_ms:>10.1f}{gflop:>9.2f}{gflop / (ms / 1000):>9.1f}"
                     f"{ms / floor_ms:>9.2f}")
    row("HF generate + prefix_allowed_tokens_fn", c["batch"], t["hf"]["ms_per_query"], t["hf"]["cpu_ms_per_query"],
        fl["hf"]["total"] / 1e9)
    row("ours beam_search (same batch)", c["batch"], t["ours"]["ms_per_query"], t["ours"]["cpu_ms_per_query"],
        fl["ours"]["total"] / 1e9)
    best = t["ours_best"]
    if best["batch"] != c["batch"]:
        row("ours beam_search (best batch)", best["batch"], best["ms_per_query"], best["cpu_ms_per_query"],
            fl["ours"]["total"] / 1e9)
    lines += [
        "",
        f"speed-up (wall), same batch: {r['speedup']['same_batch']:.2f}x   at our best batch: "
        f"{r['speedup']['best_batch']:.2f}x   (target >= 3x);   CPU time, same batch: "
        f"{r['speedup']['same_batch_cpu_time']:.2f}x",
    ]
    if t.get("ours_sweep"):
        lines.append("ours by batch size (ms/query): " + ", ".join(
            f"{s['batch']}: {s['ms_per_query']:.1f}" for s in t["ours_sweep"]))
    lines += [
        f"top-{a['top_k']} identical: {a['identical']}/{a['queries']} queries ({100 * a['identical_fraction']:.0f}%), "
        f"same set: {a['same_set']}/{a['queries']}, max |score diff| {a['max_abs_score_diff']:.2e}",
    ]
    for mis in a["mismatches"]:
        lines.append(f"  query {mis['query']}: ranks {mis['ranks']} differ, max score gap {mis['max_score_gap']:.2e}"
                     f" ({'near tie' if mis['near_tie'] else 'NOT a near tie'})")
    lines += [
        f"matmul rate: {mm['rate_gflops']:.1f} GFLOP/s fp32 (best of {mm['shapes']}); "
        f"arithmetic floor for ours: {r['floor']['ours_floor_ms_per_query']:.1f} ms/query -> "
        f"ours at {r['floor']['ours_x_floor']:.2f}x floor (best batch {r['floor']['ours_best_x_floor']:.2f}x, "
        f"CPU time {r['floor']['ours_cpu_x_floor']:.2f}x)",
        f"FLOPs/query: ours {fl['ours']['total'] / 1e9:.2f} G (logits {fl['ours']['logits'] / 1e9:.2f} G), "
        f"HF {fl['hf']['total'] / 1e9:.2f} G (logits {fl['hf']['logits'] / 1e9:.2f} G)",
        f"load average before/after: {r['load_average']['before']} / {r['load_average']['after']}",
    ]
    if r["load_average"]["contended"]:
        lines.append("WARNING: load average above the CPU count with several torch threads: OpenMP threads wait "
                     "for descheduled peers and wall times are inflated (rerun with --threads 1 to compare)")
    return "\n".join(lines)


def render_markdown(r: dict, text: str) -> str:
    c, t, fl, mm, a = r["config"], r["timing"], r["flops"], r["matmul"], r["agreement"]
    md = [
        "# Decode benchmark: `genius.beam_search` vs HF `generate` + `prefix_allowed_tokens_fn`",
        "",
        f"Command: `{' '.join(['python bench/decode.py'] + c['argv'])}`",
        "",
        "| method | batch | ms/query (wall) | CPU ms/query | GFLOP/query | GFLOP/s | x arithmetic floor |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    def row(name, batch, ms, cpu_ms, gflop):
        floor_ms = 1000 * gflop / mm["rate_gflops"]
        md.append(f"| {name} | {batch} | {ms:.1f} | {cpu_ms:.1f} | {gflop:.2f} | {gflop / (ms / 1000):.1f} "
                  f"| {ms / floor_ms:.2f} |")
    row("HF generate + prefix_allowed_tokens_fn", c["batch"], t["hf"]["ms_per_query"], t["hf"]["cpu_ms_per_query"],
        fl["hf"]["total"] / 1e9)
    row("ours `beam_search` (same batch)", c["batch"], t["ours"]["ms_per_query"], t["ours"]["cpu_ms_per_query"],
        fl["ours"]["total"] / 1e9)
    if t["ours_best"]["batch"] != c["batch"]:
        row("ours `beam_search` (best batch)", t["ours_best"]["batch"], t["ours_best"]["ms_per_query"],
            t["ours_best"]["cpu_ms_per_query"], fl["ours"]["total"] / 1e9)
    md += [
        "",
        f"- Speed-up (wall time) at the same batch: **{r['speedup']['same_batch']:.2f}x**; at our best batch: "
        f"**{r['speedup']['best_batch']:.2f}x**; in CPU time at the same batch: "
        f"{r['speedup']['same_batch_cpu_time']:.2f}x.",
        f"- {r['machine']['torch_threads']} torch threads; load average before/after "
        f"{r['load_average']['before']} / {r['load_average']['after']} on {r['machine']['cpus_usable']} CPUs.",
        f"- Top-{a['top_k']} IDs identical for {a['identical']}/{a['queries']} queries; "
        f"max |score difference| {a['max_abs_score_diff']:.2e}.",
        f"- Matmul rate {mm['rate_gflops']:.1f} GFLOP/s (fp32); our floor {r['floor']['ours_floor_ms_per_query']:.1f} "
        f"ms/query.",
        "",
        "Full output:",
        "",
        "```",
        text,
        "```",
        "",
    ]
    return "\n".join(md)


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    load_before = [round(x, 2) for x in os.getloadavg()]
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if torch.get_num_threads() > 1 and load_before[0] > usable:
        log.warning("load average %.2f exceeds the %d usable CPUs: multi-threaded timings will be distorted by "
                    "thread contention (try --threads 1); both methods still run under the same conditions",
                    load_before[0], usable)
    L, K, W = args.levels, args.codebook_size, args.beam
    top_k = min(args.top_k, W)
    batch = max(1, min(args.batch, args.queries))
    cfg = DecoderConfig() if args.decoder == "paper" else DecoderConfig.small()

    log.info("generating %d IDs (%d levels x %d codes, %s modalities)", args.num_ids, L, K, args.modalities)
    t0 = time.perf_counter()
    codes, mods = make_codes(args.num_ids, L, K, args.modalities, args.seed, args.id_structure)
    codec = IdCodec(L, K)
    trie = Trie.build(codec, codec.pack(codes), mods)
    stats = trie_stats(codes, mods)
    stats["bytes_per_item"] = round(trie.bytes_per_item(), 2)
    log.info("IDs + trie in %.1f s: distinct prefixes per depth %s", time.perf_counter() - t0,
             stats["distinct_prefixes_per_depth"])
    t0 = time.perf_counter()
    dict_trie = build_dict_trie(codes, mods, K)
    stats["dict_trie_build_seconds"] = round(time.perf_counter() - t0, 2)
    fn = make_prefix_allowed_tokens_fn(dict_trie)

    decoder = GeniusDecoder(cfg, args.embed_dim, L, K).eval()
    from genius.hf_t5 import to_hf_t5
    hf = to_hf_t5(decoder)
    gen = torch.Generator().manual_seed(args.seed + 1)
    queries = torch.randn(args.queries, args.embed_dim, generator=gen)

    # Warm-up: one call each, on the first query.
    log.info("warm-up (one query each)")
    run_ours(decoder, trie, queries[:1], W, 1, top_k)
    run_hf(hf, decoder, fn, queries[:1], W, 1, top_k)

    # Same batches for both, alternating HF and ours batch by batch so that changes in the
    # machine's load hit both methods alike.
    log.info("timing %d queries in batches of %d, beam %d: HF and ours alternating", args.queries, batch, W)
    hf_parts, ours_parts = [], []
    for lo in range(0, args.queries, batch):
        chunk = queries[lo:lo + batch]
        hf_parts.append(run_hf(hf, decoder, fn, chunk, W, len(chunk), top_k))
        ours_parts.append(run_ours(decoder, trie, chunk, W, len(chunk), top_k))
        log.info("queries %d-%d: HF %.2f s, ours %.2f s", lo, lo + len(chunk) - 1,
                 hf_parts[-1]["batch_seconds"][0], ours_parts[-1]["batch_seconds"][0])
    hf_run, ours_run = _merge_runs(hf_parts), _merge_runs(ours_parts)
    log.info("HF: %.1f ms/query; ours: %.1f ms/query", per_query_ms(hf_run["batch_seconds"], args.queries),
             per_query_ms(ours_run["batch_seconds"], args.queries))

    sweep = []
    if not args.skip_sweep:
        sizes = sorted({min(int(s), args.queries) for s in args.sweep.split(",") if s.strip()} - {batch})
        for b in sizes:
            run = run_ours(decoder, trie, queries, W, b, top_k)
            sweep.append({"batch": b, "ms_per_query": per_query_ms(run["batch_seconds"], args.queries),
                          "cpu_ms_per_query": per_query_ms(run["batch_cpu_seconds"], args.queries),
                          "batch_seconds": run["batch_seconds"]})
            log.info("ours batch %d: %.1f ms/query", b, sweep[-1]["ms_per_query"])
    same = {"batch": batch, "ms_per_query": per_query_ms(ours_run["batch_seconds"], args.queries),
            "cpu_ms_per_query": per_query_ms(ours_run["batch_cpu_seconds"], args.queries),
            "batch_seconds": ours_run["batch_seconds"]}
    all_ours = sorted(sweep + [same], key=lambda s: s["batch"])
    best = min(all_ours, key=lambda s: s["ms_per_query"])
    hf_ms = per_query_ms(hf_run["batch_seconds"], args.queries)

    agreement = compare(ours_run, hf_run)
    log.info("top-%d identical for %d/%d queries", top_k, agreement["identical"], agreement["queries"])

    # FLOPs per query and the arithmetic floor.
    widths = step_widths(W, L, K)
    ours_out = [NUM_MODALITIES] + [K] * L
    flops_ours = decoder_flops(cfg, args.embed_dim, widths, ours_out, cross_kv_rows=1)
    flops_hf = decoder_flops(cfg, args.embed_dim, [W] * (L + 1), [decoder.vocab_size] * (L + 1), cross_kv_rows=W)
    shapes = sorted({(W, cfg.d_model, cfg.d_ff), (batch * W, cfg.d_model, cfg.d_ff), (best["batch"] * W, cfg.d_model, cfg.d_ff)})
    rates = {f"{m}x{k}x{n}": matmul_rate(m, k, n) for m, k, n in shapes}
    rate = max(rates.values())
    floor_ms = 1000 * flops_ours["total"] / 1e9 / rate
    load_after = [round(x, 2) for x in os.getloadavg()]

    result = {
        "config": {
            "argv": list(argv) if argv is not None else sys.argv[1:],
            "decoder": args.decoder, "decoder_config": asdict(cfg), "levels": L, "codebook_size": K,
            "vocab_size": decoder.vocab_size, "num_ids": args.num_ids, "modalities": args.modalities,
            "modality_shares": list(MODALITY_SHARES) if args.modalities == "all" else [1.0, 0.0, 0.0],
            "embed_dim": args.embed_dim, "beam": W, "top_k": top_k, "queries": args.queries, "batch": batch,
            "seed": args.seed,
            "id_structure": args.id_structure,
            "ids": "residual quantization of a Zipf-weighted Gaussian mixture with fixed random codebooks "
                   "(skewed: Gaussian-fit codewords; balanced: data-sampled codewords)",
            "weights": "random T5 initialisation (untrained), shared by both methods via genius.hf_t5.to_hf_t5",
            "queries_from": "standard normal query embeddings",
        },
        "normalization": {
            "ours": "beam_search(normalize='allowed'): log-softmax of the level's logits over trie-allowed codes",
            "hf": "generate(renormalize_logits=True, length_penalty=0.0): log-softmax over the vocabulary, "
                  "-inf outside prefix_allowed_tokens_fn, log-softmax again => over allowed tokens",
            "same_distribution": True,
        },
        "machine": machine_info(),
        "load_average": {"before": load_before, "after": load_after, "usable_cpus": usable,
                         "contended": torch.get_num_threads() > 1 and max(load_before[0], load_after[0]) > usable},
        "trie": stats,
        "timing": {
            "hf": {"batch": batch, "ms_per_query": hf_ms, "batch_seconds": hf_run["batch_seconds"],
                   "cpu_ms_per_query": per_query_ms(hf_run["batch_cpu_seconds"], args.queries),
                   "includes": "generate() incl. prefix projection and output_scores (needed for sequences_scores)"},
            "ours": same,
            "ours_sweep": all_ours,
            "ours_best": {"batch": best["batch"], "ms_per_query": best["ms_per_query"],
                          "cpu_ms_per_query": best["cpu_ms_per_query"]},
            "cpu_time": "process CPU time (all threads) per query; on a loaded machine it tracks the work "
                        "better than wall time, but counts OpenMP spin-waiting",
            "warmup": "one call per method on the first query, untimed",
        },
        "speedup": {"same_batch": hf_ms / same["ms_per_query"], "best_batch": hf_ms / best["ms_per_query"],
                    "same_batch_cpu_time": per_query_ms(hf_run["batch_cpu_seconds"], args.queries)
                    / same["cpu_ms_per_query"],
                    "target": 3.0},
        "agreement": agreement,
        "flops": {"ours": flops_ours, "hf": flops_hf, "ours_step_widths": widths,
                  "hf_step_widths": [W] * (L + 1), "ours_logits_per_step": ours_out,
                  "hf_logits_per_step": decoder.vocab_size},
        "matmul": {"rate_gflops": rate, "by_shape_gflops": rates, "shapes": list(rates)},
        "floor": {
            "ours_floor_ms_per_query": floor_ms,
            "ours_x_floor": same["ms_per_query"] / floor_ms,
            "ours_best_x_floor": best["ms_per_query"] / floor_ms,
            # CPU time against the floor on all threads: less sensitive to waiting for a core.
            "ours_cpu_x_floor": same["cpu_ms_per_query"] / (floor_ms * torch.get_num_threads()),
            "hf_floor_ms_per_query": 1000 * flops_hf["total"] / 1e9 / rate,
            "hf_x_floor": hf_ms / (1000 * flops_hf["total"] / 1e9 / rate),
            "note": "floor = FLOPs / best measured fp32 matmul rate (the lowest floor, so the ratio is conservative)",
        },
    }
    text = render_text(result)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode.json").write_text(json.dumps(result, indent=2, default=float))
    (out / "decode.md").write_text(render_markdown(result, text))
    print(text)
    log.info("wrote %s and %s", out / "decode.json", out / "decode.md")
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "transformers.generation.utils"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    main()
