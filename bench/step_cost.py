"""Cost of one training step of every stage, paper-size config against the CPU config.

Paper-size models (t5-small decoder, 8 x 4096 codes, 31 epochs) are GPU work; this
measures what one optimiser step costs on this machine, so that a run can be planned:

    stage 1   contrastive step of the encoder (the offline MiniLM + small CNN model, and
              an open_clip CLIP such as ViT-L-14 with both towers unlocked, random weights:
              the cost does not depend on them)
    stage 2   quantizer step (projection + 8-level residual VQ with EMA, InfoNCE, MSE)
    k-means   one k-means iteration of the codebook init, per level
    stage 3   decoder step (teacher-forced cross-entropy over every level, AdamW)

Random inputs: the cost of a step does not depend on the data. Codebooks are initialised
with one k-means iteration (the init is timed separately, per iteration).

    python bench/step_cost.py [--threads 1] [--clip-model ViT-L-14 --clip-batch 8]
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from genius.decoder import DecoderConfig, GeniusDecoder
from genius.decoder_training import DecoderTrainConfig, train_decoder
from genius.encoder_training import EncoderTrainConfig, train_encoder
from genius.encoders import EncoderConfig, MultimodalEncoder
from genius.index import IndexConfig
from genius.quantizer import ModalResidualQuantizer, QuantizerConfig, train_quantizer

log = logging.getLogger("bench.step_cost")

# M-BEIR's training set (the paper's stage-2/3 data): ~1.1M query->target pairs.
MBEIR_TRAIN_PAIRS = 1_100_000


def _timed_steps(run, steps: int) -> float:
    """Seconds per step of run(n_steps): the difference of a (1 + steps)-step and a 1-step
    run, so set-up and the first (slow) step cancel out."""
    t0 = time.perf_counter()
    run(1)
    one = time.perf_counter() - t0
    t0 = time.perf_counter()
    run(1 + steps)
    return max(time.perf_counter() - t0 - one, 0.0) / steps


def quantizer_step(cfg: QuantizerConfig, dim: int, steps: int, gen: torch.Generator) -> dict:
    batch = cfg.batch_size
    n = batch * (1 + steps)
    x = torch.randn(2 * n, dim, generator=gen)
    m = torch.randint(0, 3, (n,), generator=gen)
    # Init once with one k-means iteration (timed: per-iteration cost of the real init).
    q = ModalResidualQuantizer.from_config(dim, replace(cfg, kmeans_iters=1))
    full_sample = cfg.kmeans_points_per_code * cfg.codebook_size
    sample = torch.randn(min(full_sample, 16 * cfg.codebook_size), dim, generator=gen)
    t0 = time.perf_counter()
    q.init_codebooks(sample, torch.randint(0, 3, (len(sample),), generator=gen), expected_batch_size=2 * batch)
    # One Lloyd iteration plus the final assignment: two nearest-code passes per level.
    kmeans_iter_s = (time.perf_counter() - t0) / (2 * cfg.num_levels)
    state = {k: v.clone() for k, v in q.state_dict().items()}

    def run(k: int) -> None:
        q.load_state_dict(state)
        train_quantizer(q, x[: batch * k], x[n : n + batch * k], m[: batch * k], item_emb=x[n : n + batch * k],
                        item_modality=m[: batch * k], config=replace(cfg, epochs=1), progress=False)

    return {"batch": batch, "levels": cfg.num_levels, "codebook_size": cfg.codebook_size, "dim": dim,
            "step_s": _timed_steps(run, steps), "kmeans_sample": len(sample),
            "kmeans_iteration_s_per_level": kmeans_iter_s, "kmeans_iters": cfg.kmeans_iters,
            # The real init: full_sample points (cost is linear in them), kmeans_iters iterations.
            "kmeans_init_estimate_s": kmeans_iter_s * full_sample / len(sample) * cfg.kmeans_iters * cfg.num_levels}


def decoder_step(dcfg: DecoderConfig, tcfg: DecoderTrainConfig, qcfg: QuantizerConfig, dim: int, steps: int,
                 gen: torch.Generator) -> dict:
    batch = tcfg.batch_size
    n = batch * (1 + steps)
    x = torch.randn(n, dim, generator=gen)
    codes = torch.cat([torch.randint(0, 3, (n, 1), generator=gen),
                       torch.randint(0, qcfg.codebook_size, (n, qcfg.num_levels), generator=gen)], 1)
    decoder = GeniusDecoder(dcfg, dim, qcfg.num_levels, qcfg.codebook_size)
    state = {k: v.clone() for k, v in decoder.state_dict().items()}

    def run(k: int) -> None:
        decoder.load_state_dict(state)
        train_decoder(decoder, x[: batch * k], x[: batch * k], codes[: batch * k],
                      replace(tcfg, epochs=1, index_task=False), progress=False)

    params = sum(p.numel() for p in decoder.parameters())
    return {"batch": batch, "layers": dcfg.num_layers, "d_model": dcfg.d_model, "prefix_len": dcfg.prefix_len,
            "parameters": params, "step_s": _timed_steps(run, steps)}


def encoder_step(enc_cfg: EncoderConfig, batch: int, steps: int, unlock_text: bool, seed: int) -> dict:
    encoder = MultimodalEncoder.from_config(enc_cfg)
    size = 224 if not enc_cfg.is_default else enc_cfg.image_size
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(8)]
    pairs = [(images[i % 8], f"a photo of thing number {i}") for i in range(batch * (1 + steps))]
    state = {k: v.clone() for k, v in encoder.clip.state_dict().items()}

    def run(k: int) -> None:
        encoder.clip.load_state_dict(state)
        cfg = EncoderTrainConfig(epochs=1, batch_size=batch, max_steps=k, unlock_text=unlock_text, warmup_steps=0,
                                 lr=1e-5, shuffle=False, prefetch_batches=0, text_cache_size=0)
        train_encoder(encoder, pairs[: batch * k], cfg, progress=False)

    trainable = sum(p.numel() for p in encoder.clip.parameters() if p.requires_grad or unlock_text)
    return {"model": enc_cfg.model_name, "batch": batch, "image_size": size, "unlock_text": unlock_text,
            "trainable_parameters": trainable, "step_s": _timed_steps(run, steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: robust on a shared machine)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per stage (default 3)")
    parser.add_argument("--dim", type=int, default=768, help="paper-size embedding dim (CLIP ViT-L/14: 768)")
    parser.add_argument("--cpu-items", type=int, default=10_000, help="corpus size the CPU config is sized for")
    parser.add_argument("--clip-model", default="ViT-L-14", help="open_clip model for the paper-size stage 1 ('' skips)")
    parser.add_argument("--clip-batch", type=int, default=8, help="stage-1 batch of the CLIP model (default 8)")
    parser.add_argument("--out", default="bench/results/step_cost.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)

    paper, cpu = IndexConfig.paper(), IndexConfig.for_corpus(args.cpu_items)
    rows = []
    for name, cfg, dim in (("paper", paper, args.dim), ("cpu", cpu, 384)):
        q = quantizer_step(cfg.quantizer, dim, args.steps, gen)
        d = decoder_step(cfg.decoder, cfg.decoder_training, cfg.quantizer, dim, args.steps, gen)
        rows.append({"config": name, "stage": "2 quantizer", **q})
        rows.append({"config": name, "stage": "3 decoder", **d})
        print(f"{name}: quantizer {q['step_s']:.3f} s/step, decoder {d['step_s']:.3f} s/step", flush=True)
    offline = encoder_step(EncoderConfig(), 256, args.steps, unlock_text=False, seed=0)
    rows.append({"config": "cpu", "stage": "1 encoder", **offline})
    if args.clip_model:
        clip = encoder_step(EncoderConfig(model_name=args.clip_model, lock_text=False), args.clip_batch, args.steps,
                            unlock_text=True, seed=0)
        rows.append({"config": "paper", "stage": "1 encoder", **clip})

    # Plan: a paper-size run on M-BEIR's ~1.1M training pairs, 31 epochs, at this machine's rate.
    for r in rows:
        r["per_item_ms"] = 1000 * r["step_s"] / r["batch"]
        if r["config"] == "paper" and r["stage"] != "1 encoder":
            steps = 31 * -(-MBEIR_TRAIN_PAIRS // r["batch"])
            r["paper_run_steps"] = steps
            r["paper_run_cpu_hours"] = steps * r["step_s"] / 3600
    print(f"\n{'config':6s} {'stage':11s} {'batch':>6s} {'s/step':>8s} {'ms/item':>8s} {'31 ep x 1.1M pairs, CPU h':>26s}")
    for r in rows:
        hours = f"{r['paper_run_cpu_hours']:.0f}" if "paper_run_cpu_hours" in r else ""
        print(f"{r['config']:6s} {r['stage']:11s} {r['batch']:6d} {r['step_s']:8.3f} {r['per_item_ms']:8.2f} {hours:>26s}")
    k = next(r for r in rows if r["config"] == "paper" and r["stage"] == "2 quantizer")
    print(f"paper k-means init: {k['kmeans_iteration_s_per_level']:.2f} s per iteration per level on "
          f"{k['kmeans_sample']} points -> ~{k['kmeans_init_estimate_s']:.0f} s for the full init "
          f"({k['kmeans_iters']} iterations x {k['levels']} levels on the configured sample)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": "python bench/step_cost.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                                                            if k != "out"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "paper_config": asdict(paper), "cpu_config": asdict(cpu), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
