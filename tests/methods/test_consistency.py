"""sCT and ECT (docs/methods.md, sCT and ECT): closed-form Gaussian stationary points, hand-computed targets on an
affine network, the tangent warm-up / normalisation, ECT's staged r schedule and shared dropout masks."""

from __future__ import annotations

import math

import pytest
import torch
from test_alphaflow import Affine, GaussianNet, _grad_norm, _rows

from selfe_cli.config import ConfigError
from selfe_cli.methods.ect import ECT, ect_config, r_sigma, sigma_to_t
from selfe_cli.methods.sct import SCT, normalise_tangent, sample_t_r, sct_config, warmup_factor


def _marginal_pair(g: GaussianNet, z: torch.Tensor, t: torch.Tensor):
    """(x0, eps) with (1 - t) x0 + t eps = z and eps - x0 the marginal velocity at z."""
    with torch.no_grad():
        vel = g.average(z, t, t)
    tb = t.view(-1, 1, 1, 1)
    return z - tb * vel, z + (1 - tb) * vel


# ----------------------------------------------------------------------------- sCT


@pytest.mark.parametrize("norm", ["l2", "rms", "none"])
def test_sct_exact_flow_map_is_a_stationary_point(norm):
    """At the exact average velocity over [0, t] the tangent g = v - u - t du/dt vanishes (MeanFlow identity at
    r = 0), so the loss and its gradient are zero whatever the normalisation; a wrong mean is not stationary."""
    z, t, _ = _rows()
    r = torch.zeros_like(t)
    g = GaussianNet(m=-0.6, s=0.5)
    x0, eps = _marginal_pair(g, z, t)
    cfg = sct_config(tangent_norm=norm, jvp_mode="single_pass")
    assert _grad_norm(SCT(cfg).loss_from(g, x0, eps, t, r).loss, g) < 1e-9
    wrong = GaussianNet(m=-0.2, s=0.5)
    assert _grad_norm(SCT(cfg).loss_from(wrong, x0, eps, t, r).loss, wrong) > 1e-3


def test_sct_loss_by_hand_on_an_affine_network():
    """u = a x + b t + d r + e: du/dt = a v + b; g = v - u - w t (a v + b), g / (||g|| + 0.1); flow-matching rows
    regress eps - x0; the adaptive weight on the per-sample sum."""
    net = Affine()
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, 1, 2, 2, generator=gen, dtype=torch.float64)
    eps = torch.randn(5, 1, 2, 2, generator=gen, dtype=torch.float64)
    t = torch.tensor([0.9, 0.6, 0.3, 0.7, 0.4], dtype=torch.float64)
    r = torch.tensor([0.0, 0.0, 0.0, 0.7, 0.4], dtype=torch.float64)  # 3 consistency rows, then 2 flow matching
    tb = t.view(-1, 1, 1, 1)
    z, v = (1 - tb) * x0 + tb * eps, eps - x0
    u = net(z, t, r)
    gt = v - u.detach() - 0.4 * tb * (net.a * v + net.b)
    gt = gt / (gt.pow(2).flatten(1).sum(1).sqrt() + 0.1).view(-1, 1, 1, 1)
    tgt = torch.where((r == 0).view(-1, 1, 1, 1), u.detach() + gt, v)
    sq = (u - tgt).pow(2).flatten(1).sum(1)
    want = (sq / (sq.detach() + 1e-3)).mean()
    got = SCT(sct_config(jvp_mode="single_pass")).loss_from(net, x0, eps, t, r, warmup=0.4).loss
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)


def test_sct_schedules_and_rows():
    cfg = sct_config(tangent_warmup_steps=100, ratio_fm=0.25)
    assert (warmup_factor(cfg, 0), warmup_factor(cfg, 50), warmup_factor(cfg, 500)) == (0.0, 0.5, 1.0)
    assert warmup_factor(sct_config(tangent_warmup_steps=0), 0) == 1.0
    torch.manual_seed(0)
    t, r = sample_t_r(cfg, 8)
    assert (r[:6] == 0).all() and (r[6:] == t[6:]).all()
    g = torch.tensor([[3.0, 4.0]]).view(1, 2, 1, 1)
    torch.testing.assert_close(normalise_tangent(g, "l2", 0.1), g / 5.1)
    torch.testing.assert_close(normalise_tangent(g, "rms", 0.1), g / (math.sqrt(12.5) + 0.1))


# ----------------------------------------------------------------------------- ECT


