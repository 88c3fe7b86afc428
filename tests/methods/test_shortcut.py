"""Shortcut models (docs/methods.md, Shortcut): the closed-form Gaussian fixed point of the two-half-step target,
hand-computed targets on an affine network (guided bootstrap rows included), the batch split, power-of-two steps."""

from __future__ import annotations

import types

import pytest
import torch
from test_alphaflow import Affine, GaussianNet, _grad_norm

from selfe_cli.config import ConfigError
from selfe_cli.errors import UserError
from selfe_cli.methods.shortcut import Shortcut, sample_rows, shortcut_config


def _rows(n: int = 32):
    torch.manual_seed(0)
    cfg = shortcut_config(denoise_timesteps=8, bootstrap_every=2)
    t, r, level = sample_rows(cfg, n)
    z = torch.randn(n, 2, 2, 2, dtype=torch.float64)
    return cfg, t.double(), r.double(), level, z


def test_exact_average_velocity_is_a_fixed_point():
    """Two exact half steps compose to the exact step (the flow map is a semigroup), so the bootstrap target equals
    u(x, t, t - d); with eps - x0 the exact velocity over each flow-matching row's step, every target is u and the
    loss has zero gradient. A wrong mean is not stationary."""
    cfg, t, r, level, z = _rows()
    cfg = shortcut_config(denoise_timesteps=8, bootstrap_every=2, clip=None)
    g = GaussianNet(m=-0.6, s=0.5)
    with torch.no_grad():
        vel = g.average(z, t, r)
    tb = t.view(-1, 1, 1, 1)
    x0, eps = z - tb * vel, z + (1 - tb) * vel
    out = Shortcut(cfg).loss_from(g, x0, eps, t, r, level, ema_net=g)
    assert float(out.loss) < 1e-24 and _grad_norm(out.loss, g) < 1e-10
    wrong = GaussianNet(m=-0.2, s=0.5)
    out = Shortcut(cfg).loss_from(wrong, x0, eps, t, r, level, ema_net=wrong)
    assert _grad_norm(out.loss, wrong) > 1e-3


def test_targets_by_hand_on_an_affine_network():
    """u = a x + b t + d r + e[c]: u_a, x' = clip(x - δ u_a), u_b, clip((u_a + u_b)/2); guided half steps
    u_null + s (u_c - u_null) on the finest bootstrap rows; eps - x0 on the flow-matching rows; plain MSE."""
    net, ema = Affine(), Affine()
    with torch.no_grad():
        ema.a.fill_(0.5)
    cfg = shortcut_config(denoise_timesteps=4, bootstrap_every=2, bootstrap_cfg_scale=1.5, clip=1.0)
    t = torch.tensor([1.0, 0.5, 0.75, 0.25], dtype=torch.float64)
    level = torch.tensor([1, 0, 2, 2])  # d = 1/2 (finest bootstrap: guided), d = 1; then flow matching at 1/4
    r = t - torch.tensor([0.5, 1.0, 0.25, 0.25], dtype=torch.float64)
    cond, null = torch.tensor([0, 1, 2, 0]), torch.full((4,), 3)
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(4, 1, 2, 2, generator=gen, dtype=torch.float64)
    eps = torch.randn(4, 1, 2, 2, generator=gen, dtype=torch.float64)
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps

    def u(x, tt, rr, c, guided):
        out = ema.a * x + ema.b * tt + ema.d * rr + ema.e[c]
        if guided:
            out_null = ema.a * x + ema.b * tt + ema.d * rr + ema.e[3]
            out = out_null + 1.5 * (out - out_null)
        return out

    want = (eps - x0).clone()
    for i in range(2):
        d = float(t[i] - r[i])
        h = d / 2
        u_a = u(x_t[i], t[i], t[i] - h, cond[i], i == 0)
        x_mid = (x_t[i] - h * u_a).clamp(-1, 1)
        u_b = u(x_mid, t[i] - h, t[i] - d, cond[i], i == 0)
        want[i] = ((u_a + u_b) / 2).clamp(-1, 1)
    dropped = torch.tensor([True, True, False, True])  # bootstrap rows keep their label
    c_in = torch.tensor([0, 1, 2, 3])
    loss = (net(x_t, t, r, c_in) - want.detach()).pow(2).mean()
    got = Shortcut(cfg).loss_from(net, x0, eps, t, r, level, cond, null, dropped, ema_net=ema).loss
    torch.testing.assert_close(got, loss, rtol=1e-12, atol=0)


def test_batch_split_and_time_grids():
    torch.manual_seed(1)
    cfg = shortcut_config()  # T = 128, one row in 8 bootstraps
    t, r, level = sample_rows(cfg, 64)
    assert sorted(level[:7].tolist()) == [0, 1, 2, 3, 4, 5, 6] and (level[8:] == 7).all()
    _, _, few = sample_rows(cfg, 24)  # 3 bootstrap rows: 3 consecutive levels from a random one
    assert len(set(few[:3].tolist())) == 3 and (few[3:] == 7).all()
    d = t - r
    torch.testing.assert_close(d, 2.0 ** -level.float())
    assert ((1 - t) / d - ((1 - t) / d).round()).abs().max() < 1e-5  # t on the grid of its own step
    assert (r >= 0).all() and (t <= 1).all() and (t > 0).all()


def test_power_of_two_steps_are_enforced():
    from selfe_cli.recipes.loader import load_recipe
    from selfe_cli.sampling.generate import Generator

    with pytest.raises(ConfigError, match="sample.steps: expected a power of two up to 128"):
        load_recipe("quickstart_shortcut", ["sample.steps=3"], check_network=False)
    with pytest.raises(ConfigError, match="denoise_timesteps: expected a power of two"):
        shortcut_config(denoise_timesteps=100)
    gen = Generator(Affine(), types.SimpleNamespace(kind="none"), sampler_defaults=Shortcut().sampler_defaults(),
                    sample_cfg=types.SimpleNamespace(steps=4), in_channels=1, resolution=2)
    for bad in (3, 50, 256):
        with pytest.raises(UserError, match=f"--steps {bad}: expected a power of two up to 128"):
            gen.generate_latents(None, [0], steps=bad)
