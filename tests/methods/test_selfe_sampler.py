"""Self-E sampling [22] on the shared sampler: landing-time modes, energy-preserving CFG, eta updates."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from selfe_cli.sampling.sampler import guided_velocity, sample, time_grid


class Field(nn.Module):
    """A nonlinear two-time field that records its (t, r) inputs."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x, t, r, cond=None):
        self.seen.append((t.clone(), r.clone()))
        tb, rb = t.view(-1, 1), r.view(-1, 1)
        return torch.sin(3 * x) * (1 + tb) + 0.3 * (tb - rb) * x


class TowardPoint(nn.Module):
    """The exact velocity of the path towards one data point x0*: V(x, t) = (x - x0*) / t."""

    def __init__(self, target):
        super().__init__()
        self.target = target

    def forward(self, x, t, r, cond=None):
        return (x - self.target) / t.view(-1, 1)


@pytest.mark.parametrize("steps, shift", [(1, 1.0), (4, 1.0), (7, 3.0)])
def test_same_mode_is_flow_matching_euler(steps, shift):
    torch.manual_seed(0)
    noise = torch.randn(3, 2)
    net = Field()
    out = sample(net, noise, steps=steps, r_mode="same", shift=shift)
    grid = time_grid(steps, shift)
    x = noise.clone()
    for k in range(steps):
        t = grid[k].expand(3)
        x = x - (grid[k] - grid[k + 1]) * net(x, t, t)  # Euler on the instantaneous velocity
    assert torch.allclose(out, x, atol=1e-6)
    assert all(torch.equal(t, r) for t, r in net.seen)


def test_next_and_mid_landing_times():
    net = Field()
    sample(net, torch.zeros(2, 2), steps=2, r_mode="next")
    assert [(t[0].item(), r[0].item()) for t, r in net.seen] == [(1.0, 0.5), (0.5, 0.0)]
    net = Field()
    sample(net, torch.zeros(2, 2), steps=1, r_mode="mid")
    assert [(t[0].item(), r[0].item()) for t, r in net.seen] == [(1.0, 0.5)]  # Self-E's s = 0.5 for 1 step
    net = Field()
    out = sample(net, torch.ones(2, 2), steps=1, r_mode="next")
    # one step: x = e - V(e, 1, 0)
    assert torch.allclose(out, torch.ones(2, 2) - Field()(torch.ones(2, 2), torch.ones(2), torch.zeros(2)))


class CondNet(nn.Module):
    def forward(self, x, t, r, cond):
        base = torch.stack([torch.ones_like(t), 2 * torch.ones_like(t)], dim=1)  # (N, 2)
        alt = torch.stack([3 * torch.ones_like(t), -torch.ones_like(t)], dim=1)
        return torch.where(cond.view(-1, 1) == 1, base, alt) * (1 + x.abs())


@pytest.mark.parametrize("w", [1.0, 2.0, 5.0])
def test_energy_preserving_cfg(w):
    x = torch.tensor([[0.1, -0.2], [0.5, 0.3]])
    t = torch.ones(2)
    cond, null = torch.ones(2, dtype=torch.long), torch.zeros(2, dtype=torch.long)
    net = CondNet()
    v_c, v_u = net(x, t, t, cond), net(x, t, t, null)
    v_std = guided_velocity(net, x, t, t, cond, null, w, "standard")
    v_en = guided_velocity(net, x, t, t, cond, null, w, "energy")
    assert torch.allclose(v_std, v_u + w * (v_c - v_u))
    # per sample: the norm of the conditional velocity, the direction of the guided one
    assert torch.allclose(v_en.norm(dim=1), v_c.norm(dim=1), atol=1e-6)
    cos = torch.nn.functional.cosine_similarity(v_en, v_std, dim=1)
    assert torch.allclose(cos, torch.ones(2), atol=1e-6)
    if w == 1.0:
        assert torch.allclose(v_en, v_c)
    else:
        assert not torch.allclose(v_en, v_std)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_eta_update_lands_on_the_data_for_an_exact_field(eta):
    target = torch.tensor([[0.3, -0.7], [1.2, 0.1]])
    noise = torch.randn(2, 2, generator=torch.Generator().manual_seed(1))
    out = sample(TowardPoint(target), noise, steps=4, r_mode="same", eta=eta,
                 generator=torch.Generator().manual_seed(2))
    assert torch.allclose(out, target, atol=1e-5)


def test_eta_one_renoises_with_fresh_noise():
    target = torch.tensor([[0.3, -0.7]])
    noise = torch.randn(1, 2, generator=torch.Generator().manual_seed(1))
    grid = time_grid(2)
    out = sample(TowardPoint(target), noise, steps=1, r_mode="same", eta=1.0, grid=grid[:2],
                 generator=torch.Generator().manual_seed(5))
    z = torch.randn(1, 2, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(out, 0.5 * target + 0.5 * z, atol=1e-6)  # (1 - t') x0 + t' z at t' = 0.5
    det = sample(TowardPoint(target), noise, steps=1, r_mode="same", eta=0.0, grid=grid[:2])
    assert torch.allclose(det, 0.5 * target + 0.5 * noise, atol=1e-6)  # eta = 0 keeps the noise


def test_bad_options():
    with pytest.raises(ValueError, match="r_mode"):
        sample(Field(), torch.zeros(1, 2), steps=1, r_mode="half")
    with pytest.raises(ValueError, match="guidance"):
        sample(Field(), torch.zeros(1, 2), steps=1, guidance="rescaled")
