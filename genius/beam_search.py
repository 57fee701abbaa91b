"""Batched, trie-constrained beam search over the GENIUS decoder.

Every step scores only the current level's tokens (3 modality tokens, then K codes per
level), masks the codes that the trie does not allow after each beam's prefix, and keeps
the `beam_size` best prefixes per query. The decoder's KV cache is reordered in place;
cross-attention keys and values are computed once per query. Only valid IDs come out.

With codebook scores (`ModalResidualQuantizer.code_scores`), each step also adds
`codebook_weight` x the projected query's inner product with the code's vector. Summed over
an ID's semantic levels that is the query's inner product with the ID's reconstruction less
its modality centroid (what a residual quantizer ranks by, within a modality): the beam
scores an ID by the decoder and by the index's codes; the modality stays the decoder's.
"""
from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from genius.decoder import GeniusDecoder, level_token_offset
from genius.modality import NUM_MODALITIES, Modality
from genius.trie import Trie, TrieState

NORMALIZATIONS = ("allowed", "level")


@dataclass
class BeamResult:
    """Beams of Q queries, best first. Empty slots have score -inf and codes -1."""

    codes: np.ndarray  # (Q, W, 1+L): modality, then semantic codes
    scores: np.ndarray  # (Q, W) summed log-probabilities (plus the weighted codebook scores)
    items: list[list[np.ndarray]]  # items[q][w]: item numbers carrying that ID

    def ranked_items(self, query: int) -> list[tuple[int, float]]:
        """Items of one query in beam order (ties within an ID by item number), without repeats."""
        seen: set[int] = set()
        ranked = []
        for w, beam_items in enumerate(self.items[query]):
            for item in beam_items.tolist():
                if item not in seen:
                    seen.add(item)
                    ranked.append((item, float(self.scores[query, w])))
        return ranked


def per_query_modalities(
    target_modalities: Collection | Sequence[Collection] | None, num_queries: int
) -> list[Collection] | None:
    """None, or one collection of modalities per query (one collection given means all)."""
    if target_modalities is None:
        return None
    items = list(target_modalities)
    if len(items) == num_queries and all(isinstance(t, (list, tuple, set, frozenset)) for t in items):
        return items
    return [items] * num_queries


def modality_mask(
    num_queries: int, trie: Trie, target_modalities: Collection | Sequence[Collection] | None
) -> np.ndarray:
    """(Q, 3) allowed first codes: the trie's modalities, narrowed per query if asked."""
    present = np.zeros(NUM_MODALITIES, dtype=bool)
    present[[int(m) for m in trie.modalities]] = True
    mask = np.tile(present, (num_queries, 1))
    rows = per_query_modalities(target_modalities, num_queries)
    if rows is None:
        return mask
    wanted = np.zeros_like(mask)
    for q, row in enumerate(rows):
        for m in row:
            wanted[q, int(Modality.parse(m))] = True
    return mask & wanted


def _log_probs(logits: torch.Tensor, mask: torch.Tensor, normalize: str) -> torch.Tensor:
    """Log-probabilities of the allowed tokens, -inf elsewhere. Overwrites `logits` (no copies
    of the (Q, W, n) tensors: they are the biggest of a step)."""
    blocked = ~mask
    if normalize == "level":
        return torch.log_softmax(logits, -1).masked_fill_(blocked, float("-inf"))
    # "allowed": a distribution over the trie's allowed codes (constrained decoding proper).
    # Blocked tokens come out of the log-softmax as -inf; a row with nothing allowed comes out
    # NaN and is set to -inf.
    log_probs = torch.log_softmax(logits.masked_fill_(blocked, float("-inf")), -1)
    dead = ~mask.any(-1, keepdim=True)
    return log_probs.masked_fill_(dead, float("-inf")) if bool(dead.any()) else log_probs


def _codebook_bonus(codebook_scores: tuple[torch.Tensor, torch.Tensor] | None, weight: float, Q: int, L: int,
                    K: int, device: torch.device) -> list[torch.Tensor] | None:
    """Per step, the (Q, n) weighted codebook scores added to the candidates (None: none)."""
    if codebook_scores is None or weight == 0:
        return None
    modality, levels = codebook_scores
    if modality.shape != (Q, NUM_MODALITIES) or levels.shape != (Q, L, K):
        raise ValueError(f"codebook scores must be ({Q}, {NUM_MODALITIES}) and ({Q}, {L}, {K}), got "
                         f"{tuple(modality.shape)} and {tuple(levels.shape)}")
    # The modality step gets no bonus: a query's projection lies nearer its own modality's
    # centroid, which would pull the beam away from the modality asked for (a text query for
    # an image); within one modality the centroid term is the same for every ID.
    levels = (weight * levels.float()).to(device)
    return [torch.zeros(Q, NUM_MODALITIES, device=device)] + [levels[:, level] for level in range(L)]


def step_width(step: int, num_levels: int, beam_size: int, level_widths: Sequence[int]) -> int:
    """Prefixes kept after a step (0: the modality; l: semantic level l). The modality step
    keeps as many as level 1 (at most 3 exist); the last level always keeps `beam_size`:
    results have that many slots."""
    if level_widths and step < min(len(level_widths) + 1, num_levels):
        return level_widths[max(step, 1) - 1]
    return beam_size


