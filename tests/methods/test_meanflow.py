"""MeanFlow (MF (6), Algorithms 1-2; docs/methods.md): closed-form identity, JVP vs finite differences, loss
algebra, guidance, sampling."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from selfe_cli.config import ConfigError
from selfe_cli.methods.jvp import dual_jvp
from selfe_cli.methods.meanflow import (
    MeanFlow,
    MeanFlowConfig,
    adaptive_weight,
    count_r_neq_t,
    guidance_rows,
    guided_velocity,
    meanflow_config,
    sample_t_r,
)
from selfe_cli.methods.paths import TimeSamplerConfig
from selfe_cli.methods.row_tangents import row_jvp
from selfe_cli.models.registry import build_model

# ----------------------------------------------------------------------------- small real networks


def engine_jvp(fn, primals, tangents):
    """The engine's row tangents on every row (``dual_jvp`` is PyTorch's own forward mode, the reference)."""
    out, tangent, _ = row_jvp(fn, primals, tangents)
    return out, tangent


def _roughen(net: nn.Module, scale: float = 0.05) -> nn.Module:
    """Zero / small output inits make Jacobians vanish: perturb every weight so they are O(1)."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn_like(p))
    return net


def tiny_unet(dropout: float = 0.0, skip_sigma_data: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    return _roughen(build_model("unet", sample_size=8, in_channels=2, model_channels=8, channel_mult=(1, 2),
                                num_blocks=1, attn_resolutions=(4,), num_heads=2, dropout=dropout,
                                time_freq_dim=16, skip_sigma_data=skip_sigma_data))


def tiny_dit(num_classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return _roughen(build_model("dit", sample_size=8, in_channels=2, patch_size=2, hidden_size=32, depth=2,
                                num_heads=2, time_freq_dim=16, condition="class", num_classes=num_classes))


# ----------------------------------------------------------------------------- Gaussian closed form


class GaussianExact(nn.Module):
    """Exact average velocity for x0 ~ N(m, s^2 I), eps ~ N(0, I) on the path x_t = (1 - t) x0 + t eps.

    The probability-flow ODE of a Gaussian moves z_tau = (1 - tau) m + sigma_tau xi with
    xi = (z_t - (1 - t) m) / sigma_t fixed, sigma_tau^2 = (1 - tau)^2 s^2 + tau^2, so
    u(z, r, t) = (z_t - z_r) / (t - r) = -m + xi (sigma_t - sigma_r) / (t - r), and
    (sigma_t - sigma_r)/(t - r) = ((1 + s^2)(t + r) - 2 s^2) / (sigma_t + sigma_r) (smooth at r = t).
    """

    def __init__(self, m: float, s: float):
        super().__init__()
        self.m, self.s = m, s

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return ((1 - t) ** 2 * self.s ** 2 + t ** 2).sqrt()

    def velocity(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Marginal v(z, t) = E[eps - x0 | x_t = z]."""
        tb = t.view(-1, *[1] * (z.dim() - 1))
        var = (1 - tb) ** 2 * self.s ** 2 + tb ** 2
        centred = z - (1 - tb) * self.m
        return tb / var * centred - (self.m + (1 - tb) * self.s ** 2 / var * centred)

    def forward(self, z: torch.Tensor, t: torch.Tensor, r: torch.Tensor, cond=None) -> torch.Tensor:
        tb, rb = (x.view(-1, *[1] * (z.dim() - 1)) for x in (t, r))
        st, sr = self.sigma(tb), self.sigma(rb)
        xi = (z - (1 - tb) * self.m) / st
        slope = ((1 + self.s ** 2) * (tb + rb) - 2 * self.s ** 2) / (st + sr)
        return -self.m + xi * slope


def _rk4(f, z: torch.Tensor, t: float, r: float, steps: int = 400) -> torch.Tensor:
    h = (r - t) / steps
    tau = t
    for _ in range(steps):
        tt = torch.full((z.shape[0],), tau, dtype=z.dtype)
        k1 = f(z, tt)
        k2 = f(z + h / 2 * k1, tt + h / 2)
        k3 = f(z + h / 2 * k2, tt + h / 2)
        k4 = f(z + h * k3, tt + h)
        z = z + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        tau += h
    return z


def test_gaussian_closed_form_is_the_ode_average():
    """The closed-form u equals (z_t - z_r)/(t - r) along an RK4 solution of the marginal ODE."""
    g = GaussianExact(m=1.5, s=0.4)
    z = torch.tensor([[-1.0, 0.3, 2.2]], dtype=torch.float64).T  # (3, 1)
    t, r = 0.9, 0.2
    z_r = _rk4(g.velocity, z, t, r)
    numeric = (z - z_r) / (t - r)
    exact = g(z, torch.full((3,), t, dtype=torch.float64), torch.full((3,), r, dtype=torch.float64))
    torch.testing.assert_close(exact, numeric, atol=1e-9, rtol=0)
    tt = torch.full((3,), t, dtype=torch.float64)
    torch.testing.assert_close(g(z, tt, tt), g.velocity(z, tt), atol=1e-12, rtol=0)  # u(z, t, t) = v


@pytest.mark.parametrize("jvp_mode", ["single_pass", "two_pass"])
@pytest.mark.parametrize("r_eq_t", ["none", "scattered"])
def test_meanflow_identity_holds_for_the_exact_average_velocity(jvp_mode, r_eq_t):
    """u_tgt = v - (t - r) du/dt computed by the method's JVP path equals the exact u (float64).

    ``scattered``: r = t rows in between (not the leading-rows order of sample_t_r): sorted and restored."""
    torch.manual_seed(1)
    g = GaussianExact(m=-0.7, s=0.5)
    n = 64
    t = torch.rand(n, dtype=torch.float64) * 0.98 + 0.01
    r = t * torch.rand(n, dtype=torch.float64)
    if r_eq_t == "scattered":
        r[::3] = t[::3]
    z = torch.randn(n, 2, 3, 3, dtype=torch.float64)
    v = g.velocity(z, t)
    method = MeanFlow(MeanFlowConfig(jvp_mode=jvp_mode))
    u, u_tgt = method.u_and_target(g, z, t, r, None, v)
    torch.testing.assert_close(u_tgt, u, atol=1e-5, rtol=0)
    assert (u_tgt - u).abs().max() < 1e-10
    # The wrong tangent (v, 0, 0) (no d/dt term; Table 1b) breaks the identity: the check can fail.
    _, du_z_only = engine_jvp(g, (z, t, r, None), (v, None, None, None))
    wrong = v - (t - r).view(-1, 1, 1, 1) * du_z_only
    assert (wrong - u).abs().max() > 1e-2


# ----------------------------------------------------------------------------- JVP vs finite differences


def _central_difference(net, z, t, r, cond, dz, dt, h=1e-5):
    """Five-point stencil, error O(h^4): the time embedding's 1000 t scale has large derivatives."""
    def f(k):
        with torch.no_grad():
            return net(z + k * h * dz, t + k * h * dt, r, cond)
    return (8 * (f(1) - f(-1)) - (f(2) - f(-2))) / (12 * h)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("kind", ["unet", "unet-input-skip", "dit"])
def test_jvp_equals_central_differences(kind, fast):
    nets = {"unet": tiny_unet, "unet-input-skip": lambda: tiny_unet(skip_sigma_data=0.5), "dit": tiny_dit}
    net = nets[kind]().double()
    torch.manual_seed(2)
    n = 3
    z = torch.randn(n, 2, 8, 8, dtype=torch.float64)
    t = torch.tensor([0.9, 0.5, 0.3], dtype=torch.float64)
    r = torch.tensor([0.1, 0.5, 0.05], dtype=torch.float64)
    cond = torch.tensor([0, 2, 3]) if kind == "dit" else None  # 3 = the null label
    v = torch.randn_like(z)
    dt = torch.ones_like(t)
    u, du = (engine_jvp if fast else dual_jvp)(net, (z, t, r, cond), (v, dt, None, None))
    fd = _central_difference(net, z, t, r, cond, v, dt)
    torch.testing.assert_close(u, net(z, t, r, cond), atol=1e-12, rtol=0)
    assert du.abs().max() > 1e-3  # a real, non-trivial derivative
    torch.testing.assert_close(du, fd, atol=1e-7, rtol=1e-6)
    if fast:  # the intercepted conv / linear tangents equal PyTorch's own forward-mode rules
        _, du_ref = dual_jvp(net, (z, t, r, cond), (v, dt, None, None))
        torch.testing.assert_close(du, du_ref, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("affine", [True, False])
def test_norm_tangent_rules_equal_pytorch_forward_ad(layout, affine):
    """The closed-form group/layer-norm tangents (from the primal's statistics) equal PyTorch's own rules."""
    torch.manual_seed(3)
    x = torch.randn(3, 8, 5, 4, dtype=torch.float64) * 2 + 0.5
    dx = torch.randn_like(x)
    if layout == "channels_last":
        x, dx = (a.contiguous(memory_format=torch.channels_last) for a in (x, dx))
    gamma = torch.randn(8, dtype=torch.float64) if affine else None
    beta = torch.randn(8, dtype=torch.float64) if affine else None
    gamma_ln = torch.randn(4, dtype=torch.float64) if affine else None
    cases = [lambda y: torch.nn.functional.group_norm(y, 4, gamma, beta, 1e-5),
             lambda y: torch.nn.functional.layer_norm(y, (4,), gamma_ln, None, 1e-6),
             lambda y: torch.nn.functional.layer_norm(y, (5, 4), None, None, 1e-6)]
    for fn in cases:
        out, tan = engine_jvp(fn, (x,), (dx,))
        ref_out, ref_tan = dual_jvp(fn, (x,), (dx,))
        torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=0)
        torch.testing.assert_close(tan, ref_tan, atol=1e-11, rtol=1e-10)
        assert tan.abs().max() > 1e-2


def test_fast_tangents_keep_the_primal_graph():
    """The primal from the dual pass (with TangentOps) back-propagates exactly like a plain forward."""
    net = tiny_unet().double()
    z = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    t = torch.tensor([0.7, 0.4], dtype=torch.float64)
    r = torch.tensor([0.2, 0.4], dtype=torch.float64)
    u, _ = engine_jvp(net, (z, t, r, None), (torch.randn_like(z), torch.ones_like(t), None, None))
    (u ** 2).sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    (net(z, t, r) ** 2).sum().backward()
    for got, want in zip(grads, (p.grad for p in net.parameters()), strict=True):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


def test_jvp_runs_in_float32_inside_bf16_autocast():
    net = tiny_unet()
    z = torch.randn(4, 2, 8, 8)
    t, r = torch.full((4,), 0.8), torch.full((4,), 0.3)
    v = torch.randn_like(z)
    method = MeanFlow(MeanFlowConfig(jvp_dtype="float32"))
    u_ref, tgt_ref = method.u_and_target(net, z, t, r, None, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        u, tgt = method.u_and_target(net, z, t, r, None, v)
    assert u.dtype == torch.float32
    torch.testing.assert_close(tgt, tgt_ref, atol=1e-6, rtol=1e-6)
    bf16 = MeanFlow(MeanFlowConfig(jvp_dtype="bfloat16"))
    _, tgt_bf16 = bf16.u_and_target(net, z, t, r, None, v)
    err = (tgt_bf16 - tgt_ref).abs().max().item()
    assert 0 < err < 0.1 * tgt_ref.abs().max().item()  # really ran in bf16, and close


# ----------------------------------------------------------------------------- loss algebra


class Affine(nn.Module):
    """u = a z + b t + c (t - r) + e[label]: every derivative known by hand."""

    def __init__(self, num_classes: int = 0):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.5, dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor(-0.3, dtype=torch.float64))
        self.c = nn.Parameter(torch.tensor(0.8, dtype=torch.float64))
        self.e = nn.Parameter(torch.linspace(-1, 1, num_classes + 1, dtype=torch.float64)) if num_classes else None

    def forward(self, z, t, r, cond=None):
        tb, rb = t.view(-1, 1, 1, 1), r.view(-1, 1, 1, 1)
        out = self.a * z + self.b * tb + self.c * (tb - rb)
        if self.e is not None and cond is not None:
            out = out + self.e[cond].view(-1, 1, 1, 1)
        return out


def _batch(n=6, shape=(2, 3, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    eps = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    t = torch.rand(n, generator=g, dtype=torch.float64) * 0.9 + 0.05
    r = t * torch.rand(n, generator=g, dtype=torch.float64)
    return x0, eps, t, r


def test_loss_matches_hand_computation_on_affine_net():
    """du/dt = a v + b + c for the affine net; loss = mean_i sg(w_i) ||u_i - u_tgt_i||^2 (sum over elements)."""
    net = Affine()
    x0, eps, t, r = _batch()
    method = MeanFlow(MeanFlowConfig(weight_p=0.75, weight_c=0.01))
    out = method.loss_from(net, x0, eps, t, r, None)
    tb, rb = t.view(-1, 1, 1, 1), r.view(-1, 1, 1, 1)
    z, v = (1 - tb) * x0 + tb * eps, eps - x0
    a, b, c = 0.5, -0.3, 0.8
    u = a * z + b * tb + c * (tb - rb)
    u_tgt = v - (tb - rb) * (a * v + b + c)
    sq = ((u - u_tgt) ** 2).flatten(1).sum(1)
    expected = (sq / (sq + 0.01) ** 0.75).mean()
    torch.testing.assert_close(out.loss, expected, atol=1e-12, rtol=1e-12)
    # gradient: sg(w) * d||delta||^2, the target is a constant
    out.loss.backward()
    w = (sq + 0.01) ** -0.75
    d_sq_da = (2 * (u - u_tgt) * z).flatten(1).sum(1)
    torch.testing.assert_close(net.a.grad, (w * d_sq_da).mean(), atol=1e-12, rtol=1e-10)


def test_r_equal_t_is_flow_matching():
    """With r = t for every row and p = 0: loss = mean_i sum_j (net(x_t,t,t) - v)^2 = D x FM's element-mean MSE."""
    net = tiny_unet().double()
    x0, eps, t, _ = _batch(n=4, shape=(2, 8, 8))
    method = MeanFlow(MeanFlowConfig(weight_p=0.0, ratio_r_neq_t=0.0))
    out = method.loss_from(net, x0, eps, t, t, None)
    tb = t.view(-1, 1, 1, 1)
    with torch.no_grad():
        fm_mse = ((net((1 - tb) * x0 + tb * eps, t, t) - (eps - x0)) ** 2).mean()
    d = x0[0].numel()
    torch.testing.assert_close(out.loss.detach(), d * fm_mse, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(out.logs["mse"], fm_mse, atol=1e-12, rtol=1e-10)
    assert out.logs["frac_r_neq_t"] == 0


def test_loss_draws_r_equal_t_when_ratio_is_zero():
    net = tiny_unet()
    torch.manual_seed(0)
    out = MeanFlow(MeanFlowConfig(ratio_r_neq_t=0.0)).loss(net, torch.randn(8, 2, 8, 8), None, null_cond=None,
                                                            step=0, total_steps=1)
    assert out.logs["frac_r_neq_t"].item() == 0.0
    out = MeanFlow(MeanFlowConfig(ratio_r_neq_t=0.75)).loss(net, torch.randn(8, 2, 8, 8), None, null_cond=None,
                                                             step=0, total_steps=1)
    assert out.logs["frac_r_neq_t"].item() == 0.75
    assert torch.isfinite(out.loss) and set(out.logs) >= {"loss", "mse", "mse_r_neq_t", "adaptive_weight"}


@pytest.mark.parametrize(("sq", "p", "c", "expected"), [
    (3.0, 1.0, 1e-3, 1 / 3.001),
    (3.0, 0.75, 0.01, 3.01 ** -0.75),
    (0.0, 0.5, 0.01, 10.0),
    (12.5, 0.0, 1e-3, 1.0),
    (99.99, 1.0, 0.01, 0.01),
])
def test_adaptive_weight_values(sq, p, c, expected):
    got = adaptive_weight(torch.tensor([sq], dtype=torch.float64), p, c)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    assert not adaptive_weight(torch.tensor([sq], requires_grad=True), p, c).requires_grad


# ----------------------------------------------------------------------------- guidance


def test_guided_velocity_term_by_term():
    v, uc, un = torch.tensor([1.0]), torch.tensor([10.0]), torch.tensor([100.0])
    assert guided_velocity(v, uc, un, 1.0, 0.0).item() == 1.0  # w = 1, kappa = 0: plain v
    assert guided_velocity(v, uc, un, 0.2, 0.92).item() == pytest.approx(0.2 * 1 + 0.92 * 10 + (1 - 0.2 - 0.92) * 100)
    assert guided_velocity(v, uc, un, 1.0, 0.5).item() == pytest.approx(1 + 5 - 50)


def test_guidance_rows_respect_interval_and_dropped_labels():
    from selfe_cli.methods.meanflow import MeanFlowGuidanceConfig

    cfg = MeanFlowGuidanceConfig(w=0.2, kappa=0.92, t_min=0.0, t_max=0.75)
    t = torch.tensor([0.1, 0.75, 0.76, 0.5, 0.0])
    dropped = torch.tensor([False, False, False, True, False])
    assert guidance_rows(t, dropped, cfg).tolist() == [True, True, False, False, True]


def test_guided_target_in_the_loss():
    """Guided rows: tangent and target use v~ (with the net's own u(z,t,t|c) and u(z,t,t|null)); others v."""
    ncls = 3
    net = Affine(num_classes=ncls)
    x0, eps, t, r = _batch(n=6)
    t = torch.tensor([0.1, 0.5, 0.7, 0.9, 0.3, 0.6], dtype=torch.float64)
    r = t * 0.5
    cond = torch.tensor([0, 1, 2, 0, 1, 2])
    null = torch.full((6,), ncls)
    dropped = torch.tensor([False, False, False, False, True, False])
    w, kappa = 0.2, 0.92
    cfg = meanflow_config(weight_p=0.0, guidance={"w": w, "kappa": kappa, "t_min": 0.0, "t_max": 0.75})
    method = MeanFlow(cfg)
    tb, rb = t.view(-1, 1, 1, 1), r.view(-1, 1, 1, 1)
    z, v = (1 - tb) * x0 + tb * eps, eps - x0
    a, b, c = 0.5, -0.3, 0.8
    e = torch.linspace(-1, 1, ncls + 1, dtype=torch.float64)
    u_cond = a * z + b * tb + e[cond].view(-1, 1, 1, 1)  # u(z, t, t | c): the (t - r) term vanishes
    u_null = a * z + b * tb + e[ncls]
    guided = (t <= 0.75) & ~dropped
    v_tilde = torch.where(guided.view(-1, 1, 1, 1), w * v + kappa * u_cond + (1 - w - kappa) * u_null, v)
    got = method.guided_tangent(net, z, t, v, cond, null, dropped)
    torch.testing.assert_close(got, v_tilde, atol=1e-12, rtol=0)
    assert torch.equal(got[3], v[3]) and torch.equal(got[4], v[4])  # t > t_max; dropped label
    assert not torch.allclose(got[0], v[0])
    # in the loss: the net sees the null label on dropped rows; du/dt = a v~ + b + c
    cond_in = torch.where(dropped, null, cond)
    u = a * z + b * tb + c * (tb - rb) + e[cond_in].view(-1, 1, 1, 1)
    u_tgt = v_tilde - (tb - rb) * (a * v_tilde + b + c)
    expected = ((u - u_tgt) ** 2).flatten(1).sum(1).mean()
    out = method.loss_from(net, x0, eps, t, r, cond, null, dropped)
    torch.testing.assert_close(out.loss, expected, atol=1e-12, rtol=1e-12)


# ----------------------------------------------------------------------------- time sampling


def test_sample_t_r_fraction_and_order():
    cfg = MeanFlowConfig(ratio_r_neq_t=0.75)
    t, r = sample_t_r(cfg, 1000)
    assert (r <= t).all() and ((t >= 0) & (t <= 1)).all()
    assert (r != t).sum().item() == 750
    assert (r[750:] == t[750:]).all()


def test_count_r_neq_t_is_unbiased():
    torch.manual_seed(0)
    counts = [count_r_neq_t(6, 0.25) for _ in range(4000)]  # 1.5 on average
    assert set(counts) == {1, 2}
    assert sum(counts) / len(counts) == pytest.approx(1.5, abs=0.05)
    assert count_r_neq_t(8, 0.25) == 2 and count_r_neq_t(8, 0.0) == 0 and count_r_neq_t(8, 1.0) == 8


@pytest.mark.parametrize(("before", "expected_logit_mean"), [(False, 1 / math.sqrt(math.pi)), (True, 0.0)])
def test_mask_before_minmax(before, expected_logit_mean):
    """r = t rows: t = max of two draws (paper) vs the first draw's distribution (improved CIFAR)."""
    torch.manual_seed(0)
    ln = TimeSamplerConfig(kind="logit_normal", mean=0.0, std=1.0)
    cfg = MeanFlowConfig(time_sampler_t=ln, time_sampler_r=ln, ratio_r_neq_t=0.5, mask_before_minmax=before)
    t, r = sample_t_r(cfg, 200_000)
    diag = torch.logit(t[100_000:].double())
    assert diag.mean().item() == pytest.approx(expected_logit_mean, abs=0.01)
    assert (r[:100_000] < t[:100_000]).all()


# ----------------------------------------------------------------------------- JVP modes


def test_jvp_modes_give_the_same_gradients():
    """single_pass and two_pass: same loss and gradients (without dropout: with it, each mode draws its masks
    in its own order, and tests/methods/test_jvp_engine.py checks each against torch.func.jvp)."""
    net = tiny_unet().double()
    x0, eps, t, r = _batch(n=6, shape=(2, 8, 8))
    r[4:] = t[4:]
    grads = {}
    for mode in ("single_pass", "two_pass"):
        net.zero_grad()
        out = MeanFlow(MeanFlowConfig(jvp_mode=mode, weight_p=0.75)).loss_from(net, x0, eps, t, r, None)
        out.loss.backward()
        grads[mode] = (out.loss.detach(), [p.grad.clone() for p in net.parameters()])
    torch.testing.assert_close(grads["single_pass"][0], grads["two_pass"][0], atol=1e-12, rtol=1e-10)
    for a, b in zip(grads["single_pass"][1], grads["two_pass"][1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("jvp_mode", ["single_pass", "two_pass"])
def test_dropout_masks_are_shared_by_u_and_its_target(jvp_mode):
    """With active dropout the loss is a function of (seed, inputs): the same seed gives the same gradients,
    another seed other ones (the masks matter, and primal and tangent use the same ones: test_jvp_engine)."""
    net = tiny_unet(dropout=0.3).double()
    x0, eps, t, r = _batch(n=6, shape=(2, 8, 8))
    r[4:] = t[4:]

    def grads(seed):
        net.zero_grad()
        torch.manual_seed(seed)
        MeanFlow(MeanFlowConfig(jvp_mode=jvp_mode, weight_p=0.75)).loss_from(net, x0, eps, t, r, None).loss.backward()
        return [p.grad.clone() for p in net.parameters()]

    a, b, c = grads(5), grads(5), grads(6)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.allclose(x, y) for x, y in zip(a, c, strict=True))


def test_r_eq_t_rows_are_not_differentiated_and_the_loss_is_unchanged():
    """The JVP runs on the r != t rows only; the loss equals the one with a JVP on every row."""
    net = tiny_dit().double()
    x0, eps, t, r = _batch(n=6, shape=(2, 8, 8))
    r[3:] = t[3:]
    cond = torch.tensor([0, 1, 2, 0, 1, 2])
    out = MeanFlow(MeanFlowConfig()).loss_from(net, x0, eps, t, r, cond)
    # reference: the JVP of every row through PyTorch's own rules
    z = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    v = eps - x0
    u, du = dual_jvp(net, (z, t, r, cond), (v, torch.ones_like(t), None, None))
    delta = u - (v - (t - r).view(-1, 1, 1, 1) * du)
    sq = delta.pow(2).flatten(1).sum(1)
    torch.testing.assert_close(out.loss, (sq / (sq + 1e-3)).mean(), atol=1e-12, rtol=1e-10)


# ----------------------------------------------------------------------------- config and sampling


def test_config_validation():
    with pytest.raises(ConfigError, match="method.weight_p"):
        meanflow_config(weight_p=-1)
    with pytest.raises(ConfigError, match="did you mean 'ratio_r_neq_t'"):
        meanflow_config(ratio_r_neq=0.5)
    with pytest.raises(ConfigError, match="jvp_mode"):
        meanflow_config(jvp_mode="three_pass")
    with pytest.raises(ConfigError, match="t_min"):
        meanflow_config(guidance={"t_min": 0.8, "t_max": 0.5})
    with pytest.raises(ConfigError, match="jvp_dtype"):
        meanflow_config(jvp_dtype="float16")
    cfg = meanflow_config(time_sampler_t={"mean": -0.6, "std": 1.6}, guidance={"w": 0.2, "kappa": 0.92})
    assert cfg.time_sampler_t.std == 1.6 and cfg.guidance.effective_scale == pytest.approx(2.5)


def test_one_step_and_two_step_sampling_through_the_shared_sampler():
    from selfe_cli.sampling.sampler import sample

    net = tiny_dit().eval()
    method = MeanFlow()
    e = torch.randn(3, 2, 8, 8)
    cond = torch.tensor([0, 1, 2])
    ones, zeros = torch.ones(3), torch.zeros(3)
    with torch.no_grad():
        one = sample(net, e, cond, steps=1, **method.sampler_defaults())
        torch.testing.assert_close(one, e - net(e, ones, zeros, cond), atol=1e-6, rtol=1e-6)
        two = sample(net, e, cond, steps=2, **method.sampler_defaults())  # official grid [1, 0.5, 0]
        half = torch.full((3,), 0.5)
        x = e - 0.5 * net(e, ones, half, cond)
        torch.testing.assert_close(two, x - 0.5 * net(x, half, zeros, cond), atol=1e-6, rtol=1e-6)


@pytest.mark.gpu
def test_cuda_bf16_training_step_jvp_matches_reference_rules():
    """On CUDA: fast-kernel primal + closed-form tangents equal PyTorch's MATH forward-mode rules."""
    net = tiny_dit().cuda()
    z = torch.randn(4, 2, 8, 8, device="cuda")
    t = torch.tensor([0.9, 0.6, 0.4, 0.2], device="cuda")
    r = t * 0.5
    cond = torch.tensor([0, 1, 2, 3], device="cuda")
    tangents = (torch.randn_like(z), torch.ones_like(t), None, None)
    u, du = engine_jvp(net, (z, t, r, cond), tangents)
    u_ref, du_ref = dual_jvp(net, (z, t, r, cond), tangents)
    torch.testing.assert_close(u, u_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(du, du_ref, atol=1e-4, rtol=1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = MeanFlow().loss(net, z, cond, null_cond=torch.full_like(cond, 3), step=0, total_steps=1)
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(p.grad is None or torch.isfinite(p.grad).all() for p in net.parameters())
