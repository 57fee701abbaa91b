"""Stage 3: train the ID decoder on query -> target-ID pairs (and item -> own ID)."""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from genius.augment import mix_towards_target
from genius.decoder import GeniusDecoder

log = logging.getLogger(__name__)


class _Rows:
    """Training rows from several sources (the pairs, then the items) gathered a batch at a
    time: (input, partner, codes) of row numbers, as float32/long tensors."""

    def __init__(self, inputs, partners, codes):
        self.sources: list[tuple] = []
        self.starts = [0]
        self.add(inputs, partners, codes)

    def add(self, inputs, partners, codes) -> None:
        if not (len(inputs) == len(partners) == len(codes)):
            raise ValueError(f"training rows differ in length: {len(inputs)}, {len(partners)}, {len(codes)}")
        self.sources.append((inputs, partners, codes))
        self.starts.append(self.starts[-1] + len(inputs))

    def __len__(self) -> int:
        return self.starts[-1]

    def take(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = idx.numpy() if isinstance(idx, torch.Tensor) else np.asarray(idx)
        parts: list[list[torch.Tensor]] = [[], [], []]
        order = []
        for s, (inputs, partners, codes) in enumerate(self.sources):
            lo, hi = self.starts[s], self.starts[s + 1]
            where = np.flatnonzero((idx >= lo) & (idx < hi))
            if len(where) == 0:
                continue
            local = idx[where] - lo
            for j, source in enumerate((inputs, partners, codes)):
                parts[j].append(_rows_of(source, local))
            order.append(where)
        back = torch.from_numpy(np.argsort(np.concatenate(order), kind="stable"))
        x, partner, codes_b = (torch.cat(p)[back] for p in parts)
        return x.float(), partner.float(), codes_b.long()


def _rows_of(source, local: np.ndarray) -> torch.Tensor:
    if isinstance(source, torch.Tensor):
        return source[torch.from_numpy(local)]
    return torch.from_numpy(np.ascontiguousarray(source[local]))


@dataclass
class DecoderTrainConfig:
    epochs: int = 31  # the paper's schedule
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    grad_clip: float = 1.0
    query_augmentation: bool = True
    augmentation_prob: float = 0.5  # share of training queries replaced by a mixed one
    index_task: bool = True  # DSI "indexing": every item's own embedding -> its ID
    seed: int = 0


def train_decoder(
    decoder: GeniusDecoder,
    query_emb: torch.Tensor,
    target_emb: torch.Tensor,
    target_codes: torch.Tensor,
    config: DecoderTrainConfig,
    item_emb: torch.Tensor | np.ndarray | None = None,
    item_codes: torch.Tensor | np.ndarray | None = None,
    progress: bool = True,
    *,
    rank: int = 0,
    world_size: int = 1,
    model: torch.nn.Module | None = None,
    checkpoint: Callable[[dict], None] | None = None,
    resume: dict | None = None,
) -> list[dict]:
    """Cross-entropy over each level's tokens, AdamW, cosine schedule with warm-up.

    query_emb/target_emb: (M, D) pairs; target_codes: (M, 1+L) the targets' codes.
    item_emb/item_codes: the indexed items, used when config.index_task is set; numpy arrays
    (e.g. memory-mapped files) are read a batch at a time, so the items need not fit in memory.
    Data parallel (DDP): pass `model` (the decoder wrapped by DistributedDataParallel), this
    process's `rank` and the `world_size`; every process draws the same permutation each epoch
    and trains on its stride of it, batch_size / world_size rows per step, the same number of
    steps everywhere (DDP averages the gradients).
    Resumable: `checkpoint(state)` is called after every epoch with everything the next epoch
    needs (weights, optimizer, schedule, random generator, history); `resume=state` continues
    from it, giving the same weights as a run that was never interrupted.
    Returns one dict per epoch (mean loss, accuracy of the full ID under teacher forcing).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")
    forward = model if model is not None else decoder
    rows = _Rows(query_emb, target_emb, target_codes)
    if config.index_task and item_emb is not None and item_codes is not None:
        rows.add(item_emb, item_emb, item_codes)
    n = len(rows)
    if n == 0:
        raise ValueError("no training pairs for the decoder")
    device = decoder.lm_head.weight.device
    gen = torch.Generator().manual_seed(config.seed)
    per_rank = n // world_size
    if per_rank == 0:
        raise ValueError(f"{n} training rows cannot be shared by {world_size} processes")
    batch_size = max(1, math.ceil(config.batch_size / world_size))
    steps_per_epoch = math.ceil(per_rank / batch_size)
    total = steps_per_epoch * config.epochs
    warmup = max(1, int(config.warmup_ratio * total))
    optimizer = torch.optim.AdamW(forward.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total)))
    )
    history: list[dict] = []
    first_epoch = 0
    if resume is not None:
        decoder.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        schedule.load_state_dict(resume["schedule"])
        gen.set_state(resume["generator"])
        torch.set_rng_state(resume["torch_rng"])  # dropout draws from the global generator
        history, first_epoch = list(resume["history"]), int(resume["epoch"])
        log.info("decoder training resumed at epoch %d of %d", first_epoch, config.epochs)
    forward.train()
    bar = tqdm(total=total, initial=first_epoch * steps_per_epoch, desc="decoder",
               disable=not progress or rank > 0, unit="step")
    for epoch in range(first_epoch, config.epochs):
        order = torch.randperm(n, generator=gen)[rank::world_size][:per_rank]
        loss_sum, correct, seen = 0.0, 0, 0
        for start in range(0, per_rank, batch_size):
            idx = order[start : start + batch_size]
            x, partner, codes_b = rows.take(idx)
            if config.query_augmentation:
                x = mix_towards_target(x, partner, config.augmentation_prob, gen)
            x, codes_b = x.to(device), codes_b.to(device)
            logits = forward(x, codes_b)
            loss = sum(F.cross_entropy(lg, codes_b[:, l]) for l, lg in enumerate(logits)) / len(logits)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(forward.parameters(), config.grad_clip)
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                pred = torch.stack([lg.argmax(-1) for lg in logits], 1)
                correct += int((pred == codes_b).all(1).sum())
            loss_sum += loss.item() * len(idx)
            seen += len(idx)
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
        record = {"epoch": epoch, "loss": loss_sum / seen, "id_accuracy": correct / seen}
        history.append(record)
        log.debug("decoder epoch %d: %s", epoch, record)
        if checkpoint is not None:
            checkpoint({"epoch": epoch + 1, "model": decoder.state_dict(), "optimizer": optimizer.state_dict(),
                        "schedule": schedule.state_dict(), "generator": gen.get_state(),
                        "torch_rng": torch.get_rng_state(), "history": history})
    bar.close()
    forward.eval()
    return history