@torch.no_grad()
def beam_search(
    decoder: GeniusDecoder,
    trie: Trie,
    query_emb: torch.Tensor,
    beam_size: int = 50,
    target_modalities: Collection | Sequence[Collection] | None = None,
    normalize: str = "allowed",
    codebook_scores: tuple[torch.Tensor, torch.Tensor] | None = None,
    codebook_weight: float = 0.0,
    trace: list[np.ndarray] | None = None,
    level_widths: Sequence[int] = (),
) -> BeamResult:
    """Decode the `beam_size` most probable valid IDs for each query embedding (Q, D).

    target_modalities: restrict the first step to these modalities (one collection for all
    queries, or one per query). normalize: "allowed" renormalises each step over the codes
    the trie allows; "level" over all tokens of the level (then masks). codebook_scores:
    ((Q, 3), (Q, L, K)) inner products of the projected queries with the modality centroids
    and code vectors; the code vectors' are added to the log-probabilities times
    `codebook_weight` (the modality step is left to the decoder). trace: a list
    that receives each step's (Q, width, step + 1) prefixes (-1 where a slot is empty), for
    diagnosing where a target's prefix leaves the beam. level_widths: beam widths of the
    first semantic levels (then `beam_size`): a wider beam where the early codes' scores
    cannot yet tell the target's prefix from its neighbours'.
    """
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if any(w < 1 for w in level_widths):
        raise ValueError(f"level_widths must be >= 1, got {list(level_widths)}")
    if trie.codec.num_levels != decoder.num_levels or trie.codec.codebook_size != decoder.codebook_size:
        raise ValueError("trie and decoder disagree on levels or codebook size")
    decoder.eval()
    device = decoder.lm_head.weight.device
    Q, L, K = len(query_emb), decoder.num_levels, decoder.codebook_size
    step_bonus = _codebook_bonus(codebook_scores, codebook_weight, Q, L, K, device)
    cache = decoder.start_cache(query_emb.to(device))

    tokens = torch.zeros((Q, 1), dtype=torch.long, device=device)
    beam_scores = torch.zeros((Q, 1), device=device)
    history = np.zeros((Q, 1, 0), dtype=np.int64)
    alive = np.ones(Q, dtype=bool)  # flat (Q * width) flags of live beams
    state: TrieState | None = None  # trie positions of the live beams, in flat order
    start_mask = modality_mask(Q, trie, target_modalities)

    for step in range(L + 1):
        hidden = decoder.step(tokens, cache)  # (Q, width, d)
        width = hidden.shape[1]
        # A new tensor (overwritten below); fp32 whatever precision the decoder computes in.
        logits = (hidden @ decoder.level_weight(step).T).float()  # (Q, width, n)
        n = logits.shape[-1]
        mask = np.zeros((Q * width, n), dtype=bool)
        live = np.flatnonzero(alive)
        if step == 0:
            mask[:] = start_mask
        elif step == 1:
            mask[live] = trie.root_mask(history.reshape(Q * width, -1)[live, 0])
        else:
            expansion = trie.expand(step - 1, state)
            mask[live] = expansion.mask
        mask_t = torch.from_numpy(mask).to(device).view(Q, width, n)
        candidates = _log_probs(logits, mask_t, normalize).add_(beam_scores[..., None])
        if step_bonus is not None:
            candidates.add_(step_bonus[step][:, None, :])
        keep = min(step_width(step, L, beam_size, level_widths), width * n)
        top_scores, top_index = candidates.view(Q, -1).topk(keep, dim=-1)
        parent = (top_index // n).cpu().numpy()
        code = (top_index % n).cpu().numpy()
        new_alive = torch.isfinite(top_scores).cpu().numpy().reshape(-1)

        # Trie positions of the new live beams.
        q_index = np.repeat(np.arange(Q), keep)
        parent_flat = q_index * width + parent.reshape(-1)
        chosen = np.flatnonzero(new_alive)
        if step == 1:
            modality = history.reshape(Q * width, -1)[parent_flat[chosen], 0]
            state = trie.root_children(modality, code.reshape(-1)[chosen])
        elif step >= 2:
            position_in_live = np.full(Q * width, -1, dtype=np.int64)
            position_in_live[live] = np.arange(len(live))
            state = expansion.children(position_in_live[parent_flat[chosen]], code.reshape(-1)[chosen])

        history = np.concatenate(
            [history[np.arange(Q)[:, None], parent], np.where(new_alive.reshape(Q, keep), code, -1)[..., None]], axis=2
        )
        alive = new_alive
        beam_scores = top_scores
        if trace is not None:
            trace.append(np.where(new_alive.reshape(Q, keep)[..., None], history, -1))
        if step < L:
            cache.reorder(torch.from_numpy(parent).to(device))
            offset = level_token_offset(step, K)
            tokens = torch.from_numpy(np.where(new_alive.reshape(Q, keep), code + offset, 0)).to(device)

    # Pad to beam_size slots so that results have a fixed shape.
    width = history.shape[1]
    history[~alive.reshape(Q, width)] = -1  # slots that found no valid ID
    codes = np.full((Q, beam_size, L + 1), -1, dtype=np.int64)
    codes[:, :width] = history
    scores = np.full((Q, beam_size), -np.inf, dtype=np.float64)
    scores[:, :width] = beam_scores.cpu().numpy()
    leaf_items = trie.leaf_items(state) if state is not None else []
    items: list[list[np.ndarray]] = [[] for _ in range(Q)]
    for flat, beam_items in zip(np.flatnonzero(alive), leaf_items):
        items[flat // width].append(beam_items)
    return BeamResult(codes=codes, scores=scores, items=items)
