"""improved MeanFlow (docs/methods.md, iMF): closed-form Gaussian fixed point, hand-computed loss on an affine
two-head network, guidance sampling, guidance as a network condition, the auxiliary v-head."""

from __future__ import annotations

import math

import pytest
import torch
from test_alphaflow import GaussianNet  # tests/methods is on sys.path (rootdir import mode)
from torch import nn

from selfe_cli.methods.imf import (
    IMF,
    capture_v,
    effective_omega,
    imf_config,
    output_head,
    sample_interval,
    sample_omega,
)
from selfe_cli.models.conditioning import split_guidance, with_guidance
from selfe_cli.models.registry import build_model

# ----------------------------------------------------------------------------- closed-form Gaussian


@pytest.mark.parametrize("jvp_mode", ["single_pass", "two_pass"])
def test_exact_average_velocity_makes_the_gradient_vanish_at_omega_1(jvp_mode):
    """omega = 1: v_g = v. With v the marginal velocity (x0, eps chosen so), the tangent (the v-head = the
    marginal velocity) makes V = u + (t - r) du/dt = v exactly (MeanFlow identity): both losses have zero
    gradient in the parameters (m, s) of the exact field."""
    g = GaussianNet(m=0.8, s=0.6)
    gen = torch.Generator().manual_seed(3)
    n = 40
    t = torch.rand(n, generator=gen, dtype=torch.float64) * 0.96 + 0.02
    r = t * torch.rand(n, generator=gen, dtype=torch.float64)
    r[n // 2:] = t[n // 2:]
    z = torch.randn(n, 2, 3, 3, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        vel = g.average(z, t, t)
    tb = t.view(-1, 1, 1, 1)
    x0, eps = z - tb * vel, z + (1 - tb) * vel
    ones = torch.ones(n, dtype=torch.float64)
    method = IMF(imf_config(jvp_mode=jvp_mode))
    out = method.loss_from(g, x0, eps, t, r, ones, 0 * ones, ones)
    assert float(out.logs["loss_u"]) < 1e-20 and float(out.logs["loss_v"]) < 1e-20
    grads = torch.autograd.grad(out.loss, list(g.parameters()))
    assert max(float(x.abs().max()) for x in grads) < 1e-8
    # The conditional velocity as tangent (MeanFlow's choice) is not the network's own: with the v-head
    # replaced by eps - x0 of a random pair the u-loss does not vanish.
    x0r = torch.randn_like(x0)
    assert float(method.loss_from(g, x0r, (z - (1 - tb) * x0r) / tb, t, r, ones, 0 * ones, ones)
                 .logs["loss_u"]) > 1e-3


# ----------------------------------------------------------------------------- affine two-head network


class AffineTwoHead(nn.Module):
    """u = a x + b t + d r + e[c] + k (1 - 1/omega) + k1 t_min + k2 t_max;  v = a' x + b' t + e'[c] + k' (1 - 1/omega)."""

    has_v_head = True

    def __init__(self, classes: int = 3):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        p = lambda *s: nn.Parameter(torch.randn(*s, dtype=torch.float64, generator=g))  # noqa: E731
        self.a, self.b, self.d, self.k, self.k1, self.k2 = (p(()) for _ in range(6))
        self.av, self.bv, self.kv = p(()), p(()), p(())
        self.e, self.ev = p(classes + 1), p(classes + 1)
        self.output_head, self.v_sink = "u", None

    def heads(self, x, t, r, cond):
        c, g = split_guidance(cond)
        col = lambda y: y.view(-1, 1, 1, 1)  # noqa: E731
        w = 1 - 1 / g[:, 0]
        u = self.a * x + col(self.b * t + self.d * r + self.e[c] + self.k * w + self.k1 * g[:, 1] + self.k2 * g[:, 2])
        v = self.av * x + col(self.bv * t + self.ev[c] + self.kv * w)
        return u, v

    def forward(self, x, t, r, cond=None):
        u, v = self.heads(x, t, r, cond)
        if self.output_head == "v":
            return v
        if self.v_sink is not None:
            import torch.autograd.forward_ad as fwAD

            self.v_sink.append((torch.is_grad_enabled(), fwAD.unpack_dual(v).primal))
        return u


def _hand_loss(net, x0, eps, t, r, omega, t_min, t_max, c, null, dropped, p=1.0, cc=0.01):
    col = lambda y: y.view(-1, 1, 1, 1)  # noqa: E731
    z, v = (1 - col(t)) * x0 + col(t) * eps, eps - x0
    w_eff = torch.where((t >= t_min) & (t <= t_max), omega, torch.ones_like(omega))
    with torch.no_grad():
        zero, one = torch.zeros_like(t), torch.ones_like(t)
        v_c = net.heads(z, t, t, with_guidance(c, torch.stack([w_eff, zero, one], 1)))[1]
        v_u = net.heads(z, t, t, with_guidance(null, torch.stack([one, zero, one], 1)))[1]
        v_g = v + col(1 - 1 / w_eff) * (v_c - v_u)
        v_g = torch.where(col(dropped), v, v_g)
        du = net.a * v_c + col(net.b)  # d/dt along (v_c, dt = 1, dr = 0)
    c_in = torch.where(dropped, null, c)
    u, v_pred = net.heads(z, t, r, with_guidance(c_in, torch.stack([omega, t_min, t_max], 1)))
    big_v = u + col(t - r) * du
    lu = (big_v - v_g).pow(2).flatten(1).sum(1)
    lv = (v_pred - v_g).pow(2).flatten(1).sum(1)
    return (lu / (lu.detach() + cc) ** p + lv / (lv.detach() + cc) ** p).mean()


def _affine_batch():
    g = torch.Generator().manual_seed(11)
    n = 6
    x0 = torch.randn(n, 1, 2, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(n, 1, 2, 2, generator=g, dtype=torch.float64)
    t = torch.tensor([0.9, 0.7, 0.5, 0.8, 0.3, 0.6], dtype=torch.float64)
    r = torch.tensor([0.2, 0.1, 0.5, 0.8, 0.1, 0.6], dtype=torch.float64)
    omega = torch.tensor([3.0, 1.5, 7.0, 2.0, 4.0, 1.0], dtype=torch.float64)
    t_min = torch.tensor([0.1, 0.4, 0.0, 0.0, 0.35, 0.0], dtype=torch.float64)  # row 1, 4: t outside
    t_max = torch.tensor([0.95, 0.6, 1.0, 1.0, 0.9, 1.0], dtype=torch.float64)
    c = torch.tensor([0, 1, 2, 0, 1, 2])
    dropped = torch.tensor([False, False, False, True, False, False])
    return x0, eps, t, r, omega, t_min, t_max, c, torch.full((n,), 3), dropped


@pytest.mark.parametrize("jvp_mode", ["single_pass", "two_pass"])
def test_loss_matches_hand_computation_on_affine_two_head_net(jvp_mode):
    """Guided target with omega' (interval, inclusive), the tangent v_c, V = u + (t - r) du/dt, both losses with
    adaptive weights; dropped rows regress v; the v-head of the loss's own forward (v_sink) carries the graph."""
    net = AffineTwoHead()
    x0, eps, t, r, omega, t_min, t_max, c, null, dropped = _affine_batch()
    want = _hand_loss(net, x0, eps, t, r, omega, t_min, t_max, c, null, dropped)
    got = IMF(imf_config(jvp_mode=jvp_mode)).loss_from(net, x0, eps, t, r, omega, t_min, t_max, c, null, dropped)
    torch.testing.assert_close(got.loss, want, rtol=1e-12, atol=0)
    g_got = torch.autograd.grad(got.loss, list(net.parameters()))
    g_want = torch.autograd.grad(want, list(net.parameters()))
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_guidance_interval_and_omega_prime():
    t = torch.tensor([0.2, 0.5, 0.8, 0.5])
    omega = torch.tensor([4.0, 4.0, 4.0, 2.0])
    got = effective_omega(t, omega, torch.tensor([0.2, 0.1, 0.1, 0.6]), torch.tensor([0.7, 0.5, 0.7, 0.9]))
    assert got.tolist() == [4.0, 4.0, 1.0, 1.0]  # inclusive ends; outside: 1


def test_omega_density_is_a_power_law():
    """beta = 1: log omega ~ U[0, log 8]; beta = 2: P(omega <= w) = (1 - 1/w) / (1 - 1/8)."""
    torch.manual_seed(0)
    g1 = imf_config().guidance
    om = sample_omega(g1, 200_000)
    assert float(om.min()) >= 1 and float(om.max()) <= 8
    assert abs(float(torch.log(om).mean()) - math.log(8) / 2) < 0.01
    g2 = imf_config(guidance={"beta": 2.0}).guidance
    om2 = sample_omega(g2, 200_000)
    assert abs(float((om2 <= 2).float().mean()) - (0.5 / (1 - 1 / 8))) < 0.01


def test_interval_sampling_and_r_eq_t_rows():
    torch.manual_seed(0)
    r_eq_t = torch.tensor([True, False] * 500)
    t_min, t_max = sample_interval(imf_config().guidance, r_eq_t)
    assert bool((t_min[r_eq_t] == 0).all()) and bool((t_max[r_eq_t] == 1).all())
    assert float(t_min[~r_eq_t].max()) <= 0.5 and float(t_max[~r_eq_t].min()) >= 0.5


# ----------------------------------------------------------------------------- networks


def _dit(**kw):
    torch.manual_seed(0)
    net = build_model("dit", sample_size=8, in_channels=2, patch_size=2, hidden_size=32, depth=3, num_heads=2,
                      time_freq_dim=16, condition="class", num_classes=3, **kw)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.double()


@pytest.mark.parametrize("name", ["unet", "dit", "mmdit-tiny"])
def test_guidance_condition_is_an_option_that_keeps_old_checkpoints(name):
    kw = dict(sample_size=8, in_channels=2)
    if name == "unet":
        kw.update(model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,), condition="class",
                  num_classes=3)
    elif name == "dit":
        kw.update(patch_size=2, hidden_size=32, depth=1, num_heads=2, condition="class", num_classes=3)
    else:
        kw.update(patch_size=2, text_width=32, text_layers=1, text_heads=2)
    torch.manual_seed(0)
    plain = build_model(name, **kw)
    torch.manual_seed(0)
    guided = build_model(name, guidance_embed=True, **kw)
    extra = set(guided.state_dict()) - set(plain.state_dict())
    assert extra and all(k.startswith("cond_embedder.guidance.") for k in extra)
    assert set(plain.state_dict()) <= set(guided.state_dict())
    n = 2
    x = torch.randn(n, 2, 8, 8)
    t = torch.tensor([0.7, 0.3])
    cond = plain.null_condition(n) if name != "mmdit-tiny" else plain.null_condition(n)
    g = torch.tensor([[4.0, 0.2, 0.8], [1.0, 0.0, 1.0]])
    with torch.no_grad():
        for p in guided.parameters():  # away from the zero / small output inits
            p.add_(0.1 * torch.randn_like(p))
        a = guided(x, t, t, with_guidance(cond, g))
        b = guided(x, t, t, with_guidance(cond, g.flip(0)))
        default = guided(x, t, t, cond)  # no guidance scalars: omega = 1 on [0, 1]
    assert float((a - b)[0].abs().max()) > 1e-3 * float(a.abs().max())
    torch.testing.assert_close(default[1], a[1])
    with pytest.raises(ValueError, match="guidance_embed"):
        plain(x, t, t, with_guidance(cond, g))


def test_v_head_is_one_trunk_pass_and_drops_for_sampling():
    net = _dit(guidance_embed=True, aux_v_head_blocks=1)
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    t = torch.tensor([0.9, 0.5, 0.2], dtype=torch.float64)
    r = torch.tensor([0.1, 0.5, 0.0], dtype=torch.float64)
    c = with_guidance(torch.tensor([0, 1, 2]), torch.tensor([[2.0, 0.1, 0.9]] * 3, dtype=torch.float64))
    with capture_v(net) as sink:
        u = net(x, t, r, c)
    with output_head(net, "v"):
        v = net(x, t, r, c)
    assert len(sink) == 1 and sink[0][0] is True
    torch.testing.assert_close(sink[0][1], v)
    assert not torch.allclose(u, v)
    keys = set(net.state_dict())
    net.drop_v_head()
    assert net.config.aux_v_head_blocks == 0 and not net.has_v_head
    assert {k for k in keys if k.startswith("v_")} and not {k for k in net.state_dict() if k.startswith("v_")}
    torch.testing.assert_close(net(x, t, r, c), u)  # the u network is unchanged
    torch.manual_seed(0)
    rebuilt = build_model("dit", sample_size=8, in_channels=2, patch_size=2, hidden_size=32, depth=3, num_heads=2,
                          time_freq_dim=16, condition="class", num_classes=3, guidance_embed=True)
    rebuilt.double().load_state_dict(net.state_dict(), strict=True)


def test_imf_step_on_dit_with_v_head_reaches_every_parameter():
    net = _dit(guidance_embed=True, aux_v_head_blocks=1)
    torch.manual_seed(1)
    x0 = torch.randn(8, 2, 8, 8, dtype=torch.float64)
    out = IMF(imf_config()).loss(net, x0, torch.randint(0, 3, (8,)), null_cond=net.null_condition(8), step=0,
                                 total_steps=1)
    out.loss.backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in net.parameters())
    assert {"loss_u", "loss_v", "omega"} <= set(out.logs)


def test_sampler_feeds_cfg_and_interval_as_a_condition():
    """--cfg W and the recipe's interval enter the network; one NFE per step."""
    from types import SimpleNamespace

    from selfe_cli.models.conditioning import ClassConditioner
    from selfe_cli.sampling.generate import Generator

    calls = []

    class Probe(nn.Module):
        def forward(self, x, t, r, cond=None):
            calls.append(split_guidance(cond)[1])
            return torch.zeros_like(x)

    method = IMF(imf_config(guidance={"sample_t_min": 0.4, "sample_t_max": 0.65}))
    sample_cfg = SimpleNamespace(steps=2, shift=1.0, guidance="standard", eta=0.0, r_mode=None, cfg_scale=1.0)
    gen = Generator(Probe(), ClassConditioner(3), sampler_defaults=method.sampler_defaults(), sample_cfg=sample_cfg,
                    in_channels=1, resolution=2)
    gen.generate_latents([0, 1], [0, 1], steps=2, cfg_scale=8.0)
    assert len(calls) == 2  # one NFE per step
    torch.testing.assert_close(calls[0], torch.tensor([[8.0, 0.4, 0.65]] * 2))


def test_mmdit_v_head_duplicates_single_stream_blocks():
    torch.manual_seed(0)
    net = build_model("mmdit-tiny", sample_size=8, in_channels=2, patch_size=2, text_width=32, text_layers=1,
                      text_heads=2, guidance_embed=True, aux_v_head_blocks=1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 2, 8, 8)
    t = torch.tensor([0.8, 0.4])
    c = with_guidance(net.null_condition(2), torch.tensor([[3.0, 0.1, 0.9]] * 2))
    with torch.no_grad(), capture_v(net) as sink:
        u = net(x, t, 0 * t, c)
    with torch.no_grad(), output_head(net, "v"):
        v = net(x, t, 0 * t, c)
    torch.testing.assert_close(sink[0][1], v)
    assert type(net.v_blocks[0]).__name__ == "SingleStreamBlock" and not torch.allclose(u, v)
    net.drop_v_head()
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, 0 * t, c), u)
