"""Stage 1 of GENIUS: align the encoders (LiT-style) and, optionally, train the fusion.

Every training example is a *query* and its positive *target*, each an image, a text or
an image-text pair (`PairExample`):

* plain (image, caption) pairs align the trainable image tower to the text tower, which
  stays locked (LiT, Zhai et al. 2022): query = image, target = caption;
* composed queries ((image, text) -> image, e.g. CIRR/FashionIQ) and text -> (image,
  text) examples (e.g. WebQA) train the `Fusion` module too, so that fused pair
  embeddings land next to their targets (`train_fusion=True`).

The loss is open_clip's `ClipLoss` (symmetric InfoNCE over the batch) with CLIP's
learnable logit scale. Each side of an example is embedded by its kind: image tower,
text tower, or `Fusion(image, text)`; a batch may mix kinds.

With a locked text tower, texts are embedded without gradients and cached (bounded LRU,
saved with the checkpoints), so repeated captions cost almost nothing after their first
use; within a batch each distinct text is embedded once.

Training is resumable: `checkpoint_dir` receives the trainable weights, optimizer,
scheduler, position in the data, text cache and torch RNG state every `checkpoint_every_steps`
steps, at each epoch end and at the end, each write atomic. Calling `train_encoder`
again with the same folder continues from there and ends in the same state as an
uninterrupted run, given the same data in the same order.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from open_clip.loss import ClipLoss
from torch import nn
from tqdm.auto import tqdm

from genius.atomic import write_atomic
from genius.encoders import ImageInput, MultimodalEncoder, validate_text
from genius.errors import InvalidInputError

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "last.pt"
_CHECKPOINT_VERSION = 1
# Changing these between a run and its resume would make "the position in the data" meaningless.
_RESUME_MUST_MATCH = ("batch_size", "seed", "shuffle")


@dataclass
class EncoderTrainConfig:
    """Hyper-parameters of stage-1 training. JSON-serialisable (stored in checkpoints)."""

    epochs: int = 10
    batch_size: int = 256
    # From-scratch CNN tower: on Fashion-MNIST (batch 256, ~450 steps) 5e-3 and 2e-3 both gave
    # ~90 % zero-shot. Use ~1e-5 when fine-tuning a real CLIP (unlock_text).
    lr: float = 5e-3
    weight_decay: float = 0.1  # not applied to gains, biases and the logit scale (as CLIP)
    warmup_steps: int = 50  # linear warm-up, then cosine decay to 0 over the run
    # Temperature: None keeps the model's logit scale (CLIP's init log(1/0.07) for a fresh
    # model, the learnt one of a pretrained CLIP); a float sets it to log(1/temperature)
    # at the start of a fresh run.
    init_temperature: float | None = None
    learn_temperature: bool = True
    max_logit_scale: float = 100.0  # CLIP's clamp of exp(logit_scale)
    train_image: bool = True  # the image tower
    train_fusion: bool = False  # the Fusion MLPs (needs examples with an image-text side)
    # Fine-tuning a given CLIP checkpoint trains both towers. The text tower then stays
    # unlocked after training (requires_grad), so that `encoder.save` writes its weights.
    unlock_text: bool = False
    grad_clip: float | None = None  # max global grad norm; None: no clipping (as CLIP)
    shuffle: bool = True  # reshuffle random-access data every epoch (seeded)
    seed: int = 0
    max_steps: int | None = None  # stop after this many steps in all (the schedule ends there)
    checkpoint_every_steps: int = 500
    text_cache_size: int = 50_000  # locked text tower only; 0 disables the cache
    prefetch_batches: int = 2  # batches decoded ahead in a background thread; 0: inline

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "checkpoint_every_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ValueError(f"max_steps must be positive, got {self.max_steps}")
        if self.lr <= 0 or self.warmup_steps < 0 or self.weight_decay < 0:
            raise ValueError("lr must be positive, warmup_steps and weight_decay non-negative")
        if self.init_temperature is not None and self.init_temperature <= 0:
            raise ValueError(f"init_temperature must be positive, got {self.init_temperature}")
        if not (self.train_image or self.train_fusion or self.unlock_text or self.learn_temperature):
            raise ValueError("nothing to train: enable train_image, train_fusion, unlock_text or learn_temperature")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- examples


@dataclass
class PairExample:
    """One training example: a query and its positive target, each side an image, a text
    or both (an image-text pair, embedded through the fusion module).

    Images are PIL images or encoded bytes (decoded by the encoder's preprocessing).
    `key` names the example in log lines (e.g. the WebDataset key).
    """

    query_image: ImageInput | None = None
    query_text: str | None = None
    target_image: ImageInput | None = None
    target_text: str | None = None
    key: str | None = None

    @classmethod
    def caption(cls, image: ImageInput, text: str, key: str | None = None) -> "PairExample":
        """An (image, caption) pair for image-tower alignment: image -> text."""
        return cls(query_image=image, target_text=text, key=key)

    @staticmethod
    def kind(image: object, text: object) -> str | None:
        if image is not None and text is not None:
            return "image_text"
        if image is not None:
            return "image"
        if text is not None:
            return "text"
        return None

    @property
    def query_kind(self) -> str | None:
        return self.kind(self.query_image, self.query_text)

    @property
    def target_kind(self) -> str | None:
        return self.kind(self.target_image, self.target_text)


def as_example(obj: Any) -> PairExample:
    """A `PairExample`, an (image, text) tuple, or a dict with PairExample's field names
    (or 'image'/'text' for a caption pair) → PairExample."""
    if isinstance(obj, PairExample):
        return obj
    if isinstance(obj, tuple) and len(obj) == 2:
        return PairExample.caption(obj[0], obj[1])
    if isinstance(obj, dict):
        if "image" in obj or "text" in obj:
            return PairExample.caption(obj.get("image"), obj.get("text"), obj.get("key"))
        known = {f.name for f in dataclasses.fields(PairExample)}
        return PairExample(**{k: v for k, v in obj.items() if k in known})
    raise TypeError(f"cannot use a {type(obj).__name__} as a training example")


def task_examples(task: Any) -> list[PairExample]:
    """A retrieval task's training pairs (`genius.tasks.RetrievalTask`) as stage-1 examples:
    each side keeps the image and/or text its items carry. Pairs with an image-text side
    train the fusion module (composed queries, text -> (image, text) targets)."""

    def side(items: Any, i: int) -> tuple[Any, Any]:
        image = items.images[i] if items.images is not None else None
        text = items.texts[i] if items.texts is not None else None
        return image, text

    out = []
    for q, t in enumerate(task.train_targets):
        qi, qt = side(task.train_queries, q)
        ti, tt = side(task.train_candidates, int(t))
        key = task.train_queries.keys[q] if task.train_queries.keys is not None else None
        out.append(PairExample(query_image=qi, query_text=qt, target_image=ti, target_text=tt, key=key))
    return out


@dataclass
class PairBatch:
    """A decoded batch. Each side of example b is given by an index into `pixels`
    (`*_image[b]`, -1: none) and one into `texts` (`*_text[b]`, -1: none).
    Texts are deduplicated within the batch; images are not (BatchNorm statistics)."""

    pixels: torch.Tensor  # (M, 3, S, S), M may be 0
    texts: list[str]
    query_image: torch.Tensor  # (B,) long
    query_text: torch.Tensor
    target_image: torch.Tensor
    target_text: torch.Tensor
    keys: list[str]
    num_raw: int  # examples consumed from the data, skipped ones included
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def num_images(self) -> int:
        return int(self.pixels.shape[0])


def collate_examples(encoder: MultimodalEncoder, examples: Sequence[Any], *, first_index: int = 0) -> PairBatch:
    """Decode and preprocess a list of examples with the encoder's preprocessing.

    An example with a bad image (undecodable, too large, ...) or a bad text (empty, not
    a str, ...) is skipped: it is counted in `skipped` and logged with its key (or its
    position, `first_index` + i). Nothing here raises for bad data.
    """
    pixels: list[torch.Tensor] = []
    texts: dict[str, int] = {}
    sides: list[tuple[int, int, int, int]] = []
    keys: list[str] = []
    skipped: list[tuple[str, str]] = []
    for i, raw in enumerate(examples):
        name = f"#{first_index + i}"
        try:
            ex = as_example(raw)
            if ex.key is not None:
                name = str(ex.key)
            if ex.query_kind is None or ex.target_kind is None:
                raise InvalidInputError(first_index + i, "an example needs an image and/or a text on both sides")
            ex_pixels: list[torch.Tensor] = []
            ex_texts: list[str] = []
            index: list[int] = []
            for image, text in ((ex.query_image, ex.query_text), (ex.target_image, ex.target_text)):
                if image is not None:
                    ex_pixels.append(encoder.preprocess_images([image], offset=first_index + i)[0])
                    index.append(len(pixels) + len(ex_pixels) - 1)
                else:
                    index.append(-1)
                if text is not None:
                    ex_texts.append(validate_text(text, first_index + i))
                    index.append(-2 - (len(ex_texts) - 1))  # resolved below, once the example is good
                else:
                    index.append(-1)
        except Exception as exc:  # bad data of any kind: count, log, go on
            reason = exc.reason if isinstance(exc, InvalidInputError) else f"{type(exc).__name__}: {exc}"
            log.warning("skipping training example %s: %s", name, reason)
            skipped.append((name, reason))
            continue
        pixels.extend(ex_pixels)
        text_ids = [texts.setdefault(t, len(texts)) for t in ex_texts]
        resolved = [text_ids[-2 - v] if v <= -2 else v for v in index]
        sides.append(tuple(resolved))  # type: ignore[arg-type]
        keys.append(name)
    side = torch.tensor(sides, dtype=torch.long).reshape(-1, 4)
    if pixels:
        pixel_tensor = torch.stack(pixels)
    else:
        size = _image_size(encoder)
        pixel_tensor = torch.empty(0, 3, size, size)
    return PairBatch(
        pixels=pixel_tensor,
        texts=list(texts),
        query_image=side[:, 0],
        query_text=side[:, 1],
        target_image=side[:, 2],
        target_text=side[:, 3],
        keys=keys,
        num_raw=len(examples),
        skipped=skipped,
    )


def _image_size(encoder: MultimodalEncoder) -> int:
    size = getattr(encoder.image_tower, "image_size", None) or encoder.cfg.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


# ----------------------------------------------------------------------------- embedding


class _TextEmbedder:
    """Embeds a batch's unique texts. With a locked tower: no gradients and an LRU cache
    (text -> vector). A vector's last bits depend on the batch it was computed in (GEMM
    kernels differ with the batch size), so the cache is part of the checkpoint: a
    resumed run then reuses exactly the vectors an uninterrupted run would."""

    def __init__(self, encoder: MultimodalEncoder, locked: bool, cache_size: int) -> None:
        self.encoder = encoder
        self.locked = locked
        self.cache_size = cache_size if locked else 0
        self.cache: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()

    def __call__(self, texts: list[str]) -> torch.Tensor:
        if not texts:
            return torch.empty(0, self.encoder.embed_dim, device=self.encoder.device)
        if not self.locked:
            return self.encoder.embed_text(texts)
        out: list[torch.Tensor | None] = [None] * len(texts)
        missing = []
        for i, t in enumerate(texts):
            hit = self.cache.get(t)
            if hit is not None:
                self.cache.move_to_end(t)
                out[i] = hit
            else:
                missing.append(i)
        if missing:
            with torch.no_grad():
                fresh = self.encoder.embed_text([texts[i] for i in missing])
            for i, vec in zip(missing, fresh):
                out[i] = vec
                if self.cache_size:
                    self.cache[texts[i]] = vec
            while len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        return torch.stack(out)  # type: ignore[arg-type]

    def state_dict(self) -> dict[str, Any]:
        vectors = torch.stack(list(self.cache.values())).cpu() if self.cache else torch.empty(0)
        return {"texts": list(self.cache), "vectors": vectors}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cache.clear()
        if self.cache_size:
            device = self.encoder.device
            for text, vec in zip(state["texts"], state["vectors"]):
                self.cache[text] = vec.to(device)


def _compose(
    encoder: MultimodalEncoder, image_emb: torch.Tensor, text_emb: torch.Tensor,
    image_idx: torch.Tensor, text_idx: torch.Tensor,
) -> torch.Tensor:
    """(B, D) side embeddings: image rows, text rows, or Fusion(image, text) rows."""
    device = image_emb.device if image_emb.numel() else text_emb.device
    image_idx, text_idx = image_idx.to(device), text_idx.to(device)
    has_i, has_t = image_idx >= 0, text_idx >= 0
    only_i, only_t, both = has_i & ~has_t, has_t & ~has_i, has_i & has_t
    parts, order = [], []
    if only_i.any():
        parts.append(image_emb[image_idx[only_i]])
        order.append(only_i.nonzero().squeeze(1))
    if only_t.any():
        parts.append(text_emb[text_idx[only_t]])
        order.append(only_t.nonzero().squeeze(1))
    if both.any():
        parts.append(encoder.fusion(image_emb[image_idx[both]], text_emb[text_idx[both]]))
        order.append(both.nonzero().squeeze(1))
    rows = torch.cat(parts)
    return rows[torch.argsort(torch.cat(order))]


# ----------------------------------------------------------------------------- data order


def _is_random_access(pairs: Any) -> bool:
    return hasattr(pairs, "__len__") and hasattr(pairs, "__getitem__") and not isinstance(pairs, (str, bytes, dict))


def _batches_per_epoch(n: int, batch_size: int) -> int:
    """Full batches only (a last partial batch is dropped, as in CLIP training), except
    that data smaller than one batch still gives one batch."""
    return max(1, n // batch_size) if n > 0 else 0


def _epoch_batches(
    pairs: Any, config: EncoderTrainConfig, epoch: int, start_batch: int
) -> Iterator[tuple[int, list[Any]]]:
    """Yield (first example's index in this epoch, raw examples) from batch `start_batch` on."""
    bs = config.batch_size
    if _is_random_access(pairs):
        n = len(pairs)
        if config.shuffle:
            gen = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
            order = torch.randperm(n, generator=gen).tolist()
        else:
            order = list(range(n))
        for b in range(start_batch, _batches_per_epoch(n, bs)):
            yield b * bs, [pairs[i] for i in order[b * bs : (b + 1) * bs]]
        return
    if hasattr(pairs, "set_epoch"):
        pairs.set_epoch(epoch)
    iterator = iter(pairs)
    if iterator is pairs and epoch > 0:
        raise ValueError("training for more than one epoch needs re-iterable data (not a one-shot iterator)")
    position = 0
    for _ in range(start_batch * bs):  # resume: skip what earlier steps consumed
        if next(iterator, _END) is _END:
            return
        position += 1
    batch: list[Any] = []
    yielded = False
    for example in iterator:
        batch.append(example)
        if len(batch) == bs:
            yield position, batch
            position += bs
            batch, yielded = [], True
    if batch and not yielded and start_batch == 0:
        yield position, batch


_END = object()


class _Prefetcher:
    """Runs `produce()` (an iterator of batches) in a daemon thread, `depth` batches ahead.
    Order is kept; an exception in the producer is re-raised in the consumer."""

    def __init__(self, items: Iterator[Any], depth: int) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(items,), daemon=True, name="genius-prefetch")
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, items: Iterator[Any]) -> None:
        try:
            for item in items:
                if not self._put(("item", item)):
                    return
            self._put(("end", None))
        except BaseException as exc:  # handed to the consumer
            self._put(("error", exc))

    def __iter__(self) -> Iterator[Any]:
        while True:
            kind, value = self._queue.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


