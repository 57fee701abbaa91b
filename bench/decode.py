"""Decode benchmark: our batched trie-constrained beam search vs the reference way to decode.

The reference GENIUS code decodes with transformers' `T5ForConditionalGeneration.generate`
and `prefix_allowed_tokens_fn` over a nested-dict trie (dict of dicts keyed by token id;
the function walks the dict along the decoded prefix and returns the allowed next tokens).
This script runs, on the very same weights (`genius.hf_t5.to_hf_t5`), query prefix vectors
and IDs:

* `hf`: that reference (generate + the per-beam Python callback);
* `hf_vectorised`: a strong HF baseline, generate + `TrieLogitsProcessor`, which builds the
  allowed-token mask of all beams at once with tensor ops over per-depth CSR tables of the
  same trie (no Python per beam);
* `ours`: `genius.beam_search` in fp32: the decoder stops running for a beam once it has a
  single ID below it (its remaining steps are forced by the trie);
* `ours_every_step`: the same with the decoder run at every step (`skip_forced=False`): the
  same results, showing what skipping forced steps is worth;
* low-precision variants of ours (`--lowp`): `bf16` (the decoder's weights, activations and
  KV cache in bfloat16; scores and log-softmax in fp32) and `int8` (dynamic quantization of
  the decoder layers' nn.Linear: int8 weights, activations quantized per call).

Timing: every method over the same query set at every batch size of `--sweep` (plus
`--batch`), `--repeats` times; each repeat walks the batches once and, per batch, runs every
method in turn (order rotated), so load drift on a shared machine hits all methods alike.
Wall (perf_counter) and process CPU time (process_time) per repeat; medians and spread
(min/max, quartiles). Speed-ups are medians of per-repeat ratios at equal batch.

Also reported: top-10 agreement (ours vs hf, hf_vectorised vs hf, each low-precision variant
vs our fp32), validity of every emitted ID, the decoder's FLOPs per query, this machine's
measured matmul rate, and our time as a multiple of the arithmetic floor (FLOPs / rate).

Normalisation: ours runs with `normalize="allowed"` and HF with `renormalize_logits=True`.
HF takes log-softmax over the full vocabulary, adds the constraint's -inf mask, then
renormalises (log-softmax again) over what is left, i.e. over the trie-allowed tokens; ours
takes log-softmax of the current level's logits over the trie-allowed codes. Both compute
the same distribution. `length_penalty=0.0` makes HF's `sequences_scores` plain sums of
log-probabilities, like ours.

    python bench/decode.py --threads 1   # paper size (t5-small decoder, 8 x 4096, 100k IDs)
    python bench/decode.py --help
"""
from __future__ import annotations

import argparse
import datetime as _dt
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
from transformers import LogitsProcessor, LogitsProcessorList

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from genius.beam_search import beam_search  # noqa: E402
from genius.decoder import (  # noqa: E402
    MODALITY_TOKEN_OFFSET,
    START_TOKEN,
    DecoderConfig,
    GeniusDecoder,
    level_token_offset,
)
from genius.decoder_precision import precision_support, with_precision  # noqa: E402
from genius.idcodec import IdCodec  # noqa: E402
from genius.modality import NUM_MODALITIES, Modality  # noqa: E402
from genius.trie import Trie  # noqa: E402

log = logging.getLogger("bench.decode")

# Share of items per modality when IDs are spread over all three (image, text, image-text).
MODALITY_SHARES = (0.45, 0.35, 0.20)
HF_DEAD_SCORE = -1e8  # HF pads impossible beams with about -1e9 (or -inf)
REFERENCE = "hf"
LOWP_VARIANTS = ("bf16", "int8")
LOWP_AGREEMENT_TARGET = 0.95
SPEEDUP_TARGET = 10.0
METHOD_LABELS = {
    "hf": "HF generate + prefix_allowed_tokens_fn (reference)",
    "hf_vectorised": "HF generate + vectorised trie LogitsProcessor",
    "ours": "ours beam_search fp32",
    "ours_every_step": "ours beam_search fp32, decoder at every step",
    "ours_bf16": "ours beam_search bf16",
    "ours_int8": "ours beam_search int8 (dynamic)",
}


# --------------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark genius.beam_search against transformers generate (callback and vectorised "
                    "trie constraint), in fp32 and low precision.",
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
    p.add_argument("--beam", type=int, default=50, help="beam size (all methods)")
    p.add_argument("--top-k", type=int, default=10, help="compare this many best IDs (capped at the beam)")
    p.add_argument("--queries", type=int, default=16, help="queries decoded by each method in each repeat")
    p.add_argument("--batch", type=int, default=8,
                   help="main batch (queries per call): the headline speed-ups and agreement are taken here")
    p.add_argument("--sweep", default="1,8,16",
                   help="comma-separated batch sizes at which every method is timed (capped at --queries; "
                        "--batch is always included)")
    p.add_argument("--skip-sweep", action="store_true", help="time at --batch only")
    p.add_argument("--repeats", type=int, default=5, help="timed passes over the query set per method and batch")
    p.add_argument("--lowp", default=",".join(LOWP_VARIANTS),
                   help=f"comma-separated low-precision variants of ours from {LOWP_VARIANTS}, or 'none'")
    p.add_argument("--train-pairs", type=int, default=0,
                   help="first train the decoder on this many random (query -> ID) pairs and decode those "
                        "queries: a trained decoder's peaked distributions, the fair test of low-precision "
                        "agreement (an untrained one is near uniform, so any rounding reorders its beam); "
                        "0: untrained weights (default)")
    p.add_argument("--train-epochs", type=int, default=10, help="epochs of that training (default 10)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for decode.json and decode.md")
    p.add_argument("--rerender", type=Path, metavar="DECODE_JSON",
                   help="decode nothing: recompute the derived fields of this recorded decode.json and rewrite "
                        "decode.json and decode.md under --out")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    lowp = [] if args.lowp.strip().lower() in ("", "none") else [v.strip() for v in args.lowp.split(",") if v.strip()]
    unknown = sorted(set(lowp) - set(LOWP_VARIANTS))
    if unknown:
        p.error(f"unknown --lowp variant(s) {unknown}: choose from {LOWP_VARIANTS} or 'none'")
    args.lowp = list(dict.fromkeys(lowp))
    return args


# --------------------------------------------------------------------------- data
def train_briefly(decoder: GeniusDecoder, codes: np.ndarray, mods: np.ndarray, pairs: int, epochs: int,
                  seed: int) -> tuple[torch.Tensor, dict]:
    """Train `decoder` on `pairs` random (query -> an existing ID) pairs; return the queries
    and what the training reached. The queries are then decoded: a memorised mapping gives
    the decoder a trained model's peaked distributions."""
    from genius.decoder_training import DecoderTrainConfig, train_decoder

    gen = torch.Generator().manual_seed(seed + 2)
    rows = torch.randperm(len(codes), generator=gen)[: min(pairs, len(codes))].numpy()
    queries = torch.randn(len(rows), decoder.embed_dim, generator=gen)
    targets = torch.from_numpy(np.concatenate([mods[rows, None], codes[rows]], axis=1).astype(np.int64))
    config = DecoderTrainConfig(epochs=epochs, batch_size=64, lr=1e-3, query_augmentation=False, index_task=False,
                                seed=seed)
    t0 = time.perf_counter()
    history = train_decoder(decoder, queries, queries, targets, config, progress=False)
    decoder.eval()
    info = {"pairs": len(rows), "epochs": epochs, "seconds": round(time.perf_counter() - t0, 1),
            "final_loss": round(history[-1]["loss"], 4), "final_id_accuracy": round(history[-1]["id_accuracy"], 4)}
    log.info("decoder trained on %d pairs: %s", len(rows), info)
    return queries, info


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


