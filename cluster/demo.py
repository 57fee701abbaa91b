"""`genius demo`: GENIUS on Fashion-MNIST, on this machine's CPUs, in one of two modes.

--mode system (default): the whole served system (cluster.demo_system)
    shards -> stage-1 encoder -> training pairs of every task from the train split ->
    `genius index build` on a local Ray cluster -> `genius serve local` -> example queries of
    every query->target combination and a recall table through the gRPC client -> servers
    stopped. Writes recall.{json,md} and the index (INDEX = --out/index) to --out.

--mode eval: the in-process evaluation
    shards    Fashion-MNIST (Debian package dataset-fashion-mnist) -> WebDataset shards
    stage 1   align the small image tower to the locked MiniLM text tower (LiT-style), and
              the fusion module on the training pairs with an image-text side (composed
              queries, (image, instruction) queries, (image, text) targets)
    tasks     text->image, image->text, text->(image,text), image->image, composed
              (image,text)->image, and one universal pool mixing all candidate modalities
    stages 2+3  one universal quantizer and decoder trained on every task's pairs (the
              paper's universal setting; CPU config)
    report    recall@1/5/10 per task of GENIUS, GENIUS + re-ranking and exact kNN on the same
              embeddings, over the task's own pool and over the universal pool, and a few
              example queries with their hits
    Per-task models and ablations: `genius eval --corpus-kind fashion-mnist` (slower).

Both modes reuse what an earlier run left in --out (shards, stage-1 encoder; the system mode
also the index while its inputs are unchanged). `--corpus captions` runs the older in-process
caption demo that needs no Debian package.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

log = logging.getLogger("genius.demo")

TASKS = ("text->image", "image->text", "text->image_text", "image->image", "image_text->image")


def shards(out: Path, source: str | None) -> Path:
    from genius.data import fashion_mnist
    from genius.data.shards import read_manifest

    folder = out / "shards"
    if read_manifest(folder) is None:
        log.info("converting Fashion-MNIST to shards in %s", folder)
        fashion_mnist.convert(folder, source=source)
    return folder


def stage1_encoder(out: Path, records: list, tasks: list, steps: int, threads_note: str):
    """Align the image tower to the locked text tower on the training split's captions, and
    the fusion module on the (instructed) training pairs with an image-text side (composed
    queries, text -> (image, text), (image, instruction) queries); reused from `out`."""
    import random

    from genius.encoder_training import EncoderTrainConfig, PairExample, task_examples, train_encoder, zero_shot_accuracy
    from genius.encoders import EncoderConfig, MultimodalEncoder
    from genius.modality import Modality
    from genius.tasks import universal_pool

    folder = out / "encoder"
    if (folder / "encoder_config.json").exists():
        log.info("reusing the stage-1 encoder in %s", folder)
        return MultimodalEncoder.load(folder), None
    encoder = MultimodalEncoder.from_config(EncoderConfig())
    train = [r for r in records if r.meta.get("split") == "train"]
    pairs = [PairExample.caption(r.image, r.text, r.key) for r in train]
    # The universal model's queries carry instructions, and an instructed image query is an
    # (image, instruction) pair: the fusion must learn those too, not only composed queries.
    views = universal_pool(tasks, instructions=True).tasks
    fusion = [ex for t in views if Modality.IMAGE_TEXT in (t.query_modality, t.candidate_modality)
              for ex in task_examples(t)]
    if fusion:
        # Repeated so that about a quarter of the examples train the fusion module.
        pairs += fusion * max(1, len(pairs) // (3 * len(fusion)))
        random.Random(0).shuffle(pairs)
    config = EncoderTrainConfig(epochs=1, max_steps=steps, batch_size=256, checkpoint_every_steps=100,
                                train_fusion=bool(fusion))
    log.info("stage 1: %d steps of LiT-style alignment on %d training images and %d fusion pairs (%s)", steps,
             len(train), len(fusion), threads_note)
    train_encoder(encoder, pairs, config, checkpoint_dir=out / "stage1-checkpoints")
    test = [r for r in records if r.meta.get("split") == "test"][:2000]
    names = sorted({(r.meta["label"], r.meta["class_name"]) for r in records})
    accuracy = zero_shot_accuracy(encoder, [r.image for r in test], [r.meta["label"] for r in test],
                                  [f"a photo of a {name}" for _, name in names])
    log.info("stage-1 zero-shot accuracy on %d test images: %.3f", len(test), accuracy)
    encoder.save(folder)
    return encoder, accuracy


def run(args: argparse.Namespace) -> dict:
    import torch

    from genius.data.shards import ShardReader
    from genius.evaluation import evaluate
    from genius.index import IndexConfig
    from genius.tasks import build_tasks

    # The caption demo is in-process: it takes the eval mode's defaults.
    resolve_defaults(args, "eval" if args.corpus == "captions" else args.mode)
    if args.corpus == "captions":
        from cluster import demo_captions

        return demo_captions.run(args)
    if args.mode == "system":
        from cluster import demo_system

        return demo_system.run(system_config(args))
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = list(ShardReader(shards(out, args.source), check_images="none"))
    log.info("read %d records", len(records))
    tasks = build_tasks("fashion-mnist", records, tasks=list(TASKS), max_candidates=args.candidates,
                        max_queries=args.queries, seed=args.seed)
    encoder, zero_shot = stage1_encoder(out, records, tasks, args.stage1_steps,
                                        f"{torch.get_num_threads()} torch threads")
    def index_config(num_items: int) -> IndexConfig:
        config = IndexConfig.for_corpus(num_items)
        config.quantizer = replace(config.quantizer, epochs=args.quantizer_epochs)
        config.decoder_training = replace(config.decoder_training, epochs=args.decoder_epochs)
        return config

    # One universal model (as the paper trains): a fit per task would take ~6x longer.
    report = evaluate(tasks, encoder, index_config, beams=tuple(sorted({1, 5, args.beam})), seed=args.seed,
                      per_task=False, universal=True, keep_indexes=True, title="genius demo: Fashion-MNIST",
                      encoder_description="stage-1 encoder (locked MiniLM text tower + small CNN image tower)")
    report.to_json(out / "report.json")
    markdown = report.to_markdown(out / "report.md")
    report.plot_beam(out / "recall_vs_beam.png")
    print("\n" + markdown)
    _examples(report, tasks, records, encoder, args.examples)
    summary = {"seconds": time.time() - t0, "zero_shot_accuracy": zero_shot, "out": str(out)}
    (out / "demo.json").write_text(json.dumps(summary, indent=2))
    print(f"\nreport: {out / 'report.md'}, plot: {out / 'recall_vs_beam.png'} ({summary['seconds']:.0f} s in all)")
    return summary


def _examples(report, tasks, records, encoder, count: int) -> None:
    """A few text->image and image->text queries over the universal pool, with the class
    and modality of each hit."""
    from genius.index import embed_items
    from genius.tasks import universal_pool

    index = report.indexes.get("universal")
    if index is None or count <= 0:
        return
    class_of = {r.key: r.meta.get("class_name", "?") for r in records}
    views = {v.name.split("/", 1)[1]: v for v in universal_pool(tasks, instructions=True).tasks}
    for name in ("fashion-mnist/text->image", "fashion-mnist/image->text"):
        view = views.get(name)
        if view is None:
            continue
        queries = view.test_queries.subset(range(min(count, len(view.test_queries))))
        # The kept pool index was fitted on embeddings: embed the queries with the demo's encoder.
        hits = index.search(embed_items(queries, encoder), k=3, beam_size=20)
        print(f"\nexample {name.split('/')[1]} queries over the universal pool (class and modality of each hit):")
        for q, keys in enumerate(hits.keys):
            query = (queries.texts[q] if queries.texts is not None else None) or ""
            if queries.images is not None and queries.images[q] is not None:
                query = f"<image of a {class_of.get(queries.keys[q].split('/')[0], '?')}> {query}".strip()
            # Candidate keys are "<record key>/<view>": the record says the class, the view the modality.
            shown = [f"{class_of.get(k.split('/')[0], k)} ({k.split('/')[-1]})" for k in keys]
            print(f"  {query!r} -> {', '.join(shown)}")


# Defaults that differ by mode (None on the command line: the mode's own).
MODE_DEFAULTS = {
    "eval": {"candidates": 500, "queries": 200, "quantizer_epochs": 20, "decoder_epochs": 20, "examples": 4},
    "system": {"candidates": 500, "queries": 100, "quantizer_epochs": 10, "decoder_epochs": 10, "examples": 2},
}


def resolve_defaults(args: argparse.Namespace, mode: str) -> None:
    for name, value in MODE_DEFAULTS[mode].items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)


def system_config(args: argparse.Namespace):
    from cluster.demo_system import SystemDemoConfig

    return SystemDemoConfig(
        out=Path(args.out), source=args.source, stage1_steps=args.stage1_steps, pool=args.candidates,
        train=args.train_records, queries=args.queries, actors=args.actors, quantizer_epochs=args.quantizer_epochs,
        decoder_epochs=args.decoder_epochs, beam=args.beam, examples=args.examples, concurrency=args.concurrency,
        rebuild=args.rebuild, threads=args.threads, seed=args.seed, serve=args.serve, ui_port=args.ui_port)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    def both(name: str) -> str:
        return f"{MODE_DEFAULTS['system'][name]} system, {MODE_DEFAULTS['eval'][name]} eval"

    parser.add_argument("--mode", choices=["system", "eval"], default="system",
                        help="system: index build on a local Ray cluster, gRPC servers, queries through the client "
                             "(default); eval: the in-process evaluation report")
    parser.add_argument("--corpus", choices=["fashion-mnist", "captions"], default="fashion-mnist",
                        help="fashion-mnist (needs the Debian package dataset-fashion-mnist) or the generated "
                             "caption corpus (in-process; default: fashion-mnist)")
    parser.add_argument("--out", default="demo_out", help="folder for shards, encoder, indexes and report")
    parser.add_argument("--source", help="folder with the Fashion-MNIST idx files (default: the Debian package's)")
    parser.add_argument("--stage1-steps", type=int, default=200, help="stage-1 steps of batch 256 (default: 200)")
    parser.add_argument("--candidates", type=int, help="system: test-split records in the index, each as an image, "
                        "a text and an image-text item; eval: candidate pool size per task "
                        f"(default: {both('candidates')})")
    parser.add_argument("--queries", type=int, help=f"test queries per task (default: {both('queries')})")
    parser.add_argument("--train-records", type=int, default=1000,
                        help="system: train-split records giving each task's training pairs; their three views "
                             "are indexed as the pairs' targets (default: 1000)")
    parser.add_argument("--actors", type=int, default=2, help="system: embed/quantize actors of the build (default: 2)")
    parser.add_argument("--concurrency", type=int, default=4,
                        help="system: client threads sending the recall queries (default: 4)")
    parser.add_argument("--rebuild", action="store_true",
                        help="system: build the index even when its inputs are unchanged")
    parser.add_argument("--serve", action="store_true",
                        help="system: at the end, leave the servers running with the search page (genius ui) "
                             "and print its address; stop with Ctrl-C or SIGTERM")
    parser.add_argument("--ui-port", type=int, default=8080, help="system, --serve: the page's port (default: 8080)")
    parser.add_argument("--beam", type=int, default=20, help="beam size (default: 20)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own)")
    parser.add_argument("--quantizer-epochs", type=int, help=f"stage-2 epochs (default: {both('quantizer_epochs')})")
    parser.add_argument("--decoder-epochs", type=int, help=f"stage-3 epochs (default: {both('decoder_epochs')})")
    parser.add_argument("--examples", type=int,
                        help=f"example queries (system: per combination; default: {both('examples')})")
    parser.add_argument("--seed", type=int, default=0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