# ----------------------------------------------------------------------------- checkpoints


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ----------------------------------------------------------------------------- training


def _param_groups(named: list[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict[str, Any]]:
    """CLIP's split: no weight decay on gains, biases, norms and the logit scale."""
    decay, no_decay = [], []
    for name, p in named:
        if p.ndim < 2 or "bn" in name or "ln" in name or "norm" in name or "bias" in name or "logit_scale" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _lr_lambda(warmup: int, total: int | None) -> Callable[[int], float]:
    def f(step: int) -> float:
        w = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
        if total is None:
            return w
        return w * 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / max(1, total))))

    return f


def train_encoder(
    encoder: MultimodalEncoder,
    pairs: Any,
    config: EncoderTrainConfig | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> list[dict]:
    """Stage-1 training of `encoder` in place; returns one dict per epoch.

    `pairs`: `PairExample`s, (image, text) tuples or dicts (see `as_example`), either
    random access (len + indexing: shuffled every epoch) or an iterable that yields the
    same order on every pass (e.g. shards; an optional `set_epoch(epoch)` is called
    before each pass, like a DistributedSampler's).

    History entries: epoch, steps, loss (mean ClipLoss), images, images_per_s, skipped
    (bad examples), lr and logit_scale at the epoch's end. With `checkpoint_dir`, a
    checkpoint there is resumed from, and new ones are written as described above.
    """
    config = config or EncoderTrainConfig()
    device = encoder.device
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
    if ckpt_path is not None:
        ckpt_path.parent.mkdir(parents=True, exist_ok=True)

    # --- what trains ----------------------------------------------------------------
    text_ids = {id(p) for p in encoder.text_parameters()}
    image_ids = {id(p) for p in encoder.image_tower.parameters()}
    fusion_ids = {id(p) for p in encoder.fusion.parameters()}
    scale = encoder.clip.logit_scale

    def wanted(p: nn.Parameter) -> bool:
        if id(p) in text_ids:
            return config.unlock_text
        if id(p) in image_ids:
            return config.train_image
        if id(p) in fusion_ids:
            return config.train_fusion
        if p is scale:
            return config.learn_temperature
        return False  # e.g. SigLIP's logit_bias: left as it is

    all_named = list(encoder.named_parameters())
    saved_flags = {id(p): p.requires_grad for _, p in all_named}
    for _, p in all_named:
        p.requires_grad_(wanted(p))
    trainable = [(n, p) for n, p in all_named if p.requires_grad]
    if not trainable:
        raise ValueError("the configuration leaves no parameter of this encoder to train")
    text_locked = not config.unlock_text
    # Locked text weights never change and are not checkpointed (they come with the model).
    text_names = {n for n, p in all_named if id(p) in text_ids}

    optimizer = torch.optim.AdamW(_param_groups(trainable, config.weight_decay), lr=config.lr)
    n_data = len(pairs) if hasattr(pairs, "__len__") else None
    per_epoch = _batches_per_epoch(n_data, config.batch_size) if n_data is not None else None
    total = per_epoch * config.epochs if per_epoch is not None else None
    if config.max_steps is not None:
        total = min(total, config.max_steps) if total is not None else config.max_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config.warmup_steps, total))
    loss_fn = ClipLoss()
    texts = _TextEmbedder(encoder, text_locked, config.text_cache_size)

    state: dict[str, Any] = {"step": 0, "epoch": 0, "batch": 0, "history": [], "acc": _new_acc()}
    rng_state: dict[str, Any] | None = None
    if ckpt_path is not None and ckpt_path.exists():
        rng_state = _load_checkpoint(ckpt_path, encoder, optimizer, scheduler, texts, config, text_names, state)
        log.info("resuming stage-1 training from %s at step %d (epoch %d, batch %d)",
                 ckpt_path, state["step"], state["epoch"], state["batch"])
    elif config.init_temperature is not None:
        with torch.no_grad():
            scale.fill_(math.log(1.0 / config.init_temperature))

    def save_checkpoint() -> None:
        if ckpt_path is None:
            return
        model_state = {k: v.detach().cpu() for k, v in encoder.state_dict().items()
                       if not (text_locked and k in text_names)}
        checkpoint = {
            "version": _CHECKPOINT_VERSION,
            "config": config.to_dict(),
            "model": model_state,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": state["step"], "epoch": state["epoch"], "batch": state["batch"],
            "history": state["history"], "acc": state["acc"],
            "rng": _rng_state(device),
            "text_cache": texts.state_dict(),
        }
        write_atomic(ckpt_path, lambda f: torch.save(checkpoint, f))
        log.debug("checkpoint at step %d written to %s", state["step"], ckpt_path)

    def done() -> bool:
        return state["epoch"] >= config.epochs or (config.max_steps is not None and state["step"] >= config.max_steps)

    was_training = encoder.training
    bar = tqdm(total=total, initial=state["step"], desc="encoder", unit="step", disable=not progress)
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):  # the caller's RNG stream is left alone
            if rng_state is not None:
                _set_rng_state(rng_state, device)
            else:
                torch.manual_seed(config.seed)
            encoder.train()
            if not config.train_image:
                encoder.image_tower.train(False)  # a frozen tower keeps its BatchNorm statistics
            while not done():
                epoch = state["epoch"]
                batches = (
                    (start, collate_examples(encoder, raw, first_index=start))
                    for start, raw in _epoch_batches(pairs, config, epoch, state["batch"])
                )
                prefetch = _Prefetcher(batches, config.prefetch_batches) if config.prefetch_batches > 0 else None
                acc = state["acc"]
                tick = time.perf_counter()
                try:
                    for _, batch in (prefetch if prefetch is not None else batches):
                        loss = _train_step(encoder, batch, texts, loss_fn, optimizer, config, trainable, scale)
                        scheduler.step()
                        state["step"] += 1
                        state["batch"] += 1
                        now = time.perf_counter()
                        acc["skipped"] += len(batch.skipped)
                        acc["seconds"] += now - tick
                        tick = now
                        if loss is not None:
                            acc["loss_sum"] += loss
                            acc["steps"] += 1
                            acc["images"] += batch.num_images
                        bar.update(1)
                        bar.set_postfix(epoch=epoch, loss=f"{loss if loss is not None else float('nan'):.3f}",
                                        img_s=f"{acc['images'] / max(acc['seconds'], 1e-9):.0f}")
                        if config.max_steps is not None and state["step"] >= config.max_steps:
                            break  # the run's end: the epoch-end code below writes the checkpoint
                        if state["step"] % config.checkpoint_every_steps == 0:
                            save_checkpoint()
                            tick = time.perf_counter()  # checkpoint time is not training time
                finally:
                    if prefetch is not None:
                        prefetch.close()
                if config.max_steps is not None and state["step"] >= config.max_steps and (
                    per_epoch is None or state["batch"] < per_epoch
                ):
                    state["history"].append(_epoch_record(epoch, acc, scheduler, scale))
                    log.info("encoder epoch %d (stopped at max_steps): %s", epoch, state["history"][-1])
                    state["epoch"] = config.epochs  # max_steps ended the run mid-epoch: finished
                    save_checkpoint()
                    break
                state["history"].append(_epoch_record(epoch, acc, scheduler, scale))
                log.info("encoder epoch %d: %s", epoch, state["history"][-1])
                state["epoch"] += 1
                state["batch"] = 0
                state["acc"] = _new_acc()
                save_checkpoint()
    finally:
        bar.close()
        encoder.train(was_training)
        for _, p in all_named:
            keep_unlocked = config.unlock_text and id(p) in text_ids
            p.requires_grad_(True if keep_unlocked else saved_flags[id(p)])
    return list(state["history"])


