"""sCT and ECT (docs/methods.md, sCT and ECT): closed-form Gaussian stationary points, hand-computed targets on an
affine network, the tangent warm-up / normalisation, sCT's learned log-variance weight (its optimum, the network
head that carries it, the recipe check), ECT's staged r schedule and shared dropout masks."""

from __future__ import annotations

import math

import pytest
import torch
from test_alphaflow import Affine, GaussianNet, _grad_norm, _rows
from test_jvp_engine import _inputs, _roughen

from selfe_cli.config import ConfigError
from selfe_cli.methods.ect import ECT, ect_config, r_sigma, sigma_to_t
from selfe_cli.methods.row_tangents import row_jvp
from selfe_cli.methods.sct import SCT, logvar_loss, normalise_tangent, sample_t_r, sct_config, warmup_factor
from selfe_cli.models.registry import build_model


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


# ----------------------------------------------------------------------------- sCT's learned log-variance

# every network family, small, class-conditional, on the (5, 2, 8, 8) inputs of test_jvp_engine._inputs
_LOGVAR_NETS = {
    "unet": dict(name="unet", sample_size=8, in_channels=2, model_channels=8, channel_mult=(1, 2), num_blocks=1,
                 attn_resolutions=(4,), num_heads=2, time_freq_dim=16),
    "dit": dict(name="dit", sample_size=8, in_channels=2, patch_size=2, hidden_size=32, depth=2, num_heads=2,
                time_freq_dim=16),
    "mmdit": dict(name="mmdit", sample_size=8, in_channels=2, patch_size=2, hidden_size=32, num_heads=2,
                  depth_double=1, depth_single=1, time_freq_dim=16),
    "mlp": dict(name="mlp", sample_size=8, in_channels=2, width=32, depth=2, time_freq_dim=16),
    "imf-dit": dict(name="imf-dit", sample_size=8, in_channels=2, patch_size=2, hidden_size=32, depth=2,
                    num_heads=2, aux_v_head_blocks=1, num_class_tokens=2, num_cfg_tokens=1, num_interval_tokens=1,
                    num_time_tokens=1, time_freq_dim=16),
}


def _logvar_pair(kind: str, channels: int = 8):
    """The network without and with the log-variance head, from the same seed (so the same other weights)."""
    kw = dict(_LOGVAR_NETS[kind])
    name = kw.pop("name")
    torch.manual_seed(0)
    plain = build_model(name, condition="class", num_classes=3, **kw)
    torch.manual_seed(0)
    head = build_model(name, condition="class", num_classes=3, logvar_channels=channels, **kw)
    return plain, head


def test_sct_logvar_optimum_is_the_log_mean_squared_residual():
    """For fixed residuals the loss e^-l m + l (m = ||delta||^2 / D) is smallest at l = log m: zero gradient
    there, larger loss on either side; through the method, a constant l (the head's bias) is optimal at the log
    of the batch's mean m, which is what the loss's gradient says."""
    m = torch.tensor([0.3, 2.0, 0.01], dtype=torch.float64)
    best = m.log().requires_grad_()
    (grad,) = torch.autograd.grad(logvar_loss(m, best), best)
    assert grad.abs().max() < 1e-15
    for step in (-0.1, 0.1):
        assert logvar_loss(m, best.detach() + step) > logvar_loss(m, best.detach())
    # d/dl of e^-l m + l is 1 - e^-l m: at l = 0 the mean of (1 - m) / N
    zero = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(logvar_loss(m, zero), zero)
    torch.testing.assert_close(grad, (1 - m) / 3)

    _, net = _logvar_pair("dit")
    net = _roughen(net.double())
    x0, _, _, cond, eps, _ = _inputs()
    t = torch.tensor([0.9, 0.6, 0.3, 0.7, 0.4], dtype=torch.float64)
    r = torch.tensor([0.0, 0.0, 0.0, 0.7, 0.4], dtype=torch.float64)
    with torch.no_grad():
        net.logvar_head.weight.zero_()  # l(t) = bias for every row
    sct = SCT(sct_config(weighting="logvar", jvp_mode="single_pass"))
    mse = float(sct.loss_from(net, x0, eps, t, r, cond).logs["mse"])  # mean over rows of ||delta||^2 / D
    with torch.no_grad():
        net.logvar_head.bias.fill_(math.log(mse))
    out = sct.loss_from(net, x0, eps, t, r, cond)
    torch.testing.assert_close(out.logs["logvar"], torch.tensor(math.log(mse), dtype=torch.float64))
    grad_b, grad_w = torch.autograd.grad(out.loss, [net.logvar_head.bias, net.logvar_head.weight])
    assert abs(float(grad_b)) < 1e-12
    assert float(grad_w.abs().sum()) > 1e-6  # the rows' m differ: l(t) still learns their dependence on t


