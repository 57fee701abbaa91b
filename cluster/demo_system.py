"""`genius demo` (default mode): the whole served system on Fashion-MNIST, on this machine.

    shards    Fashion-MNIST (Debian package dataset-fashion-mnist) -> WebDataset shards (cached)
    stage 1   the image tower aligned to the locked text tower (cached; cluster.demo.stage1_encoder)
    corpus    index shards: test-split pool records as image, text and image-text items, plus the
              training targets (train-split records, same three views)
    pairs     training queries of every task (text->image, image->text, text->image_text,
              image->image, composed image_text->image) from the TRAIN split, each with an
              instruction naming the target modality, as a pairs table (query -> target key)
    build     `genius index build` on a local Ray cluster (embed, pairs, quantizer, quantize,
              merge, decoder, publish); reused when its inputs are unchanged
    serve     `genius serve local`: a replica and one shard server per vector shard on 127.0.0.1
    query     through the gRPC client: example queries of every combination, then recall@1/5/10
              per combination over held-out test-split queries, with chance beside it
    stop      the servers are stopped (also on an error or Ctrl-C)

Relevance is class-level, as in genius.tasks: a hit is relevant when it has the requested
modality and its record's class is the query's target class (the query's own class; for
composed queries the class the text names). It is judged over the whole served index, which
holds the test-split pool and the train-split training targets, and chance is that of a
random ranking of the indexed items of the requested modality.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("genius.demo")

KS = (1, 5, 10)
KEY_SEP = "--"  # index shard key = "<record>--<view>": WebDataset keys may not hold '/'


@dataclass
class SystemDemoConfig:
    out: Path
    source: str | None = None  # Fashion-MNIST idx folder (default: the Debian package's)
    stage1_steps: int = 200
    pool: int = 500  # test-split records in the index, each as image, text and image-text item
    train: int = 1000  # train-split records giving the training pairs (their three views are indexed too)
    queries: int = 100  # held-out test-split queries per combination
    actors: int = 2  # embed/quantize actors of the build (1 CPU each)
    quantizer_epochs: int = 10
    decoder_epochs: int = 10
    beam: int = 20
    examples: int = 2  # example queries per combination
    concurrency: int = 4  # client threads sending the recall queries
    rebuild: bool = False  # build the index even when its inputs are unchanged
    threads: int = 0  # torch threads of this process (0: torch's own)
    seed: int = 0
    serve: bool = False  # leave the servers running with the search page at the end
    ui_port: int = 8080


@dataclass
class Query:
    """One held-out query as sent to the service, with what a relevant hit must be."""

    combination: str  # e.g. "text->image"
    key: str
    text: str | None
    image: bytes | None
    target_modality: str
    target_label: int
    shown: str  # how the example printout names it


@dataclass
class Steps:
    """Per-step wall time, logged as each step ends."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        log.info("step %s ...", name)
        t0 = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - t0, 1)
        log.info("step %s done in %.1f s", name, self.seconds[name])


# ----------------------------------------------------------------------------- data


def shard_key(item_key: str) -> str:
    """genius.tasks item key ("<record>/<view>") -> index shard key."""
    return item_key.replace("/", KEY_SEP)


def split_tasks(records: Sequence, config: SystemDemoConfig) -> tuple[list, list]:
    """Tasks whose training pairs come from the train split and whose pool and test queries
    come from the test split (genius.tasks builds both; the unused side is kept tiny)."""
    from cluster.demo import TASKS
    from genius.tasks import build_tasks

    train = [r for r in records if r.meta.get("split") == "train"]
    test = [r for r in records if r.meta.get("split") == "test"]
    if not train or not test:
        raise ValueError("the demo needs records of both splits (train and test)")
    train_tasks = build_tasks("fashion-mnist", train, tasks=list(TASKS), max_candidates=10, max_queries=10,
                              max_train=config.train, seed=config.seed)
    test_tasks = build_tasks("fashion-mnist", test, tasks=list(TASKS), max_candidates=config.pool,
                             max_queries=config.queries, max_train=0, seed=config.seed)
    return train_tasks, test_tasks


