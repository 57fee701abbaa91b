"""Batched, trie-constrained beam search over the GENIUS decoder.

Every step scores only the current level's tokens (3 modality tokens, then K codes per
level), masks the codes that the trie does not allow after each beam's prefix, and keeps
the `beam_size` best prefixes per query. The decoder's KV cache is reordered in place;
cross-attention keys and values are computed once per query. Only valid IDs come out.

With codebook scores (`ModalResidualQuantizer.code_scores`), each step also adds
`codebook_weight` x the projected query's inner product with the code's vector. Summed over
an ID's semantic levels that is the query's inner product with the ID's reconstruction less
its modality centroid (what a residual quantizer ranks by, within a modality): the beam
scores an ID by the decoder and by the index's codes. Those scores do not compare across
modalities (each modality's items fill their own region of the projected space, and a query
lies nearer its own: a text query's nearest codes are texts even when its instruction asks
for an image), so with them the decoder alone decides which modalities are searched: the
first step keeps only those it gives at least `min_modality_prob` (and always its most
probable one), and the codes rank IDs within and across the modalities kept.

A prefix's partial score says little about its best complete ID: with `lookahead_rows`, each
level (but the last) keeps the prefixes best by score plus `best_completion`, the best
remaining code score among a few of the prefix's rows (all of them once the prefix holds that
few, which past the first levels is most), chosen among the `lookahead_pool` x width best by
score alone. Cost grows with the beam, not with the corpus.
"""
from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

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
    # (Q, 1+L) beams the decoder ran for, per query and step (the others' codes were forced)
    decoder_rows: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.int64))

    @property
    def decoder_steps(self) -> np.ndarray:
        """(Q,) steps that ran the decoder for each query."""
        return (self.decoder_rows > 0).sum(1)

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


def _drop_unlikely_modalities(candidates: torch.Tensor, min_prob: float) -> None:
    """Block, in place, the modality tokens of (Q, 1, 3) first-step scores that the decoder
    gives under `min_prob`, except each query's most probable allowed one."""
    if min_prob <= 0:
        return
    best = candidates.max(-1, keepdim=True).values
    floor = torch.minimum(best, torch.full_like(best, float(np.log(min_prob))))
    candidates.masked_fill_(candidates < floor, float("-inf"))


def best_completion(trie: Trie, state: TrieState, level: int, rest_scores: np.ndarray, query_of: np.ndarray,
                    max_rows: int) -> np.ndarray:
    """Per prefix of `state` (`level` semantic codes chosen), an estimate of its best complete
    ID's remaining score: the best, over up to `max_rows` of its rows (all of them when it has
    no more, else evenly spaced ones, which the sorted rows spread over its children), of the
    summed scores of the codes after `level`. rest_scores: (Q, L, K) weighted code scores;
    query_of: each prefix's query."""
    num_levels = trie.codec.num_levels
    if level >= num_levels or len(state.lo) == 0:
        return np.zeros(len(state.lo), dtype=np.float64)
    span = state.hi - state.lo
    count = np.minimum(span, max_rows)
    start = np.cumsum(count) - count
    owner = np.repeat(np.arange(len(count)), count)
    within = np.arange(int(count.sum())) - start[owner]
    rows = state.lo[owner] + within * span[owner] // count[owner]
    scores = np.empty(len(rows), dtype=np.float64)
    later = np.arange(level, num_levels)
    for p in np.unique(state.part):
        sel = np.flatnonzero(state.part[owner] == p)
        codes = trie.codec.unpack(np.asarray(np.take(trie.partitions[p].ids, rows[sel], axis=0)))[:, level:]
        scores[sel] = rest_scores[query_of[owner[sel]][:, None], later[None, :], codes].sum(1)
    return np.maximum.reduceat(scores, start)


@dataclass(frozen=True)
class Lookahead:
    """How one level's prefixes are pruned with `best_completion`: among the `pool` best by
    score, the best by score plus the best remaining code score over up to `max_rows` rows.
    child_states(query, flat_index) gives the trie positions of candidates."""

    pool: int
    child_states: Callable[[np.ndarray, np.ndarray], TrieState]
    level: int
    rest_scores: np.ndarray  # (Q, L, K) weighted code scores
    trie: Trie
    max_rows: int