def test_ect_exact_flow_map_is_stationary_as_the_gap_closes():
    """f(x_t) = x_t - t u(x_t, 0, t) with the exact average velocity is the flow map to the data; with x_r one
    marginal-velocity step below x_t the target differs by O((t - r)^2), so with a quadratic core (pseudo-Huber
    c > 0) the gradient vanishes as r -> t, while a wrong mean keeps a gradient."""
    z, t, _ = _rows()
    t_sig = t / (1 - t)
    g = GaussianNet(m=-0.6, s=0.5)
    x0, eps = _marginal_pair(g, z, t)
    cfg = ect_config(huber_c=1e-2)
    grads = []
    for stage in (4, 10):
        loss = ECT(cfg).loss_from(g, x0, eps, t_sig, r_sigma(cfg, t_sig, stage)).loss
        grads.append(_grad_norm(loss, g))
    assert grads[1] < grads[0] / 20  # O(t - r): the target is detached, its O((t - r)^2) error enters once
    wrong = GaussianNet(m=-0.2, s=0.5)
    assert _grad_norm(ECT(cfg).loss_from(wrong, x0, eps, t_sig, r_sigma(cfg, t_sig, 10)).loss, wrong) > 50 * grads[1]


def test_ect_loss_by_hand_on_an_affine_network():
    """f = x - t (a x + b t + e) at r = 0; ||f(x_t) - sg f(x_r)||_2 / (t_sigma - r_sigma); the data where r = 0."""
    net = Affine()
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randn(3, 1, 2, 2, generator=gen, dtype=torch.float64)
    eps = torch.randn(3, 1, 2, 2, generator=gen, dtype=torch.float64)
    t_sig = torch.tensor([4.0, 0.5, 0.2], dtype=torch.float64)
    r_sig = torch.tensor([3.0, 0.1, 0.0], dtype=torch.float64)

    def f(x, tt):
        tb = tt.view(-1, 1, 1, 1)
        return x - tb * (net.a * x + net.b * tb)

    t, r = t_sig / (1 + t_sig), r_sig / (1 + r_sig)
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    x_r = (1 - r.view(-1, 1, 1, 1)) * x0 + r.view(-1, 1, 1, 1) * eps
    target = f(x_r, r).detach()
    target[2] = x0[2]
    dist = (f(x_t, t) - target).pow(2).flatten(1).sum(1).sqrt()
    want = (dist / (t_sig - r_sig)).mean()
    torch.testing.assert_close(ECT(ect_config()).loss_from(net, x0, eps, t_sig, r_sig).loss, want, rtol=1e-10, atol=0)


def test_ect_r_schedule_and_time_map():
    cfg = ect_config()
    t_sig = torch.tensor([0.0, 1.0, 80.0], dtype=torch.float64)
    for stage in (0, 3):
        want = t_sig * (1 - 2.0 ** -(stage + 1) * (1 + 8 * torch.sigmoid(-t_sig)))
        torch.testing.assert_close(r_sigma(cfg, t_sig, stage), want.clamp(min=0))
    assert float(r_sigma(cfg, torch.tensor([0.1]), 0)) == 0.0  # clamped: the target is the data
    assert float(sigma_to_t(torch.tensor(80.0))) == pytest.approx(80 / 81)


def test_ect_shares_the_dropout_masks_between_its_two_calls():
    """With dropout and x_r = x_t (same t and r levels) the two calls see the same masks: the distance is zero."""
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.5), torch.nn.Linear(4, 4)).double()

    class TwoTime(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = net

        def forward(self, x, t, r, cond=None):
            return self.body(x).view_as(x)

    two = TwoTime().train()
    x0 = torch.randn(6, 1, 2, 2, dtype=torch.float64)
    eps = torch.randn_like(x0)
    sig = torch.full((6,), 0.7, dtype=torch.float64)
    out = ECT(ect_config()).loss_from(two, x0, eps, sig, sig * (1 - 1e-12))
    assert float(out.logs["distance"]) < 1e-8


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="method.q"):
        ect_config(q=1.0)
    with pytest.raises(ConfigError, match="method.tangent_norm"):
        sct_config(tangent_norm="l1")


def test_sampler_starts_below_pure_noise():
    """t_start < 1 (ECT's sigma_max 80, IMM's 0.994): the grid is scaled and x starts at t_start * noise."""
    from selfe_cli.sampling.sampler import sample, time_grid

    grid = time_grid(2, t_start=0.9, dtype=torch.float64)
    torch.testing.assert_close(grid, torch.tensor([0.9, 0.45, 0.0], dtype=torch.float64))
    net = Affine()
    noise = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    x = sample(net, noise, steps=1, r_mode="zero", t_start=0.9)
    t = torch.full((3,), 0.9, dtype=torch.float64)
    x_start = 0.9 * noise
    torch.testing.assert_close(x, x_start - 0.9 * net(x_start, t, torch.zeros_like(t)))
    with pytest.raises(ValueError, match="t_start"):
        time_grid(2, t_start=1.5)