def index_items(train_tasks: Sequence, test_tasks: Sequence) -> list[tuple[str, str | None, bytes | None]]:
    """(item key, text, image) of every item to index: the test pools' and the training
    targets' image, text and image-text views, each key once."""
    from genius.tasks import universal_pool

    seen: dict[str, tuple[str, str | None, bytes | None]] = {}
    parts = [t.candidates for t in test_tasks] + [universal_pool(train_tasks).train_candidates]
    for items in parts:
        for i, key in enumerate(items.keys):
            if key not in seen:
                seen[key] = (key, items.texts[i] if items.texts is not None else None,
                             items.images[i] if items.images is not None else None)
    return list(seen.values())


def write_index_shards(folder: Path, items: Sequence[tuple[str, str | None, bytes | None]],
                       meta_of: dict[str, dict], shard_size: int = 1000) -> dict[str, Any]:
    """The index corpus as WebDataset shards; each record's JSON says its class and view."""
    from genius.data.shards import Record, ShardWriter
    from genius.tasks import record_key

    with ShardWriter(folder, "demo-index", shard_size, dataset="genius-demo-index") as writer:
        for key, text, image in items:
            record = record_key(key)
            meta = {**meta_of[record], "record": record, "view": key.split("/")[1]}
            writer.write(Record(key=shard_key(key), image=image, image_ext="png" if image is not None else None,
                                text=text, meta=meta))
        return writer.close()


@dataclass
class Pairs:
    """Training queries (text, image PNG bytes or both) and the index keys of their targets."""

    keys: list[str]
    texts: list[str | None]
    images: list[bytes | None]
    targets: list[str]


def training_pairs(train_tasks: Sequence) -> Pairs:
    """The training queries of every task, with instructions naming the target modality (the
    universal setting of genius.tasks: one model answers every combination)."""
    from genius.tasks import universal_pool

    pairs = Pairs([], [], [], [])
    for view in universal_pool(train_tasks, instructions=True).tasks:
        q = view.train_queries
        for i, target in enumerate(view.train_targets):
            pairs.keys.append(q.keys[i])
            pairs.texts.append(q.texts[i] if q.texts is not None else None)
            pairs.images.append(q.images[i] if q.images is not None else None)
            pairs.targets.append(shard_key(view.train_candidates.keys[int(target)]))
    return pairs


def write_pairs(path: Path, pairs: Pairs) -> None:
    """A pairs table for `genius index build --pairs`: key, text, image (PNG bytes), target."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from genius.atomic import write_atomic

    table = pa.table({"key": pa.array(pairs.keys, pa.string()), "text": pa.array(pairs.texts, pa.string()),
                      "image": pa.array(pairs.images, pa.binary()), "target": pa.array(pairs.targets, pa.string())})
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: pq.write_table(table, f))


def held_out_queries(test_tasks: Sequence, meta_of: dict[str, dict]) -> list[Query]:
    """The test tasks' queries as sent to the service: with the same instruction as training."""
    from genius.modality import Modality
    from genius.tasks import instruct, record_key

    out = []
    for task in test_tasks:
        target = task.candidate_modality
        sent = instruct(task.test_queries, target)
        for i, key in enumerate(task.test_queries.keys):
            meta = meta_of[record_key(key)]
            # Composed keys end in "/to-<label>": the class the modification text names.
            label = int(key.rsplit("/to-", 1)[1]) if "/to-" in key else int(meta["label"])
            original = task.test_queries.texts[i] if task.test_queries.texts is not None else None
            shown = " + ".join(part for part in (
                f"<image: {meta['class_name']}>" if Modality(int(task.test_queries.modality[i])) != Modality.TEXT
                else None, f"{original!r}" if original else None) if part)
            out.append(Query(task.short_name, key, sent.texts[i] if sent.texts is not None else None,
                             sent.images[i] if sent.images is not None else None, target.name.lower(), label, shown))
    return out


def pick_examples(queries: Sequence[Query], count: int) -> list[Query]:
    """`count` queries per combination; the tasks share their query records, so each
    combination takes the next ones (other items in each printout)."""
    out = []
    for i, combination in enumerate(dict.fromkeys(q.combination for q in queries)):
        mine = [q for q in queries if q.combination == combination]
        start = (i * count) % max(len(mine), 1)
        out += (mine[start:] + mine[:start])[:count]
    return out