# --------------------------------------------------------------------------- vectorised HF constraint
def id_tokens(codes: np.ndarray, mods: np.ndarray, codebook_size: int) -> np.ndarray:
    """(N, 1+L) token ids of the IDs: the modality token, then one token per level."""
    offsets = np.array([level_token_offset(l, codebook_size) for l in range(1, codes.shape[1] + 1)])
    return np.concatenate([mods[:, None] + MODALITY_TOKEN_OFFSET, codes + offsets], axis=1).astype(np.int64)


class TokenTrieTables:
    """The trie over token ids as per-depth CSR arrays, for lookups on whole tensors of beams.

    Nodes at depth d are the distinct token prefixes of length d (depth 0: the root, node 0),
    numbered in sorted order. For each depth d < D: `keys[d]` (sorted) holds parent * V + token
    of every child, so a child's node number at depth d + 1 is its position in `keys[d]`;
    `ptr[d]` (nodes at depth d, + 1) gives each node's children as the slice
    `tokens[d][ptr[d][n]:ptr[d][n + 1]]`.
    """

    def __init__(self, tokens: np.ndarray, vocab_size: int):
        self.vocab_size = int(vocab_size)
        self.depth = tokens.shape[1]
        self.keys: list[torch.Tensor] = []
        self.ptr: list[torch.Tensor] = []
        self.tokens: list[torch.Tensor] = []
        node = np.zeros(len(tokens), dtype=np.int64)
        num_nodes = 1
        for d in range(self.depth):
            uniq, inverse = np.unique(node * self.vocab_size + tokens[:, d], return_inverse=True)
            parent = uniq // self.vocab_size
            self.keys.append(torch.from_numpy(uniq))
            self.ptr.append(torch.from_numpy(np.searchsorted(parent, np.arange(num_nodes + 1)).astype(np.int64)))
            self.tokens.append(torch.from_numpy(uniq % self.vocab_size))
            node, num_nodes = inverse.reshape(-1).astype(np.int64), len(uniq)

    def nodes(self, prefixes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Node number of each (B, d) token prefix at depth d, and whether the prefix is in the trie."""
        B, d = prefixes.shape
        node = torch.zeros(B, dtype=torch.long)
        valid = torch.ones(B, dtype=torch.bool)
        for j in range(d):
            if j >= self.depth:
                return node, torch.zeros(B, dtype=torch.bool)
            keys = self.keys[j]
            key = node * self.vocab_size + prefixes[:, j]
            at = torch.searchsorted(keys, key).clamp_(max=len(keys) - 1)
            valid &= keys[at] == key
            node = torch.where(valid, at, 0)
        return node, valid

    def allowed(self, prefixes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, tokens) of every allowed next token of each prefix, and the rows with none."""
        B, d = prefixes.shape
        node, valid = self.nodes(prefixes)
        if d >= self.depth:  # complete IDs: nothing follows
            count = torch.zeros(B, dtype=torch.long)
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), count == 0
        ptr = self.ptr[d]
        start = ptr[node]
        count = torch.where(valid, ptr[node + 1] - start, 0)
        rows = torch.repeat_interleave(torch.arange(B), count)
        first = torch.cumsum(count, 0) - count
        index = torch.repeat_interleave(start - first, count) + torch.arange(len(rows))
        return rows, self.tokens[d][index], count == 0


class TrieLogitsProcessor(LogitsProcessor):
    """Constrains generate() to the trie for all beams at once (tensor ops, no Python per beam).

    Same semantics as transformers' PrefixConstrainedLogitsProcessor with the reference's
    `prefix_allowed_tokens_fn`: every token the trie does not allow after the beam's prefix
    (the tokens after the decoder start token) gets -inf; a beam whose prefix is not in the
    trie (a dead beam) may only emit the start token, as the callback returns [START_TOKEN].
    """

    def __init__(self, tables: TokenTrieTables):
        self.tables = tables

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows, tokens, dead = self.tables.allowed(input_ids[:, 1:])
        out = torch.full_like(scores, -math.inf)
        out[rows, tokens] = scores[rows, tokens]
        if dead.any():
            out[dead, START_TOKEN] = scores[dead, START_TOKEN]
        return out


# --------------------------------------------------------------------------- decoding
def decode_ours(decoder: GeniusDecoder, trie: Trie, queries: torch.Tensor, beam: int,
                top_k: int, skip_forced: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k codes (Q, k, 1+L) and scores (Q, k) of one beam_search call, and the beams the
    decoder ran for per query and step (Q, 1+L)."""
    with torch.inference_mode():
        res = beam_search(decoder, trie, queries, beam_size=beam, normalize="allowed", skip_forced=skip_forced)
    return res.codes[:, :top_k], res.scores[:, :top_k], res.decoder_rows


def decode_hf(model, decoder: GeniusDecoder, queries: torch.Tensor, beam: int, top_k: int, fn=None,
              processor: LogitsProcessor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k codes and scores of one generate() call, constrained by `fn` (callback) or `processor`."""
    from transformers.modeling_outputs import BaseModelOutput

    L, K = decoder.num_levels, decoder.codebook_size
    offsets = np.array([level_token_offset(l, K) for l in range(L + 1)])
    constraint = {"prefix_allowed_tokens_fn": fn} if fn is not None else {
        "logits_processor": LogitsProcessorList([processor])}
    with torch.inference_mode():
        prefix = decoder.prefix(queries)
        out = model.generate(
            encoder_outputs=BaseModelOutput(last_hidden_state=prefix),
            decoder_start_token_id=START_TOKEN, eos_token_id=None, pad_token_id=START_TOKEN,
            max_new_tokens=1 + L, num_beams=beam, num_return_sequences=top_k, do_sample=False,
            renormalize_logits=True, length_penalty=0.0, early_stopping=False,
            return_dict_in_generate=True, output_scores=True, **constraint,
        )
    Q = len(queries)
    seq = out.sequences.view(Q, top_k, -1)[:, :, 1:].numpy()
    s = out.sequences_scores.view(Q, top_k).double().numpy()
    c = seq - offsets
    dead = ~(s > HF_DEAD_SCORE)
    c[dead] = -1
    return c, np.where(dead, -np.inf, s)


def _run_batches(decode, queries: torch.Tensor, batch: int) -> dict:
    codes, scores, times, cpu = [], [], [], []
    for lo in range(0, len(queries), batch):
        t0, c0 = time.perf_counter(), time.process_time()
        c, s = decode(queries[lo:lo + batch])[:2]
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        codes.append(c)
        scores.append(s)
    return {"codes": np.concatenate(codes), "scores": np.concatenate(scores), "batch_seconds": times,
            "batch_cpu_seconds": cpu}


def run_ours(decoder: GeniusDecoder, trie: Trie, queries: torch.Tensor, beam: int, batch: int,
             top_k: int) -> dict:
    return _run_batches(lambda q: decode_ours(decoder, trie, q, beam, top_k), queries, batch)


def run_hf(model, decoder: GeniusDecoder, fn, queries: torch.Tensor, beam: int, batch: int, top_k: int,
           processor: LogitsProcessor | None = None) -> dict:
    return _run_batches(lambda q: decode_hf(model, decoder, q, beam, top_k, fn, processor), queries, batch)


# --------------------------------------------------------------------------- low precision
def cpu_flags() -> list[str]:
    """The CPU's low-precision instruction sets (from /proc/cpuinfo), for the record."""
    wanted = ("avx2", "avx512f", "avx512bw", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8",
              "amx_tile", "avx512_fp16")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in have]
    except OSError:
        pass
    return []