def _new_acc() -> dict[str, float]:
    return {"loss_sum": 0.0, "steps": 0, "images": 0, "seconds": 0.0, "skipped": 0}


def _epoch_record(epoch: int, acc: dict[str, float], scheduler: Any, scale: torch.Tensor) -> dict[str, Any]:
    return {
        "epoch": epoch,
        "steps": int(acc["steps"]),
        "loss": acc["loss_sum"] / acc["steps"] if acc["steps"] else float("nan"),
        "images": int(acc["images"]),
        "images_per_s": acc["images"] / acc["seconds"] if acc["seconds"] > 0 else 0.0,
        "skipped": int(acc["skipped"]),
        "lr": float(scheduler.get_last_lr()[0]),
        "logit_scale": float(scale.detach().exp()),
    }


def _train_step(
    encoder: MultimodalEncoder, batch: PairBatch, texts: _TextEmbedder, loss_fn: ClipLoss,
    optimizer: torch.optim.Optimizer, config: EncoderTrainConfig,
    trainable: list[tuple[str, nn.Parameter]], scale: nn.Parameter,
) -> float | None:
    if len(batch) < 2:
        log.warning("skipping a batch with %d usable example(s): contrastive loss needs 2", len(batch))
        return None
    device = encoder.device
    image_emb = encoder.embed_image(batch.pixels.to(device)) if batch.num_images else torch.empty(0, device=device)
    text_emb = texts(batch.texts)
    query = _compose(encoder, image_emb, text_emb, batch.query_image, batch.query_text)
    target = _compose(encoder, image_emb, text_emb, batch.target_image, batch.target_text)
    logit_scale = scale.exp() if config.learn_temperature else scale.detach().exp()
    loss = loss_fn(query, target, logit_scale)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if config.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_([p for _, p in trainable], config.grad_clip)
    optimizer.step()
    with torch.no_grad():
        scale.clamp_(0, math.log(config.max_logit_scale))
    return float(loss.detach())