# ----------------------------------------------------------------------------- build


def fingerprint(config: SystemDemoConfig, corpus: dict, items: Sequence[tuple], pairs: Pairs,
                encoder_dir: Path) -> str:
    """What the index depends on: the Fashion-MNIST shards, the items and training pairs drawn
    from them, the encoder, epochs and seed."""
    h = hashlib.sha256()
    h.update(json.dumps({"quantizer_epochs": config.quantizer_epochs, "decoder_epochs": config.decoder_epochs,
                         "seed": config.seed, "corpus": [s.get("sha256") for s in corpus.get("shards", [])],
                         "items": [key for key, _, _ in items], "pairs": [pairs.keys, pairs.targets]}).encode())
    for path in sorted(encoder_dir.iterdir()):
        h.update(path.name.encode())
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:16]


def build_index(config: SystemDemoConfig, shards: Path, pairs: Path, encoder_dir: Path, index: Path):
    """`genius index build` on a local Ray cluster started (and shut down) here."""
    import ray

    from cluster.build.pipeline import Build, BuildConfig

    cpus_per_actor = 1.0
    build = BuildConfig(shards=str(shards), out=str(index), actors=config.actors, cpus_per_actor=cpus_per_actor,
                        batch_size=256, encoder=str(encoder_dir), pairs=str(pairs),
                        quantizer_epochs=config.quantizer_epochs, decoder_epochs=config.decoder_epochs,
                        seed=config.seed, progress=False)
    started = not ray.is_initialized()  # a caller's own Ray is used as it is, and left running
    if started:
        # A cluster of our own ("local": not one that `ray start` left running here), one CPU per
        # actor plus one for the Ray Train coordinator; worker logs stay in /tmp/ray.
        ray.init(address="local", num_cpus=int(config.actors * cpus_per_actor) + 1, include_dashboard=False,
                 log_to_driver=False)
    try:
        return Build(build).run()
    finally:
        if started:
            ray.shutdown()


# ----------------------------------------------------------------------------- serving


@dataclass
class Answer:
    query: Query
    keys: list[str]
    modalities: list[str]
    metadata: list[dict]
    version: str
    partial: bool


def ask(client, query: Query, k: int, beam: int) -> Answer:
    result = client.search(text=query.text, image=query.image, k=k, beam_size=beam,
                           target_modalities=[query.target_modality])
    return Answer(query, list(result.keys[0]), [m.name.lower() for m in result.modalities[0]],
                  [json.loads(m) if m else {} for m in result.metadata[0]], result.version, result.partial)


def relevant(answer: Answer) -> list[bool]:
    q = answer.query
    return [m == q.target_modality and meta.get("label") == q.target_label
            for m, meta in zip(answer.modalities, answer.metadata)]


def chance(n: int, r: int, k: int) -> float:
    """Recall@k (>= 1 relevant in the top k) of a random ranking of n items, r of them relevant."""
    if n == 0 or r == 0:
        return 0.0
    k = min(k, n)
    return 1.0 - math.comb(n - r, k) / math.comb(n, k)


def recall_table(answers: Sequence[Answer], composition: Counter) -> list[dict[str, Any]]:
    """recall@k and precision@10 per combination, with chance over the served index (the
    indexed items of the requested modality, `composition[(modality, label)]` of each class)."""
    rows = []
    for combination in dict.fromkeys(a.query.combination for a in answers):
        mine = [a for a in answers if a.query.combination == combination]
        modality = mine[0].query.target_modality
        n = sum(c for (m, _), c in composition.items() if m == modality)
        hits = [relevant(a) for a in mine]
        row: dict[str, Any] = {"combination": combination, "target": modality, "queries": len(mine)}
        for k in KS:
            row[f"recall@{k}"] = round(float(np.mean([any(h[:k]) for h in hits])), 4)
        for k in KS:
            row[f"chance@{k}"] = round(float(np.mean([chance(n, composition[(modality, a.query.target_label)], k)
                                                      for a in mine])), 4)
        row["with_hits"] = sum(bool(a.keys) for a in mine)
        row["precision@10"] = round(float(np.mean([sum(h[:10]) / 10 for h in hits])), 4)
        row["chance_precision@10"] = round(float(np.mean([composition[(modality, a.query.target_label)] / max(n, 1)
                                                          for a in mine])), 4)
        rows.append(row)
    return rows


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    head = ("| query -> target | queries | R@1 | R@5 | R@10 | chance R@1 | chance R@5 | chance R@10 | P@10 | "
            "chance P@10 |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        lines.append(f"| {r['combination']} | {r['queries']} | " + " | ".join(
            f"{r[c]:.3f}" for c in ("recall@1", "recall@5", "recall@10", "chance@1", "chance@5", "chance@10",
                                    "precision@10", "chance_precision@10")) + " |")
    return "\n".join(lines)


