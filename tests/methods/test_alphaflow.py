"""alpha-Flow (docs/methods.md, alpha-Flow): curriculum, closed-form Gaussian fixed points, hand-computed targets
on an affine network for each branch, guidance, clamp, sampling."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from selfe_cli.config import ConfigError
from selfe_cli.methods.alphaflow import AlphaFlow, alpha_at, alphaflow_config, discrete_target, sample_t_r
from selfe_cli.models.conditioning import split_guidance

# ----------------------------------------------------------------------------- closed-form Gaussian


class GaussianNet(nn.Module):
    """The exact average velocity of x0 ~ N(m, s^2 I) (tests/methods/test_meanflow.py, GaussianExact) with
    m and s as parameters: at their true values the loss must have zero gradient."""

    def __init__(self, m: float, s: float):
        super().__init__()
        self.m = nn.Parameter(torch.tensor(m, dtype=torch.float64))
        self.s = nn.Parameter(torch.tensor(s, dtype=torch.float64))
        self.output_head, self.v_sink = "u", None

    has_v_head = True  # the v-head is the instantaneous velocity (iMF tests)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return ((1 - t) ** 2 * self.s ** 2 + t ** 2).sqrt()

    def average(self, z: torch.Tensor, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        tb, rb = (x.view(-1, *[1] * (z.dim() - 1)) for x in (t, r))
        st, sr = self.sigma(tb), self.sigma(rb)
        xi = (z - (1 - tb) * self.m) / st
        slope = ((1 + self.s ** 2) * (tb + rb) - 2 * self.s ** 2) / (st + sr)
        return -self.m + xi * slope

    def forward(self, z: torch.Tensor, t: torch.Tensor, r: torch.Tensor, cond=None) -> torch.Tensor:
        split_guidance(cond)  # guidance scalars are accepted and ignored: the exact field is unguided
        v = self.average(z, t, t)
        if self.output_head == "v":
            return v
        if self.v_sink is not None:
            import torch.autograd.forward_ad as fwAD

            self.v_sink.append((torch.is_grad_enabled(), fwAD.unpack_dual(v).primal))
        return self.average(z, t, r)


def _rows(n: int = 48, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g, dtype=torch.float64) * 0.96 + 0.02
    r = t * torch.rand(n, generator=g, dtype=torch.float64)
    r[: n // 4] = t[: n // 4]  # some r = t rows, first as sample_t_r puts them
    z = torch.randn(n, 2, 3, 3, generator=g, dtype=torch.float64)
    return z, t, r


def _grad_norm(loss: torch.Tensor, net: nn.Module) -> float:
    grads = torch.autograd.grad(loss, list(net.parameters()))
    return max(float(g.abs().max()) for g in grads)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_exact_average_velocity_is_a_fixed_point(alpha):
    """With the velocity of each row taken along the ODE (the exact average velocity over the first alpha-part
    of [r, t], i.e. the marginal velocity at alpha = 0), every target equals u and the loss has zero gradient.

    (x0, eps) are chosen so that z = (1 - t) x0 + t eps and eps - x0 = that velocity. With the conditional
    velocity eps - x0 of random pairs this holds only at alpha = 0 in expectation: at alpha > 0 the official
    target steps along the conditional velocity, whose fixed point is not the average velocity.
    """
    g = GaussianNet(m=-0.6, s=0.5)
    z, t, r = _rows()
    dt = alpha * (t - r)
    with torch.no_grad():
        vel = g.average(z, t, t - dt) if alpha > 0 else g.average(z, t, t)
    tb = t.view(-1, 1, 1, 1)
    x0, eps = z - tb * vel, z + (1 - tb) * vel
    method = AlphaFlow(alphaflow_config(alpha=alpha, jvp_mode="single_pass"))
    out = method.loss_from(g, x0, eps, t, r, alpha)
    assert float(out.logs["mse"]) < 1e-20
    assert _grad_norm(out.loss, g) < 1e-8
    # the wrong time arguments in the discrete branch break it: the check can fail
    if 0 < alpha < 1:
        with torch.no_grad():
            u_next = g.average(z - dt.view(-1, 1, 1, 1) * vel, t, r)  # should be at t - dt
            wrong = discrete_target(vel, u_next, t, r, dt, None)
            assert (wrong - g.average(z, t, r))[t != r].abs().max() > 1e-3


# ----------------------------------------------------------------------------- affine network, by hand


class Affine(nn.Module):
    """u = a x + b t + d r + e[c] per element: every target can be written out by hand."""

    def __init__(self, classes: int = 3):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.a = nn.Parameter(torch.tensor(0.7, dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor(-1.3, dtype=torch.float64))
        self.d = nn.Parameter(torch.tensor(0.4, dtype=torch.float64))
        self.e = nn.Parameter(torch.randn(classes + 1, dtype=torch.float64, generator=g))
        self.classes = classes

    def forward(self, x, t, r, cond=None):
        tb, rb = t.view(-1, 1, 1, 1), r.view(-1, 1, 1, 1)
        out = self.a * x + self.b * tb + self.d * rb
        if cond is not None:
            out = out + self.e[cond].view(-1, 1, 1, 1)
        return out


def _batch(n: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 1, 2, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(n, 1, 2, 2, generator=g, dtype=torch.float64)
    t = torch.tensor([0.9, 0.7, 0.5, 0.8, 0.3, 0.95], dtype=torch.float64)[:n]
    r = torch.tensor([0.9, 0.2, 0.1, 0.5, 0.3, 0.4], dtype=torch.float64)[:n]
    return x0, eps, t, r


def _weighted(delta: torch.Tensor, row_w: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    mse = delta.pow(2).flatten(1).mean(1)
    return (row_w * mse / (mse.detach() + eps)).mean()


@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_discrete_branch_by_hand(alpha):
    net = Affine()
    x0, eps, t, r = _batch()
    z = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    v = eps - x0
    u = net(z, t, r)
    tgt = v.clone()
    for i in range(len(t)):
        if r[i] == t[i]:
            continue
        dt = alpha * (t[i] - r[i])
        s = t[i] - dt
        z_s = z[i] - dt * v[i]
        u_next = net.a * z_s + net.b * s + net.d * r[i]
        tgt[i] = (dt * v[i] + (s - r[i]) * u_next) / (t[i] - r[i])
    discrete = r != t
    row_w = torch.where(discrete, torch.full_like(t, alpha), torch.ones_like(t))
    want = _weighted(u - tgt.detach(), row_w)
    got = AlphaFlow(alphaflow_config(alpha=alpha)).loss_from(net, x0, eps, t, r, alpha).loss
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_jvp_branch_by_hand():
    """alpha = 0: u_tgt = v - (t - r) du/dt with du/dt = a v + b (tangent (v, 0, 1))."""
    net = Affine()
    x0, eps, t, r = _batch()
    tb = t.view(-1, 1, 1, 1)
    z, v = (1 - tb) * x0 + tb * eps, eps - x0
    u = net(z, t, r)
    tgt = v - (tb - r.view(-1, 1, 1, 1)) * (net.a * v + net.b)
    want = _weighted(u - tgt.detach(), torch.ones(len(t), dtype=torch.float64))
    for mode in ("single_pass", "two_pass"):
        got = AlphaFlow(alphaflow_config(alpha=0.0, jvp_mode=mode)).loss_from(net, x0, eps, t, r, 0.0).loss
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_clamp_applies_to_discrete_rows_only():
    net = Affine()
    with torch.no_grad():
        net.b.fill_(-30.0)  # large targets
    x0, eps, t, r = _batch()
    method = AlphaFlow(alphaflow_config(alpha=0.5, clamp_utgt=0.5))
    z = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    v = eps - x0
    _, tgt, discrete = method.u_and_target(net, z, t, r, 0.5, v, None)
    assert discrete.tolist() == (r != t).tolist()
    assert tgt[discrete].abs().max() <= 0.5
    torch.testing.assert_close(tgt[~discrete], v[~discrete])  # r = t rows: v, unclipped
    assert v[~discrete].abs().max() > 0.5
    unclamped = AlphaFlow(alphaflow_config(alpha=0.5)).u_and_target(net, z, t, r, 0.5, v, None)[1]
    torch.testing.assert_close(tgt[discrete], unclamped[discrete].clamp(-0.5, 0.5))


def test_guided_velocity_by_hand_on_the_open_interval():
    """v~ = w v + kappa u(z,t,t|c_in) + (1 - w - kappa) u(z,t,t|null) for t_min < t < t_max, c_in after dropout."""
    net = Affine()
    x0, eps, t, r = _batch()
    tb = t.view(-1, 1, 1, 1)
    z, v = (1 - tb) * x0 + tb * eps, eps - x0
    c = torch.tensor([0, 1, 2, 0, 1, 2])
    null = torch.full((6,), 3)
    dropped = torch.tensor([False, True, False, False, False, False])
    c_in = torch.where(dropped, null, c)
    w, kappa, t_min, t_max = 0.2, 0.5, 0.3, 0.9  # t = 0.3 and 0.9 are on the (open) boundary: unguided
    method = AlphaFlow(alphaflow_config(alpha=0.0, guidance={"w": w, "kappa": kappa, "t_min": t_min, "t_max": t_max}))
    got = method.guided_tangent(net, z, t, v, c_in, null)
    want = v.clone()
    for i in range(6):
        if t_min < t[i] < t_max:
            u_c = net(z[i:i + 1], t[i:i + 1], t[i:i + 1], c_in[i:i + 1])
            u_n = net(z[i:i + 1], t[i:i + 1], t[i:i + 1], null[i:i + 1])
            want[i] = w * v[i] + kappa * u_c[0] + (1 - w - kappa) * u_n[0]
    torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-14)
    assert not torch.equal(got[1], v[1])  # a dropped row inside the interval is guided (official)
    assert torch.equal(got[0], v[0]) and torch.equal(got[4], v[4])  # t = t_max, t = t_min: outside


# ----------------------------------------------------------------------------- schedule and sampling


def test_alpha_curriculum_and_snapping():
    cfg = alphaflow_config(alpha_start=100, alpha_end=300)
    assert alpha_at(cfg, 0, 1000) == 1.0 and alpha_at(cfg, 100, 1000) == 1.0  # sigmoid(-12.5) snaps to 1
    assert alpha_at(cfg, 200, 1000) == pytest.approx(0.5)
    assert alpha_at(cfg, 220, 1000) == pytest.approx(1 - 1 / (1 + math.exp(-25 * 0.1)))
    assert alpha_at(cfg, 250, 1000) == 0.0  # 0.0019 < 0.005: snapped to the JVP branch
    assert alpha_at(cfg, 300, 1000) == 0.0 and alpha_at(cfg, 5000, 1000) == 0.0
    # fractions of the run when the steps are not given (XL/2-cfg: 600k -> 1M of 1.2M)
    frac = alphaflow_config()
    assert alpha_at(frac, 599_000, 1_200_000) == 1.0 and alpha_at(frac, 800_000, 1_200_000) == pytest.approx(0.5)
    assert alpha_at(alphaflow_config(alpha=0.004), 0, 10) == 0.0
    assert alpha_at(alphaflow_config(alpha=0.996), 0, 10) == 1.0
    assert alpha_at(alphaflow_config(alpha=0.3), 0, 10) == 0.3


def test_sample_t_r_puts_floor_ratio_fm_rows_first():
    torch.manual_seed(0)
    t, r = sample_t_r(alphaflow_config(ratio_fm=0.25), 10)
    assert torch.equal(t[:2], r[:2]) and bool((r[2:] < t[2:]).all())


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="alpha_snap"):
        alphaflow_config(alpha_snap=0.7)
    with pytest.raises(ConfigError, match="alpha_end"):
        alphaflow_config(alpha_start=10, alpha_end=5)


def test_consistency_sampling_renoises_the_x0_prediction():
    """r_mode zero + eta 1: x' = (1 - t') (x - t u(x, t, 0)) + t' z, z the step's fresh noise."""
    from selfe_cli.sampling.sampler import sample

    net = Affine()
    noise = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    zs = [torch.randn(3, 1, 2, 2, dtype=torch.float64) for _ in range(2)]
    with torch.no_grad():
        got = sample(net, noise, steps=2, r_mode="zero", eta=1.0, step_noise=lambda k: zs[k],
                     grid=torch.tensor([1.0, 0.55, 0.0], dtype=torch.float64))
        grid = [1.0, 0.55, 0.0]  # the official XL/2-cfg grid (recipes: shift 11/9 makes it from linspace)
        x = noise
        for k in range(2):
            t = torch.full((3,), grid[k], dtype=torch.float64)
            x0 = x - grid[k] * net(x, t, torch.zeros_like(t))
            x = (1 - grid[k + 1]) * x0 + grid[k + 1] * zs[k]
    torch.testing.assert_close(got, x, rtol=1e-12, atol=1e-12)
    from selfe_cli.sampling.sampler import time_grid

    torch.testing.assert_close(time_grid(2, shift=11 / 9, dtype=torch.float64)[1].item(), 0.55)


def test_sampling_cfg_is_refused_on_trained_in_guidance_but_not_on_imf():
    """alpha-Flow's guidance is trained into the target (CFG at sampling would guide twice); iMF's --cfg is the
    network's omega input."""
    from selfe_cli.recipes.loader import guidance_trained_in, load_recipe

    assert guidance_trained_in(load_recipe("quickstart_alphaflow", check_network=False).method.config)
    assert not guidance_trained_in(load_recipe("quickstart_imf", check_network=False).method.config)


def test_alpha_positive_without_discrete_rows_is_flow_matching():
    """alpha > 0 on a batch of r = t rows only: no extra forward, the target is v~ (no JVP either)."""
    net = Affine()
    x0, eps, t, _ = _batch()
    calls = []
    net.register_forward_hook(lambda *a: calls.append(1))
    out = AlphaFlow(alphaflow_config(alpha=0.5)).loss_from(net, x0, eps, t, t.clone(), 0.5)
    assert len(calls) == 1 and float(out.logs["frac_discrete"]) == 0.0
