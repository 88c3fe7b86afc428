"""IMM (docs/methods.md, IMM): the Laplace-kernel MMD estimator against its closed form on Gaussians, the exact flow
map as the stationary point, the loss by hand on an affine network, the times and the weight."""

from __future__ import annotations

import math

import pytest
import torch
from test_alphaflow import Affine, GaussianNet

from selfe_cli.errors import UserError
from selfe_cli.methods.imm import IMM, eta_of, imm_config, laplace_mmd2, sample_times, time_weight


def _laplace_mean(mu: float, var: float, h: float) -> float:
    """E exp(-|Z| / h) for Z ~ N(mu, var), in closed form."""
    sd = math.sqrt(var)
    lift = math.exp(var / (2 * h * h))
    return 0.5 * lift * (math.exp(-mu / h) * math.erfc((var / h - mu) / (sd * math.sqrt(2)))
                         + math.exp(mu / h) * math.erfc((var / h + mu) / (sd * math.sqrt(2))))


def test_mmd_estimator_matches_its_closed_form_on_gaussians():
    """1-D N(m1, s1^2) vs N(m2, s2^2): E k(X, X') + E k(Y, Y') - 2 E k(X, Y), plus the V-statistic's diagonal
    (1/M of the pairs have k = 1)."""
    gen = torch.Generator().manual_seed(0)
    m1, s1, m2, s2, h, n = 0.3, 0.8, -0.2, 0.5, 0.7, 2500
    a = (m1 + s1 * torch.randn(1, n, 1, generator=gen, dtype=torch.float64))
    b = (m2 + s2 * torch.randn(1, n, 1, generator=gen, dtype=torch.float64))
    kxx, kyy = _laplace_mean(0, 2 * s1 ** 2, h), _laplace_mean(0, 2 * s2 ** 2, h)
    kxy = _laplace_mean(m1 - m2, s1 ** 2 + s2 ** 2, h)
    want = kxx + kyy - 2 * kxy + (2 - kxx - kyy) / n
    got = float(laplace_mmd2(a, b, torch.tensor([h], dtype=torch.float64)))
    assert got == pytest.approx(want, abs=0.01) and want > 0.05
    same = float(laplace_mmd2(a, a, torch.tensor([h], dtype=torch.float64)))
    assert abs(same) < 1e-12


def test_exact_flow_map_is_the_stationary_point():
    """The exact flow map pushes p_t and p_r both to p_s: with many particles in one group the gradient is small
    (sampling noise only) and much smaller than at a wrong mean."""
    gen = torch.Generator().manual_seed(1)
    m = 1500
    x0 = -0.6 + 0.5 * torch.randn(m, 1, 1, 1, generator=gen, dtype=torch.float64)
    eps = torch.randn(m, 1, 1, 1, generator=gen, dtype=torch.float64)
    s, r, t = (torch.tensor([v], dtype=torch.float64) for v in (0.2, 0.6, 0.8))
    cfg = imm_config(group_size=m)

    def grad(net):
        loss = IMM(cfg).loss_from(net, x0, eps, s, r, t).loss
        return max(float(g.abs().max()) for g in torch.autograd.grad(loss, list(net.parameters())))

    exact, wrong = grad(GaussianNet(m=-0.6, s=0.5)), grad(GaussianNet(m=-0.3, s=0.5))
    assert wrong > 10 * exact


def test_loss_by_hand_on_an_affine_network():
    net = Affine()
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randn(4, 1, 2, 2, generator=gen, dtype=torch.float64)
    eps = torch.randn(4, 1, 2, 2, generator=gen, dtype=torch.float64)
    s = torch.tensor([0.1, 0.3], dtype=torch.float64)
    r = torch.tensor([0.5, 0.6], dtype=torch.float64)
    t = torch.tensor([0.55, 0.7], dtype=torch.float64)
    cfg = imm_config(group_size=2)
    total = 0.0
    for g in range(2):
        def f(x, tt, ss):
            return x - (tt - ss) * (net.a * x + net.b * tt + net.d * ss)

        rows = slice(2 * g, 2 * g + 2)
        y_t = f((1 - t[g]) * x0[rows] + t[g] * eps[rows], t[g], s[g]).flatten(1)
        y_r = f((1 - r[g]) * x0[rows] + r[g] * eps[rows], r[g], s[g]).detach().flatten(1)
        h = 4 * (t[g] - s[g]) * 0.5

        def k(u, v, h=h):
            return torch.exp(-(u - v).norm() / h)

        mmd = sum(k(y_t[i], y_t[j]) + k(y_r[i], y_r[j]) - 2 * k(y_t[i], y_r[j]) for i in range(2) for j in range(2)) / 4
        tt = t[g]
        lam = 2 * torch.log((1 - tt) / tt)
        w = 0.5 * torch.sigmoid(4 - lam) * 2 / (tt * (1 - tt)) * (1 - tt) ** 2 / ((1 - tt) ** 2 + tt ** 2)
        total = total + w * mmd
    got = IMM(cfg).loss_from(net, x0, eps, s, r, t).loss
    torch.testing.assert_close(got, total / 2, rtol=1e-10, atol=0)
    torch.testing.assert_close(time_weight(cfg, t[:1]), (0.5 * torch.sigmoid(4 - 2 * torch.log(0.45 / t[:1]))
                                                         * 2 / (0.55 * 0.45) * 0.45 ** 2 / (0.45 ** 2 + 0.55 ** 2)))


def test_times_and_group_errors():
    cfg = imm_config()
    torch.manual_seed(0)
    s, r, t = sample_times(cfg, 256)
    assert (s <= r).all() and (r <= t).all() and (t < 0.994).all()
    gap = eta_of(t) - eta_of(r)
    want = eta_of(torch.tensor(0.994, dtype=torch.float64)) / 2 ** 12
    assert torch.allclose(gap[r > s], torch.full_like(gap[r > s], float(want)), rtol=1e-6)
    with pytest.raises(UserError, match="method.group_size: the micro-batch \\(6 samples"):
        IMM(cfg).loss(Affine(), torch.zeros(6, 1, 2, 2), None, null_cond=None, step=0, total_steps=1)