def _select(candidates: torch.Tensor, keep: int,
            lookahead: Lookahead | None) -> tuple[torch.Tensor, torch.Tensor, TrieState | None]:
    """The (Q, keep) scores and flat indices of the prefixes kept from (Q, width, n) candidates:
    the best by score, or by score plus best_completion under `lookahead`, which also gives the
    kept live prefixes' trie positions (row-major; None without a lookahead)."""
    Q = candidates.shape[0]
    flat = candidates.view(Q, -1)
    if lookahead is None:
        top_scores, top_index = flat.topk(keep, dim=-1)
        return top_scores, top_index, None
    pre_scores, pre_index = flat.topk(min(lookahead.pool, flat.shape[1]), dim=-1)
    query_of, slot = np.nonzero(torch.isfinite(pre_scores).cpu().numpy())
    states = lookahead.child_states(query_of, pre_index.cpu().numpy()[query_of, slot])
    bonus = np.zeros(tuple(pre_scores.shape), dtype=np.float32)
    bonus[query_of, slot] = best_completion(lookahead.trie, states, lookahead.level, lookahead.rest_scores, query_of,
                                            lookahead.max_rows)
    order = (pre_scores + torch.from_numpy(bonus).to(pre_scores.device)).topk(keep, dim=-1).indices
    top_scores = pre_scores.gather(1, order)
    # Live kept prefixes are live pool entries (a dead one's score stays -inf): reuse their states.
    position = np.full(tuple(pre_scores.shape), -1, dtype=np.int64)
    position[query_of, slot] = np.arange(len(query_of))
    kept = np.take_along_axis(position, order.cpu().numpy(), axis=1).reshape(-1)
    live = torch.isfinite(top_scores).cpu().numpy().reshape(-1)
    return top_scores, pre_index.gather(1, order), states.take(kept[live])