def _load_checkpoint(
    path: Path, encoder: MultimodalEncoder, optimizer: torch.optim.Optimizer, scheduler: Any,
    texts: _TextEmbedder, config: EncoderTrainConfig, text_names: set[str], state: dict[str, Any],
) -> dict[str, Any]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("version") != _CHECKPOINT_VERSION:
        raise ValueError(f"{path}: unsupported checkpoint version {ckpt.get('version')!r}")
    saved = ckpt["config"]
    now = config.to_dict()
    for name in _RESUME_MUST_MATCH:
        if saved.get(name) != now[name]:
            raise ValueError(f"{path}: checkpoint was written with {name}={saved.get(name)!r}, now {now[name]!r}; "
                             "use a new checkpoint folder")
    changed = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
    if changed:
        log.warning("resuming with a changed config (the run will differ from an uninterrupted one): %s", changed)
    result = encoder.load_state_dict(ckpt["model"], strict=False)
    missing = [k for k in result.missing_keys if k not in text_names]
    if missing or result.unexpected_keys:
        raise ValueError(f"{path}: checkpoint does not fit this encoder: missing {missing[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}")
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    texts.load_state_dict(ckpt["text_cache"])
    for k in ("step", "epoch", "batch", "history", "acc"):
        state[k] = ckpt[k]
    return ckpt["rng"]


# ----------------------------------------------------------------------------- evaluation


def zero_shot_accuracy(
    encoder: MultimodalEncoder,
    images: Sequence[ImageInput],
    labels: Sequence[int] | torch.Tensor,
    class_prompts: Sequence[str] | Sequence[Sequence[str]],
) -> float:
    """Top-1 zero-shot classification accuracy: each image gets the class whose prompt
    embedding is nearest. `class_prompts[c]` is one prompt or a list of prompts (their
    mean embedding is used, CLIP's prompt ensembling)."""
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if len(images) == 0:
        raise ValueError("no images to classify")
    prompt_lists = [[p] if isinstance(p, str) else list(p) for p in class_prompts]
    flat = [p for ps in prompt_lists for p in ps]
    emb = encoder.encode_text(flat)
    classes, start = [], 0
    for ps in prompt_lists:
        classes.append(torch.nn.functional.normalize(emb[start : start + len(ps)].mean(0), dim=-1))
        start += len(ps)
    class_emb = torch.stack(classes)
    image_emb = encoder.encode_image(images)
    pred = (image_emb @ class_emb.T).argmax(1)
    truth = torch.from_numpy(np.array(labels, dtype=np.int64))  # a copy: inputs may be read-only
    return float((pred == truth).float().mean())