def print_examples(answers: Sequence[Answer]) -> None:
    print("\nExample queries through the gRPC service (class and modality of each hit; * = relevant):")
    for combination in dict.fromkeys(a.query.combination for a in answers):
        print(f"\n  {combination}")
        for a in (x for x in answers if x.query.combination == combination):
            shown = [f"{meta.get('class_name', key)} ({m}){'*' if ok else ''}"
                     for key, m, meta, ok in zip(a.keys, a.modalities, a.metadata, relevant(a))]
            sent = f"  (sent with text {a.query.text!r})" if a.query.text else ""
            print(f"    {a.query.shown}{sent}\n      -> {', '.join(shown) or '(no hits)'}")


def serve_and_query(index: Path, queries: Sequence[Query], examples: Sequence[Query], config: SystemDemoConfig,
                    steps: Steps) -> tuple[list[Answer], list[Answer], dict[str, Any], Any]:
    """Start `serve local`, ask the examples and the held-out queries, stop the servers (unless
    config.serve: then the running LocalCluster is returned too, else None)."""
    from cluster.serve import serve_local
    from genius.client import SearchClient

    with steps("serve local"):
        cluster = serve_local(str(index))
        log.info("serving %s: replica at %s, %d shard server(s)", index, cluster.address, len(cluster.shards))
    info: dict[str, Any] = {"address": cluster.address,
                            "shard_addresses": [a for n in sorted(cluster.shard_map) for a in cluster.shard_map[n]]}
    try:
        with SearchClient(cluster.address) as client:
            with steps("example queries"):
                shown = [ask(client, q, 5, config.beam) for q in examples]
            with steps("recall queries"):
                t0 = time.perf_counter()
                # Concurrent requests: the replica batches them into one beam search.
                pool = ThreadPoolExecutor(max_workers=max(1, config.concurrency))
                try:
                    answers = list(pool.map(lambda q: ask(client, q, max(KS), config.beam), queries))
                finally:  # on Ctrl-C or an error: drop the queued queries instead of sending them all
                    pool.shutdown(wait=False, cancel_futures=True)
                seconds = time.perf_counter() - t0
        info.update(queries=len(answers), seconds=round(seconds, 2),
                    queries_per_s=round(len(answers) / max(seconds, 1e-9), 1),
                    versions=sorted({a.version for a in [*shown, *answers]}),
                    partial=sum(a.partial for a in [*shown, *answers]))
    except BaseException:
        cluster.stop(grace=1.0)
        raise
    if config.serve:
        return shown, answers, info, cluster
    with steps("stop servers"):
        cluster.stop(grace=1.0)
    return shown, answers, info, None


def serve_until_stopped(cluster, shards: Path, port: int) -> None:
    """The search page over the demo's servers, until Ctrl-C or SIGTERM; then everything stops."""
    from cluster.serve import shutdown, wait_for_termination
    from cluster.ui import start_ui

    try:
        ui = start_ui(cluster.address, str(shards), "127.0.0.1", port)
    except BaseException:
        shutdown(cluster.servers, 0.0, 1.0)
        raise
    print(f"\nsearch page: {ui.url}  (gRPC replica at {cluster.address}; Ctrl-C stops everything)", flush=True)
    try:
        wait_for_termination(cluster.servers, 0.0, 1.0)
    finally:
        ui.stop()


# ----------------------------------------------------------------------------- main


