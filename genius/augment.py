"""Query augmentation of GENIUS: interpolate a query towards its target in embedding space."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def beta22(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """n samples of Beta(2, 2): the median of three uniforms (2nd order statistic of 3)."""
    return torch.rand(n, 3, generator=generator).median(dim=1).values


def mix_towards_target(
    query: torch.Tensor, target: torch.Tensor, prob: float = 1.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """z' = mu * z_q + (1 - mu) * z_c with mu ~ Beta(2, 2) per sample, for a `prob` share of rows.

    This is the paper's formula with one mu per sample (the reference code samples mu per
    dimension and mixes square roots; our design allows either). The mix is put back on
    the unit sphere, where the embeddings live.
    """
    n = len(query)
    mu = beta22(n, generator)[:, None].to(query)
    chosen = (torch.rand(n, 1, generator=generator) < prob).to(query.device)
    mixed = F.normalize(mu * query + (1 - mu) * target, dim=-1)
    return torch.where(chosen, mixed, query)
