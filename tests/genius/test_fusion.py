"""Fusion h(x, y) = λ·x + (1-λ)·y + MLP([x; y]), λ = sigmoid(MLP_λ([x; y]))."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from genius.fusion import Fusion

DIM = 32


def _pair(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, DIM, generator=g), dim=-1)
    y = F.normalize(torch.randn(n, DIM, generator=g), dim=-1)
    return x, y


def _perturb(fusion: Fusion, seed: int = 1) -> None:
    """Give the zero-initialised last layers some weights, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in (fusion.mlp[-1], fusion.gate[-1]):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g))
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=g) * 0.1)


def test_shape_and_unit_norm() -> None:
    fusion = Fusion(dim=DIM, hidden_dim=16)
    _perturb(fusion)
    x, y = _pair()
    h = fusion(x, y)
    assert h.shape == (8, DIM)
    assert torch.allclose(h.norm(dim=-1), torch.ones(8), atol=1e-5)


def test_initial_fusion_is_normalised_average() -> None:
    fusion = Fusion(dim=DIM)
    x, y = _pair()
    h, lam = fusion(x, y, return_lambda=True)
    assert torch.allclose(h, F.normalize((x + y) / 2, dim=-1), atol=1e-6)
    assert torch.allclose(lam, torch.full((8,), 0.5))
    # ... and it differs from either part
    assert (h * x).sum(-1).max() < 0.999 and (h * y).sum(-1).max() < 0.999


def test_lambda_is_one_scalar_per_sample_in_open_unit_interval() -> None:
    fusion = Fusion(dim=DIM, hidden_dim=16)
    _perturb(fusion)
    x, y = _pair(n=16)
    h, lam = fusion(x, y, return_lambda=True)
    assert lam.shape == (16,)
    assert torch.all(lam > 0) and torch.all(lam < 1)
    assert lam.std() > 1e-3, "λ should depend on the sample"
    assert torch.allclose(fusion.weights(x, y), lam)
    # h really is λ·x + (1-λ)·y + MLP([x; y]), normalised
    expected = lam[:, None] * x + (1 - lam[:, None]) * y + fusion.mlp(torch.cat([x, y], -1))
    assert torch.allclose(h, F.normalize(expected, dim=-1), atol=1e-5)


def test_per_sample_independence() -> None:
    """Each output row depends on its own inputs only (no batch mixing)."""
    fusion = Fusion(dim=DIM)
    _perturb(fusion)
    x, y = _pair(n=6)
    full = fusion(x, y)
    single = torch.cat([fusion(x[i : i + 1], y[i : i + 1]) for i in range(6)])
    assert torch.allclose(full, single, atol=1e-6)


def test_gradients_reach_all_parameters() -> None:
    fusion = Fusion(dim=DIM, hidden_dim=16)
    x, y = _pair()
    target = F.normalize(torch.randn(8, DIM), dim=-1)
    loss = -(fusion(x, y) * target).sum()
    loss.backward()
    # zero-initialised last layers still receive gradient, so training can move them
    assert fusion.mlp[-1].weight.grad.abs().sum() > 0
    assert fusion.gate[-1].weight.grad.abs().sum() > 0


def test_bad_shapes_raise() -> None:
    fusion = Fusion(dim=DIM)
    x, y = _pair()
    with pytest.raises(ValueError):
        fusion(x, y[:4])
    with pytest.raises(ValueError):
        fusion(x[:, :8], y[:, :8])
    with pytest.raises(ValueError):
        Fusion(dim=0)
