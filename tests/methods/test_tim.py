"""TiM (docs/methods.md, TiM): the finite difference against the JVP, the closed-form Gaussian stationary point,
hand-computed targets and weights on an affine network, the (t, r) shares, guidance from the EMA network."""

from __future__ import annotations

import math

import pytest
import torch
from test_alphaflow import Affine, GaussianNet, _batch, _grad_norm, _rows

from selfe_cli.config import ConfigError
from selfe_cli.methods.jvp import two_time_jvp
from selfe_cli.methods.tim import TiM, dde_derivative, directional_loss, sample_t_r, tim_config, time_weight


def test_finite_difference_converges_to_the_jvp_quadratically():
    """The DDE is the total derivative along (v, 0, 1): its error against the exact JVP shrinks as e^2."""
    g = GaussianNet(m=-0.6, s=0.5)
    z, t, r = _rows(16)
    t = t.clamp(0.1, 0.9)
    gen = torch.Generator().manual_seed(3)
    eps = torch.randn(z.shape, generator=gen, dtype=torch.float64)
    tb = t.view(-1, 1, 1, 1)
    x0 = (z - tb * eps) / (1 - tb)  # so that (1 - t) x0 + t eps = z
    _, exact = two_time_jvp(g, z, t, r, None, eps - x0, torch.ones_like(t), None, mode="single_pass")
    errors = []
    for e in (1e-1, 1e-2, 1e-3):
        errors.append(float((dde_derivative(g, x0, eps, t, r, None, e) - exact).abs().max()))
    assert errors[0] > 1e-6  # the path is curved: the difference is not exact
    assert errors[1] < errors[0] / 50 and errors[2] < errors[1] / 50  # O(e^2): 100x per decade


@pytest.mark.parametrize("derivative", ["jvp", "dde"])
def test_exact_average_velocity_is_a_stationary_point(derivative):
    """(x0, eps) chosen so that eps - x0 is the marginal velocity at z: the exact average velocity is the target
    (up to O(e^2) for the finite difference), so the loss has (almost) zero gradient; a wrong mean does not."""
    g = GaussianNet(m=-0.6, s=0.5)
    z, t, r = _rows()
    t, r = t.flip(0), r.flip(0)  # r != t rows first, as sample_t_r puts them
    with torch.no_grad():
        vel = g.average(z, t, t)
    tb = t.view(-1, 1, 1, 1)
    x0, eps = z - tb * vel, z + (1 - tb) * vel
    cfg = dict(derivative=derivative, dde_epsilon=1e-4, weight_eps=1e-2)  # eps 1e-2: the O(e^2) rest stays small
    out = TiM(tim_config(**cfg)).loss_from(g, x0, eps, t, r)
    assert _grad_norm(out.loss, g) < (1e-9 if derivative == "jvp" else 1e-4)
    wrong = GaussianNet(m=-0.3, s=0.5)
    out = TiM(tim_config(**cfg)).loss_from(wrong, x0, eps, t, r)
    assert _grad_norm(out.loss, wrong) > 1e-2


@pytest.mark.parametrize("derivative", ["dde", "jvp"])
def test_loss_by_hand_on_an_affine_network(derivative):
    """F = a x + b t + d r + e: dF/dt along (v, 0, 1) is a v + b (the central difference is exact), the target
    v - (t - r)(a v + b), per row mse + directional term, weighted by 1/sqrt(tan t - tan r + 1) / (loss + eps)."""
    net = Affine()
    x0, eps, t, r = _batch()
    order = torch.argsort((r == t).to(torch.int8), stable=True)  # r != t rows first
    x0, eps, t, r = x0[order], eps[order], t[order], r[order]
    tb, rb = t.view(-1, 1, 1, 1), r.view(-1, 1, 1, 1)
    z, v = (1 - tb) * x0 + tb * eps, eps - x0
    f = net(z, t, r)
    tgt = (v - (tb - rb) * (net.a * v + net.b)).detach()
    mse = (f - tgt).pow(2).flatten(1).mean(1)
    cos = ((f * tgt).sum(1) / (f.norm(dim=1).clamp(min=1e-8) * tgt.norm(dim=1).clamp(min=1e-8)))
    per_row = mse + (1 - cos).flatten(1).mean(1)
    tw = torch.where(r == t, torch.ones_like(t), 1 / (torch.tan(t) - torch.tan(r) + 1).sqrt())
    want = (tw * per_row / (per_row.detach() + 1e-5)).mean()
    got = TiM(tim_config(derivative=derivative, jvp_mode="single_pass")).loss_from(net, x0, eps, t, r).loss
    torch.testing.assert_close(got, want, rtol=1e-9, atol=0)
    torch.testing.assert_close(directional_loss(f, tgt), (1 - cos).flatten(1).mean(1))


def test_time_weights_and_shares():
    cfg = tim_config()
    t = torch.tensor([0.8, 0.5, 0.3])
    r = torch.tensor([0.2, 0.5, 0.0])
    want = torch.tensor([1 / math.sqrt(math.tan(0.8) - math.tan(0.2) + 1), 1.0, 1 / math.sqrt(math.tan(0.3) + 1)])
    torch.testing.assert_close(time_weight(cfg, t, r), want)
    torch.testing.assert_close(time_weight(tim_config(time_weight="reciprocal", time_weight_tangent=False), t, r),
                               torch.tensor([1 / 1.6, 1.0, 1 / 1.3]))
    torch.manual_seed(0)
    t, r = sample_t_r(cfg, 20)
    assert (r[:2] == 0).all() and (r[2:10] < t[2:10]).all() and (r[10:] == t[10:]).all()  # 10% r = 0, 50% r = t
    assert (r <= t).all()


def test_guided_target_uses_the_ema_network():
    """Enhanced target: v' = w v + kappa F_ema(z,t,t|c) + (1 - w - kappa) F_ema(z,t,t|null) inside [t_min, t_max]."""
    net, ema = Affine(), Affine()
    with torch.no_grad():
        ema.e.mul_(3.0)
    x0, eps, t, r = _batch()
    r = t.clone()  # r = t: the target is v' itself
    cond = torch.tensor([0, 1, 2, 0, 1, 2])
    null = torch.full_like(cond, 3)
    cfg = tim_config(guidance={"w": 1.0, "kappa": 0.75, "t_min": 0.3, "t_max": 0.8}, dir_loss=False)
    out = TiM(cfg).loss_from(net, x0, eps, t, r, cond, null, torch.zeros(6, dtype=torch.bool), ema_net=ema)
    tb = t.view(-1, 1, 1, 1)
    z, v = (1 - tb) * x0 + tb * eps, eps - x0
    guided = v + 0.75 * (ema.e[cond] - ema.e[null]).view(-1, 1, 1, 1)
    inside = ((t >= 0.3) & (t <= 0.8)).view(-1, 1, 1, 1)
    tgt = torch.where(inside, guided, v).detach()
    mse = (net(z, t, r, cond) - tgt).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(out.loss, (mse / (mse.detach() + 1e-5)).mean(), rtol=1e-9, atol=0)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="ratio_r_eq_t \\+ ratio_r_zero"):
        tim_config(ratio_r_eq_t=0.95, ratio_r_zero=0.1)
    with pytest.raises(ConfigError, match="method.derivative"):
        tim_config(derivative="fd")
