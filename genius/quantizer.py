"""Stage 2 of GENIUS: modal-decoupled residual quantization.

Every item gets an ID ``(m, c_1, ..., c_L)``: ``m`` is its modality (assigned from the data,
never learned) and ``c_1..c_L`` are residual-quantization codes, coarse to fine.

The encoders' embeddings are fixed, so a small trainable projection (a residual MLP that
starts as the identity, output L2-normalised) sits in front of the codebooks: it is what the
contrastive loss trains. The modality code also removes a per-modality centroid (a running
mean of that modality's projected vectors) before the residual levels, as the reference code
does with its 3-entry first codebook: the CLIP "modality gap" then does not eat the capacity
of the first semantic level, and an image and a text about the same thing can share codes.

The residual levels are lucidrains' ``vector_quantize_pytorch.ResidualVQ`` (EMA codebooks,
dead-code restart). Its own k-means init runs on whatever first batch it sees, so we
initialise every level ourselves on a large sample (``init_codebooks``), level by level on the
residuals, and mark the codebooks as initialised.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from dataclasses import dataclass, replace
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm
from vector_quantize_pytorch import ResidualVQ

from genius.augment import beta22
from genius.modality import NUM_MODALITIES

logger = logging.getLogger(__name__)

__all__ = [
    "QuantizerConfig",
    "QuantizerOutput",
    "ModalResidualQuantizer",
    "kmeans",
    "train_quantizer",
    "common_prefix_length",
]

# --------------------------------------------------------------------------- config


# The ID's width in bits (DESIGN.md "The 12-byte ID"), which for_corpus fills from
# FULL_ID_CORPUS items.
ID_BITS = 96
FULL_ID_CORPUS = 4096


@dataclass
class QuantizerConfig:
    num_levels: int = 8
    codebook_size: int = 4096
    temperature: float = 0.01  # InfoNCE tau, as in the reference code
    cl_weight: float = 1.0
    rq_weight: float = 100.0
    mse_weight: float = 100.0
    ema_decay: float = 0.99
    kmeans_iters: int = 25  # per stage of the progressive k-means
    # Stages of faiss's progressive-dimension k-means (principal axes, dimensions added
    # geometrically); 0: plain Lloyd. On WordNet (10k items, 4 x 128) the codes' own recall@10
    # (every item ranked by query . reconstruction) rises from 0.17 to 0.22
    # (bench/results/codebooks-10k.md).
    kmeans_progressive_steps: int = 10
    # After training, re-run the k-means init on the trained projection. The EMA codebooks
    # trail a projection that the contrastive loss moves, and the refit ranks better by the
    # codes alone (WordNet 10k, 4 x 128: recall@10 0.22 -> 0.25), but the refitted codes ignore
    # the query-target alignment that L_mse trained into the EMA codes: the decoder learns them
    # worse (generated corpus: GENIUS recall@10 0.85 -> 0.79). Off until it wins end to end.
    refit_codebooks: bool = False
    # k-means init sample: at most this many items per code (faiss uses 256; 64 is enough for
    # the init to use every code and keeps the CPU cost bounded).
    kmeans_points_per_code: int = 64
    # Absolute EMA cluster size (expected hits per training batch) below which a code is
    # restarted from a vector of the current batch. A healthy code holds about
    # items_per_batch / codebook_size, so 1e-3 with the defaults (512 / 4096 = 0.125 per code)
    # means "used about 100x less than average". ``for_corpus`` scales it with the batch.
    dead_code_threshold: float = 1e-3
    epochs: int = 20
    batch_size: int = 256  # query->target pairs per step (plus as many extra items if given)
    lr: float = 1e-3
    weight_decay: float = 1e-4
    # Early stopping on held-out pairs: holdout_share of the pairs (at most holdout_max; none
    # when fewer than holdout_min would be held out) stay out of training, and after every
    # epoch their targets are ranked among the items by the codes (query . reconstruction,
    # the beam's codebook score). The quantizer of the best epoch is kept, epoch 0 (the
    # identity projection and its k-means codes) included: on small pair sets the contrastive
    # loss overfits the projection below the encoder's own space (Openclipart, 4,841 pairs:
    # the projection's recall@10 0.093 against the encoder's 0.103).
    holdout_share: float = 0.1
    holdout_min: int = 50
    holdout_max: int = 1000
    patience: int = 10  # epochs without a better held-out recall before training stops (0: never)
    query_augmentation: bool = True  # z'_q = mu z_q + (1-mu) z_c, mu ~ Beta(2, 2) per sample
    use_contrastive: bool = True  # ablation: False drops L_cl ("w/o contrastive loss")
    use_modality_code: bool = True  # ablation: False makes code 0 always 0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.holdout_share < 1.0:
            raise ValueError(f"holdout_share must be in [0, 1) (0: no early stopping), got {self.holdout_share}")

    @classmethod
    def for_corpus(cls, num_items: int, **overrides: object) -> "QuantizerConfig":
        """Codebooks and levels sized to the corpus.

        K ~ the power of two nearest sqrt(N), capped at 4096: the codebooks are shared by all
        parents, so a level of K codes needs many items per code for k-means and EMA to fit it
        and for the decoder to see every code often in training; with K = sqrt(N) two levels
        already have room for N distinct cells (K^2 = N), and each first-level code holds about
        sqrt(N) items. From FULL_ID_CORPUS items, K is at least 256 and the levels fill the
        12-byte ID (96 bits: 12 x 256 up to ~130k items, the paper's 8 x 4096 from ~16M): the
        beam scored by the codes is as good as the codes' reconstruction, and finer codes
        measured better (full-pool WordNet, codes at weight 100: GENIUS recall@10 0.190 at
        5 x 256, 0.214 at 12 x 256, 0.276 with today's beam; Openclipart text -> image, codes at
        weight 300: 0.050 at 5 x 64, 0.081 at 12 x 256). Below it (tests, toy
        corpora): enough levels for K^L to exceed N with two levels of margin, at most 8.
        """
        n = max(int(num_items), 2)
        overrides = dict(overrides)
        k = 2 ** int(round(math.log2(math.sqrt(n))))
        if n >= FULL_ID_CORPUS:
            k = max(k, 256)
        # An explicit K, L or batch also sets what derives from it (levels, threshold, epochs).
        k = int(overrides.pop("codebook_size", min(max(k, 4), 4096)))
        if n >= FULL_ID_CORPUS:
            default_levels = max(2, ID_BITS // int(math.log2(k)))
        else:
            default_levels = min(8, max(2, math.ceil(math.log(n) / math.log(k)) + 2))
        levels = int(overrides.pop("num_levels", default_levels))
        batch = int(overrides.pop("batch_size", min(256, max(32, 2 ** int(math.log2(max(n // 8, 1)))))))
        # Restart a code when it is used ~50x less than an average code (see the field).
        threshold = 0.02 * batch / k
        steps_per_epoch = max(1, math.ceil(n / batch))
        epochs = int(min(100, max(10, math.ceil(2000 / steps_per_epoch))))
        cfg = cls(
            num_levels=levels,
            codebook_size=k,
            batch_size=batch,
            dead_code_threshold=threshold,
            epochs=epochs,
        )
        return replace(cfg, **overrides) if overrides else cfg

    def with_ablation(self, name: str) -> "QuantizerConfig":
        """The paper's ablations by name: no_contrastive, no_modality_code,
        no_query_augmentation, no_mse (or 'full' for the unchanged config)."""
        table = {
            "full": {},
            "no_contrastive": {"use_contrastive": False},
            "no_modality_code": {"use_modality_code": False},
            "no_query_augmentation": {"query_augmentation": False},
            "no_mse": {"mse_weight": 0.0},
        }
        if name not in table:
            raise ValueError(f"unknown ablation {name!r}: expected one of {sorted(table)}")
        return replace(self, **table[name])


@dataclass
class QuantizerOutput:
    z: Tensor  # (N, D) projected, L2-normalised input
    quantized: Tensor  # (N, D) centroid + semantic codes, straight-through to z
    semantic: Tensor  # (N, D) sum of the L semantic code vectors, straight-through
    codes: Tensor  # (N, 1+L) long; column 0 = modality code
    rq_loss: Tensor  # scalar: commitment loss, mean over levels (0 in eval mode)
    commit_losses: Tensor  # (L,) per level


# --------------------------------------------------------------------------- k-means


def _nearest(x: Tensor, centroids: Tensor, chunk_rows: int) -> tuple[Tensor, Tensor]:
    """Index of and squared distance to the nearest centroid, in row chunks so that the
    (rows x K) distance block stays small."""
    c_sq = (centroids * centroids).sum(1)
    idx_out, dist_out = [], []
    for start in range(0, x.shape[0], chunk_rows):
        xs = x[start : start + chunk_rows]
        d = c_sq[None, :] - 2.0 * (xs @ centroids.T)
        v, i = d.min(dim=1)
        idx_out.append(i)
        dist_out.append((v + (xs * xs).sum(1)).clamp_min(0.0))
    return torch.cat(idx_out), torch.cat(dist_out)


def _reseed_empty(
    x: Tensor, centroids: Tensor, assign: Tensor, dist: Tensor, counts: Tensor
) -> bool:
    """Move each empty centroid onto a distinct point far from its own centroid, taken from a
    cluster with more than one member. Returns whether anything moved."""
    empty = (counts == 0).nonzero(as_tuple=True)[0]
    if empty.numel() == 0:
        return False
    score = dist.clone()
    score[counts[assign] <= 1] = -1.0
    take = min(empty.numel(), int((score >= 0).sum()))
    if take == 0:
        return False
    far = score.topk(take).indices
    centroids[empty[:take]] = x[far]
    return True


def kmeans(
    x: Tensor,
    num_clusters: int,
    num_iters: int = 25,
    *,
    generator: torch.Generator | None = None,
    chunk_rows: int | None = None,
    progressive_steps: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Lloyd's k-means in torch (any device) with empty-cluster repair.

    ``progressive_steps`` > 1: faiss's progressive-dimension clustering. The points are
    rotated onto their principal axes and clustered on the first d dimensions, d growing
    geometrically to D over that many stages (num_iters each), each stage starting from the
    previous one's clusters: the coarse structure is found where distances are not yet
    flattened by hundreds of low-variance dimensions. It is what brings faiss's residual
    quantizer ahead of a plain one on sentence embeddings.

    Returns (centroids (K, D), assignment (N,), counts (K,)) where the assignment is to the
    final centroids. With N >= K distinct points no cluster is left empty: an empty one is
    moved onto a far point, which is then at distance 0 from it.
    """
    x = x.float()
    n, dim = x.shape
    k = int(num_clusters)
    if chunk_rows is None:
        chunk_rows = max(256, (1 << 24) // max(k, 1))  # ~64 MiB distance block
    gen_device = generator.device if generator is not None else torch.device("cpu")
    if n >= k:
        first = torch.randperm(n, generator=generator, device=gen_device)[:k]
    else:
        logger.warning("k-means: %d points for %d clusters; some codes will repeat", n, k)
        first = torch.randint(n, (k,), generator=generator, device=gen_device)
    centroids = x[first.to(x.device)].clone()
    if progressive_steps > 1 and n > k:
        centroids = _progressive_dim(x, centroids, num_iters, progressive_steps, chunk_rows)
    else:
        centroids = _lloyd(x, centroids, num_iters, chunk_rows)
    assign, dist = _nearest(x, centroids, chunk_rows)
    counts = torch.bincount(assign, minlength=k)
    # Final repair: Lloyd can leave a cluster empty after its last move.
    for _ in range(8):
        if not _reseed_empty(x, centroids, assign, dist, counts):
            break
        assign, dist = _nearest(x, centroids, chunk_rows)
        counts = torch.bincount(assign, minlength=k)
    return centroids, assign, counts


def _lloyd(x: Tensor, centroids: Tensor, num_iters: int, chunk_rows: int) -> Tensor:
    """Lloyd iterations from ``centroids`` (updated in place) until the assignment settles."""
    k, dim = centroids.shape
    assign = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
    for _ in range(num_iters):
        new_assign, dist = _nearest(x, centroids, chunk_rows)
        counts = torch.bincount(new_assign, minlength=k)
        sums = torch.zeros(k, dim, dtype=x.dtype, device=x.device).index_add_(0, new_assign, x)
        full = counts > 0
        centroids[full] = sums[full] / counts[full, None].to(x.dtype)
        moved = _reseed_empty(x, centroids, new_assign, dist, counts)
        if not moved and torch.equal(new_assign, assign):
            break
        assign = new_assign
    return centroids


def _progressive_dim(x: Tensor, first: Tensor, num_iters: int, steps: int, chunk_rows: int) -> Tensor:
    """k-means on the principal axes, adding dimensions stage by stage (see ``kmeans``)."""
    dim = x.shape[1]
    centered = x - x.mean(0)
    _, axes = torch.linalg.eigh(centered.T @ centered)
    rotation = axes.flip(1)  # largest variance first
    y = x @ rotation
    dims = sorted({max(1, min(dim, round(dim ** ((s + 1) / steps)))) for s in range(steps)} | {dim})
    centroids = (first @ rotation)[:, : dims[0]].contiguous()
    for stage, d in enumerate(dims):
        if stage:  # start from the previous stage's clusters, now seen in d dimensions
            assign, _ = _nearest(y[:, : dims[stage - 1]], centroids, chunk_rows)
            counts = torch.bincount(assign, minlength=first.shape[0])
            grown = torch.zeros(first.shape[0], d, dtype=y.dtype, device=y.device).index_add_(0, assign, y[:, :d])
            grown = grown / counts.clamp_min(1)[:, None].to(y.dtype)
            grown[counts == 0, : dims[stage - 1]] = centroids[counts == 0]
            centroids = grown
        centroids = _lloyd(y[:, :d].contiguous(), centroids, num_iters, chunk_rows)
    return centroids @ rotation.T


# --------------------------------------------------------------------------- model


class ResidualProjection(nn.Module):
    """z = normalize(x + MLP(x)); the last layer starts at zero so z = x / |x| at init."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x + self.fc2(F.gelu(self.fc1(x))), dim=-1)


def _exact_straight_through(value: Tensor, source: Tensor) -> Tensor:
    """Forward value exactly ``value`` (bit for bit: source - source is exactly 0), gradient
    the identity to ``source``."""
    return value.detach() + (source - source.detach())


class ModalResidualQuantizer(nn.Module):
    """Projection -> modality centroid -> residual VQ over L levels of K codes."""

    def __init__(
        self,
        *,
        dim: int,
        num_levels: int = 8,
        codebook_size: int = 4096,
        ema_decay: float = 0.99,
        kmeans_iters: int = 25,
        kmeans_progressive_steps: int = 10,
        dead_code_threshold: float = 1e-3,
        dead_code_reset_size: float | None = None,
        use_modality_code: bool = True,
        hidden_dim: int | None = None,
        commitment_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if num_levels < 1 or codebook_size < 2:
            raise ValueError("need num_levels >= 1 and codebook_size >= 2")
        self.dim = int(dim)
        self.num_levels = int(num_levels)
        self.codebook_size = int(codebook_size)
        self.ema_decay = float(ema_decay)
        self.kmeans_iters = int(kmeans_iters)
        self.kmeans_progressive_steps = int(kmeans_progressive_steps)
        self.dead_code_threshold = float(dead_code_threshold)
        self.use_modality_code = bool(use_modality_code)
        self.projection = ResidualProjection(self.dim, int(hidden_dim or self.dim))
        self.rvq = ResidualVQ(
            dim=self.dim,
            num_quantizers=self.num_levels,
            codebook_size=self.codebook_size,
            kmeans_init=True,  # codebooks start "not initialised"; init_codebooks fills them
            kmeans_iters=self.kmeans_iters,
            decay=self.ema_decay,
            threshold_ema_dead_code=self.dead_code_threshold,
            commitment_weight=commitment_weight,
            rotation_trick=False,  # plain straight-through; we build our own exact STE anyway
        )
        # The library resets a restarted code's EMA size to the threshold itself, so a code
        # restarted onto a lone vector is restarted again the very next step unless hit at
        # once. 4x the threshold gives it ln(4) / (1 - decay) steps (~140 at 0.99) of grace.
        reset = 4.0 * self.dead_code_threshold if dead_code_reset_size is None else dead_code_reset_size
        for layer in self.rvq.layers:
            layer._codebook.reset_cluster_size = float(reset)
        # Row m: running mean of projected vectors of modality m (all rows equal, the global
        # mean, when the modality code is off).
        self.register_buffer("modality_centroids", torch.zeros(NUM_MODALITIES, self.dim))

    @classmethod
    def from_config(cls, dim: int, config: QuantizerConfig, **kwargs: object) -> "ModalResidualQuantizer":
        return cls(
            dim=dim,
            num_levels=config.num_levels,
            codebook_size=config.codebook_size,
            ema_decay=config.ema_decay,
            kmeans_iters=config.kmeans_iters,
            kmeans_progressive_steps=config.kmeans_progressive_steps,
            dead_code_threshold=config.dead_code_threshold,
            use_modality_code=config.use_modality_code,
            **kwargs,
        )

    # ----- helpers

    @property
    def device(self) -> torch.device:
        return self.modality_centroids.device

    @property
    def is_initialized(self) -> bool:
        return all(bool(layer._codebook.initted) for layer in self.rvq.layers)

    @property
    def codebooks(self) -> Tensor:
        """(L, K, D) semantic codebooks."""
        return torch.stack([layer._codebook.embed[0] for layer in self.rvq.layers])

    def _as_modality(self, modality: Tensor | np.ndarray | Sequence[int] | int, n: int) -> Tensor:
        m = modality if isinstance(modality, Tensor) else torch.as_tensor(np.asarray(modality))
        m = m.to(device=self.device, dtype=torch.long).reshape(-1)
        if m.numel() == 1 and n != 1:
            m = m.expand(n)
        if m.numel() != n:
            raise ValueError(f"got {m.numel()} modalities for {n} vectors")
        if n and (int(m.min()) < 0 or int(m.max()) >= NUM_MODALITIES):
            raise ValueError(f"modality must be in [0, {NUM_MODALITIES})")
        return m

    def _as_input(self, x: Tensor | np.ndarray) -> Tensor:
        x = x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected (N, {self.dim}) embeddings, got {tuple(x.shape)}")
        return x.to(device=self.device, dtype=torch.float32)

    def modality_code(self, modality: Tensor) -> Tensor:
        """Code 0: the modality, or always 0 when the modality code is ablated."""
        return modality if self.use_modality_code else torch.zeros_like(modality)

    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)

    def _require_init(self) -> None:
        if not self.is_initialized:
            raise RuntimeError(
                "codebooks not initialised: call init_codebooks(x, modality) on a sample of "
                "items (train_quantizer does this) or load a state_dict"
            )

    # ----- init

    @torch.no_grad()
    def init_codebooks(
        self,
        x: Tensor | np.ndarray,
        modality: Tensor | np.ndarray | Sequence[int],
        *,
        expected_batch_size: int | None = None,
        seed: int = 0,
    ) -> list[int]:
        """k-means every level on the residuals of a sample of items, level by level.

        ``expected_batch_size`` (vectors per EMA update) scales the initial EMA cluster sizes
        to per-batch counts, the scale the EMA and the dead-code threshold work in. Returns
        the number of used codes per level.
        """
        x = self._as_input(x)
        m = self._as_modality(modality, x.shape[0])
        n = x.shape[0]
        gen = torch.Generator(device="cpu").manual_seed(seed)
        with self._eval_mode():
            z = torch.cat([self.projection(x[s : s + 8192]) for s in range(0, n, 8192)])
        self._init_centroids(z, m)
        residual = z - self.modality_centroids[self.modality_code(m)]
        scale = float(expected_batch_size or n) / n
        used = []
        for level, layer in enumerate(self.rvq.layers):
            centroids, assign, counts = kmeans(residual, self.codebook_size, self.kmeans_iters, generator=gen,
                                               progressive_steps=self.kmeans_progressive_steps)
            book = layer._codebook
            size = counts.to(centroids.dtype) * scale
            book.embed.data.copy_(centroids[None])
            book.cluster_size.data.copy_(size[None])
            book.embed_avg.data.copy_((centroids * size[:, None])[None])
            book.initted.data.copy_(torch.tensor(True))
            residual = residual - centroids[assign]
            used.append(int((counts > 0).sum()))
            logger.debug("level %d: %d/%d codes used, residual %.4g", level + 1, used[-1],
                         self.codebook_size, float((residual**2).sum(1).mean()))
        return used

    def _init_centroids(self, z: Tensor, m: Tensor) -> None:
        overall = z.mean(0)
        if not self.use_modality_code:
            self.modality_centroids.copy_(overall.expand_as(self.modality_centroids))
            return
        for k in range(NUM_MODALITIES):
            sel = m == k
            # A modality absent from the sample starts at the global mean; the EMA moves it.
            self.modality_centroids[k] = z[sel].mean(0) if bool(sel.any()) else overall

    @torch.no_grad()
    def _update_centroids(self, z: Tensor, m: Tensor) -> None:
        rows = self.modality_code(m)
        for k in rows.unique().tolist():
            batch_mean = z[rows == k].mean(0)
            self.modality_centroids[k].lerp_(batch_mean, 1.0 - self.ema_decay)
        if not self.use_modality_code:
            self.modality_centroids.copy_(self.modality_centroids[0].expand_as(self.modality_centroids))

    # ----- forward / encode / decode

    def project(self, x: Tensor | np.ndarray) -> Tensor:
        """Trainable projection of fixed encoder embeddings: (N, D) -> (N, D), unit norm."""
        return self.projection(self._as_input(x))

    def quantize_projected(
        self,
        z: Tensor,
        modality: Tensor | np.ndarray | Sequence[int],
        *,
        centroid: Tensor | None = None,
        update_codebooks: bool = True,
    ) -> QuantizerOutput:
        """Quantize already projected vectors. ``centroid`` (N, D) overrides the modality
        centroid (used for mixed queries); ``update_codebooks=False`` quantizes without EMA
        updates or code restarts (queries: they get no ID, so they must not shape the
        codebooks)."""
        self._require_init()
        m = self._as_modality(modality, z.shape[0])
        code0 = self.modality_code(m)
        if centroid is None:
            centroid = self.modality_centroids[code0]
        residual = z - centroid.detach()
        update = self.training and update_codebooks
        q_sum, indices, commit = self.rvq(residual, freeze_codebook=not update)
        # In training the library's sum is of per-level STE values (and the codebooks have
        # already moved); in eval it is exactly the sequential sum of code vectors, i.e.
        # exactly what decode() rebuilds.
        semantic = _exact_straight_through(q_sum, residual)
        quantized = _exact_straight_through(centroid.detach() + q_sum.detach(), z)
        if update:
            self._update_centroids(z.detach(), m)
        codes = torch.cat([code0[:, None], indices.long()], dim=1)
        commit = commit.reshape(-1)
        return QuantizerOutput(
            z=z, quantized=quantized, semantic=semantic, codes=codes,
            rq_loss=commit.mean(), commit_losses=commit,
        )

    def forward(
        self,
        x: Tensor | np.ndarray,
        modality: Tensor | np.ndarray | Sequence[int],
        *,
        update_codebooks: bool = True,
    ) -> QuantizerOutput:
        return self.quantize_projected(self.project(x), modality, update_codebooks=update_codebooks)

    @torch.no_grad()
    def encode(
        self,
        x: Tensor | np.ndarray,
        modality: Tensor | np.ndarray | Sequence[int],
        *,
        batch_size: int = 8192,
    ) -> Tensor:
        """IDs (N, 1+L), long, on the quantizer's device. Eval mode: no EMA, no restarts,
        deterministic."""
        self._require_init()
        x = self._as_input(x)
        m = self._as_modality(modality, x.shape[0])
        out = []
        with self._eval_mode():
            for s in range(0, x.shape[0], batch_size):
                out.append(self.forward(x[s : s + batch_size], m[s : s + batch_size]).codes)
        if not out:
            return torch.empty(0, 1 + self.num_levels, dtype=torch.long, device=self.device)
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """Rebuild vectors in z space from IDs (N, 1+l), l <= L: modality centroid plus the
        first l semantic code vectors, summed in the same order as the forward pass (so a
        full ID gives exactly the forward's ``quantized``)."""
        codes = torch.as_tensor(codes, device=self.device).long()
        levels = codes.shape[1] - 1
        if codes.ndim != 2 or not 0 <= levels <= self.num_levels:
            raise ValueError(f"codes must be (N, 1..{1 + self.num_levels}), got {tuple(codes.shape)}")
        total = torch.zeros(codes.shape[0], self.dim, device=self.device)
        for level in range(levels):
            total = total + self.rvq.layers[level]._codebook.embed[0][codes[:, 1 + level]]
        return self.modality_centroids[codes[:, 0]] + total

    @torch.no_grad()
    def code_scores(self, x: Tensor | np.ndarray) -> tuple[Tensor, Tensor]:
        """The projected queries' inner products with every code vector: ((Q, 3) modality
        centroids, (Q, L, K) semantic codes). An ID's reconstruction is the sum of its code
        vectors, so a query's inner product with it is the sum of one entry per level: the
        score a residual quantizer searches by, and additive along a beam's prefix."""
        self._require_init()
        z = self.project(x)
        return z @ self.modality_centroids.T, torch.einsum("qd,lkd->qlk", z, self.codebooks)

    @torch.no_grad()
    def reconstruction_error(
        self,
        x: Tensor | np.ndarray,
        modality: Tensor | np.ndarray | Sequence[int],
        *,
        batch_size: int = 8192,
    ) -> Tensor:
        """Mean squared L2 error |z - decode(ID prefix)|^2 for 1..L levels: a tensor (L,)."""
        x = self._as_input(x)
        m = self._as_modality(modality, x.shape[0])
        codes = self.encode(x, m, batch_size=batch_size)
        err = torch.zeros(self.num_levels, device=self.device)
        with self._eval_mode():
            for s in range(0, x.shape[0], batch_size):
                z = self.projection(x[s : s + batch_size])
                c = codes[s : s + batch_size]
                for level in range(1, self.num_levels + 1):
                    err[level - 1] += ((z - self.decode(c[:, : 1 + level])) ** 2).sum()
        return err / max(x.shape[0], 1)


# --------------------------------------------------------------------------- training


def common_prefix_length(a: Tensor, b: Tensor) -> Tensor:
    """Per row, how many leading columns of a and b agree: (N,) long."""
    same = (a == b).long()
    return same.cumprod(dim=1).sum(dim=1)


def _info_nce(q: Tensor, t: Tensor, temperature: float, target_key: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE with in-batch negatives. ``target_key`` (B,) marks rows with the
    same target: those are not negatives of each other (several queries per target)."""
    logits = q @ t.T / temperature
    if target_key is not None:
        same = target_key[:, None] == target_key[None, :]
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))
    labels = torch.arange(q.shape[0], device=q.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def _to_tensor(x: Tensor | np.ndarray | Sequence[int], dtype: torch.dtype) -> Tensor:
    """CPU copy of the training data; batches move to the quantizer's device one by one."""
    t = x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
    t = t.detach().to(device="cpu", dtype=dtype)
    return t.reshape(-1) if dtype == torch.long else t


def _rng_devices(device: torch.device) -> list[int]:
    return [device.index or 0] if device.type == "cuda" else []


def train_quantizer(
    quantizer: ModalResidualQuantizer,
    query_emb: Tensor | np.ndarray,
    target_emb: Tensor | np.ndarray,
    target_modality: Tensor | np.ndarray | Sequence[int],
    item_emb: Tensor | np.ndarray | None = None,
    item_modality: Tensor | np.ndarray | Sequence[int] | None = None,
    config: QuantizerConfig | None = None,
    progress: bool = True,
    *,
    query_modality: Tensor | np.ndarray | Sequence[int] | None = None,
) -> list[dict]:
    """Train the projection (AdamW) and the codebooks (EMA) on query->target pairs.

    L = cl_weight L_cl + rq_weight L_rq + mse_weight L_mse:
      * L_cl: symmetric InfoNCE between projected query and projected target, in-batch
        negatives, on the un-augmented query (a mixed query already contains its target, so
        in-batch negatives would be trivially beaten);
      * L_rq: commitment loss of targets, extra items and queries, mean over levels;
      * L_mse: MSE between the quantized (semantic levels) query and target.
    Query augmentation (config.query_augmentation): z'_q = mu z_q + (1 - mu) z_c with one
    mu ~ Beta(2, 2) per sample, linear (the reference samples mu per dimension and mixes with
    square roots); per-sample linear keeps the mix on the segment from query to target and
    lets the same mu mix the two modality centroids, so the mixed residual is exactly the mix
    of the two residuals. Queries are quantized with the codebooks frozen: they get no ID and
    must not pull codes toward themselves.

    ``item_emb``/``item_modality`` are more items to index (beyond the targets): they join the
    k-means init sample and every step's EMA update and commitment loss.
    ``query_modality``: the queries' own modality (its centroid is removed from the query);
    by default a query is quantized as an item of its target's modality.

    Early stopping (config.holdout_*, config.patience): a share of the pairs is held out, and
    the quantizer (projection, codebooks, centroids) of the epoch whose codes rank the held-out
    targets best is kept, epoch 0 included; each epoch's record then has ``holdout_r10`` (by
    the codes) and ``holdout_r10_projected``.

    With config.refit_codebooks the codebooks and centroids are finally re-initialised by
    k-means on the trained projection, so an item's ID is a plain residual code of where the
    projection puts it (the EMA codebooks trail a moving projection).

    Seeded by config.seed (the global RNG state is restored afterwards). Returns one dict of
    mean losses per epoch.
    """
    config = config or QuantizerConfig()
    if config.use_modality_code != quantizer.use_modality_code:
        raise ValueError("config.use_modality_code differs from the quantizer's")
    if (item_emb is None) != (item_modality is None):
        raise ValueError("give both item_emb and item_modality, or neither")
    device = quantizer.device
    xq = _to_tensor(query_emb, torch.float32)
    xt = _to_tensor(target_emb, torch.float32)
    mt = _to_tensor(target_modality, torch.long)
    mq = None if query_modality is None else _to_tensor(query_modality, torch.long)
    n = xq.shape[0]
    if xt.shape[0] != n or mt.shape[0] != n or (mq is not None and mq.shape[0] != n):
        raise ValueError("query_emb, target_emb and the modalities must have the same length")
    if n < 2:
        raise ValueError("need at least 2 pairs (in-batch negatives)")
    if item_emb is not None:
        xi = _to_tensor(item_emb, torch.float32)
        mi = _to_tensor(item_modality, torch.long)
        if xi.shape[0] != mi.shape[0]:
            raise ValueError("item_emb and item_modality must have the same length")
    else:
        xi = mi = None

    history: list[dict] = []

    with torch.random.fork_rng(devices=_rng_devices(device)):
        torch.manual_seed(config.seed)
        gen = torch.Generator().manual_seed(config.seed)
        holdout = None
        held = _holdout_rows(n, config, gen) if config.epochs > 0 else None
        if held is not None:
            holdout = _Holdout.build(xq[held], xt[held], mt[held], xt if xi is None else xi,
                                     mt if mi is None else mi, gen, device)
            keep = torch.ones(n, dtype=torch.bool)
            keep[held] = False
            xq, xt, mt = xq[keep], xt[keep], mt[keep]
            mq = None if mq is None else mq[keep]
            n = xq.shape[0]
        batch = min(config.batch_size, n)
        steps_per_epoch = max(1, n // batch)  # drop the ragged tail: InfoNCE wants full batches
        item_batch = batch if xi is not None and xi.shape[0] > 0 else 0

        def init_from_sample(when: str) -> None:
            sample_x, sample_m = _init_sample(xt, mt, xi, mi, config.kmeans_points_per_code * quantizer.codebook_size,
                                              gen)
            t0 = time.perf_counter()
            used = quantizer.init_codebooks(sample_x, sample_m, expected_batch_size=batch + item_batch,
                                            seed=config.seed)
            logger.info("k-means %s on %d items in %.1fs; codes used per level: %s",
                        when, sample_x.shape[0], time.perf_counter() - t0, used)

        if not quantizer.is_initialized:
            init_from_sample("init")

        best = _Best()
        if holdout is not None:
            best.offer(0, *holdout.recall_at_10(quantizer), quantizer)
            logger.info("quantizer: %d pairs held out for early stopping; before training their recall@10 is %.3f by "
                        "the codes", holdout.query.shape[0], best.codes_recall)
        params = [p for p in quantizer.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        quantizer.train()
        bar = tqdm(total=config.epochs * steps_per_epoch, disable=not progress, desc="quantizer", leave=False)
        try:
            for epoch in range(config.epochs):
                t0 = time.perf_counter()
                sums = {"loss": 0.0, "cl": 0.0, "rq": 0.0, "mse": 0.0}
                perm = torch.randperm(n, generator=gen)
                for step in range(steps_per_epoch):
                    idx = perm[step * batch : (step + 1) * batch]
                    bq, bt, bm = xq[idx].to(device), xt[idx].to(device), mt[idx].to(device)
                    if item_batch:
                        pick = torch.randint(xi.shape[0], (item_batch,), generator=gen)
                        x_items = torch.cat([bt, xi[pick].to(device)])
                        m_items = torch.cat([bm, mi[pick].to(device)])
                    else:
                        x_items, m_items = bt, bm
                    z_q = quantizer.project(bq)
                    z_items = quantizer.project(x_items)
                    z_t = z_items[: bt.shape[0]]
                    # Queries first, with frozen codebooks, so that queries and targets see
                    # the same codebooks and centroids in this step.
                    c_t = quantizer.modality_centroids[quantizer.modality_code(bm)]
                    c_q = c_t if mq is None else quantizer.modality_centroids[
                        quantizer.modality_code(mq[idx].to(device))]
                    if config.query_augmentation:
                        mu = beta22(bt.shape[0], gen)[:, None].to(device)
                        z_mix = mu * z_q + (1.0 - mu) * z_t
                        c_mix = mu * c_q + (1.0 - mu) * c_t
                    else:
                        z_mix, c_mix = z_q, c_q
                    out_q = quantizer.quantize_projected(z_mix, bm, centroid=c_mix, update_codebooks=False)
                    # Targets and extra items update the codebooks (EMA, restarts) and centroids.
                    out_t = quantizer.quantize_projected(z_items, m_items)

                    if config.use_contrastive:
                        key = torch.unique(bt, dim=0, return_inverse=True)[1]
                        cl = _info_nce(z_q, z_t, config.temperature, key)
                    else:
                        cl = z_q.new_zeros(())
                    rq = 0.5 * (out_t.rq_loss + out_q.rq_loss)
                    mse = F.mse_loss(out_q.semantic, out_t.semantic[: bt.shape[0]])
                    loss = config.cl_weight * cl + config.rq_weight * rq + config.mse_weight * mse
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()

                    for key, val in (("loss", loss), ("cl", cl), ("rq", rq), ("mse", mse)):
                        sums[key] += float(val.detach())
                    bar.update(1)
                    bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss.detach()):.4f}")
                record = {k: v / steps_per_epoch for k, v in sums.items()}
                record.update(epoch=epoch + 1, seconds=time.perf_counter() - t0)
                if holdout is not None:
                    record["holdout_r10"], record["holdout_r10_projected"] = holdout.recall_at_10(quantizer)
                    best.offer(epoch + 1, record["holdout_r10"], record["holdout_r10_projected"], quantizer)
                history.append(record)
                logger.info("quantizer epoch %d/%d: loss %.4f (cl %.4f, rq %.5f, mse %.5f)%s %.1fs",
                            epoch + 1, config.epochs, record["loss"], record["cl"], record["rq"],
                            record["mse"], "" if holdout is None else
                            f", held-out recall@10 {record['holdout_r10']:.3f} by the codes", record["seconds"])
                if holdout is not None and config.patience and epoch + 1 - best.epoch >= config.patience:
                    logger.info("quantizer: no better held-out recall for %d epochs: stopping", config.patience)
                    break
        finally:
            bar.close()
            quantizer.eval()
        if holdout is not None and best.epoch < len(history):
            quantizer.load_state_dict(best.state)
            logger.info("quantizer: kept epoch %d of %d (held-out recall@10 %.3f by the codes, %.3f projected; "
                        "%d held-out pairs among %d candidates)", best.epoch, len(history), best.codes_recall,
                        best.projected_recall, holdout.query.shape[0], holdout.candidates.shape[0])
        if config.refit_codebooks and config.epochs > 0:
            init_from_sample("refit on the trained projection")
    return history


def _init_sample(xt: Tensor, mt: Tensor, xi: Tensor | None, mi: Tensor | None, limit: int,
                 gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Distinct items (targets and extra items) for the k-means, at most `limit` of them."""
    pool_x = xt if xi is None else torch.cat([xt, xi])
    pool_m = mt if mi is None else torch.cat([mt, mi])
    if pool_x.shape[0] > limit:
        pick = torch.randperm(pool_x.shape[0], generator=gen)[:limit]
        pool_x, pool_m = pool_x[pick], pool_m[pick]
    # Targets repeat (several queries per target): duplicates would waste codes.
    pool_x, pool_m, _ = _distinct_rows(pool_x, pool_m)
    return pool_x, pool_m


def _distinct_rows(x: Tensor, m: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(distinct rows of x, their modalities, each input row's position among them)."""
    distinct, inverse = torch.unique(x, dim=0, return_inverse=True)
    first = torch.full((distinct.shape[0],), -1, dtype=torch.long).scatter_reduce(
        0, inverse, torch.arange(inverse.numel()), reduce="amax", include_self=True)
    return distinct, m[first], inverse


# Held-out targets are ranked among themselves and random items, this many candidates in all
# (every item of a smaller corpus). Among a few thousand, recall@10 saturates on easy tasks
# (Fashion-MNIST views: 0.99 among 4,096 before training, 0.79 among 65,536) and cannot tell
# the epochs apart.
HOLDOUT_CANDIDATES = 32768
HOLDOUT_CHUNK = 8192  # candidates scored at a time


def _holdout_rows(n: int, config: QuantizerConfig, gen: torch.Generator) -> Tensor | None:
    """Which pairs early stopping holds out (config.holdout_*), or None."""
    count = min(config.holdout_max, int(n * config.holdout_share))
    if count < max(1, config.holdout_min) or n - count < 2:
        return None
    return torch.randperm(n, generator=gen)[:count]


@dataclass
class _Holdout:
    """Held-out pairs: their queries, and the distinct candidates their targets are among."""

    query: Tensor  # (H, D)
    candidates: Tensor  # (C, D)
    candidate_modality: Tensor  # (C,)
    position: Tensor  # (H,) each query's target's row in candidates

    @classmethod
    def build(cls, query: Tensor, target: Tensor, target_modality: Tensor, items: Tensor, item_modality: Tensor,
              gen: torch.Generator, device: torch.device) -> "_Holdout":
        others = torch.randperm(items.shape[0], generator=gen)[: max(0, HOLDOUT_CANDIDATES - target.shape[0])]
        candidates, modality, inverse = _distinct_rows(torch.cat([target, items[others]]),
                                                       torch.cat([target_modality, item_modality[others]]))
        return cls(query.to(device), candidates.to(device), modality.to(device),
                   inverse[: target.shape[0]].to(device))

    @torch.no_grad()
    def recall_at_10(self, quantizer: ModalResidualQuantizer) -> tuple[float, float]:
        """Recall@10 of the targets ranked by query . reconstruction (the codes) and by
        query . projected item (no quantization)."""
        size = HOLDOUT_CHUNK
        with quantizer._eval_mode():
            query = quantizer.project(self.query)
            # Each chunk of candidates quantized once: (reconstructions, projections).
            chunks = []
            for start in range(0, self.candidates.shape[0], size):
                z = quantizer.project(self.candidates[start : start + size])
                chunks.append((quantizer.quantize_projected(z, self.candidate_modality[start : start + size],
                                                            update_codebooks=False).quantized, z))
        # Two passes, so that a target's score comes from the same product as its rivals':
        # first each target's scores (by the codes, projected), then how many candidates score
        # above it. Ties (items with the same ID) count half, as a random order among them would.
        rows = torch.arange(query.shape[0], device=query.device)
        own = torch.zeros(2, query.shape[0], device=query.device)
        above = torch.zeros(2, query.shape[0], device=query.device)
        for number, chunk in enumerate(chunks):
            local = self.position - number * size
            inside = (local >= 0) & (local < chunk[0].shape[0])
            if bool(inside.any()):
                for which, vectors in enumerate(chunk):
                    own[which, inside] = (query @ vectors.T)[rows[inside], local[inside]]
        for chunk in chunks:
            for which, vectors in enumerate(chunk):
                scores = query @ vectors.T
                target = own[which][:, None]
                above[which] += (scores > target).sum(dim=1) + 0.5 * (scores == target).sum(dim=1)
        hits = ((above - 0.5) < 10).float().mean(dim=1)  # the target ties with itself once
        return float(hits[0]), float(hits[1])


@dataclass
class _Best:
    """The quantizer's state at the epoch with the best held-out recall (ties: the earliest)."""

    epoch: int = -1
    codes_recall: float = -1.0
    projected_recall: float = -1.0
    state: dict | None = None

    def offer(self, epoch: int, codes_recall: float, projected_recall: float,
              quantizer: ModalResidualQuantizer) -> None:
        if codes_recall > self.codes_recall:
            self.epoch, self.codes_recall, self.projected_recall = epoch, codes_recall, projected_recall
            self.state = copy.deepcopy(quantizer.state_dict())
