"""Every bundled recipe loads and validates; the paper recipes carry the papers' numbers (docs/methods.md §7)."""

from __future__ import annotations

import pytest
import torch

from selfe_cli.methods.meanflow import MeanFlowConfig
from selfe_cli.models.registry import build_model, count_parameters
from selfe_cli.recipes.loader import bundled_recipes, load_recipe
from selfe_cli.training.run import model_kwargs

NAMES = sorted(bundled_recipes())


def test_the_bundle_is_complete():
    assert {"quickstart", "quickstart_meanflow", "quickstart_selfe", "cifar10_meanflow", "imagenet256_meanflow_b2",
            "imagenet256_meanflow_xl2", "t2i_selfe_0p5b_256", "t2i_selfe_2b", "quickstart_imf",
            "quickstart_alphaflow", "imagenet256_imf_b2", "imagenet256_imf_xl2", "imagenet256_alphaflow_xl2",
            "quickstart_tim", "imagenet256_tim_xl2", "quickstart_sct", "quickstart_ect", "cifar10_sct",
            "cifar10_ect", "quickstart_shortcut", "imagenet256_shortcut_xl2", "quickstart_imm", "cifar10_imm"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_bundled_recipe_loads_and_builds_on_meta(name):
    recipe = load_recipe(name)
    with torch.device("meta"):
        net = build_model(recipe.model.name, **model_kwargs(recipe, None))
    assert count_parameters(net) > 0


def test_quickstarts_share_network_data_and_budget():
    recipes = {n: load_recipe(n) for n in ("quickstart", "quickstart_meanflow", "quickstart_selfe")}
    first = recipes["quickstart"]
    for r in recipes.values():
        assert (r.model.name, r.model.kwargs) == (first.model.name, first.model.kwargs)
        assert r.data == first.data and r.train == first.train
    assert [r.method.name for r in recipes.values()] == ["flow_matching", "meanflow", "selfe"]


def test_cifar10_meanflow_is_the_paper_configuration():
    r = load_recipe("cifar10_meanflow")
    m = r.method.config
    assert isinstance(m, MeanFlowConfig)
    assert r.model.name == "unet-ddpmpp-cifar10" and r.model.kwargs["dropout"] == 0.2
    assert (r.train.optimizer, r.train.lr, tuple(r.train.betas)) == ("adam", 6e-4, (0.9, 0.999))
    assert (r.train.batch_size, r.train.total_steps, r.train.warmup_steps) == (1024, 800_000, 10_000)
    assert r.train.ema_decays == [0.99995]
    assert (m.time_sampler_t.mean, m.time_sampler_t.std, m.time_sampler_r.mean, m.time_sampler_r.std) == (-2, 2, -2, 2)
    assert (m.ratio_r_neq_t, m.weight_p, m.cond_dropout) == (0.75, 0.75, 0.0)
    assert r.sample.steps == 1
    with torch.device("meta"):
        n = count_parameters(build_model(r.model.name, **model_kwargs(r, None), in_channels=3, sample_size=32))
    assert 50e6 < n < 60e6  # the ~55M DDPM++ network


@pytest.mark.parametrize("name, w, kappa, t_max", [("imagenet256_meanflow_b2", 1.0, 0.5, 1.0),
                                                   ("imagenet256_meanflow_xl2", 0.2, 0.92, 0.75)])
def test_imagenet_meanflow_recipes(name, w, kappa, t_max):
    r = load_recipe(name)
    m = r.method.config
    assert (r.train.lr, tuple(r.train.betas), r.train.batch_size, r.train.ema_decays) == (1e-4, (0.9, 0.95), 256,
                                                                                           [0.9999])
    assert (m.time_sampler_t.mean, m.time_sampler_t.std, m.ratio_r_neq_t, m.weight_p) == (-0.4, 1.0, 0.25, 1.0)
    assert (m.guidance.w, m.guidance.kappa, m.guidance.t_max, m.cond_dropout) == (w, kappa, t_max, 0.1)
    assert r.data.name == "latents" and r.model.kwargs["in_channels"] == 4


def test_the_2b_selfe_recipe_trains_sharded():
    r = load_recipe("t2i_selfe_2b")
    assert (r.train.parallel, r.train.activation_checkpointing, r.train.precision) == ("fsdp", True, "bf16")
    with torch.device("meta"):
        net = build_model(r.model.name, **model_kwargs(r, None))
    assert getattr(net, "_supports_gradient_checkpointing", False)
    units = {type(m).__name__ for m in net.modules()} & set(net._no_split_modules)
    assert units == {"DoubleStreamBlock", "SingleStreamBlock"}  # one FSDP unit per block


def test_quickstart_imf_and_alphaflow_share_the_quickstart_network_data_and_budget():
    first = load_recipe("quickstart")
    for name, method, extra in (("quickstart_alphaflow", "alphaflow", {}),
                                ("quickstart_imf", "imf", {"guidance_embed": True})):  # iMF's guidance inputs
        r = load_recipe(name)
        assert r.method.name == method
        assert (r.model.name, r.model.kwargs) == (first.model.name, {**first.model.kwargs, **extra})
        assert r.data == first.data and r.train == first.train


def test_imf_recipes_are_the_official_configuration():
    from selfe_cli.methods.configs import IMFConfig

    for name, model, (t_min, t_max) in (("imagenet256_imf_b2", "iMF-B/2", (0.4, 0.65)),
                                        ("imagenet256_imf_xl2", "iMF-XL/2", (0.42, 0.62))):
        r = load_recipe(name)
        m = r.method.config
        assert isinstance(m, IMFConfig) and r.model.name == model
        assert (m.time_sampler.mean, m.time_sampler.std, m.ratio_r_neq_t, m.weight_p, m.weight_c, m.cond_dropout) \
            == (-0.4, 1.0, 0.5, 1.0, 0.01, 0.1)
        g = m.guidance
        assert (g.omega_max, g.beta, g.t_min_high, g.t_max_low, g.sample_t_min, g.sample_t_max) == \
            (8.0, 1.0, 0.5, 0.5, t_min, t_max)
        assert (r.train.lr, tuple(r.train.betas), r.train.batch_size, r.train.weight_decay, r.train.ema_decays) == \
            (1e-4, (0.9, 0.95), 1024, 0.0, [0.9999])
        assert (r.train.total_steps, r.train.warmup_steps) == (800_729, 12_511)  # 640 and 10 epochs
        assert (r.sample.steps, r.sample.cfg_scale) == (1, 8.0)


def test_alphaflow_xl2_recipe_is_the_official_xl2_cfg_experiment():
    from selfe_cli.methods.configs import AlphaFlowConfig

    r = load_recipe("imagenet256_alphaflow_xl2")
    m = r.method.config
    assert isinstance(m, AlphaFlowConfig) and r.model.name == "DiT-XL/2"
    assert (m.ratio_fm, m.alpha_start, m.alpha_end, m.alpha_gamma, m.alpha_snap, m.clamp_utgt) == \
        (0.5, 600_000, 1_000_000, 25.0, 0.005, 4.0)
    assert (m.guidance.w, m.guidance.kappa, m.guidance.t_min, m.guidance.t_max, m.cond_dropout) == \
        (0.2, 0.92, 0.0, 0.75, 0.1)
    assert (r.train.total_steps, r.train.batch_size, r.train.lr, tuple(r.train.betas)) == \
        (1_200_000, 256, 1e-4, (0.9, 0.95))
    assert (r.sample.r_mode, r.sample.eta) == ("zero", 1.0)
    from selfe_cli.sampling.sampler import time_grid

    assert time_grid(2, r.sample.shift, dtype=torch.float64)[1].item() == pytest.approx(0.55)


ZOO_QUICKSTARTS = {"quickstart_tim": "tim", "quickstart_sct": "sct", "quickstart_ect": "ect",
                   "quickstart_shortcut": "shortcut", "quickstart_imm": "imm"}  # issue 14's methods: the quickstart's network, data and budget


@pytest.mark.parametrize("name", sorted(ZOO_QUICKSTARTS))
def test_zoo_quickstarts_share_the_quickstart_network_data_and_budget(name):
    first, r = load_recipe("quickstart"), load_recipe(name)
    assert r.method.name == ZOO_QUICKSTARTS[name]
    kwargs = dict(r.model.kwargs)
    if name == "quickstart_sct":  # plus the learned log-variance head of sCT's weight
        assert kwargs.pop("logvar_channels") > 0 and r.method.config.weighting == "logvar"
    assert (r.model.name, kwargs) == (first.model.name, first.model.kwargs)
    assert r.data == first.data and r.train == first.train
    assert r.sample.grid_prompts == first.sample.grid_prompts


def test_tim_xl2_recipe_is_the_official_configuration():
    from selfe_cli.methods.configs import TiMConfig

    r = load_recipe("imagenet256_tim_xl2")
    m = r.method.config
    assert isinstance(m, TiMConfig) and r.model.name == "DiT-XL/2"
    assert (m.ratio_r_eq_t, m.ratio_r_zero, m.derivative, m.dde_epsilon, m.time_weight, m.time_weight_tangent,
            m.weight_eps, m.dir_loss) == (0.5, 0.1, "dde", 0.005, "sqrt", True, 1e-5, True)
    assert (r.train.optimizer, r.train.lr, tuple(r.train.betas), r.train.weight_decay, r.train.batch_size,
            r.train.grad_clip, r.train.ema_decays, r.train.total_steps) == \
        ("adamw", 2e-4, (0.9, 0.95), 0.01, 512, 1.0, [0.9999], 750_000)


def test_cifar10_consistency_recipes():
    from selfe_cli.methods.configs import ECTConfig, SCTConfig
    from selfe_cli.sampling.sampler import time_grid

    r = load_recipe("cifar10_ect")
    m = r.method.config
    assert isinstance(m, ECTConfig) and r.model.name == "unet-ddpmpp-cifar10" and r.model.kwargs["dropout"] == 0.2
    assert (m.p_mean, m.p_std, m.q, m.k, m.b, m.stage_steps, m.huber_c) == (-1.1, 2.0, 2.0, 8.0, 1.0, 25_000, 0.0)
    assert (r.train.batch_size, r.train.lr, r.train.ema_decays, r.train.total_steps) == (128, 1e-4, [0.9999], 400_000)
    grid = time_grid(2, r.sample.shift, t_start=r.sample.t_start, dtype=torch.float64)
    assert grid[0] == pytest.approx(80 / 81) and grid[1] == pytest.approx(0.821 / 1.821, abs=1e-4)  # sigma 80, 0.821
    r = load_recipe("cifar10_sct")
    m = r.method.config
    assert isinstance(m, SCTConfig) and (m.time_sampler.mean, m.time_sampler.std) == (-1.0, 1.4)
    assert (m.ratio_fm, m.tangent_warmup_steps, m.tangent_norm, m.tangent_norm_c) == (0.0, 10_000, "l2", 0.1)
    assert m.weighting == "logvar" and r.model.kwargs["logvar_channels"] > 0  # the paper's learned weight
    assert (r.sample.r_mode, r.sample.eta) == ("zero", 1.0)


def test_shortcut_xl2_recipe_is_the_official_configuration():
    from selfe_cli.methods.configs import ShortcutConfig

    r = load_recipe("imagenet256_shortcut_xl2")
    m = r.method.config
    assert isinstance(m, ShortcutConfig) and r.model.name == "DiT-XL/2"
    assert (m.denoise_timesteps, m.bootstrap_every, m.bootstrap_ema, m.clip, m.cond_dropout) == (128, 8, True, 4.0, 0.1)
    assert (r.train.optimizer, r.train.lr, tuple(r.train.betas), r.train.weight_decay, r.train.batch_size,
            r.train.total_steps, r.train.ema_decays) == ("adamw", 1e-4, (0.9, 0.999), 0.1, 256, 810_000, [0.999])


def test_cifar10_imm_recipe():
    from selfe_cli.methods.configs import IMMConfig
    from selfe_cli.sampling.sampler import time_grid

    r = load_recipe("cifar10_imm")
    m = r.method.config
    assert isinstance(m, IMMConfig) and (m.group_size, m.t_max, m.gap_power, m.sigma_d) == (4, 0.994, 12, 0.5)
    assert r.train.batch_size % m.group_size == 0
    grid = time_grid(2, r.sample.shift, t_start=r.sample.t_start, dtype=torch.float64)
    assert grid[0] == pytest.approx(0.994) and grid[1] == pytest.approx(1.4 / 2.4, abs=1e-4)  # eta = 1.4
