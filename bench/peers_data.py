"""Full-pool retrieval tasks for `bench/peers.py`: every record of a corpus is a candidate.

A `PoolTask` holds embeddings only (pool, training queries, test queries) with
instance-level relevance. Records are grouped by what makes them indistinguishable (the
synset's lemma text, the clip-art title, the image's pixels); test queries come from
held-out groups, training pairs from every other group, and the pool holds every record:
the production setting, where the index covers all items, training pairs teach most of
them, and a held-out item is reachable only through what the decoder learnt about others
(and, for GENIUS, through the indexing task on its own embedding).

Embeddings are cached by content (`genius.embedding_cache`) so that a second run, and every
accuracy experiment after it, starts at the fit.
"""
from __future__ import annotations

import io
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from genius.embedding_cache import EmbeddingCache, content_id, encoder_fingerprint
from genius.modality import Modality
from genius.tasks import normalise_title

log = logging.getLogger("bench.peers")


@dataclass
class PoolTask:
    """Embeddings of one full-pool task. Rows of `train_targets` and of `relevance` are pool rows."""

    name: str
    query_modality: Modality
    candidate_modality: Modality
    pool: np.ndarray  # (N, D) float32, unit norm
    train_queries: np.ndarray  # (T, D)
    train_targets: np.ndarray  # (T,) pool rows
    test_queries: np.ndarray  # (Q, D)
    relevance: list[np.ndarray]  # per test query, the relevant pool rows
    relevance_rule: str
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def pool_modality(self) -> np.ndarray:
        return np.full(len(self.pool), int(self.candidate_modality), dtype=np.int64)

    def chance_recall(self, k: int) -> float:
        """Recall@k of a random ranking: P(some relevant row among k drawn of N), averaged."""
        n = len(self.pool)
        k = min(k, n)
        out = []
        for rel in self.relevance:
            r = len(rel)
            # 1 - C(n - r, k) / C(n, k), as a product to stay in floating point
            miss = math.exp(sum(math.log((n - r - i) / (n - i)) for i in range(k))) if n - r >= k else 0.0
            out.append(1.0 - miss)
        return float(np.mean(out))

    def subset(self, size: int, seed: int = 0) -> "PoolTask":
        """The task over a pool of `size` rows: every test query's relevant rows plus random
        others; training pairs whose target stays in the pool."""
        n = len(self.pool)
        if size >= n:
            return self
        needed = np.unique(np.concatenate(self.relevance))
        if size < len(needed):
            raise ValueError(f"{self.name}: a pool of {size} cannot hold the {len(needed)} relevant rows")
        rng = np.random.default_rng(seed)
        others = np.setdiff1d(np.arange(n), needed)
        rows = np.sort(np.concatenate([needed, rng.choice(others, size - len(needed), replace=False)]))
        new_row = np.full(n, -1, dtype=np.int64)
        new_row[rows] = np.arange(len(rows))
        kept = new_row[self.train_targets] >= 0
        return replace(
            self, name=f"{self.name}@{size}", pool=self.pool[rows], train_queries=self.train_queries[kept],
            train_targets=new_row[self.train_targets[kept]], relevance=[new_row[r] for r in self.relevance],
            info={**self.info, "subset_of": len(self.pool), "subset_seed": seed},
        )

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name, "query_modality": self.query_modality.name.lower(),
            "candidate_modality": self.candidate_modality.name.lower(), "pool": len(self.pool),
            "train_pairs": len(self.train_queries), "test_queries": len(self.test_queries),
            "relevant_per_query": round(float(np.mean([len(r) for r in self.relevance])), 3),
            **{f"chance_r{k}": round(self.chance_recall(k), 6) for k in (1, 5, 10)},
            "relevance_rule": self.relevance_rule, **self.info,
        }


# ----------------------------------------------------------------------------- splitting