@pytest.mark.parametrize("kind", sorted(_LOGVAR_NETS))
def test_logvar_head_adds_two_parameters_and_changes_no_output(kind):
    """logvar_channels 0 builds exactly the network of before (same parameter names, same config otherwise); > 0
    adds ``logvar_head.weight`` / ``.bias`` and nothing else, changes no other weight drawn from the same seed,
    and leaves u and the row-tangent JVP unchanged (no fallback rule), with or without grad; under grad the head
    is in the graph of u (for DDP) with zero gradient."""
    plain, head = _logvar_pair(kind)
    assert not plain.has_logvar_head and plain.config.logvar_channels == 0
    assert not any("logvar" in k for k in plain.state_dict())
    assert set(head.state_dict()) - set(plain.state_dict()) == {"logvar_head.weight", "logvar_head.bias"}
    for key, value in plain.state_dict().items():
        assert torch.equal(value, head.state_dict()[key]), key
    plain, head = _roughen(plain.double()), head.double()
    head.load_state_dict({**plain.state_dict(), "logvar_head.weight": torch.randn(1, 8, dtype=torch.float64),
                          "logvar_head.bias": torch.ones(1, dtype=torch.float64)})
    x, t, r, cond, dx, dt = _inputs()
    with torch.no_grad():
        assert torch.equal(plain(x, t, r, cond), head(x, t, r, cond))
    u_plain = plain(x, t, r, cond)
    u_head = head(x, t, r, cond)
    assert torch.equal(u_plain, u_head)
    grads = torch.autograd.grad(u_head.square().sum(), list(head.logvar_head.parameters()))
    assert all((g == 0).all() for g in grads)
    k = 3
    u1, du1, fb1 = row_jvp(plain, (x, t, r, cond), (dx[:k], dt[:k], None, None), rows=k)
    sink: list = []
    head.logvar_sink = sink
    u2, du2, fb2 = row_jvp(head, (x, t, r, cond), (dx[:k], dt[:k], None, None), rows=k)
    head.logvar_sink = None
    assert fb2 == fb1 and torch.equal(u1, u2) and torch.equal(du1, du2)
    assert len(sink) == 1 and sink[0][0] and torch.equal(sink[0][1], head.logvar_head(t))


def test_sct_logvar_weighting_needs_the_head(monkeypatch):
    """weighting logvar on a network without the head: refused at recipe load (one line naming the key) and by
    the method; auto takes the head where there is one, else the adaptive weight."""
    from selfe_cli.models.registry import MODELS
    from selfe_cli.recipes.loader import check_method_model, load_recipe

    with pytest.raises(ConfigError, match=r"model\.logvar_channels: expected > 0 for method\.weighting logvar") as err:
        load_recipe("quickstart_sct", ["model.logvar_channels=0"])
    assert "\n" not in str(err.value)
    monkeypatch.setitem(MODELS, "headless", lambda sample_size=8: Affine())  # a network without the option
    with pytest.raises(ConfigError, match="model.name: method.weighting logvar needs a network with a log-var"):
        check_method_model("sct", "headless", {}, sct_config(weighting="logvar"))
    load_recipe("quickstart_sct", ["model.logvar_channels=0", "method.weighting=adaptive"])  # accepted
    assert load_recipe("quickstart_sct").method.config.weighting == "logvar"
    x0 = torch.randn(4, 1, 2, 2, dtype=torch.float64)
    t = torch.full((4,), 0.5, dtype=torch.float64)
    with pytest.raises(ValueError, match="method.weighting: logvar needs"):
        SCT(sct_config(weighting="logvar")).loss_from(Affine(), x0, torch.randn_like(x0), t, torch.zeros_like(t))
    auto = SCT(sct_config(jvp_mode="single_pass"))  # weighting auto
    assert "logvar" not in auto.loss_from(Affine(), x0, torch.randn_like(x0), t, torch.zeros_like(t)).logs


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
