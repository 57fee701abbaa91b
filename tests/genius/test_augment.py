import torch

from genius.augment import beta22, mix_towards_target


def test_beta22_has_the_right_moments():
    mu = beta22(200_000, torch.Generator().manual_seed(0))
    assert 0 <= float(mu.min()) and float(mu.max()) <= 1
    assert abs(float(mu.mean()) - 0.5) < 0.005
    assert abs(float(mu.var()) - 0.05) < 0.002  # Var Beta(2,2) = 1/20


def test_mix_lies_between_query_and_target_on_the_sphere():
    g = torch.Generator().manual_seed(1)
    q = torch.nn.functional.normalize(torch.randn(500, 16, generator=g), dim=-1)
    t = torch.nn.functional.normalize(torch.randn(500, 16, generator=g), dim=-1)
    mixed = mix_towards_target(q, t, prob=1.0, generator=g)
    assert torch.allclose(mixed.norm(dim=-1), torch.ones(500), atol=1e-5)
    # Closer to the target than the query is, and closer to the query than the target is.
    assert ((mixed * t).sum(-1) >= (q * t).sum(-1) - 1e-5).all()
    assert ((mixed * q).sum(-1) >= (q * t).sum(-1) - 1e-5).all()


def test_prob_controls_the_share_of_mixed_rows():
    g = torch.Generator().manual_seed(2)
    q = torch.nn.functional.normalize(torch.randn(4000, 8, generator=g), dim=-1)
    t = torch.nn.functional.normalize(torch.randn(4000, 8, generator=g), dim=-1)
    changed = (mix_towards_target(q, t, prob=0.3, generator=g) != q).any(-1).float().mean()
    assert abs(float(changed) - 0.3) < 0.03
