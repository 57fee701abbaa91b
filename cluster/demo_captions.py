"""`genius demo --corpus captions`: the single-process pipeline on a generated caption corpus.

Items are captions ("a red bicycle in a garden"); queries are paraphrases of them, and the
test queries use synonyms ("a crimson bike among flowers in a yard"). All text
is embedded by the locked, pretrained MiniLM text tower (offline), the quantizer and decoder
are trained on the training paraphrases, and recall is measured on paraphrases of items
that were never training targets, against exact kNN on the same embeddings.
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from genius.items import Items

log = logging.getLogger("genius.demo")

COLORS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple", "brown", "grey"]
OBJECTS = ["bicycle", "car", "dog", "cat", "umbrella", "guitar", "teapot", "backpack", "boat", "kite",
           "chair", "lamp", "horse", "bird", "truck", "clock"]
PLACES = ["in a garden", "on a beach", "in a kitchen", "on a city street", "in the snow", "in a forest",
          "on a wooden table", "next to a river"]
ITEM_TEMPLATE = "a {color} {object} {place}"
TRAIN_TEMPLATES = ["a photo of a {color} {object} {place}", "there is a {object}, {color}, {place}"]
TEST_TEMPLATE = "picture showing one {object} coloured {color} {place}"
# Test queries use other words than the items, so that exact search is not trivially perfect.
SYNONYMS = {
    "red": "crimson", "blue": "navy", "green": "emerald", "yellow": "golden", "black": "dark",
    "white": "snow-white", "orange": "tangerine", "purple": "violet", "brown": "chocolate", "grey": "silver",
    "bicycle": "bike", "car": "automobile", "dog": "puppy", "cat": "kitten", "umbrella": "parasol",
    "guitar": "acoustic guitar", "teapot": "kettle", "backpack": "rucksack", "boat": "small ship",
    "kite": "flying kite", "chair": "seat", "lamp": "light", "horse": "pony", "bird": "sparrow",
    "truck": "lorry", "clock": "watch",
    "in a garden": "among flowers in a yard", "on a beach": "by the sea on sand", "in a kitchen": "next to a stove",
    "on a city street": "downtown", "in the snow": "in winter snow", "in a forest": "among trees in the woods",
    "on a wooden table": "on a desk", "next to a river": "by a stream",
}


def build_corpus(seed: int) -> tuple[Items, list[str], np.ndarray, list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    combos = list(itertools.product(COLORS, OBJECTS, PLACES))
    items = [ITEM_TEMPLATE.format(color=c, object=o, place=p) for c, o, p in combos]
    held_out = rng.random(len(combos)) < 0.2
    train_q, train_t, test_q, test_t = [], [], [], []
    for i, (c, o, p) in enumerate(combos):
        if held_out[i]:
            test_q.append(TEST_TEMPLATE.format(color=SYNONYMS[c], object=SYNONYMS[o], place=SYNONYMS[p]))
            test_t.append(i)
        else:
            for template in TRAIN_TEMPLATES:
                train_q.append(template.format(color=c, object=o, place=p))
                train_t.append(i)
    corpus = Items(texts=items, keys=[f"caption-{i:04d}" for i in range(len(items))])
    return corpus, train_q, np.array(train_t), test_q, np.array(test_t)


def run(args: argparse.Namespace) -> dict:
    # Imported here so that `genius --help` stays fast.
    from genius.encoders import EncoderConfig, MultimodalEncoder
    from genius.index import GeniusIndex, IndexConfig
    from genius.metrics import exact_knn, recall_table

    t0 = time.time()
    corpus, train_q, train_t, test_q, test_t = build_corpus(args.seed)
    log.info("corpus: %d captions, %d training queries, %d test queries (items never seen as targets)",
             len(corpus), len(train_q), len(test_q))
    encoder = MultimodalEncoder.from_config(EncoderConfig())
    config = IndexConfig.for_corpus(len(corpus))
    config.quantizer = replace(config.quantizer, epochs=args.quantizer_epochs)
    config.decoder_training = replace(config.decoder_training, epochs=args.decoder_epochs)
    index = GeniusIndex.fit(corpus, Items(texts=train_q), train_t, config, encoder=encoder, progress=True)
    out = Path(args.out)
    index.save(out / "index")

    query_emb = index.embed(Items(texts=test_q))
    relevant = [{int(t)} for t in test_t]
    item_emb = index.vectors[np.arange(len(index))].astype(np.float32)
    rows = {"exact kNN (flat inner product)": recall_table(exact_knn(query_emb, item_emb, 10).tolist(), relevant)}
    timings = {}
    for name, rerank in (("GENIUS", False), ("GENIUS + re-ranking", True)):
        start = time.time()
        result = index.search(query_emb, k=10, beam_size=args.beam, rerank=rerank)
        timings[name] = (time.time() - start) / len(test_q)
        rows[name] = recall_table(result.as_lists(), relevant)
    knn = rows["exact kNN (flat inner product)"]
    print(f"\nGENIUS demo: {len(corpus)} captions, {len(test_q)} held-out paraphrase queries, beam {args.beam}, "
          f"{config.quantizer.num_levels} levels x {config.quantizer.codebook_size} codes\n")
    print(f"{'method':34s} {'R@1':>6s} {'R@5':>6s} {'R@10':>6s} {'R@10/kNN':>9s} {'ms/query':>9s}")
    for name, r in rows.items():
        ratio = r["recall@10"] / max(knn["recall@10"], 1e-9)
        ms = f"{1000 * timings[name]:9.1f}" if name in timings else f"{'':9s}"
        print(f"{name:34s} {r['recall@1']:6.3f} {r['recall@5']:6.3f} {r['recall@10']:6.3f} {ratio:9.2f} {ms}")
    examples = index.search(Items(texts=test_q[: args.examples]), k=3, beam_size=args.beam)
    print("\nexample queries:")
    for q, keys, items in zip(test_q, examples.keys, examples.items):
        hits = ", ".join(f"{corpus.texts[i]!r}" for i in items if i >= 0)
        print(f"  {q!r}\n    -> {hits}")
    summary = {"recall": rows, "ms_per_query": timings, "config": config.to_dict(),
               "seconds": time.time() - t0, "index": str(out / "index")}
    (out / "demo.json").write_text(json.dumps(summary, indent=2))
    print(f"\nindex saved to {out / 'index'}; summary in {out / 'demo.json'} ({time.time() - t0:.0f} s in all)")
    return summary


if __name__ == "__main__":
    from cluster.demo import main

    main(["--corpus", "captions"])