def lowp_support(variant: str) -> tuple[bool, str]:
    """Whether this torch build and CPU run the variant, and why (not); bf16 says whether it is
    native (avx512_bf16 / amx_bf16) or emulated."""
    ok, why = precision_support(variant)
    if ok and variant == "bf16":
        native = [f for f in cpu_flags() if f in ("avx512_bf16", "amx_bf16")]
        why = ("native bf16: " + ", ".join(native)) if native else "bf16 emulated (no avx512_bf16/amx_bf16)"
    return ok, why


def compare(ours: dict, hf: dict, tie_tol: float = 1e-4, names: tuple[str, str] = ("ours", "hf")) -> dict:
    """Top-k agreement per query, and score differences (`names` label the two sides in mismatches)."""
    Q = len(ours["codes"])
    identical, same_set, mismatches, overlap = 0, 0, [], []
    max_diff = 0.0
    for q in range(Q):
        a, b = ours["codes"][q], hf["codes"][q]
        overlap.append(len({tuple(r) for r in a.tolist()} & {tuple(r) for r in b.tolist()}) / max(1, len(a)))
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
            names[0]: {"codes": a[ranks].tolist(), "scores": [float(sa[r]) for r in ranks]},
            names[1]: {"codes": b[ranks].tolist(), "scores": [float(sb[r]) for r in ranks]},
            "max_score_gap": max(gaps),
            "near_tie": max(gaps) < tie_tol,
        })
    return {"queries": Q, "top_k": int(ours["codes"].shape[1]), "identical": identical,
            "identical_fraction": identical / max(1, Q), "same_set": same_set,
            "overlap_at_k_mean": float(np.mean(overlap)) if overlap else float("nan"),
            "near_tie_mismatches": sum(m["near_tie"] for m in mismatches),
            # Mismatches whose rank-wise score gap is within twice the largest score error seen on
            # common IDs: order swaps that the arithmetic's own error can explain.
            "mismatches_within_score_error": sum(m["max_score_gap"] <= 2 * max_diff for m in mismatches),
            "max_abs_score_diff": max_diff, "tie_tolerance": tie_tol, "mismatches": mismatches}



def validity(codes: np.ndarray, scores: np.ndarray, valid_ids: set[tuple[int, ...]]) -> dict:
    """How many emitted IDs (slots with a finite score) are IDs of the trie."""
    live = np.isfinite(scores)
    emitted = codes[live].tolist()
    return {"emitted": len(emitted), "valid": sum(tuple(r) in valid_ids for r in emitted),
            "empty_slots": int((~live).sum())}


def spread(values: list[float]) -> dict:
    """Median and spread of per-repeat values (all repeats kept)."""
    a = np.asarray(values, dtype=float)
    return {"median": float(np.median(a)), "min": float(a.min()), "max": float(a.max()),
            "q25": float(np.percentile(a, 25)), "q75": float(np.percentile(a, 75)),
            "repeats": [float(x) for x in a]}


def time_methods(methods: dict, queries: torch.Tensor, sizes: list[int], repeats: int) -> tuple[dict, dict]:
    """Time every method over the whole query set at every batch size, `repeats` times.

    Per repeat and batch size, the query set is walked once in batches and each batch is
    decoded by every method in turn, the order rotated from batch to batch and repeat to
    repeat, so that load changes and cache effects fall on all methods alike. Returns
    times[batch][method] = {"wall", "cpu": per-repeat totals (s), "chunks": per-repeat lists
    of per-call wall seconds} and the first repeat's outputs[batch][method] = {"codes", "scores"}.
    """
    names = list(methods)
    times = {b: {n: {"wall": [], "cpu": [], "chunks": []} for n in names} for b in sizes}
    outputs: dict = {b: {} for b in sizes}
    for rep in range(repeats):
        for b in sizes:
            parts = {n: [] for n in names}
            wall = dict.fromkeys(names, 0.0)
            cpu = dict.fromkeys(names, 0.0)
            chunks = {n: [] for n in names}
            for ci, lo in enumerate(range(0, len(queries), b)):
                chunk = queries[lo:lo + b]
                k = (rep + ci) % len(names)
                for n in names[k:] + names[:k]:
                    t0, c0 = time.perf_counter(), time.process_time()
                    out = methods[n](chunk)
                    dt, dc = time.perf_counter() - t0, time.process_time() - c0
                    wall[n] += dt
                    cpu[n] += dc
                    chunks[n].append(dt)
                    parts[n].append(out)
            for n in names:
                times[b][n]["wall"].append(wall[n])
                times[b][n]["cpu"].append(cpu[n])
                times[b][n]["chunks"].append(chunks[n])
                if rep == 0:
                    outputs[b][n] = {"codes": np.concatenate([p[0] for p in parts[n]]),
                                     "scores": np.concatenate([p[1] for p in parts[n]]),
                                     "decoder_rows": [r for p in parts[n] if len(p) > 2 for r in p[2].tolist()]}
            log.info("repeat %d/%d, batch %d: %s", rep + 1, repeats, b,
                     ", ".join(f"{n} {1000 * wall[n] / len(queries):.1f}" for n in names) + " ms/query (wall)")
    return times, outputs


def summarize_timing(times: dict, queries: int, names: list[str]) -> list[dict]:
    """Per batch size: each method's per-query wall and CPU ms (median, spread) and the speed-ups
    over the reference (and, for low-precision variants, over ours fp32) as medians of per-repeat
    ratios: both sides of a ratio come from the same repeat."""
    sweep = []
    for b in sorted(times):
        entry: dict = {"batch": b, "methods": {}, "speedup_vs_reference": {}, "speedup_cpu_vs_reference": {},
                       "speedup_vs_ours_fp32": {}, "speedup_cpu_vs_ours_fp32": {}}
        t = times[b]
        for n in names:
            wall = spread([1000 * x / queries for x in t[n]["wall"]])
            cpu = spread([1000 * x / queries for x in t[n]["cpu"]])
            chunk_median = [float(np.median(c)) for c in zip(*t[n]["chunks"])]
            entry["methods"][n] = {"ms_per_query": wall["median"], "cpu_ms_per_query": cpu["median"],
                                   "wall_ms_per_query": wall, "cpu_ms_per_query_spread": cpu,
                                   "batch_seconds": chunk_median}
        for n in names:
            if n != REFERENCE and REFERENCE in t:
                entry["speedup_vs_reference"][n] = spread([h / o for h, o in zip(t[REFERENCE]["wall"], t[n]["wall"])])
                entry["speedup_cpu_vs_reference"][n] = spread([h / o for h, o in zip(t[REFERENCE]["cpu"], t[n]["cpu"])])
            if n.startswith("ours_") and "ours" in t:
                entry["speedup_vs_ours_fp32"][n] = spread([f / o for f, o in zip(t["ours"]["wall"], t[n]["wall"])])
                entry["speedup_cpu_vs_ours_fp32"][n] = spread([f / o for f, o in zip(t["ours"]["cpu"], t[n]["cpu"])])
        sweep.append(entry)
    return sweep


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


