"""M-BEIR-style retrieval tasks built from a corpus of shard `Record`s.

A `RetrievalTask` is one (query modality -> candidate modality) task with

* training pairs: `train_queries[i]` -> `train_candidates[train_targets[i]]`;
* a test candidate pool (`candidates`, with keys) and test queries (`test_queries`);
* per test query, the set of relevant pool rows (`relevance`) and a `relevance_rule`
  sentence saying how relevance was decided (reported with every number).

Splits are made once per corpus, by record (or by group of records that share a title or
a lemma text), and shared by all tasks of the corpus, so that:

* no test candidate of any task is a training target of any task: the decoder meets pool
  items only through the index's DSI indexing task (item embedding -> own ID);
* test queries come from other records than training queries (`RetrievalTask.validate`).

Builders:

* `labelled_image_tasks` — labelled image corpora (Fashion-MNIST: meta `label` /
  `class_name`, class-level captions): text->image, image->text, text->image_text,
  image->image and composed image_text->image (CIRR-like: an image of class A + "the same
  item but as a {class B}" -> images of class B). Relevance is class-level.
* `titled_image_tasks` — Openclipart-like corpora (meta `title`): text->image and
  image->text, relevance "same title".
* `wordnet_tasks` — WordNet (text only, meta `definition`, text = lemma text):
  definition -> synset (text->text), instance-level relevance.
* `universal_pool` — the union of several tasks' pools in one index; a query's relevant
  set is only its own task's relevant candidates, so the first decoded code (the
  modality) must be right.

Item keys name the record and the view of it: ``<record>/image``, ``<record>/text``,
``<record>/image_text`` (composed queries: ``<record>/image_text/to-<label>``), so that one
key always means one content, and pools of several tasks can be merged by key.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from genius.items import Items
from genius.modality import Modality

log = logging.getLogger(__name__)

__all__ = [
    "RetrievalTask", "UniversalPool", "LABELLED_TASKS", "TITLED_TASKS", "WORDNET_TASKS",
    "labelled_image_tasks", "titled_image_tasks", "wordnet_tasks", "universal_pool",
    "build_tasks", "concat_items", "instruct", "item_key", "normalise_title",
]

# Short task names (the part after "<corpus>/").
LABELLED_TASKS = ("text->image", "image->text", "text->image_text", "image->image", "image_text->image")
TITLED_TASKS = ("text->image", "image->text")
WORDNET_TASKS = ("definition->synset",)
DEFAULT_MODIFICATION = "the same item but as {article} {name}"

_VIEW = {Modality.IMAGE: "image", Modality.TEXT: "text", Modality.IMAGE_TEXT: "image_text"}


def item_key(record_key: str, modality: Modality, suffix: str | None = None) -> str:
    """The key of one view of a record: ``<record>/<modality>[/<suffix>]``."""
    key = f"{record_key}/{_VIEW[Modality(modality)]}"
    return f"{key}/{suffix}" if suffix else key


def record_key(key: str) -> str:
    """The record an item key (`item_key`) was made from (record keys hold no '/')."""
    return key.split("/", 1)[0]


def split_record_keys(tasks: Sequence["RetrievalTask"]) -> dict[str, list[str]]:
    """Record keys by role over all tasks: "held_out" (in a test pool or a test query) and
    "train" (in a training pair). Stage 1 trained without the held-out records keeps the
    test split unseen by every stage (`genius train encoder --exclude-keys`)."""
    held, train = set(), set()
    for t in tasks:
        for items, into in ((t.candidates, held), (t.test_queries, held), (t.train_queries, train),
                            (t.train_candidates, train)):
            into.update(record_key(k) for k in items.keys or [])
    return {"held_out": sorted(held), "train": sorted(train - held)}


def normalise_title(title: str) -> str:
    """Case-folded, whitespace-collapsed title (the "same title" relevance key)."""
    return re.sub(r"\s+", " ", str(title)).strip().casefold()


# ----------------------------------------------------------------------------- items


def _items(texts: Sequence[str | None], images: Sequence[Any | None], modality: Modality | Sequence[int],
           keys: Sequence[str]) -> Items:
    n = len(keys)
    mods = [int(modality)] * n if isinstance(modality, (int, Modality)) else [int(m) for m in modality]
    return Items(
        texts=None if all(t is None for t in texts) else list(texts),
        images=None if all(i is None for i in images) else list(images),
        modality=np.asarray(mods, dtype=np.int64), keys=list(keys),
    )


def _view(records: Sequence[Any], modality: Modality) -> Items:
    """The image, text or image-text view of records."""
    modality = Modality(modality)
    texts = [r.text if modality != Modality.IMAGE else None for r in records]
    images = [r.image if modality != Modality.TEXT else None for r in records]
    return _items(texts, images, modality, [item_key(r.key, modality) for r in records])


def concat_items(parts: Sequence[Items]) -> Items:
    """Rows of several `Items` in order (fields absent in a part become None rows; the
    embeddings are kept only when every part has them)."""
    parts = [p for p in parts if p is not None and len(p)]
    if not parts:
        raise ValueError("concat_items needs at least one non-empty Items")

    def column(name: str) -> list | None:
        if all(getattr(p, name) is None for p in parts):
            return None
        out: list = []
        for p in parts:
            values = getattr(p, name)
            out.extend(values if values is not None else [None] * len(p))
        return out

    embeddings = None
    if all(p.embeddings is not None for p in parts):
        embeddings = np.concatenate([p.embeddings for p in parts]).astype(np.float32)
    keys = column("keys")
    if keys is not None and any(k is None for k in keys):
        raise ValueError("concat_items: some parts have keys and others not")
    return Items(texts=column("texts"), images=column("images"), embeddings=embeddings,
                 modality=np.concatenate([p.modality for p in parts]), keys=keys)


# ----------------------------------------------------------------------------- task


@dataclass
class RetrievalTask:
    """One retrieval task: training pairs, a test pool, test queries and their relevance."""

    name: str  # "<corpus>/<query>-><candidate>", e.g. "fashion-mnist/text->image"
    query_modality: Modality
    candidate_modality: Modality
    train_queries: Items
    train_targets: np.ndarray  # (M,) rows of train_candidates
    train_candidates: Items  # the training targets' pool: never test candidates
    test_queries: Items
    candidates: Items  # the test candidate pool (keys set)
    relevance: list[frozenset[int]]  # per test query: relevant rows of `candidates`
    relevance_rule: str
    corpus: str = ""
    info: dict[str, Any] = field(default_factory=dict)  # split sizes, dropped queries, ...

    def __post_init__(self) -> None:
        self.query_modality = Modality.parse(self.query_modality)
        self.candidate_modality = Modality.parse(self.candidate_modality)
        self.train_targets = np.asarray(self.train_targets, dtype=np.int64)
        self.relevance = [frozenset(int(i) for i in rel) for rel in self.relevance]

    @property
    def candidate_keys(self) -> list[str]:
        return list(self.candidates.keys or [])

    @property
    def short_name(self) -> str:
        return self.name.split("/", 1)[-1]

    def summary(self) -> dict[str, Any]:
        sizes = [len(r) for r in self.relevance]
        return {
            "name": self.name, "corpus": self.corpus,
            "query_modality": self.query_modality.name.lower(),
            "candidate_modality": self.candidate_modality.name.lower(),
            "train_queries": len(self.train_queries), "train_candidates": len(self.train_candidates),
            "test_queries": len(self.test_queries), "candidates": len(self.candidates),
            "relevant_per_query": {"mean": float(np.mean(sizes)) if sizes else 0.0,
                                   "min": int(min(sizes, default=0)), "max": int(max(sizes, default=0))},
            **{f"chance_recall@{k}": round(self.chance_recall(k), 4) for k in (1, 5, 10)},
            "relevance_rule": self.relevance_rule,
            **({"info": self.info} if self.info else {}),
        }

    def chance_recall(self, k: int) -> float:
        """Expected recall@k of a random ranking of the pool (M-BEIR recall: >= 1 hit)."""
        n = len(self.candidates)
        if n == 0 or not self.relevance:
            return 0.0
        k = min(k, n)
        out = []
        for rel in self.relevance:
            r = len(rel)
            # P(no relevant among k drawn without replacement) = C(n-r, k) / C(n, k)
            miss = 1.0
            for j in range(k):
                miss *= max(n - r - j, 0) / (n - j)
            out.append(1.0 - miss)
        return float(np.mean(out))

    def validate(self) -> None:
        """Raise ValueError unless the split is clean (see the module docstring)."""
        problems = []
        if len(self.train_queries) != len(self.train_targets):
            problems.append(f"{len(self.train_queries)} training queries but {len(self.train_targets)} targets")
        if len(self.train_targets) and (self.train_targets.min() < 0 or self.train_targets.max() >= len(self.train_candidates)):
            problems.append("training targets outside train_candidates")
        if len(self.relevance) != len(self.test_queries):
            problems.append(f"{len(self.test_queries)} test queries but {len(self.relevance)} relevance sets")
        if any(not rel for rel in self.relevance):
            problems.append("a test query has no relevant candidate")
        if any(i < 0 or i >= len(self.candidates) for rel in self.relevance for i in rel):
            problems.append("relevance outside the candidate pool")
        for name, items in (("candidates", self.candidates), ("train_candidates", self.train_candidates),
                            ("test_queries", self.test_queries), ("train_queries", self.train_queries)):
            if items.keys is None:
                problems.append(f"{name} have no keys")
        if not problems:
            pool = set(self.candidates.keys)
            if len(pool) != len(self.candidates):
                problems.append("candidate keys are not unique")
            trained = {self.train_candidates.keys[i] for i in np.unique(self.train_targets)}
            if pool & trained:
                problems.append(f"{len(pool & trained)} test candidates are training targets")
            if set(self.test_queries.keys) & set(self.train_queries.keys):
                problems.append("test queries overlap training queries")
            relevant = sorted(set().union(*self.relevance)) if self.relevance else []
            if (self.candidates.modality[relevant] != int(self.candidate_modality)).any():
                problems.append("a relevant candidate has another modality than the task's")
            if (self.test_queries.modality != int(self.query_modality)).any():
                problems.append("a test query has another modality than the task's")
        if problems:
            raise ValueError(f"task {self.name}: " + "; ".join(problems))


def _drop_unanswerable(queries: Items, relevance: list[set[int]]) -> tuple[Items, list[set[int]], int]:
    keep = [i for i, rel in enumerate(relevance) if rel]
    dropped = len(relevance) - len(keep)
    if dropped:
        queries = queries.subset(keep)
        relevance = [relevance[i] for i in keep]
    return queries, relevance, dropped


# ----------------------------------------------------------------------------- splits


def _split_sizes(n: int, max_candidates: int, max_queries: int, max_train: int | None) -> tuple[int, int, int]:
    """(pool, query, train) record counts; shrinks pool and queries to leave half for training."""
    need_q = max_queries
    c, q = max_candidates, need_q
    if c + q > n // 2:
        scale = (n // 2) / max(c + q, 1)
        c, q = max(int(c * scale), 1), int(q * scale)
        log.warning("only %d records: pool %d and %d separate query records (asked %d and %d)",
                    n, c, q, max_candidates, need_q)
    rest = n - c - q
    t = rest if max_train is None else min(rest, max_train)
    return c, q, t


def _group_split(groups: list[list[int]], max_pool: int, max_train: int | None, max_per_group: int | None,
                 rng: np.random.Generator) -> tuple[list[list[int]], list[list[int]]]:
    """Assign whole groups (records sharing a title/text) to the pool or to training."""
    order = rng.permutation(len(groups))
    total = sum(min(len(g), max_per_group or len(g)) for g in groups)
    pool_cap = min(max_pool, total // 2) if total > 1 else max_pool
    if pool_cap < max_pool:
        log.warning("only %d usable records: pool of %d (asked %d)", total, pool_cap, max_pool)
    pool, train, n_pool, n_train = [], [], 0, 0
    for g in order:
        members = list(groups[g])
        rng.shuffle(members)
        if max_per_group:
            members = members[:max_per_group]
        if n_pool < pool_cap:
            members = members[: pool_cap - n_pool]
            pool.append(members)
            n_pool += len(members)
        elif max_train is None or n_train < max_train:
            if max_train is not None:
                members = members[: max_train - n_train]
            train.append(members)
            n_train += len(members)
    return pool, train


def _select(records: Iterable[Any], need_image: bool, need_text: bool, meta_keys: Sequence[str],
            what: str) -> tuple[list[Any], dict[str, int]]:
    kept, skipped = [], defaultdict(int)
    for r in records:
        if need_image and r.image is None:
            skipped["no_image"] += 1
        elif need_text and not (r.text and r.text.strip()):
            skipped["no_text"] += 1
        elif any(r.meta.get(k) in (None, "") for k in meta_keys):
            skipped["no_" + "_".join(meta_keys)] += 1
        else:
            kept.append(r)
    if skipped:
        log.warning("%s: %d records unusable %s", what, sum(skipped.values()), dict(skipped))
    return kept, dict(skipped)


def _check_names(wanted: Sequence[str] | None, known: Sequence[str], corpus: str) -> list[str]:
    names = list(known) if not wanted else [w.split("/", 1)[-1] for w in wanted]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"{corpus}: unknown task(s) {unknown}; choose from {list(known)}")
    return names


# ----------------------------------------------------------------------------- labelled images


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def labelled_image_tasks(
    records: Iterable[Any],
    *,
    corpus: str = "fashion-mnist",
    tasks: Sequence[str] | None = None,
    max_candidates: int = 1000,
    max_queries: int = 200,
    max_train: int | None = None,
    seed: int = 0,
    label_key: str = "label",
    name_key: str = "class_name",
    modification: str = DEFAULT_MODIFICATION,
    caption_note: str = "captions name the class",
) -> list[RetrievalTask]:
    """Tasks over a labelled image corpus whose records carry an image, a caption and
    meta[label_key] (and meta[name_key], used in the composed queries' texts).

    Records are split once: `max_candidates` pool records (their images, captions or
    image-caption pairs form each task's pool), `max_queries` query records (test queries),
    and up to `max_train` training records (default: as many as the pool) for training
    pairs. Training pairs: caption->image, image->caption, caption->pair of the same record;
    image->image of another training record of the same class; composed
    (image of class A, "the same item but as a B") -> image of a training record of class B.
    """
    names = _check_names(tasks, LABELLED_TASKS, corpus)
    recs, skipped = _select(records, True, True, [label_key], corpus)
    rng = np.random.default_rng(seed)
    max_train = max_candidates if max_train is None else max_train
    c, q, t = _split_sizes(len(recs), max_candidates, max_queries, max_train)
    order = rng.permutation(len(recs))
    pool = [recs[i] for i in order[:c]]
    qrec = [recs[i] for i in order[c : c + q]]
    train = [recs[i] for i in order[c + q : c + q + t]]
    label = lambda r: r.meta[label_key]  # noqa: E731
    class_name = {}
    for r in recs:
        class_name.setdefault(label(r), str(r.meta.get(name_key) or label(r)))
    labels = sorted(class_name, key=str)
    pool_by_label = defaultdict(list)
    for i, r in enumerate(pool):
        pool_by_label[label(r)].append(i)
    train_by_label = defaultdict(list)
    for i, r in enumerate(train):
        train_by_label[label(r)].append(i)
    info_base = {"records": len(recs), "pool_records": len(pool), "query_records": len(qrec),
                 "train_records": len(train), "classes": len(labels), "seed": seed,
                 **({"skipped_records": skipped} if skipped else {})}
    class_rule = (f"class-level: a candidate is relevant when its record's meta['{label_key}'] equals the "
                  f"query's{{target}}; {caption_note}, so any item of the class answers a caption. Pool, "
                  f"query and training records are disjoint.")

    def mod_text(lbl: Any) -> str:
        name = class_name[lbl].lower()
        return modification.format(name=name, article=_article(name))

    out: list[RetrievalTask] = []
    for short in names:
        qm_name, cm_name = short.split("->")
        qm, cm = Modality.parse(qm_name), Modality.parse(cm_name)
        candidates = _view(pool, cm)
        train_candidates = _view(train, cm)
        info = dict(info_base)
        if short == "image_text->image":
            # Composed: image of class A + modification to class B (B != A) -> images of B.
            if len(labels) < 2:
                raise ValueError(f"{corpus}: composed queries need at least 2 classes")

            def other(a: Any, allowed: Sequence[Any]) -> Any:
                choices = [b for b in allowed if b != a]
                return choices[int(rng.integers(len(choices)))]

            def composed(rs: Sequence[Any], to: Sequence[Any]) -> Items:
                keys = [item_key(r.key, Modality.IMAGE_TEXT, f"to-{b}") for r, b in zip(rs, to)]
                return _items([mod_text(b) for b in to], [r.image for r in rs], Modality.IMAGE_TEXT, keys)

            train_labels = [b for b in labels if train_by_label[b]]
            pool_labels = [b for b in labels if pool_by_label[b]]
            usable = [r for r in train if any(b != label(r) for b in train_labels)]
            to = [other(label(r), train_labels) for r in usable]
            targets = [int(rng.choice(train_by_label[b])) for b in to]
            tq = composed(usable, to)
            test_rec = [r for r in qrec if any(b != label(r) for b in pool_labels)]
            test_to = [other(label(r), pool_labels) for r in test_rec]
            test_q = composed(test_rec, test_to)
            relevance = [set(pool_by_label[b]) for b in test_to]
            rule = class_rule.format(target=" target class (the class named by the modification text "
                                     f"'{modification}', never the query image's own class)")
        else:
            if short == "image->image":
                usable = [r for r in train if len(train_by_label[label(r)]) > 1]
                targets = []
                index_of = {id(r): i for i, r in enumerate(train)}
                for r in usable:
                    mates = [j for j in train_by_label[label(r)] if j != index_of[id(r)]]
                    targets.append(int(rng.choice(mates)))
            else:
                usable = list(train)
                targets = list(range(len(train)))
            tq = _view(usable, qm)
            test_q = _view(qrec, qm)
            relevance = [set(pool_by_label[label(r)]) for r in qrec]
            rule = class_rule.format(target="")
        test_q, relevance, dropped = _drop_unanswerable(test_q, relevance)
        if dropped:
            info["queries_without_relevant_candidate"] = dropped
        task = RetrievalTask(
            name=f"{corpus}/{short}", query_modality=qm, candidate_modality=cm,
            train_queries=tq, train_targets=np.asarray(targets, dtype=np.int64), train_candidates=train_candidates,
            test_queries=test_q, candidates=candidates, relevance=relevance, relevance_rule=rule,
            corpus=corpus, info=info,
        )
        task.validate()
        out.append(task)
    return out


# ----------------------------------------------------------------------------- titled images


def titled_image_tasks(
    records: Iterable[Any],
    *,
    corpus: str = "openclipart",
    tasks: Sequence[str] | None = None,
    max_candidates: int = 1000,
    max_queries: int = 200,
    max_train: int | None = None,
    max_per_title: int | None = 20,
    seed: int = 0,
    title_key: str = "title",
) -> list[RetrievalTask]:
    """text->image and image->text over images with (noisy) titles, relevance "same title".

    Records are grouped by normalised meta[title_key]; whole groups go to the pool or to
    training, so no test query's title is a training query and no pool item a training
    target. At most `max_per_title` records per title are kept (None: all) so that one
    very common title cannot fill the pool. Test queries: one record per pool title
    (its text for text->image, its image for image->text); training pairs: text<->image of
    each training record. Query texts are the records' texts (the converter's caption,
    usually the title).
    """
    names = _check_names(tasks, TITLED_TASKS, corpus)
    # A record without a caption is described by its title.
    records = [r if (r.text and r.text.strip()) or not r.meta.get(title_key)
               else dataclasses.replace(r, text=str(r.meta[title_key]).strip()) for r in records]
    recs, skipped = _select(records, True, True, [title_key], corpus)
    rng = np.random.default_rng(seed)
    by_title: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(recs):
        by_title[normalise_title(r.meta[title_key])].append(i)
    titles = list(by_title)
    max_train = max_candidates if max_train is None else max_train
    pool_groups, train_groups = _group_split([by_title[t] for t in titles], max_candidates, max_train,
                                             max_per_title, rng)
    pool = [recs[i] for g in pool_groups for i in g]
    train = [recs[i] for g in train_groups for i in g]
    group_of = np.concatenate([[gi] * len(g) for gi, g in enumerate(pool_groups)]).astype(int) if pool else np.zeros(0, int)
    members = defaultdict(set)
    for row, gi in enumerate(group_of):
        members[int(gi)].add(row)
    # One query record per pool title, up to max_queries titles.
    start = np.cumsum([0] + [len(g) for g in pool_groups])
    chosen_groups = rng.permutation(len(pool_groups))[:max_queries]
    query_rows = [int(start[g] + rng.integers(len(pool_groups[g]))) for g in chosen_groups]
    qrec = [pool[i] for i in query_rows]
    sizes = [len(g) for g in pool_groups]
    info = {"records": len(recs), "titles": len(titles), "pool_records": len(pool), "pool_titles": len(pool_groups),
            "train_records": len(train), "train_titles": len(train_groups), "max_per_title": max_per_title,
            "largest_pool_title": int(max(sizes, default=0)), "seed": seed,
            **({"skipped_records": skipped} if skipped else {})}
    rule = (f"same title: a candidate is relevant when its record's normalised meta['{title_key}'] (case-folded, "
            f"whitespace collapsed) equals the query record's; the query's own record is always among them. "
            f"Titles are noisy (one title labels 1,375 images of the full Openclipart set): the split is by "
            f"title (no test title is a training query) and at most {max_per_title} records per title are kept.")
    out = []
    for short in names:
        qm_name, cm_name = short.split("->")
        qm, cm = Modality.parse(qm_name), Modality.parse(cm_name)
        relevance = [set(members[int(group_of[row])]) for row in query_rows]
        task = RetrievalTask(
            name=f"{corpus}/{short}", query_modality=qm, candidate_modality=cm,
            train_queries=_view(train, qm), train_targets=np.arange(len(train)), train_candidates=_view(train, cm),
            test_queries=_view(qrec, qm), candidates=_view(pool, cm), relevance=relevance, relevance_rule=rule,
            corpus=corpus, info=dict(info),
        )
        task.validate()
        out.append(task)
    return out


# ----------------------------------------------------------------------------- wordnet


def wordnet_tasks(
    records: Iterable[Any],
    *,
    corpus: str = "wordnet",
    tasks: Sequence[str] | None = None,
    max_candidates: int = 1000,
    max_queries: int = 200,
    max_train: int | None = None,
    seed: int = 0,
    definition_key: str = "definition",
) -> list[RetrievalTask]:
    """definition -> synset (text->text): the query is a synset's definition, the candidates
    are synsets' lemma texts ("dog, domestic dog, Canis familiaris").

    Relevance is instance-level: the query's own synset, plus any pool synset with the same
    lemma text (identical texts cannot be told apart). Synsets are grouped by lemma text
    and whole groups go to the pool or to training; test queries are definitions of pool
    synsets, training pairs definitions of training synsets -> their lemma texts.
    """
    _check_names(tasks, WORDNET_TASKS, corpus)
    recs, skipped = _select(records, False, True, [definition_key], corpus)
    rng = np.random.default_rng(seed)
    by_text: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(recs):
        by_text[normalise_title(r.text)].append(i)
    max_train = max_candidates if max_train is None else max_train
    pool_groups, train_groups = _group_split(list(by_text.values()), max_candidates, max_train, None, rng)
    pool = [recs[i] for g in pool_groups for i in g]
    train = [recs[i] for g in train_groups for i in g]
    text_rows = defaultdict(set)
    for row, r in enumerate(pool):
        text_rows[normalise_title(r.text)].add(row)
    query_rows = sorted(rng.permutation(len(pool))[:max_queries].tolist())
    qrec = [pool[i] for i in query_rows]
    test_defs = {normalise_title(r.meta[definition_key]) for r in qrec}
    # A training definition identical to a test one would be the same query: drop it.
    train_pairs = [r for r in train if normalise_title(r.meta[definition_key]) not in test_defs]

    def definitions(rs: Sequence[Any]) -> Items:
        return _items([str(r.meta[definition_key]) for r in rs], [None] * len(rs), Modality.TEXT,
                      [f"{r.key}/definition" for r in rs])

    relevance = [set(text_rows[normalise_title(r.text)]) for r in qrec]
    rule = (f"instance-level: the query (a synset's meta['{definition_key}']) is answered by its own synset "
            f"(candidate text: the synset's lemmas), and by any pool synset with an identical lemma text, which "
            f"cannot be told apart; synsets are split by lemma text, so no pool text is a training target.")
    info = {"records": len(recs), "pool_records": len(pool), "train_records": len(train_pairs),
            "dropped_train_same_definition": len(train) - len(train_pairs), "seed": seed,
            **({"skipped_records": skipped} if skipped else {})}
    task = RetrievalTask(
        name=f"{corpus}/definition->synset", query_modality=Modality.TEXT, candidate_modality=Modality.TEXT,
        train_queries=definitions(train_pairs), train_targets=np.arange(len(train_pairs)),
        train_candidates=_view(train_pairs, Modality.TEXT), test_queries=definitions(qrec),
        candidates=_view(pool, Modality.TEXT), relevance=relevance, relevance_rule=rule, corpus=corpus, info=info,
    )
    task.validate()
    return [task]


# ----------------------------------------------------------------------------- universal

# M-BEIR-style instructions naming the target modality (UniIR prepends such an instruction
# to every query): without one, a caption is the same query whether it asks for an image,
# a pair or a text, and the universal task would be ill-posed.
TEXT_INSTRUCTIONS = {
    Modality.IMAGE: "retrieve an image: ",
    Modality.TEXT: "retrieve a text: ",
    Modality.IMAGE_TEXT: "retrieve an image with its caption: ",
}
IMAGE_INSTRUCTIONS = {  # an image query becomes an (image, instruction) pair
    Modality.IMAGE: "retrieve a similar image",
    Modality.TEXT: "retrieve a caption for this image",
    Modality.IMAGE_TEXT: "retrieve a similar image with its caption",
}


def instruct(items: Items, target: Modality) -> Items:
    """Queries with an instruction naming the target modality: text queries get a prefix,
    image queries become (image, instruction) pairs, pair queries get a prefix on their text.
    Keys get ``@to-<target>``; embeddings are dropped (the inputs changed)."""
    target = Modality(target)
    texts, images, mods, keys = [], [], [], []
    for i in range(len(items)):
        m = Modality(int(items.modality[i]))
        text = items.texts[i] if items.texts is not None else None
        image = items.images[i] if items.images is not None else None
        if m == Modality.IMAGE:
            text, mods_i = IMAGE_INSTRUCTIONS[target], Modality.IMAGE_TEXT
        else:
            text, mods_i = TEXT_INSTRUCTIONS[target] + str(text), m
        texts.append(text)
        images.append(image if m != Modality.TEXT else None)
        mods.append(int(mods_i))
        keys.append(f"{items.keys[i]}@to-{_VIEW[target]}")
    return _items(texts, images, mods, keys)


@dataclass
class UniversalPool:
    """Several tasks over one pool: the union of their candidate pools (by key).

    `tasks` are views of the original tasks whose `candidates` are the whole union and
    whose relevance is remapped to union rows (still only the task's own relevant items);
    their training targets index `train_candidates`, the union of the training pools.
    With `instructions`, their (training and test) queries carry an instruction naming the
    target modality (`instruct`). `rows[name]` are the union rows of that task's own pool.
    """

    name: str
    candidates: Items
    train_candidates: Items
    tasks: list[RetrievalTask]
    rows: dict[str, np.ndarray]
    instructions: bool = False

    def summary(self) -> dict[str, Any]:
        counts = {Modality(m).name.lower(): int((self.candidates.modality == m).sum())
                  for m in np.unique(self.candidates.modality)}
        out = {"name": self.name, "candidates": len(self.candidates), "by_modality": counts,
               "train_candidates": len(self.train_candidates),
               "train_queries": sum(len(t.train_queries) for t in self.tasks),
               "tasks": [t.name for t in self.tasks], "instructions": self.instructions}
        if self.instructions:
            out["instruction_templates"] = {
                "text query prefix": {m.name.lower(): v for m, v in TEXT_INSTRUCTIONS.items()},
                "image query text": {m.name.lower(): v for m, v in IMAGE_INSTRUCTIONS.items()}}
        return out


def _union(parts: Sequence[Items]) -> tuple[Items, list[np.ndarray]]:
    position: dict[str, int] = {}
    picks: list[Items] = []
    maps = []
    for items in parts:
        rows = np.empty(len(items), dtype=np.int64)
        fresh = []
        for i, key in enumerate(items.keys):
            if key not in position:
                position[key] = len(position)
                fresh.append(i)
            rows[i] = position[key]
        if fresh:
            picks.append(items.subset(fresh))
        maps.append(rows)
    return concat_items(picks), maps


def universal_pool(tasks: Sequence[RetrievalTask], name: str = "universal", instructions: bool = True) -> UniversalPool:
    """Merge the tasks' pools (and training pools) by item key; see `UniversalPool`.

    instructions: give every query an instruction naming its task's target modality (as
    M-BEIR/UniIR do); the instructed queries need embedding (they carry none)."""
    if not tasks:
        raise ValueError("universal_pool needs at least one task")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names repeat: {names}")
    pool, pool_maps = _union([t.candidates for t in tasks])
    train, train_maps = _union([t.train_candidates for t in tasks])
    trained = {train.keys[int(r)] for tmap, t in zip(train_maps, tasks) for r in tmap[t.train_targets]}
    clash = set(pool.keys) & trained
    if clash:
        raise ValueError(f"{len(clash)} candidates of one task's pool are training targets of another, "
                         f"e.g. {sorted(clash)[:3]}: build the tasks from one split")
    views = []
    note = (" Universal pool: only the task's own relevant candidates count, among all tasks' pools (all "
            "modalities) in one index" + (", queries carry an instruction naming the target modality." if instructions
                                          else ", queries carry no instruction."))
    for task, pmap, tmap in zip(tasks, pool_maps, train_maps):
        train_q, test_q, qm = task.train_queries, task.test_queries, task.query_modality
        if instructions:
            train_q = instruct(train_q, task.candidate_modality)
            test_q = instruct(test_q, task.candidate_modality)
            qm = Modality.IMAGE_TEXT if qm == Modality.IMAGE else qm
        views.append(RetrievalTask(
            name=f"{name}/{task.name}", query_modality=qm, candidate_modality=task.candidate_modality,
            train_queries=train_q, train_targets=tmap[task.train_targets], train_candidates=train,
            test_queries=test_q, candidates=pool, relevance=[{int(pmap[i]) for i in rel} for rel in task.relevance],
            relevance_rule=task.relevance_rule + note, corpus=task.corpus,
            info={**task.info, "own_pool": len(task.candidates)},
        ))
    return UniversalPool(name=name, candidates=pool, train_candidates=train, tasks=views,
                         rows={t.name: m for t, m in zip(tasks, pool_maps)}, instructions=instructions)


# ----------------------------------------------------------------------------- dispatch

CORPUS_KINDS = {
    "fashion-mnist": (labelled_image_tasks, LABELLED_TASKS),
    "openclipart": (titled_image_tasks, TITLED_TASKS),
    "wordnet": (wordnet_tasks, WORDNET_TASKS),
}


def build_tasks(kind: str, records: Iterable[Any], **options: Any) -> list[RetrievalTask]:
    """Tasks of a corpus kind ('fashion-mnist', 'openclipart', 'wordnet'); options go to the builder."""
    if kind not in CORPUS_KINDS:
        raise ValueError(f"unknown corpus kind {kind!r}: choose from {sorted(CORPUS_KINDS)}")
    builder, _ = CORPUS_KINDS[kind]
    options.setdefault("corpus", kind)
    if kind == "fashion-mnist":
        options.setdefault("caption_note", "captions name the class (plus tone/texture words measured on the "
                                           "pixels), never the instance")
    return builder(records, **options)
