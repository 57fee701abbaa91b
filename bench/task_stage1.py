"""Stage 1 on a task's own training pairs: fine-tune the text tower (and the image tower and
fusion where the pairs have them) contrastively on query -> target, as the paper's CLIP-SF
is trained on M-BEIR's pairs, then save the encoder for `genius eval --encoder`.

The split is the one `genius eval` builds with the same corpus options and seed, so the
evaluation's test queries and pool stay unseen:

    python bench/task_stage1.py --shards data/wordnet --corpus-kind wordnet \\
        --max-candidates 2000 --max-queries 300 --max-train 20000 --epochs 2 --out enc-wordnet
    genius eval --shards data/wordnet --corpus-kind wordnet --encoder enc-wordnet \\
        --max-candidates 2000 --max-queries 300 --max-train 20000

Measures whether aligning queries with their targets in the encoder (which the locked
MiniLM cannot do) closes GENIUS's gap to exact kNN on instance-level tasks.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from genius.data.shards import iter_shards
from genius.encoder_training import EncoderTrainConfig, task_examples, train_encoder
from genius.encoders import EncoderConfig, MultimodalEncoder
from genius.tasks import build_tasks

log = logging.getLogger("bench.task_stage1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", nargs="+", required=True)
    parser.add_argument("--corpus-kind", required=True, choices=["fashion-mnist", "openclipart", "wordnet"])
    parser.add_argument("--encoder", help="start from this saved MultimodalEncoder (default: the offline default)")
    parser.add_argument("--max-candidates", type=int, default=1000)
    parser.add_argument("--max-queries", type=int, default=200)
    parser.add_argument("--max-train", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-5, help="peak learning rate (default 3e-5: fine-tuning)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True, help="folder for the encoder")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    tasks = build_tasks(args.corpus_kind, list(iter_shards(args.shards)), max_candidates=args.max_candidates,
                        max_queries=args.max_queries, max_train=args.max_train, seed=args.seed)
    examples = [ex for t in tasks for ex in task_examples(t)]
    has_images = any(ex.query_image is not None or ex.target_image is not None for ex in examples)
    torch.manual_seed(args.seed)
    encoder = MultimodalEncoder.load(args.encoder) if args.encoder else MultimodalEncoder.from_config(EncoderConfig())
    config = EncoderTrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, unlock_text=True,
                                train_image=has_images, train_fusion=has_images, seed=args.seed,
                                warmup_steps=20, checkpoint_every_steps=10**9)
    log.info("stage 1 on %d training pairs of %s (text tower unlocked%s)", len(examples),
             ", ".join(t.name for t in tasks), ", image tower and fusion too" if has_images else "")
    t0 = time.perf_counter()
    history = train_encoder(encoder, examples, config, progress=False)
    out = Path(args.out)
    encoder.save(out)
    (out / "train_history.json").write_text(json.dumps({
        "command": vars(args), "history": history, "config": config.to_dict(),
        "seconds": time.perf_counter() - t0, "pairs": len(examples)}, indent=2) + "\n")
    log.info("encoder written to %s in %.0f s", out, time.perf_counter() - t0)


if __name__ == "__main__":
    main()