def matmul_rate(m: int, k: int, n: int, min_seconds: float = 0.5, dtype: torch.dtype = torch.float32) -> float:
    """GFLOP/s of F.linear((m, k), (n, k)) in `dtype` (fp32 by default), best of a few timed rounds."""
    a = torch.randn(m, k).to(dtype)
    w = torch.randn(n, k).to(dtype)
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


def _rng(s: dict, fmt: str = ".1f") -> str:
    return f"{s['median']:{fmt}} [{s['min']:{fmt}}-{s['max']:{fmt}}]"


def _main_rows(r: dict) -> list[tuple]:
    """(label, batch, ms, cpu_ms, gflop or None, wall spread) of the headline table."""
    c, t, fl = r["config"], r["timing"], r["flops"]
    main = next(e for e in t["sweep"] if e["batch"] == c["batch"])
    rows = []
    for n in c["methods"]:
        m = main["methods"][n]
        gflop = fl["hf" if n.startswith("hf") else "ours_every_step" if n == "ours_every_step" else "ours"]["total"] / 1e9
        rows.append((METHOD_LABELS[n], c["batch"], m["ms_per_query"], m["cpu_ms_per_query"], gflop,
                     m["wall_ms_per_query"], n))
    if t["ours_best"]["batch"] != c["batch"]:
        rows.append(("ours beam_search fp32 (best batch; secondary)", t["ours_best"]["batch"],
                     t["ours_best"]["ms_per_query"], t["ours_best"]["cpu_ms_per_query"], fl["ours"]["total"] / 1e9,
                     None, "ours"))
    return rows


def render_text(r: dict) -> str:
    c, m, t = r["config"], r["machine"], r["timing"]
    a, fl, mm, sp = r["agreement"], r["flops"], r["matmul"], r["speedup"]
    dec = c["decoder_config"]
    lines = [
        f"GENIUS decode benchmark: torch {m['torch_version']}, transformers {m['transformers_version']}, "
        f"{m['torch_threads']} torch threads, {m['cpus_usable']} CPUs ({m['cpu_model']}; "
        f"{' '.join(m.get('cpu_flags', [])) or 'no flags read'})",
        f"decoder {c['decoder']} ({dec['num_layers']} layers, d={dec['d_model']}, {dec['num_heads']} heads, "
        f"d_ff {dec['d_ff']}, P={dec['prefix_len']}), L={c['levels']} x K={c['codebook_size']}, "
        f"{c['num_ids']} IDs ({c['modalities']} modalities, {r['trie']['distinct_ids']} distinct), "
        f"beam {c['beam']}, {c['queries']} queries, embed_dim {c['embed_dim']}",
        f"every method at batch sizes {c['batch_sizes']}, {c['repeats']} repeats each (methods alternating per "
        f"batch); medians with [min-max] over repeats; main batch {c['batch']}",
        f"weights: {c['weights']}" + (f" ({c['training']})" if c.get("training") else ""),
        "normalisation: ours normalize='allowed', HF renormalize_logits=True (log-softmax over the "
        "trie-allowed tokens in both); HF length_penalty=0 (scores = summed log-probs)",
        "",
        f"{'method (main batch)':<52}{'batch':>6}{'ms/query [min-max]':>24}{'cpu ms/q':>10}{'GFLOP/q':>9}"
        f"{'GFLOP/s':>9}{'x floor':>9}",
    ]
    for label, batch, ms, cpu_ms, gflop, wall, n in _main_rows(r):
        floor_ms = 1000 * gflop / mm["rate_gflops"]
        fp32 = n.removeprefix("ours_") not in LOWP_VARIANTS
        lines.append(f"{label:<52}{batch:>6}{(_rng(wall) if wall else f'{ms:.1f}'):>24}{cpu_ms:>10.1f}{gflop:>9.2f}"
                     f"{gflop / (ms / 1000):>9.1f}{(f'{ms / floor_ms:.2f}' if fp32 else '-'):>9}")
    lines += [
        "",
        f"speed-up over the reference at equal batch {c['batch']} (wall): {sp['same_batch']:.2f}x "
        f"[{sp['same_batch_min']:.2f}-{sp['same_batch_max']:.2f}], per repeat "
        f"{[round(x, 2) for x in r['speedup_repeats']]}; CPU time: {r['speedup_cpu_same_batch']:.2f}x "
        f"(target >= {sp['target']:g}x)",
        f"HF vectorised: {sp['hf_vectorised_same_batch']:.2f}x the reference; ours {sp['ours_over_hf_vectorised_same_batch']:.2f}x "
        f"HF vectorised",
        f"{sp['best_batch_note']}: {sp['best_batch']:.2f}x",
        "",
        "by batch size (ms/query, median [min-max] over repeats; speed-up = median of per-repeat ratios):",
    ]
    for e in t["sweep"]:
        lines.append(f"  batch {e['batch']}:")
        for n in c["methods"]:
            mth = e["methods"][n]
            sw = e["speedup_vs_reference"].get(n)
            sc = e["speedup_cpu_vs_reference"].get(n)
            extra = f"   x ref: wall {_rng(sw, '.2f')}, cpu {sc['median']:.2f}" if sw else ""
            lines.append(f"    {n:<15} wall {_rng(mth['wall_ms_per_query']):>24}   cpu "
                         f"{_rng(mth['cpu_ms_per_query_spread']):>24}{extra}")
    lp = r["lowp"]
    lines += ["", f"low precision (main batch {c['batch']}; agreement = share of ours fp32's top-{a['top_k']} IDs "
                  f"also in the variant's top {a['top_k']}):"]
    for variant, info in lp["variants"].items():
        if not info["supported"]:
            lines.append(f"  {variant:<6} not run: {info['support']}")
            continue
        ag = info["agreement"]
        lines.append(
            f"  {variant:<6} wall {info['ms_per_query']:.1f} ms/q, cpu {info['cpu_ms_per_query']:.1f}; "
            f"x ours fp32 {_rng(info['speedup_vs_ours_fp32'], '.2f')} (cpu {info['speedup_cpu_vs_ours_fp32']['median']:.2f}); "
            f"x reference {_rng(info['speedup_vs_reference'], '.2f')} (cpu {info['speedup_cpu_vs_reference']['median']:.2f}); "
            f"top-{ag['top_k']} agreement {info['top10_agreement']:.3f}, identical lists {ag['identical']}/"
            f"{ag['queries']}, max |score diff| {ag['max_abs_score_diff']:.2e}, "
            f"near ties (<{ag['tie_tolerance']:g}) {ag['near_tie_mismatches']}, within score error "
            f"{ag['mismatches_within_score_error']}/{len(ag['mismatches'])}  [{info['support']}]")
    if r["lowp_variant"]:
        lines.append(f"  lowp headline ({r['lowp_variant']}): {r['lowp_speedup']:.2f}x the reference, "
                     f"{r['lowp_speedup_vs_fp32']:.2f}x ours fp32, top-{a['top_k']} agreement {r['lowp_top10_agreement']:.3f} "
                     f"({'meets' if r['lowp_meets_agreement_target'] else 'MISSES'} the "
                     f"{lp['agreement_target']:.0%} target; identical lists {r['lowp_top10_identical']:.2f}); x reference "
                     "by batch: " + ", ".join(f"{b}: {v:.2f}" for b, v in r["lowp_speedup_by_batch"].items()))
    va = r["agreement_hf_vectorised"]
    lines += [
        "",
        f"top-{a['top_k']} identical, ours vs hf: {a['identical']}/{a['queries']} queries "
        f"({100 * a['identical_fraction']:.0f}%), same set: {a['same_set']}/{a['queries']}, "
        f"max |score diff| {a['max_abs_score_diff']:.2e}",
    ]
    for mis in a["mismatches"]:
        lines.append(f"  query {mis['query']}: ranks {mis['ranks']} differ, max score gap {mis['max_score_gap']:.2e}"
                     f" ({'near tie' if mis['near_tie'] else 'NOT a near tie'})")
    lines += [
        f"hf_vectorised vs hf: {va['vs_hf']['identical']}/{va['vs_hf']['queries']} identical "
        f"(max |score diff| {va['vs_hf']['max_abs_score_diff']:.2e}); vs ours: {va['vs_ours']['identical']}/"
        f"{va['vs_ours']['queries']}",
        "valid emitted IDs: " + ", ".join(f"{n} {v['valid']}/{v['emitted']}" for n, v in r["validity"].items()),
        f"matmul rate: {mm['rate_gflops']:.1f} GFLOP/s fp32 (best of {mm['shapes']})"
        + (f", {mm['bf16_rate_gflops']:.1f} GFLOP/s bf16" if mm.get("bf16_rate_gflops") else "")
        + f"; arithmetic floor for ours: {r['floor']['ours_floor_ms_per_query']:.1f} ms/query -> "
        f"ours at {r['floor']['ours_x_floor']:.2f}x floor (best batch {r['floor']['ours_best_x_floor']:.2f}x, "
        f"CPU time {r['floor']['ours_cpu_x_floor']:.2f}x)"
        + (f"; bf16 at {r['floor']['ours_bf16_x_bf16_floor']:.2f}x its bf16 floor "
           f"({r['floor']['ours_bf16_floor_ms_per_query']:.1f} ms/query)" if "ours_bf16_x_bf16_floor" in r["floor"] else ""),
        f"FLOPs/query: ours {fl['ours']['total'] / 1e9:.2f} G (logits {fl['ours']['logits'] / 1e9:.2f} G), "
        f"HF {fl['hf']['total'] / 1e9:.2f} G (logits {fl['hf']['logits'] / 1e9:.2f} G)",
        f"load average before/after: {r['load_average']['before']} / {r['load_average']['after']}",
    ]
    if r["load_average"]["contended"]:
        lines.append("WARNING: load average above the CPU count with several torch threads: OpenMP threads wait "
                     "for descheduled peers and wall times are inflated (rerun with --threads 1 to compare)")
    return "\n".join(lines)


