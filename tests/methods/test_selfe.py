"""Self-E method math (SE (6)-(22); docs/methods.md §4): closed-form values, gradients, RNG-replayed losses, the fake stage."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from selfe_cli.config import ConfigError, from_dict
from selfe_cli.errors import UserError
from selfe_cli.methods.selfe import (
    SelfE,
    SelfEConfig,
    clean_estimate,
    energy_renorm,
    fake_captions,
    lambda_st,
    loss_weight,
    per_sample_loss,
    sample_s,
    self_eval_target,
    shift_mu,
    shift_time,
    tau_at,
    token_count,
)
from selfe_cli.models.conditioning import cond_index

NUM_CLASSES = 3


class TinyNet(nn.Module):
    """A small class-conditional two-time network: depends on x, t, t - r and the label."""

    def __init__(self, ch: int = 2, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)
        self.emb = nn.Embedding(NUM_CLASSES + 1, ch)
        self.time = nn.Linear(2, ch)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.calls: list[tuple] = []

    def forward(self, x, t, r, cond):
        self.calls.append((x.detach().clone(), t.detach().clone(), r.detach().clone(), cond.clone()))
        h = torch.stack([t, t - r], dim=1)  # (N, 2)
        bias = (self.emb(cond) + self.time(h))[:, :, None, None]  # (N, C, 1, 1)
        return torch.tanh(self.conv(x)) + bias * (1 + x)


def _labels(n: int) -> torch.Tensor:
    return torch.arange(n) % NUM_CLASSES


def _null(n: int) -> torch.Tensor:
    return torch.full((n,), NUM_CLASSES)


# ---------------------------------------------------------------- closed-form pieces


@pytest.mark.parametrize("t, s, expected", [
    (0.5, 0.5, 0.0),
    (0.5, 0.25, 1.0 - 1.0 / 3.0),
    (0.75, 0.5, 3.0 - 1.0),
    (0.9, 0.0, 9.0),
    (0.2, 0.1, 0.25 - 1.0 / 9.0),
    (1.0, 0.5, 999.0 - 1.0),  # guard: t clamped to 0.999
])
def test_lambda_hand_values(t, s, expected):
    lam = lambda_st(torch.tensor([t]), torch.tensor([s]), 0.999)
    assert lam.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("t, expected", [(0.5, 4.0), (0.1, 100.0), (1.0, 1.0), (0.001, 1e4), (0.0, 1e4)])
def test_inv_t2_weight_clamped(t, expected):
    assert loss_weight(torch.tensor([t]), "inv_t2", 0.01).item() == pytest.approx(expected, rel=1e-5)
    assert loss_weight(torch.tensor([t]), "none").item() == 1.0


@pytest.mark.parametrize("tokens, mu", [(512, 0.5), (4096, 1.15), (2304, 0.825), (256, 0.5 - 0.65 * 256 / 3584)])
def test_shift_mu_linear_in_tokens(tokens, mu):
    assert shift_mu(tokens) == pytest.approx(mu, abs=1e-9)


def test_shift_formula_matches_paper_form_and_sampler():
    from selfe_cli.sampling.sampler import shift_time as sampler_shift

    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    mu = 1.15
    paper = math.exp(mu) / (math.exp(mu) + (1 / t - 1))
    assert torch.allclose(shift_time(t, mu), paper, atol=1e-12)
    assert torch.allclose(sampler_shift(t, math.exp(mu)), paper, atol=1e-12)
    ends = shift_time(torch.tensor([0.0, 1.0], dtype=torch.float64), mu)
    assert ends.tolist() == [0.0, 1.0]


@pytest.mark.parametrize("step, n, tau", [(0, 100, 0.0), (25, 100, 0.25), (100, 100, 1.0), (500, 100, 1.0), (7, 0, 1.0)])
def test_tau_annealing(step, n, tau):
    assert tau_at(step, n) == pytest.approx(tau)


def test_tau_anneal_scales_with_recipe_length():
    m = SelfE()
    assert m.tau_anneal_steps(710_000) == 300_000
    assert m.tau_anneal_steps(7100) == 3000
    assert SelfE(SelfEConfig(tau_anneal_steps=5)).tau_anneal_steps(7100) == 5
    assert m.fake_start(710_000) == 550_000


def test_sample_s_support():
    torch.manual_seed(0)
    t = torch.rand(20000) * 0.98 + 0.01
    s0 = sample_s(t, 0.0, 0.5)
    assert torch.equal(s0, t)  # tau = 0: the interval collapses to s = t
    s1 = sample_s(t, 1.0, 0.5)
    same = s1 == t
    assert abs(same.float().mean().item() - 0.5) < 0.02
    assert (s1 <= t).all() and (s1 >= 0).all()
    half = sample_s(t, 0.5, 0.0)
    assert (half >= 0.5 * t - 1e-7).all() and (half <= t).all()
    ratio = (half / t)
    assert abs(ratio.mean().item() - 0.75) < 0.01  # U(0.5 t, t) / t has mean 0.75


@pytest.mark.parametrize("mode, patch", [("sample", 1), ("token", 1), ("token", 2)])
def test_energy_renorm_keeps_norm_of_x0(mode, patch):
    torch.manual_seed(1)
    x0, x_tar = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8) * 7
    out = energy_renorm(x_tar, x0, mode, patch)
    if mode == "sample":
        assert torch.allclose(out.flatten(1).norm(dim=1), x0.flatten(1).norm(dim=1), rtol=1e-5)
        cos = torch.nn.functional.cosine_similarity(out.flatten(1), x_tar.flatten(1))
        assert torch.allclose(cos, torch.ones(3), atol=1e-6)  # direction of x_tar is kept
    else:
        def tokens(x):
            return x.reshape(3, 4, 8 // patch, patch, 8 // patch, patch).permute(0, 2, 4, 1, 3, 5).reshape(3, -1, 4 * patch * patch)

        assert torch.allclose(tokens(out).norm(dim=-1), tokens(x0).norm(dim=-1), rtol=1e-5)
    # lambda = 0: the target is x0 itself
    assert torch.allclose(energy_renorm(x0.clone(), x0, mode, patch), x0, atol=1e-6)


def test_result1_gradient_of_self_term():
    """Result 1: d/d x0_hat of lambda ||x0_hat - sg(x_self)||^2 = 2 lambda (G(null) - G(c)).

    Our squared norms are means over the D elements of a sample, so the gradient carries 1/D."""
    torch.manual_seed(2)
    n, shape = 4, (2, 4, 4)
    d = math.prod(shape)
    x0_hat = torch.randn(n, *shape, requires_grad=True)
    x0 = torch.randn(n, *shape)
    g_c, g_u = torch.randn(n, *shape), torch.randn(n, *shape)
    lam = torch.tensor([0.0, 0.5, 2.0, 9.0])
    x_self = self_eval_target(x0_hat, g_c, g_u)
    assert not x_self.requires_grad
    per = per_sample_loss(x0_hat, x0, x_self, lam, target="sum")
    (g,) = torch.autograd.grad(per.sum(), x0_hat)
    expected = (2.0 / d) * ((x0_hat.detach() - x0) + lam.view(-1, 1, 1, 1) * (g_u - g_c))
    assert torch.allclose(g, expected, atol=1e-6)
    # the self term alone: exactly the classifier-score direction 2 lambda (G_null - G_c) / D
    per_self = per_sample_loss(x0_hat, x0_hat.detach(), x_self, lam, target="sum")
    (g_self,) = torch.autograd.grad(per_self.sum(), x0_hat)
    assert torch.allclose(g_self, (2.0 / d) * lam.view(-1, 1, 1, 1) * (g_u - g_c), atol=1e-6)


def test_fake_mix_delta():
    a, gc, gu, gf = (torch.full((1, 1), v) for v in (10.0, 1.0, 3.0, 6.0))
    out = self_eval_target(a, gc, gu, gf, k=0.9)
    # Delta = 0.9 (3 - 1) + 0.1 (6 - 1) = 2.3
    assert out.item() == pytest.approx(10.0 - 2.3)


def test_clean_estimate_and_tokens():
    x, v, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.tensor([0.2, 0.7])
    assert clean_estimate(x.bfloat16(), t, v.bfloat16()).dtype == torch.float32
    assert torch.allclose(clean_estimate(x, t, v), x - t.view(-1, 1, 1, 1) * v)

    class P(nn.Module):
        patch_size = 2

    assert token_count(P(), torch.zeros(1, 4, 32, 32)) == 256
    assert token_count(nn.Identity(), torch.zeros(1, 4, 32, 32)) == 1024


def test_fake_captions():
    assert fake_captions(["a red cube", ""]) == ["a red cube fake image", " fake image"]


def test_config_validation():
    cfg = from_dict(SelfEConfig, {"cond_drop": 0.2, "renoise": "shared", "norm": "token"})
    assert cfg.cond_drop == 0.2 and cfg.renoise == "shared"
    with pytest.raises(ConfigError, match="self_eval_cond_weights"):
        from_dict(SelfEConfig, {"self_eval_cond_weights": "emaa"})
    with pytest.raises(ConfigError, match="p_same"):
        from_dict(SelfEConfig, {"p_same": 1.5})
    with pytest.raises(ConfigError, match="did you mean 'cond_drop'"):
        from_dict(SelfEConfig, {"cond_dropp": 0.1})


# ---------------------------------------------------------------- the full loss


def _replay(cfg: SelfEConfig, x0, step, total, seed, tokens):
    """Re-draw the loss's randomness in its documented order: t, s, eps, eps', dropout."""
    m = SelfE(cfg)
    torch.manual_seed(seed)
    n = x0.shape[0]
    t = m.sample_t(n, tokens)
    s = sample_s(t, tau_at(step, m.tau_anneal_steps(total)), cfg.p_same)
    eps = torch.randn_like(x0)
    eps2 = torch.randn_like(x0) if cfg.renoise == "fresh" else eps
    dropped = torch.rand(n) < cfg.cond_drop
    return t, s, eps, eps2, dropped


def test_s_equal_t_gives_the_data_loss():
    torch.manual_seed(0)
    net, x0 = TinyNet(), torch.randn(6, 2, 4, 4)
    cfg = SelfEConfig(p_same=1.0, cond_drop=0.3)
    torch.manual_seed(5)
    out = SelfE(cfg).loss(net, x0, _labels(6), null_cond=_null(6), step=10, total_steps=100)
    t, s, eps, _, dropped = _replay(cfg, x0, 10, 100, 5, tokens=16)
    assert torch.equal(s, t)
    assert len(net.calls) == 1  # lambda = 0 everywhere: no self-evaluation passes
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    cond = torch.where(dropped, _null(6), _labels(6))
    with torch.no_grad():
        g = x_t - t.view(-1, 1, 1, 1) * net(x_t, t, t, cond)
    expected = ((g - x0).pow(2).flatten(1).mean(1) / t.clamp(min=0.01) ** 2).mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.logs["loss_data"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.logs["lambda_mean"].item() == 0.0


def test_full_loss_gradient_matches_closed_form():
    """Sum form [16], no weighting: dL/dV = -t dL/dx0_hat with dL/dx0_hat = (2/(N D))[(x0_hat - x0) +
    lambda (G(x_s_hat, s, s, null) - G(x_s_hat, s, s, c))], G of the stop-gradient passes replayed."""
    torch.manual_seed(0)
    net, x0 = TinyNet(), torch.randn(8, 2, 4, 4)
    n, d = 8, 32
    cfg = SelfEConfig(p_same=0.0, cond_drop=0.25, target="sum", weighting="none", time_shift=False,
                      self_eval_cond_weights="online", renoise="fresh")
    grads = {}

    def keep(module, args, out):
        if out.requires_grad:
            out.register_hook(lambda g: grads.setdefault("v", g))

    net.register_forward_hook(keep)
    torch.manual_seed(3)
    out = SelfE(cfg).loss(net, x0, _labels(n), null_cond=_null(n), step=50, total_steps=50)
    out.loss.backward()
    t, s, eps, eps2, dropped = _replay(cfg, x0, 50, 50, 3, tokens=16)
    assert dropped.any() and (~dropped).any()
    main, evals = net.calls[0], net.calls[1]
    assert len(net.calls) == 2  # EMA off: conditional and null branches batched in one forward
    tb = t.view(-1, 1, 1, 1)
    with torch.no_grad():
        x0_hat = main[0] - tb * net(main[0], t, s, main[3])
        x_s_hat = (1 - s.view(-1, 1, 1, 1)) * x0_hat + s.view(-1, 1, 1, 1) * eps2
        act = (~dropped).nonzero().squeeze(1)
        m = act.numel()
        assert torch.allclose(evals[0][:m], x_s_hat[act], atol=1e-6)  # landing input
        assert torch.equal(evals[1][:m], s[act]) and torch.equal(evals[2][:m], s[act])  # (s, s) mode
        assert torch.equal(evals[3], torch.cat([_labels(n)[act], _null(m)]))
        v_eval = net(evals[0], evals[1], evals[2], evals[3])
        g_eval = evals[0] - evals[1].view(-1, 1, 1, 1) * v_eval
        delta = torch.zeros_like(x0)
        delta[act] = g_eval[m:] - g_eval[:m]  # G(null) - G(c)
    lam = lambda_st(t, s) * (~dropped)
    dx0 = (2.0 / (n * d)) * ((x0_hat - x0) + lam.view(-1, 1, 1, 1) * delta)
    assert torch.allclose(grads["v"], -tb * dx0, atol=1e-6, rtol=1e-4)


def test_energy_loss_matches_manual():
    torch.manual_seed(0)
    net, x0 = TinyNet(), torch.randn(5, 2, 4, 4)
    cfg = SelfEConfig(p_same=0.0, cond_drop=0.0, self_eval_cond_weights="online")
    torch.manual_seed(9)
    out = SelfE(cfg).loss(net, x0, _labels(5), null_cond=_null(5), step=1000, total_steps=1000)
    t, s, eps, eps2, _ = _replay(cfg, x0, 1000, 1000, 9, tokens=16)
    tb, sb = t.view(-1, 1, 1, 1), s.view(-1, 1, 1, 1)
    with torch.no_grad():
        x_t = (1 - tb) * x0 + tb * eps
        x0_hat = x_t - tb * net(x_t, t, s, _labels(5))
        x_s = (1 - sb) * x0_hat + sb * eps2
        g_c = x_s - sb * net(x_s, s, s, _labels(5))
        g_u = x_s - sb * net(x_s, s, s, _null(5))
        x_self = x0_hat - (g_u - g_c)
        lam = (t / (1 - t) - s / (1 - s)).view(-1, 1, 1, 1)
        x_tar = x0 + lam * x_self
        x_ren = x_tar / x_tar.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * x0.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        expected = ((x0_hat - x_ren).pow(2).flatten(1).mean(1) / t.clamp(min=0.01) ** 2).mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_ema_weights_for_the_conditional_branch():
    torch.manual_seed(0)
    net, ema, x0 = TinyNet(seed=0), TinyNet(seed=1), torch.randn(4, 2, 4, 4)
    cfg = SelfEConfig(p_same=0.0, cond_drop=0.0)
    torch.manual_seed(1)
    SelfE(cfg).loss(net, x0, _labels(4), null_cond=_null(4), step=1, total_steps=1, ema_net=ema)
    assert len(ema.calls) == 1 and torch.equal(ema.calls[0][3], _labels(4))  # conditional on EMA
    assert len(net.calls) == 2 and torch.equal(net.calls[1][3], _null(4))  # null on online
    # no EMA given: a clear warning, online weights used
    net2 = TinyNet()
    with pytest.warns(UserWarning, match="no EMA network"):
        out = SelfE(cfg).loss(net2, x0, _labels(4), null_cond=_null(4), step=1, total_steps=1)
    assert out.logs["self_eval_ema"].item() == 0.0


def test_unconditional_model_is_a_user_error():
    with pytest.raises(UserError, match="conditional"):
        SelfE().loss(TinyNet(), torch.randn(2, 2, 4, 4), None, null_cond=None, step=0, total_steps=1)


def _fake_run(fused: bool):
    torch.manual_seed(0)
    net, x0 = TinyNet(), torch.randn(6, 2, 4, 4)
    cfg = SelfEConfig(p_same=0.0, cond_drop=0.3, fake_score=True, fake_score_start=5,
                      self_eval_cond_weights="online")
    m = SelfE(cfg)
    m.fuse_grad_passes = fused
    fake = torch.full((6,), 2)  # stands for "prompt + fake image"
    torch.manual_seed(4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = m.loss(net, x0, _labels(6), null_cond=_null(6), step=5, total_steps=10, fake_cond=fake)
    out.loss.backward()
    grad_calls = sum(1 for c in net.calls) - 1  # minus the stop-gradient self-evaluation pass
    return out, [p.grad.clone() for p in net.parameters()], net, grad_calls


def test_fake_stage_fused_and_unfused_agree():
    out_a, grads_a, net_a, _ = _fake_run(fused=False)
    out_b, grads_b, net_b, _ = _fake_run(fused=True)
    assert "loss_fake" in out_a.logs and out_a.logs["loss_fake"].item() > 0
    assert out_a.loss.item() == pytest.approx(out_b.loss.item(), rel=1e-5)
    for a, b in zip(grads_a, grads_b, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    # fused: exactly one forward carried gradients (the [x_t ; x_s_hat] batch)
    fused_grad_batches = [c for c in net_b.calls if c[0].shape[0] > 6]
    assert len(fused_grad_batches) >= 1
    # the stop-gradient pass mixes three branches (c, null, c_fake) in one batched call
    evals = net_a.calls[-1]
    assert evals[3].shape[0] % 3 == 0


def test_fake_stage_off_before_start_and_needs_cond():
    torch.manual_seed(0)
    m = SelfE(SelfEConfig(fake_score=True, fake_score_start=5))
    assert m.needs_fake_cond and not SelfE().needs_fake_cond
    net, x0 = TinyNet(), torch.randn(2, 2, 4, 4)
    fake = torch.full((2,), 2)
    out = m.loss(net, x0, _labels(2), null_cond=_null(2), step=4, total_steps=10, ema_net=TinyNet(), fake_cond=fake)
    assert "loss_fake" not in out.logs
    out = m.loss(net, x0, _labels(2), null_cond=_null(2), step=5, total_steps=10, ema_net=TinyNet(), fake_cond=fake)
    assert "loss_fake" in out.logs
    with pytest.raises(UserError, match="fake_cond"):  # fails fast, long before the stage starts
        m.loss(net, x0, _labels(2), null_cond=_null(2), step=0, total_steps=10, ema_net=TinyNet())


def test_fake_loss_value():
    """|| G(sg x_s_hat, s, s, c_fake) - sg x0_hat ||^2 / s^2 on the non-dropped samples, / N."""
    torch.manual_seed(0)
    net, x0 = TinyNet(), torch.randn(4, 2, 4, 4)
    cfg = SelfEConfig(p_same=0.0, cond_drop=0.0, fake_score=True, fake_score_start=0,
                      self_eval_cond_weights="online", fake_time_weight=False)
    fake = torch.full((4,), 2)
    torch.manual_seed(8)
    out = SelfE(cfg).loss(net, x0, _labels(4), null_cond=_null(4), step=0, total_steps=10, fake_cond=fake)
    t, s, eps, eps2, _ = _replay(cfg, x0, 0, 10, 8, tokens=16)
    tb, sb = t.view(-1, 1, 1, 1), s.view(-1, 1, 1, 1)
    with torch.no_grad():
        x_t = (1 - tb) * x0 + tb * eps
        x0_hat = x_t - tb * net(x_t, t, s, _labels(4))
        x_s = (1 - sb) * x0_hat + sb * eps2
        g_f = x_s - sb * net(x_s, s, s, fake)
    expected = (g_f - x0_hat).pow(2).flatten(1).mean(1).mean()
    assert out.logs["loss_fake"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_cond_index_helper_used_on_dicts():
    c = {"context": torch.randn(4, 3, 2), "mask": torch.ones(4, 3, dtype=torch.bool), "pooled": torch.randn(4, 5)}
    sub = cond_index(c, torch.tensor([1, 3]))
    assert sub["context"].shape == (2, 3, 2)


def test_sampler_defaults():
    m = SelfE()
    assert m.sampler_defaults() == {"r_mode": "next"}

    class Net(nn.Module):
        sample_size, patch_size = 32, 2

    assert m.sampler_defaults(Net())["shift"] == pytest.approx(math.exp(shift_mu(256)))
    assert SelfE(SelfEConfig(time_shift=False)).sampler_defaults(Net())["shift"] == 1.0
    assert SelfE(SelfEConfig(shift_mu=1.15)).sampling_shift(10) == pytest.approx(math.exp(1.15))


@pytest.mark.parametrize("name", ["quickstart_selfe", "t2i_selfe_0p5b_256", "t2i_selfe_2b"])
def test_bundled_recipes_load(name, monkeypatch):
    from selfe_cli.methods import METHODS, MethodEntry
    from selfe_cli.models.registry import validate_model_kwargs
    from selfe_cli.recipes.loader import load_recipe

    monkeypatch.setitem(METHODS, "selfe", MethodEntry(SelfE, SelfEConfig))
    recipe = load_recipe(name)
    assert isinstance(recipe.method.config, SelfEConfig)
    validate_model_kwargs(recipe.model.name, recipe.model.kwargs)
    m = SelfE(recipe.method.config)
    # the recipe's sampling shift is the training shift at its token count
    tokens = 32 * 32 if name == "quickstart_selfe" else 256  # pixel U-Net: one token per pixel
    assert recipe.sample.shift == pytest.approx(m.sampling_shift(tokens), abs=1e-3)
    if name != "quickstart_selfe":
        assert recipe.train.betas == (0.9, 0.95) and recipe.train.lr == 3e-4 and recipe.train.final_lr == 1e-5
        assert recipe.train.ema_decays == [0.9999] and recipe.train.batch_size == 1024
        assert recipe.sample.cfg_scale == 5.0 and recipe.sample.guidance == "energy"
    if name == "t2i_selfe_2b":
        assert m.tau_anneal_steps(recipe.train.total_steps) == 300_000 and m.fake_start(710_000) == 550_000