class _DecodedBeams:
    """The beams the decoder runs for, as the rows of its KV cache: `queries` (A,), ascending,
    and per query its beam slots `slots` (A, W), padded with repeats of its first (a repeated
    row computes the same values again). `full`: every slot of every query, in order."""

    def __init__(self, num_queries: int):
        self.queries = np.arange(num_queries)
        self.slots = np.zeros((num_queries, 1), dtype=np.int64)
        self.full = True

    def advance(self, open_beam: np.ndarray, parent: np.ndarray,
                width: int) -> tuple[np.ndarray | None, np.ndarray]:
        """Move to the next step's beams: the slots of `open_beam` (Q, keep), whose parents
        `parent` (Q, keep) are slots of this step (of `width`). Returns, for
        DecoderCache.reorder, the positions of the kept queries among this step's (None when
        all are kept) and, per kept query and slot, its parent's row in the cache."""
        Q, keep = open_beam.shape
        row_of = np.full((Q, width), -1, dtype=np.int64)
        row_of[self.queries[:, None], self.slots] = np.arange(self.slots.shape[1])
        counts = open_beam.sum(1)
        queries = np.flatnonzero(counts)
        W = int(counts.max()) if len(queries) else 0
        # Each kept query's open slots first, in slot order; padded with its first.
        first = np.argsort(~open_beam[queries], axis=1, kind="stable")[:, :W]
        slots = np.where(np.arange(W) < counts[queries, None], first, first[:, :1])
        parent_rows = row_of[queries[:, None], parent[queries[:, None], slots]]
        if (parent_rows < 0).any():
            raise RuntimeError("a beam left the decoder and came back: its parent has no cache row")
        kept = None if len(queries) == len(self.queries) else np.searchsorted(self.queries, queries)
        self.queries, self.slots = queries, slots
        self.full = bool((counts == keep).all())
        return kept, parent_rows


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
    min_modality_prob: float = 0.02,
    lookahead_rows: int = 0,
    lookahead_pool: int = 4,
    skip_forced: bool = True,
) -> BeamResult:
    """Decode the `beam_size` most probable valid IDs for each query embedding (Q, D).

    target_modalities: restrict the first step to these modalities (one collection for all
    queries, or one per query). normalize: "allowed" renormalises each step over the codes
    the trie allows; "level" over all tokens of the level (then masks). codebook_scores:
    ((Q, 3), (Q, L, K)) inner products of the projected queries with the modality centroids
    and code vectors; the code vectors' are added to the log-probabilities times
    `codebook_weight`, and the beam keeps only the modalities that the decoder gives at
    least `min_modality_prob` (and its most probable one). trace: a list
    that receives each step's (Q, width, step + 1) prefixes (-1 where a slot is empty), for
    diagnosing where a target's prefix leaves the beam. level_widths: beam widths of the
    first semantic levels (then `beam_size`): a wider beam where the early codes' scores
    cannot yet tell the target's prefix from its neighbours'. lookahead_rows: with the codes
    scoring the beam, keep at each level (but the last) the best prefixes by their score plus
    an estimate of their best completion (`best_completion` over up to this many of their
    rows), chosen among the `lookahead_pool` x width best by score alone; 0: by score alone.
    skip_forced: under "allowed" normalisation, stop running the decoder for a beam once it
    has a single complete ID below it (its remaining steps are forced: the allowed code's
    log-probability is 0, whatever the decoder says); the trie finishes its ID. The same
    results (scores to float rounding: the decoder's batch shrinks; False runs the decoder at
    every step, for checking), fewer forward passes: at 100k+ items most prefixes of 3-4
    codes are unique already.
    """
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if lookahead_rows < 0 or lookahead_pool < 1:
        raise ValueError(f"lookahead_rows must be >= 0 and lookahead_pool >= 1, got {lookahead_rows}, "
                         f"{lookahead_pool}")
    if not 0 <= min_modality_prob <= 1:
        raise ValueError(f"min_modality_prob must be in [0, 1], got {min_modality_prob}")
    if any(w < 1 for w in level_widths):
        raise ValueError(f"level_widths must be >= 1, got {list(level_widths)}")
    if trie.codec.num_levels != decoder.num_levels or trie.codec.codebook_size != decoder.codebook_size:
        raise ValueError("trie and decoder disagree on levels or codebook size")
    decoder.eval()
    device = decoder.lm_head.weight.device
    Q, L, K = len(query_emb), decoder.num_levels, decoder.codebook_size
    step_bonus = _codebook_bonus(codebook_scores, codebook_weight, Q, L, K, device)
    # The weighted code scores of every level, for estimating a prefix's best completion.
    rest_scores = None
    if step_bonus is not None and lookahead_rows > 0:
        rest_scores = torch.stack(step_bonus[1:], dim=1).cpu().numpy()
    cache = decoder.start_cache(query_emb.to(device))

    tokens = torch.zeros((Q, 1), dtype=torch.long, device=device)
    beam_scores = torch.zeros((Q, 1), device=device)
    history = np.zeros((Q, 1, 0), dtype=np.int64)
    alive = np.ones(Q, dtype=bool)  # flat (Q * width) flags of live beams
    state: TrieState | None = None  # trie positions of the live beams, in flat order
    start_mask = modality_mask(Q, trie, target_modalities)
    decoded = _DecodedBeams(Q)
    decoder_rows = np.zeros((Q, L + 1), dtype=np.int64)

    for step in range(L + 1):
        width = history.shape[1]
        if decoded.full:
            hidden = decoder.step(tokens, cache)  # (Q, width, d)
            # A new tensor (overwritten below); fp32 whatever precision the decoder computes in.
            logits = (hidden @ decoder.level_weight(step).T).float()  # (Q, width, n)
        else:
            # Beams left out (step >= 1) are forced or dead: any finite logits give a forced
            # beam's one allowed code log-probability 0.
            logits = torch.zeros((Q, width, K), device=device)
            if len(decoded.queries):
                hidden = decoder.step(tokens, cache)  # (queries, decoded beams, d)
                logits[torch.from_numpy(decoded.queries[:, None]).to(device),
                       torch.from_numpy(decoded.slots).to(device)] = (hidden @ decoder.level_weight(step).T).float()
        decoder_rows[decoded.queries, step] = decoded.slots.shape[1]
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
        if step == 0 and step_bonus is not None:
            _drop_unlikely_modalities(candidates, min_modality_prob)
        keep = min(step_width(step, L, beam_size, level_widths), width * n)
        if step >= 2:
            position_in_live = np.full(Q * width, -1, dtype=np.int64)
            position_in_live[live] = np.arange(len(live))

        def child_states(query: np.ndarray, flat_index: np.ndarray) -> TrieState:
            """Trie positions of the children `flat_index` (parent * n + code) of queries `query`."""
            parent_flat, child_code = query * width + flat_index // n, flat_index % n
            if step == 1:
                return trie.root_children(history.reshape(Q * width, -1)[parent_flat, 0], child_code)
            return expansion.children(position_in_live[parent_flat], child_code)

        lookahead = None
        if rest_scores is not None and 1 <= step < L:
            lookahead = Lookahead(lookahead_pool * keep, child_states, step, rest_scores, trie, lookahead_rows)
        top_scores, top_index, kept_states = _select(candidates, keep, lookahead)
        new_alive = torch.isfinite(top_scores).cpu().numpy().reshape(-1)
        parent = (top_index // n).cpu().numpy()
        code = (top_index % n).cpu().numpy()

        # Trie positions of the new live beams.
        if kept_states is not None:
            state = kept_states
        elif step >= 1:
            chosen = np.flatnonzero(new_alive)
            state = child_states(chosen // keep, top_index.cpu().numpy().reshape(-1)[chosen])

        history = np.concatenate(
            [history[np.arange(Q)[:, None], parent], np.where(new_alive.reshape(Q, keep), code, -1)[..., None]], axis=2
        )
        alive = new_alive
        beam_scores = top_scores
        if trace is not None:
            trace.append(np.where(new_alive.reshape(Q, keep)[..., None], history, -1))
        if step == L or not len(decoded.queries):
            continue
        if skip_forced and normalize == "allowed":
            # The decoder runs on for the live beams with more than one ID below them.
            open_beam = new_alive.reshape(Q, keep).copy()
            if step >= 1:
                open_beam.reshape(-1)[np.flatnonzero(new_alive)[trie.single_completion(state)]] = False
        else:
            open_beam = np.ones((Q, keep), dtype=bool)
        kept_queries, parent_rows = decoded.advance(open_beam, parent, width)
        if not len(decoded.queries):
            continue
        cache.reorder(torch.from_numpy(parent_rows).to(device),
                      None if kept_queries is None else torch.from_numpy(kept_queries).to(device))
        offset = level_token_offset(step, K)
        tokens = torch.from_numpy(np.where(new_alive.reshape(Q, keep), code + offset, 0)[decoded.queries[:, None],
                                                                                         decoded.slots]).to(device)

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
    return BeamResult(codes=codes, scores=scores, items=items, decoder_rows=decoder_rows)
