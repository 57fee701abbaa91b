"""Image-text fusion of GENIUS: h(x, y) = λ·x + (1-λ)·y + MLP([x; y]).

λ = sigmoid(MLP_λ([x; y])) is one scalar per sample. Both MLPs end in a zero-initialised
layer, so an untrained Fusion returns exactly normalize((x + y) / 2): a sensible
starting point (CLIP score fusion) that training moves away from only where it helps.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Fusion(nn.Module):
    """Fuse an image embedding x and a text embedding y, both (N, dim), into (N, dim).

    The output is L2-normalised. `hidden_dim` (default: `dim`) is the width of both MLPs.
    """

    def __init__(self, *, dim: int, hidden_dim: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        hidden = hidden_dim if hidden_dim is not None else dim
        if hidden <= 0:
            raise ValueError(f"hidden_dim must be positive, got {hidden_dim}")
        self.dim = dim
        self.hidden_dim = hidden
        self.mlp = nn.Sequential(
            nn.Linear(2 * dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, dim),
        )
        self.gate = nn.Sequential(
            nn.Linear(2 * dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, 1),
        )
        # Zero last layers: residual MLP starts at 0 and λ at sigmoid(0) = 0.5, so the
        # untrained fusion is the plain average. Gradients still reach both layers.
        for last in (self.mlp[-1], self.gate[-1]):
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def _check(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if x.shape != y.shape or x.ndim != 2 or x.shape[-1] != self.dim:
            raise ValueError(
                f"Fusion expects two (N, {self.dim}) tensors, got {tuple(x.shape)} and {tuple(y.shape)}"
            )

    def weights(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """λ for each sample, shape (N,), in (0, 1): the share of the image embedding."""
        self._check(x, y)
        return torch.sigmoid(self.gate(torch.cat([x, y], dim=-1))).squeeze(-1)

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, *, return_lambda: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        self._check(x, y)
        xy = torch.cat([x, y], dim=-1)
        lam = torch.sigmoid(self.gate(xy))  # (N, 1): broadcasts over the feature dim
        h = lam * x + (1.0 - lam) * y + self.mlp(xy)
        h = F.normalize(h, dim=-1)
        if return_lambda:
            return h, lam.squeeze(-1)
        return h