def run(config: SystemDemoConfig) -> dict[str, Any]:
    import torch

    from cluster.demo import shards as fashion_shards
    from cluster.demo import stage1_encoder
    from genius.data.shards import ShardReader, read_manifest
    from genius.store.layout import read_current

    if config.threads:
        torch.set_num_threads(config.threads)
    t0 = time.time()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    served, index = out / "served", out / "index"
    steps = Steps()
    with steps("shards"):
        records = list(ShardReader(fashion_shards(out, config.source), check_images="none"))
        log.info("read %d Fashion-MNIST records", len(records))
    with steps("tasks"):
        train_tasks, test_tasks = split_tasks(records, config)
        meta_of = {r.key: {"label": int(r.meta["label"]), "class_name": r.meta["class_name"],
                           "split": r.meta["split"]} for r in records}
    with steps("stage-1 encoder"):
        _, zero_shot = stage1_encoder(out, records, train_tasks, config.stage1_steps,
                                      f"{torch.get_num_threads()} torch threads")
    del records
    encoder_dir = out / "encoder"
    items = index_items(train_tasks, test_tasks)
    pairs = training_pairs(train_tasks)
    stamp = served / "build.json"
    with steps("index corpus and pairs"):
        inputs = fingerprint(config, read_manifest(out / "shards") or {}, items, pairs, encoder_dir)
        previous = json.loads(stamp.read_text()) if stamp.exists() else {}
        reuse = (not config.rebuild and read_current(index) is not None and previous.get("fingerprint") == inputs)
        if not reuse:
            manifest = write_index_shards(served / "shards", items, meta_of)
            write_pairs(served / "pairs.parquet", pairs)
            log.info("index corpus: %d items in %d shards %s; %d training pairs from the train split",
                     manifest["items"], len(manifest["shards"]), manifest["modalities"], len(pairs.keys))
    with steps("index build (Ray)"):
        if reuse:
            log.info("reusing the index in %s (%s): its inputs are unchanged (--rebuild to build again)",
                     index, read_current(index))
            built = previous.get("build", {})
        else:
            stamp.unlink(missing_ok=True)
            result = build_index(config, served / "shards", served / "pairs.parquet", encoder_dir, index)
            built = {"version": result.version.name, "items": result.items, "skipped": result.skipped,
                     "stage_seconds": result.stage_seconds}
            log.info("built %s: %d items; stage seconds %s", result.version, result.items, result.stage_seconds)
            stamp.write_text(json.dumps({"fingerprint": inputs, "build": built}, indent=2))
    queries = held_out_queries(test_tasks, meta_of)
    examples = pick_examples(queries, config.examples)
    shown, answers, serving, running = serve_and_query(index, queries, examples, config, steps)
    composition = Counter((key.split("/")[1], meta_of[key.split("/")[0]]["label"]) for key, _, _ in items)
    rows = recall_table(answers, composition)
    print_examples(shown)
    table = markdown(rows)
    splits = Counter(meta_of[k.split("/")[0]]["split"] for k, _, _ in items)
    print(f"\nRecall through the served index {', '.join(serving['versions'])}: {len(items)} items "
          f"{dict(Counter(k.split('/')[1] for k, _, _ in items))} ({splits['test']} from the test-split pool, "
          f"{splits['train']} training targets from the train split); {len(queries)} held-out test-split queries; "
          f"relevant = requested modality and the query's target class; chance = a random ranking of the "
          f"indexed items of that modality; beam {config.beam}, k 10.\n\n{table}\n")
    print(f"{serving['queries']} queries in {serving['seconds']:.1f} s: {serving['queries_per_s']} queries/s "
          f"({config.concurrency} client threads); partial responses: {serving['partial']}")
    summary = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
               "index": str(index), "index_reused": reuse, "build": built, "serving": serving,
               "zero_shot_accuracy": zero_shot, "recall": rows, "step_seconds": steps.seconds,
               "seconds": round(time.time() - t0, 1)}
    (out / "recall.md").write_text(table + "\n")
    (out / "recall.json").write_text(json.dumps(summary, indent=2))
    print(f"recall table: {out / 'recall.json'}, {out / 'recall.md'}; index: {index} "
          f"({summary['seconds']:.0f} s in all; steps {steps.seconds})")
    if running is not None:
        serve_until_stopped(running, served / "shards", config.ui_port)
    return summary