def held_out_split(groups: Sequence[str], num_test: int, rng: np.random.Generator,
                   query_key: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(test rows, training rows): `num_test` rows of distinct random groups as test queries;
    training rows are every row of the other groups, minus those whose query equals a test
    query (`query_key`, e.g. the normalised definition: the same query is not held out)."""
    by_group: dict[str, list[int]] = defaultdict(list)
    for row, g in enumerate(groups):
        by_group[g].append(row)
    names = list(by_group)
    if num_test > len(names):
        raise ValueError(f"{num_test} test queries asked, only {len(names)} groups")
    chosen = rng.choice(len(names), num_test, replace=False)
    test = np.sort(np.array([by_group[names[i]][int(rng.integers(len(by_group[names[i]])))] for i in chosen]))
    held = {names[i] for i in chosen}
    test_queries = {query_key[r] for r in test} if query_key is not None else set()
    train = np.array([r for r, g in enumerate(groups) if g not in held
                      and (query_key is None or query_key[r] not in test_queries)], dtype=np.int64)
    return test, train


def relevance_by_group(groups: Sequence[str], rows: np.ndarray) -> list[np.ndarray]:
    by_group: dict[str, list[int]] = defaultdict(list)
    for row, g in enumerate(groups):
        by_group[g].append(row)
    return [np.array(by_group[groups[r]], dtype=np.int64) for r in rows]


# ----------------------------------------------------------------------------- embedding


class CachedEmbedder:
    """Embeds texts, images or (image, text) pairs with one encoder, through a content cache."""

    def __init__(self, encoder: Any, cache_path: Path, batch: int = 512) -> None:
        self.encoder = encoder
        self.cache = EmbeddingCache(cache_path, encoder_fingerprint(encoder))
        self.batch = batch

    def __call__(self, modality: Modality, images: Sequence[Any] | None, texts: Sequence[str] | None,
                 what: str) -> np.ndarray:
        n = len(texts if texts is not None else images)
        images = images if images is not None else [None] * n
        texts = texts if texts is not None else [None] * n
        ids = [content_id(int(modality), im, tx) for im, tx in zip(images, texts)]
        out: list[np.ndarray | None] = [self.cache.get(c) for c in ids]
        todo = [i for i, v in enumerate(out) if v is None]
        if todo:
            from tqdm import tqdm

            distinct: dict[str, int] = {}
            for i in todo:
                distinct.setdefault(ids[i], i)
            rows = list(distinct.values())
            if modality == Modality.TEXT:  # batches of similar length: little padding
                rows.sort(key=lambda i: len(texts[i]))
            log.info("%s: embedding %d of %d (%d cached)", what, len(rows), n, n - len(todo))
            for a in tqdm(range(0, len(rows), self.batch), desc=f"embed {what}", unit="batch", mininterval=10):
                part = rows[a : a + self.batch]
                vecs = self._encode(modality, [images[i] for i in part], [texts[i] for i in part])
                for i, v in zip(part, vecs):
                    self.cache.put(ids[i], v)
            self.cache.save()
            out = [self.cache.get(c) for c in ids]
        return _unit(np.stack(out).astype(np.float32))

    def _encode(self, modality: Modality, images: list[Any], texts: list[str | None]) -> np.ndarray:
        if modality == Modality.TEXT:
            v = self.encoder.encode_text(texts)
        elif modality == Modality.IMAGE:
            v = self.encoder.encode_image(images)
        else:
            v = self.encoder.encode_pair(images, texts)
        return v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


# ----------------------------------------------------------------------------- tasks


def wordnet_task(records: Sequence[Any], embed: Callable[..., np.ndarray], num_test: int, seed: int) -> PoolTask:
    """definition -> synset over every synset: the candidate is a synset's lemma text, the
    query a held-out synset's definition. Relevant: every synset with the same lemma text."""
    rng = np.random.default_rng(seed)
    groups = [normalise_title(r.text) for r in records]
    definitions = [str(r.meta["definition"]) for r in records]
    test, train = held_out_split(groups, num_test, rng, [normalise_title(d) for d in definitions])
    pool = embed(Modality.TEXT, None, [r.text for r in records], "wordnet synsets")
    queries = embed(Modality.TEXT, None, definitions, "wordnet definitions")
    return PoolTask(
        name="wordnet", query_modality=Modality.TEXT, candidate_modality=Modality.TEXT, pool=pool,
        train_queries=queries[train], train_targets=train, test_queries=queries[test],
        relevance=relevance_by_group(groups, test),
        relevance_rule=("instance-level: a held-out synset's definition is answered by its synset (its lemma "
                        "text) and by any synset with the same lemma text; no synset with that text is a "
                        "training target, and no training definition equals a test one"),
        info={"records": len(records), "seed": seed},
    )


def titled_split(records: Sequence[Any], num_test: int, seed: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(group per record = normalised title, test rows, training rows)."""
    groups = [normalise_title(r.meta.get("title") or r.text) for r in records]
    test, train = held_out_split(groups, num_test, np.random.default_rng(seed))
    return groups, test, train


def titled_image_tasks(records: Sequence[Any], embed: Callable[..., np.ndarray], num_test: int, seed: int,
                       corpus: str) -> list[PoolTask]:
    """text -> image and image -> text over every record (Openclipart): relevant = same
    normalised title; test titles never appear in training."""
    groups, test, train = titled_split(records, num_test, seed)
    images = embed(Modality.IMAGE, [r.image for r in records], None, f"{corpus} images")
    texts = embed(Modality.TEXT, None, [r.text for r in records], f"{corpus} titles")
    rel = relevance_by_group(groups, test)
    rule = "same title: a candidate is relevant when its normalised title equals the query record's"
    info = {"records": len(records), "seed": seed}
    return [
        PoolTask(f"{corpus}/text->image", Modality.TEXT, Modality.IMAGE, images, texts[train], train, texts[test],
                 rel, rule, info),
        PoolTask(f"{corpus}/image->text", Modality.IMAGE, Modality.TEXT, texts, images[train], train, images[test],
                 rel, rule, info),
    ]


def augmented_view(png: bytes, rng: np.random.Generator) -> bytes:
    """Another view of the same picture: a random shift (up to 3 px), a 50 % horizontal flip,
    contrast x[0.8, 1.2] and Gaussian noise (sd 8 grey levels)."""
    from PIL import Image

    a = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float32)
    dy, dx = rng.integers(-3, 4, size=2)
    a = np.roll(a, (int(dy), int(dx)), axis=(0, 1))
    if rng.random() < 0.5:
        a = a[:, ::-1]
    a = (a - a.mean()) * rng.uniform(0.8, 1.2) + a.mean() + rng.normal(0, 8, a.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class InstanceSplit:
    pngs: list[bytes]
    views: list[bytes]  # one augmented view per image, in row order
    groups: list[str]  # pixel hash: identical pictures cannot be told apart
    test: np.ndarray
    train: np.ndarray


def instance_split(records: Sequence[Any], num_test: int, seed: int) -> InstanceSplit:
    import hashlib

    pngs = [r.image if isinstance(r.image, bytes) else Path(r.image).read_bytes() for r in records]
    groups = [hashlib.sha1(_pixels(p)).hexdigest() for p in pngs]
    test, train = held_out_split(groups, num_test, np.random.default_rng(seed))
    view_rng = np.random.default_rng(seed + 1)
    return InstanceSplit(pngs, [augmented_view(p, view_rng) for p in pngs], groups, test, train)


def instance_image_task(records: Sequence[Any], embed: Callable[..., np.ndarray], num_test: int, seed: int,
                        corpus: str) -> PoolTask:
    """image -> image, instance-level: the query is an augmented view of a held-out image,
    relevant is that image (and any pixel-identical copy). Training pairs: one augmented view
    of every other image -> that image."""
    split = instance_split(records, num_test, seed)
    pool = embed(Modality.IMAGE, split.pngs, None, f"{corpus} images")
    queries = embed(Modality.IMAGE, split.views, None, f"{corpus} augmented views")
    return PoolTask(
        f"{corpus}/image->image (instance)", Modality.IMAGE, Modality.IMAGE, pool, queries[split.train], split.train,
        queries[split.test], relevance_by_group(split.groups, split.test),
        "instance-level: an augmented view (shift, flip, contrast, noise) of a held-out image is answered by "
        "that image and by any pixel-identical copy",
        {"records": len(records), "seed": seed, "distinct_images": len(set(split.groups))},
    )


def _pixels(png: bytes) -> bytes:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("L")).tobytes()


# ----------------------------------------------------------------------------- stage 1


def train_stage1(kind: str, records: Sequence[Any], encoder: Any, num_test: int, seed: int, folder: Path,
                 epochs: int) -> None:
    """Stage 1 on the task's training pairs only (the same split as the task's): the image
    tower (and, for titles, the text side stays the locked MiniLM) learns query -> target."""
    from genius.encoder_training import EncoderTrainConfig, PairExample, train_encoder

    if kind == "fashion":
        split = instance_split(records, num_test, seed)
        examples = [PairExample(query_image=split.views[i], target_image=split.pngs[i], key=records[i].key)
                    for i in split.train]
    else:
        _, _, train = titled_split(records, num_test, seed)
        examples = [PairExample(query_text=records[i].text, target_image=records[i].image, key=records[i].key)
                    for i in train]
    config = EncoderTrainConfig(epochs=epochs, batch_size=256, seed=seed, checkpoint_every_steps=10**9)
    log.info("stage 1 for %s: %d training pairs, %d epochs", kind, len(examples), epochs)
    train_encoder(encoder, examples, config, progress=True)
    encoder.save(folder)