def _median(s: dict | None, fmt: str = ".2f") -> str:
    return "1" if s is None else f"{s['median']:{fmt}}"


def render_markdown(r: dict, text: str) -> str:
    c, t, mm, a, sp = r["config"], r["timing"], r["matmul"], r["agreement"], r["speedup"]
    md = [
        "# Decode benchmark: `genius.beam_search` vs HF `generate` (callback and vectorised trie constraint)",
        "",
        f"Command: `{' '.join(['python bench/decode.py'] + c['argv'])}`",
        "",
        f"Every method decodes the same {c['queries']} queries at each batch size {c['batch_sizes']}, "
        f"{c['repeats']} times (methods alternating batch by batch); times are medians over the repeats with "
        f"[min-max]; speed-ups are medians of per-repeat ratios at equal batch. Weights: {c['weights']}"
        + (f" (pairs {c['training']['pairs']}, {c['training']['epochs']} epochs, final loss "
           f"{c['training']['final_loss']}, ID accuracy {c['training']['final_id_accuracy']})"
           if c.get("training") else "") + ".",
        "",
        f"## Main batch ({c['batch']})",
        "",
        "| method | batch | ms/query wall [min-max] | CPU ms/query | GFLOP/query | GFLOP/s | x arithmetic floor |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, batch, ms, cpu_ms, gflop, wall, n in _main_rows(r):
        floor_ms = 1000 * gflop / mm["rate_gflops"]
        fp32 = n.removeprefix("ours_") not in LOWP_VARIANTS
        md.append(f"| {label} | {batch} | {_rng(wall) if wall else f'{ms:.1f}'} | {cpu_ms:.1f} | {gflop:.2f} | "
                  f"{gflop / (ms / 1000):.1f} | {f'{ms / floor_ms:.2f}' if fp32 else '-'} |")
    md += [
        "",
        f"- Speed-up over the reference at equal batch (wall): **{sp['same_batch']:.2f}x** "
        f"[{sp['same_batch_min']:.2f}-{sp['same_batch_max']:.2f} over repeats; per repeat "
        f"{', '.join(f'{x:.2f}' for x in r['speedup_repeats'])}]; in CPU time: **{r['speedup_cpu_same_batch']:.2f}x** "
        f"(target >= {sp['target']:g}x).",
        f"- HF with the vectorised trie processor: {sp['hf_vectorised_same_batch']:.2f}x the reference; ours is "
        f"{sp['ours_over_hf_vectorised_same_batch']:.2f}x faster than it.",
    ]
    ds = r.get("decoder_rows")
    if ds and "ours_every_step" in t["sweep"][0]["methods"]:
        main_methods = next(e for e in t["sweep"] if e["batch"] == c["batch"])["methods"]
        same = ds["ours_vs_every_step"]
        ran = ds["mean_per_query_and_step"]["ours"][str(c["batch"])]
        md.append(f"- Forced steps: at batch {c['batch']} ours ran the decoder for "
                  + " / ".join(f"{v:.1f}" for v in ran) + " beams per query at steps 0-" + str(ds["steps"] - 1)
                  + f" (beam widths {' / '.join(map(str, ds['beam_widths']))}; {sum(ran) / sum(ds['beam_widths']):.0%} "
                  f"of the beam-steps): a beam with a single ID below it leaves the decoder and the trie finishes "
                  f"its ID. With the decoder "
                  f"at every step: {main_methods['ours_every_step']['ms_per_query']:.1f} ms/query at batch "
                  f"{c['batch']} (ours {main_methods['ours']['ms_per_query']:.1f}); top-{same['top_k']} identical "
                  f"for {same['identical']}/{same['queries']} queries.")
    if r["lowp_variant"]:
        md.append(f"- Low precision ({r['lowp_variant']}): **{r['lowp_speedup']:.2f}x** the reference, "
                  f"{r['lowp_speedup_vs_fp32']:.2f}x ours fp32 (x reference at each batch: "
                  + ", ".join(f"{b}: **{v:.2f}x**" for b, v in r["lowp_speedup_by_batch"].items())
                  + f"); top-{a['top_k']} agreement with ours fp32 (share of its top-{a['top_k']} IDs returned) "
                  f"**{r['lowp_top10_agreement']:.3f}** ({'meets' if r['lowp_meets_agreement_target'] else 'misses'} "
                  f"the {r['lowp']['agreement_target']:.0%} target); identical ordered lists "
                  f"{r['lowp_top10_identical']:.2f} (the others differ by swaps within the score error).")
    md += [
        f"- {sp['best_batch_note'][0].upper()}{sp['best_batch_note'][1:]}: {sp['best_batch']:.2f}x.",
        f"- {r['machine']['torch_threads']} torch threads; load average before/after "
        f"{r['load_average']['before']} / {r['load_average']['after']} on {r['machine']['cpus_usable']} CPUs.",
        f"- Top-{a['top_k']} IDs identical, ours vs reference: {a['identical']}/{a['queries']} queries "
        f"(max |score difference| {a['max_abs_score_diff']:.2e}); HF vectorised vs reference: "
        f"{r['agreement_hf_vectorised']['vs_hf']['identical']}/{a['queries']}.",
        "- Valid emitted IDs: " + ", ".join(f"{n} {v['valid']}/{v['emitted']}" for n, v in r["validity"].items()) + ".",
        f"- Matmul rate {mm['rate_gflops']:.1f} GFLOP/s (fp32)"
        + (f", {mm['bf16_rate_gflops']:.1f} GFLOP/s (bf16)" if mm.get("bf16_rate_gflops") else "")
        + f"; our fp32 floor {r['floor']['ours_floor_ms_per_query']:.1f} ms/query.",
        "",
        "## By batch size",
        "",
    ]
    for e in t["sweep"]:
        md += [f"Batch {e['batch']}:", "",
               "| method | ms/query wall [min-max] | CPU ms/query [min-max] | x reference (wall) [min-max] | "
               "x reference (CPU) |",
               "|---|---:|---:|---:|---:|"]
        for n in c["methods"]:
            mth = e["methods"][n]
            sw, sc = e["speedup_vs_reference"].get(n), e["speedup_cpu_vs_reference"].get(n)
            md.append(f"| {METHOD_LABELS[n]} | {_rng(mth['wall_ms_per_query'])} | "
                      f"{_rng(mth['cpu_ms_per_query_spread'])} | {_rng(sw, '.2f') if sw else '1'} | "
                      f"{_median(sc)} |")
        md.append("")
    md += [
        f"## Low precision (batch {c['batch']}, against ours fp32)",
        "",
        "| variant | ms/query wall | CPU ms/query | x ours fp32 (wall) | x reference (wall) | x reference (CPU) | "
        f"top-{a['top_k']} identical | top-{a['top_k']} agreement | max abs score diff | mismatches within score error |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for variant, info in r["lowp"]["variants"].items():
        if not info["supported"]:
            md.append(f"| {variant} | not run: {info['support']} | | | | | | | | |")
            continue
        ag = info["agreement"]
        md.append(f"| {variant} | {_rng(info['wall_ms_per_query'])} | {info['cpu_ms_per_query']:.1f} | "
                  f"{_rng(info['speedup_vs_ours_fp32'], '.2f')} | {_rng(info['speedup_vs_reference'], '.2f')} | "
                  f"{info['speedup_cpu_vs_reference']['median']:.2f} | {ag['identical']}/{ag['queries']} | "
                  f"{info['overlap_at_10_mean']:.3f} | {ag['max_abs_score_diff']:.1e} | "
                  f"{ag['mismatches_within_score_error']}/{len(ag['mismatches'])} |")
    md += [
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
def choose_lowp(variants: dict) -> tuple[str | None, bool]:
    """The variant behind lowp_speedup / lowp_top10_agreement: the fastest (wall, vs the reference)
    of those keeping >= LOWP_AGREEMENT_TARGET top-10 agreement with our fp32; if none does, the
    one with the highest agreement (then the fastest), flagged as missing the target."""
    ran = {k: v for k, v in variants.items() if v.get("supported")}
    if not ran:
        return None, False
    def speed(k):
        return ran[k]["speedup_vs_reference"]["median"]
    keeping = [k for k in ran if ran[k]["top10_agreement"] >= LOWP_AGREEMENT_TARGET]
    if keeping:
        return max(keeping, key=speed), True
    return max(ran, key=lambda k: (ran[k]["top10_agreement"], speed(k))), False


def lowp_headline(result: dict) -> None:
    """Fill, in place, each low-precision variant's agreement and speed-up by batch and the
    headline `lowp_*` fields, from its recorded comparison with ours fp32 and the timing sweep."""
    sweep = result["timing"]["sweep"]
    variants = result["lowp"]["variants"]
    for variant, info in variants.items():
        if not info.get("supported"):
            continue
        n, ag = f"ours_{variant}", info["agreement"]
        # Agreement: the share of ours fp32's top-10 IDs that the variant also returns in its
        # top 10 (what recall@10 sees); identical ordered lists are reported beside it.
        info.update(top10_agreement=ag["overlap_at_k_mean"], top10_identical=ag["identical_fraction"],
                    overlap_at_10_mean=ag["overlap_at_k_mean"],
                    speedup_vs_reference_by_batch={str(e["batch"]): e["speedup_vs_reference"][n]["median"]
                                                   for e in sweep if n in e["speedup_vs_reference"]})
    lowp_variant, lowp_ok = choose_lowp(variants)
    chosen = variants.get(lowp_variant, {}) if lowp_variant else {}
    result.update({
        "lowp_speedup": chosen.get("speedup_vs_reference", {}).get("median"),
        "lowp_speedup_vs_fp32": chosen.get("speedup_vs_ours_fp32", {}).get("median"),
        "lowp_top10_agreement": chosen.get("top10_agreement"),
        "lowp_top10_identical": chosen.get("top10_identical"),
        "lowp_speedup_by_batch": chosen.get("speedup_vs_reference_by_batch"),
        "lowp_variant": lowp_variant,
        "lowp_meets_agreement_target": lowp_ok,
    })
    result["lowp"].update({
        "agreement_target": LOWP_AGREEMENT_TARGET, "speedup_target": SPEEDUP_TARGET,
        "chosen": lowp_variant, "chosen_meets_agreement_target": lowp_ok,
        "rule": "lowp_speedup (vs the reference, wall, equal batch, at the main batch; lowp_speedup_by_batch at "
                "every batch) and lowp_top10_agreement (mean share of ours fp32's top-10 IDs that the variant "
                "returns in its top 10; lowp_top10_identical: share of queries whose top-10 list is identical, "
                "order included) are the fastest variant with agreement >= target; if none reaches it, the most "
                "agreeing one",
    })


def write_results(result: dict, out: Path) -> str:
    """decode.json and decode.md under `out`; returns the text report."""
    text = render_text(result)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode.json").write_text(json.dumps(result, indent=2, default=float))
    (out / "decode.md").write_text(render_markdown(result, text))
    log.info("wrote %s and %s", out / "decode.json", out / "decode.md")
    return text


def rerender(path: Path, out: Path) -> dict:
    """Recompute the derived low-precision fields of a recorded decode.json and rewrite it and
    decode.md (no decoding: the measurements are the recorded ones)."""
    result = json.loads(path.read_text())
    lowp_headline(result)
    result["config"]["rerendered"] = f"{_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}: " \
                                     "derived fields recomputed from the recorded measurements (--rerender)"
    print(write_results(result, out))
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.rerender:
        return rerender(args.rerender, Path(args.out))
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    load_before = [round(x, 2) for x in os.getloadavg()]
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if torch.get_num_threads() > 1 and load_before[0] > usable:
        log.warning("load average %.2f exceeds the %d usable CPUs: multi-threaded timings will be distorted by "
                    "thread contention (try --threads 1); all methods still run under the same conditions",
                    load_before[0], usable)
    L, K, W = args.levels, args.codebook_size, args.beam
    top_k = min(args.top_k, W)
    batch = max(1, min(args.batch, args.queries))
    cfg = DecoderConfig() if args.decoder == "paper" else DecoderConfig.small()
    sizes = [batch] if args.skip_sweep else sorted(
        {max(1, min(int(s), args.queries)) for s in args.sweep.split(",") if s.strip()} | {batch})

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
    valid_ids = {tuple(r) for r in np.concatenate([mods[:, None], codes], axis=1).tolist()}

    decoder = GeniusDecoder(cfg, args.embed_dim, L, K).eval()
    from genius.hf_t5 import to_hf_t5
    hf = to_hf_t5(decoder)
    t0 = time.perf_counter()
    tables = TokenTrieTables(id_tokens(codes, mods, K), decoder.vocab_size)
    stats["token_tables_build_seconds"] = round(time.perf_counter() - t0, 2)
    processor = TrieLogitsProcessor(tables)
    gen = torch.Generator().manual_seed(args.seed + 1)
    queries = torch.randn(args.queries, args.embed_dim, generator=gen)
    training = None
    if args.train_pairs:
        trained_queries, training = train_briefly(decoder, codes, mods, max(args.train_pairs, args.queries),
                                                  args.train_epochs, args.seed)
        queries = trained_queries[: args.queries]
        hf = to_hf_t5(decoder)  # the trained weights

    methods = {
        "hf": lambda q: decode_hf(hf, decoder, q, W, top_k, fn=fn),
        "hf_vectorised": lambda q: decode_hf(hf, decoder, q, W, top_k, processor=processor),
        "ours": lambda q: decode_ours(decoder, trie, q, W, top_k),
        "ours_every_step": lambda q: decode_ours(decoder, trie, q, W, top_k, skip_forced=False),
    }
    lowp_info: dict = {}
    for variant in args.lowp:
        ok, why = lowp_support(variant)
        lowp_info[variant] = {"supported": ok, "support": why}
        if ok:
            low = with_precision(decoder, variant)
            methods[f"ours_{variant}"] = (lambda d: lambda q: decode_ours(d, trie, q, W, top_k))(low)
        else:
            log.warning("low-precision variant %s skipped: %s", variant, why)
    names = list(methods)

    log.info("warm-up (one query per method)")
    for n in names:
        methods[n](queries[:1])
    log.info("timing %s: %d queries at batch sizes %s, %d repeats, beam %d", names, args.queries, sizes,
             args.repeats, W)
    times, outputs = time_methods(methods, queries, sizes, args.repeats)
    sweep = summarize_timing(times, args.queries, names)
    main_entry = next(e for e in sweep if e["batch"] == batch)
    out_main = outputs[batch]

    # Agreement at the main batch (first repeat's outputs).
    agreement = compare(out_main["ours"], out_main["hf"])
    log.info("ours vs hf: top-%d identical for %d/%d queries", top_k, agreement["identical"], agreement["queries"])
    vec_vs_hf = compare(out_main["hf_vectorised"], out_main["hf"], names=("hf_vectorised", "hf"))
    vec_vs_ours = compare(out_main["hf_vectorised"], out_main["ours"], names=("hf_vectorised", "ours"))
    valid = {n: validity(out_main[n]["codes"], out_main[n]["scores"], valid_ids) for n in names}
    consistency = {n: {str(b): sum(np.array_equal(outputs[b][n]["codes"][q], out_main[n]["codes"][q])
                                   for q in range(args.queries)) / args.queries for b in sizes}
                   for n in names}

    # FLOPs per query and the arithmetic floor.
    widths = step_widths(W, L, K)
    ours_out = [NUM_MODALITIES] + [K] * L
    flops_every_step = decoder_flops(cfg, args.embed_dim, widths, ours_out, cross_kv_rows=1)
    # Ours runs the decoder for a beam until the trie forces the rest of its code: its work is
    # that of the beams it ran, per step, averaged over the main batch's queries.
    rows_run = np.mean(out_main["ours"]["decoder_rows"], axis=0).tolist()
    flops_ours = decoder_flops(cfg, args.embed_dim, rows_run, ours_out, cross_kv_rows=1)
    decoder_rows = {n: {str(b): np.mean(outputs[b][n]["decoder_rows"], axis=0).round(2).tolist() for b in sizes}
                    for n in names if outputs[batch][n]["decoder_rows"]}
    skipped_same = compare(out_main["ours"], out_main["ours_every_step"], names=("ours", "ours_every_step"))
    log.info("beams decoded per step (mean per query, batch %d): ours %s, every step %s; ours vs every step: "
             "top-%d identical for %d/%d queries", batch, decoder_rows["ours"][str(batch)],
             decoder_rows["ours_every_step"][str(batch)], top_k, skipped_same["identical"], skipped_same["queries"])
    flops_hf = decoder_flops(cfg, args.embed_dim, [W] * (L + 1), [decoder.vocab_size] * (L + 1), cross_kv_rows=W)
    ours_by_batch = [{"batch": e["batch"], "ms_per_query": e["methods"]["ours"]["ms_per_query"],
                      "cpu_ms_per_query": e["methods"]["ours"]["cpu_ms_per_query"],
                      "batch_seconds": e["methods"]["ours"]["batch_seconds"]} for e in sweep]
    best = min(ours_by_batch, key=lambda s: s["ms_per_query"])
    shapes = sorted({(W, cfg.d_model, cfg.d_ff), (batch * W, cfg.d_model, cfg.d_ff),
                     (best["batch"] * W, cfg.d_model, cfg.d_ff)})
    rates = {f"{m}x{k}x{n}": matmul_rate(m, k, n) for m, k, n in shapes}
    rate = max(rates.values())
    bf16_rates = ({f"{m}x{k}x{n}": matmul_rate(m, k, n, dtype=torch.bfloat16) for m, k, n in shapes}
                  if lowp_info.get("bf16", {}).get("supported") else {})
    floor_ms = 1000 * flops_ours["total"] / 1e9 / rate
    hf_floor_ms = 1000 * flops_hf["total"] / 1e9 / rate
    load_after = [round(x, 2) for x in os.getloadavg()]

    m = main_entry["methods"]
    same = {"batch": batch, "ms_per_query": m["ours"]["ms_per_query"],
            "cpu_ms_per_query": m["ours"]["cpu_ms_per_query"], "batch_seconds": m["ours"]["batch_seconds"],
            "wall_ms_per_query": m["ours"]["wall_ms_per_query"],
            "cpu_ms_per_query_spread": m["ours"]["cpu_ms_per_query_spread"]}
    hf_ms = m["hf"]["ms_per_query"]
    sp_wall = main_entry["speedup_vs_reference"]["ours"]
    sp_cpu = main_entry["speedup_cpu_vs_reference"]["ours"]

    # Low-precision variants against our fp32 at the main batch.
    for variant, info in lowp_info.items():
        n = f"ours_{variant}"
        if not info["supported"]:
            continue
        ag = compare(out_main["ours"], out_main[n], names=("ours", n))
        info.update({
            "method": n, "batch": batch, "ms_per_query": m[n]["ms_per_query"],
            "cpu_ms_per_query": m[n]["cpu_ms_per_query"], "wall_ms_per_query": m[n]["wall_ms_per_query"],
            "cpu_ms_per_query_spread": m[n]["cpu_ms_per_query_spread"],
            "speedup_vs_ours_fp32": main_entry["speedup_vs_ours_fp32"][n],
            "speedup_cpu_vs_ours_fp32": main_entry["speedup_cpu_vs_ours_fp32"][n],
            "speedup_vs_reference": main_entry["speedup_vs_reference"][n],
            "speedup_cpu_vs_reference": main_entry["speedup_cpu_vs_reference"][n],
            "agreement": ag,
        })

    result = {
        "config": {
            "argv": list(argv) if argv is not None else sys.argv[1:],
            "decoder": args.decoder, "decoder_config": asdict(cfg), "levels": L, "codebook_size": K,
            "vocab_size": decoder.vocab_size, "num_ids": args.num_ids, "modalities": args.modalities,
            "modality_shares": list(MODALITY_SHARES) if args.modalities == "all" else [1.0, 0.0, 0.0],
            "embed_dim": args.embed_dim, "beam": W, "top_k": top_k, "queries": args.queries, "batch": batch,
            "batch_sizes": sizes, "repeats": args.repeats, "methods": names, "lowp_variants": args.lowp,
            "seed": args.seed,
            "id_structure": args.id_structure,
            "ids": "residual quantization of a Zipf-weighted Gaussian mixture with fixed random codebooks "
                   "(skewed: Gaussian-fit codewords; balanced: data-sampled codewords)",
            "weights": ("random T5 initialisation (untrained)" if training is None else
                        "T5 trained on the random (query -> ID) pairs of `training`")
                       + ", shared by all methods via genius.hf_t5.to_hf_t5",
            "queries_from": ("standard normal query embeddings" if training is None else
                             "the training pairs' queries (standard normal embeddings)"),
            "training": training,
        },
        "normalization": {
            "ours": "beam_search(normalize='allowed'): log-softmax of the level's logits over trie-allowed codes",
            "hf": "generate(renormalize_logits=True, length_penalty=0.0): log-softmax over the vocabulary, "
                  "-inf outside prefix_allowed_tokens_fn, log-softmax again => over allowed tokens",
            "hf_vectorised": "as hf, with the -inf mask from TrieLogitsProcessor (same trie, tensor ops)",
            "lowp": "bf16: decoder weights/activations/KV cache in bfloat16, level logits cast to fp32 before the "
                    "log-softmax, scores summed in fp32; int8: the decoder layers' nn.Linear dynamically "
                    "quantized (int8 weights, per-call activation scale), level logits fp32",
            "same_distribution": True,
        },
        "machine": {**machine_info(), "cpu_flags": cpu_flags()},
        "load_average": {"before": load_before, "after": load_after, "usable_cpus": usable,
                         "contended": torch.get_num_threads() > 1 and max(load_before[0], load_after[0]) > usable},
        "trie": stats,
        "timing": {
            "hf": {"batch": batch, "ms_per_query": hf_ms, "batch_seconds": m["hf"]["batch_seconds"],
                   "cpu_ms_per_query": m["hf"]["cpu_ms_per_query"],
                   "wall_ms_per_query": m["hf"]["wall_ms_per_query"],
                   "cpu_ms_per_query_spread": m["hf"]["cpu_ms_per_query_spread"],
                   "includes": "generate() incl. prefix projection and output_scores (needed for sequences_scores)"},
            "hf_vectorised": {"batch": batch, "ms_per_query": m["hf_vectorised"]["ms_per_query"],
                              "cpu_ms_per_query": m["hf_vectorised"]["cpu_ms_per_query"],
                              "batch_seconds": m["hf_vectorised"]["batch_seconds"],
                              "wall_ms_per_query": m["hf_vectorised"]["wall_ms_per_query"],
                              "cpu_ms_per_query_spread": m["hf_vectorised"]["cpu_ms_per_query_spread"],
                              "speedup_vs_reference": main_entry["speedup_vs_reference"]["hf_vectorised"],
                              "ours_speedup_over_it": spread([v / o for v, o in zip(
                                  times[batch]["hf_vectorised"]["wall"], times[batch]["ours"]["wall"])])},
            "ours": same,
            "ours_sweep": ours_by_batch,
            "ours_best": {"batch": best["batch"], "ms_per_query": best["ms_per_query"],
                          "cpu_ms_per_query": best["cpu_ms_per_query"]},
            "sweep": sweep,
            "method_labels": {n: METHOD_LABELS[n] for n in names},
            "repeats": args.repeats,
            "cpu_time": "process CPU time (all threads) per query; on a loaded machine it tracks the work "
                        "better than wall time, but counts OpenMP spin-waiting",
            "order": "per repeat and batch size, each batch of queries is decoded by every method in turn, "
                     "the order rotated from batch to batch and repeat to repeat",
            "warmup": "one call per method on the first query, untimed",
            "batch_seconds": "per call, median over repeats",
        },
        "speedup": {"same_batch": sp_wall["median"],
                    "same_batch_min": sp_wall["min"], "same_batch_max": sp_wall["max"],
                    "same_batch_cpu_time": sp_cpu["median"],
                    "by_batch": {str(e["batch"]): e["speedup_vs_reference"]["ours"]["median"] for e in sweep},
                    "by_batch_cpu_time": {str(e["batch"]): e["speedup_cpu_vs_reference"]["ours"]["median"]
                                          for e in sweep},
                    "hf_vectorised_same_batch": main_entry["speedup_vs_reference"]["hf_vectorised"]["median"],
                    "ours_over_hf_vectorised_same_batch": float(np.median(
                        [v / o for v, o in zip(times[batch]["hf_vectorised"]["wall"], times[batch]["ours"]["wall"])])),
                    "best_batch": hf_ms / best["ms_per_query"],
                    "best_batch_note": f"secondary, not like for like: the reference at batch {batch} against ours "
                                       f"at its best batch ({best['batch']})",
                    "definition": "median over repeats of (reference time / ours time) within the same repeat, "
                                  "at equal batch",
                    "target": SPEEDUP_TARGET},
        "speedup_cpu_same_batch": sp_cpu["median"],
        "speedup_repeats": sp_wall["repeats"],
        "lowp": {"variants": lowp_info},
        "agreement": agreement,
        "agreement_hf_vectorised": {"vs_hf": vec_vs_hf, "vs_ours": vec_vs_ours},
        "validity": valid,
        "batch_consistency": consistency,
        "decoder_rows": {"steps": L + 1, "beam_widths": widths, "mean_per_query_and_step": decoder_rows,
                          "ours_vs_every_step": skipped_same},
        "flops": {"ours": flops_ours, "ours_every_step": flops_every_step, "hf": flops_hf, "ours_step_widths": widths,
                  "hf_step_widths": [W] * (L + 1), "ours_logits_per_step": ours_out,
                  "hf_logits_per_step": decoder.vocab_size},
        "matmul": {"rate_gflops": rate, "by_shape_gflops": rates, "shapes": list(rates),
                   "bf16_rate_gflops": max(bf16_rates.values()) if bf16_rates else None,
                   "bf16_by_shape_gflops": bf16_rates},
        "floor": {
            "ours_floor_ms_per_query": floor_ms,
            "ours_x_floor": same["ms_per_query"] / floor_ms,
            "ours_best_x_floor": best["ms_per_query"] / floor_ms,
            # CPU time against the floor on all threads: less sensitive to waiting for a core.
            "ours_cpu_x_floor": same["cpu_ms_per_query"] / (floor_ms * torch.get_num_threads()),
            "hf_floor_ms_per_query": hf_floor_ms,
            "hf_x_floor": hf_ms / hf_floor_ms,
            "hf_vectorised_x_floor": m["hf_vectorised"]["ms_per_query"] / hf_floor_ms,
            "note": "floor = FLOPs / best measured fp32 matmul rate (the lowest floor, so the ratio is conservative)",
        },
    }
    lowp_headline(result)
    if bf16_rates and "ours_bf16" in m:
        bf16_floor = 1000 * flops_ours["total"] / 1e9 / max(bf16_rates.values())
        result["floor"]["ours_bf16_floor_ms_per_query"] = bf16_floor
        result["floor"]["ours_bf16_x_bf16_floor"] = m["ours_bf16"]["ms_per_query"] / bf16_floor
    print(write_results(result, Path(args.out)))
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "transformers.generation.utils"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    main()
