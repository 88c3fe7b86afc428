"""The two-time networks: contract, conditions, forward-mode AD, save/load, bf16."""

from __future__ import annotations

import pytest
import torch

from selfe_cli.models import DiT, TwoTimeModel, UNet, attention_backend, load_model
from selfe_cli.models.text import tokenize

from .conftest import randomize_

pytestmark = pytest.mark.usefixtures("small_nets")

N, C, S = 3, 2, 8
TEXT_TINY = dict(condition="text", text_encoder="tiny", text_width=16, text_layers=1, text_heads=2)
TEXT_EXT = dict(condition="text", text_encoder="external", context_dim=12, pooled_dim=10)
CONDS = {"none": {}, "class": dict(condition="class", num_classes=3), "text": TEXT_TINY, "external": TEXT_EXT}


def small(arch: str, cond: str = "none", **kwargs) -> TwoTimeModel:
    if arch == "unet":
        model = UNet(sample_size=S, in_channels=C, model_channels=16, channel_mult=(1, 2), num_blocks=1,
                     attn_resolutions=(4,), num_heads=2, **CONDS[cond], **kwargs)
    elif arch == "unet-conv":
        model = UNet(sample_size=S, in_channels=C, model_channels=16, channel_mult=(1, 2), num_blocks=1,
                     attn_resolutions=(8, 4), resample="conv", **CONDS[cond], **kwargs)
    else:
        model = DiT(sample_size=S, in_channels=C, patch_size=2, hidden_size=32, depth=2, num_heads=2,
                    qk_norm=arch == "dit-qk", **CONDS[cond], **kwargs)
    return randomize_(model).eval()


def make_cond(cond: str, n: int = N, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    if cond == "none":
        return None
    if cond == "class":
        return torch.tensor([0, 2, 3, 1, 0][:n])  # 3 = the null label
    if cond == "text":
        return {"input_ids": tokenize(["a red cube", "", "two blue spheres", "x", "y"][:n])}
    mask = torch.ones(n, 5, dtype=torch.bool)
    mask[0, 3:] = False
    return {"context": torch.randn(n, 5, 12, generator=gen), "mask": mask, "pooled": torch.randn(n, 10, generator=gen)}


def inputs(n: int = N, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, C, S, S, generator=gen).to(dtype)
    t = torch.rand(n, generator=gen).to(dtype) * 0.8 + 0.2
    r = t * torch.rand(n, generator=gen).to(dtype)
    return x, t, r


ARCHS = ["unet", "unet-conv", "dit", "dit-qk"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("cond", list(CONDS))
def test_shapes_and_attributes(arch: str, cond: str) -> None:
    model = small(arch, cond)
    x, t, r = inputs()
    out = model(x, t, r, make_cond(cond))
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()
    assert model.cond_kind == CONDS[cond].get("condition", "none")
    assert model.in_channels == C and model.sample_size == S


@pytest.mark.parametrize("arch", ["unet", "dit"])
@pytest.mark.parametrize("cond", list(CONDS))
def test_batch_independence(arch: str, cond: str) -> None:
    """Sample i's output depends only on sample i (catches reshapes that mix the batch)."""
    model = small(arch, cond)
    x, t, r = inputs()
    c = make_cond(cond)
    full = model(x, t, r, c)
    for i in range(N):
        ci = None if c is None else (c[i:i + 1] if isinstance(c, torch.Tensor) else {k: v[i:i + 1] for k, v in c.items()})
        assert torch.allclose(model(x[i:i + 1], t[i:i + 1], r[i:i + 1], ci), full[i:i + 1], atol=1e-5)


@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_output_depends_on_r_through_the_second_embedder(arch: str) -> None:
    model = small(arch)
    x, t, _ = inputs()
    out_a = model(x, t, torch.zeros(N))
    out_b = model(x, t, t * 0.5)
    assert (out_a - out_b).abs().max() > 1e-3
    with torch.no_grad():  # without the (t - r) embedder, r has no path into the network
        for p in model.time_embed.h_embedder.parameters():
            p.zero_()
    assert torch.equal(model(x, t, torch.zeros(N)), model(x, t, t * 0.5))
    assert not torch.equal(model(x, t, t * 0.5), model(x, t * 0.9, t * 0.5))


@pytest.mark.parametrize("arch", ["unet", "dit"])
@pytest.mark.parametrize("cond", ["class", "text", "external"])
def test_condition_matters_and_null_condition(arch: str, cond: str) -> None:
    model = small(arch, cond)
    x, t, r = inputs(2)
    c = make_cond(cond, 2)
    other = make_cond(cond, 2, seed=2)
    if cond == "class":
        other = torch.tensor([1, 0])
    elif cond == "text":
        other = {"input_ids": tokenize(["a green dog", "three cats"])}
    assert (model(x, t, r, c) - model(x, t, r, other)).abs().max() > 1e-4
    if cond == "external":
        with pytest.raises(ValueError, match="null condition"):
            model(x, t, r, None)
        return
    null = model.null_condition(2)
    assert torch.equal(model(x, t, r, None), model(x, t, r, null))
    if cond == "class":
        assert null.tolist() == [3, 3]
    else:
        assert torch.equal(null["input_ids"], tokenize(["", ""]))


def test_external_text_mask_is_respected() -> None:
    model = small("dit", "external")
    x, t, r = inputs(1)
    c = make_cond("external", 1)  # tokens 3, 4 are padding
    changed = {k: v.clone() for k, v in c.items()}
    changed["context"][0, 3:] = 100.0
    assert torch.allclose(model(x, t, r, c), model(x, t, r, changed), atol=1e-6)
    changed["context"][0, 1] = 5.0
    assert not torch.allclose(model(x, t, r, c), model(x, t, r, changed), atol=1e-4)
    empty = {k: v.clone() for k, v in c.items()}
    empty["mask"][:] = False
    assert torch.isfinite(model(x, t, r, empty)).all()


@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_bad_condition_types(arch: str) -> None:
    x, t, r = inputs()
    with pytest.raises(ValueError, match="unconditional"):
        small(arch)(x, t, r, torch.zeros(N, dtype=torch.long))
    with pytest.raises(ValueError, match="LongTensor"):
        small(arch, "class")(x, t, r, {"input_ids": torch.zeros(N, 77, dtype=torch.long)})
    with pytest.raises(ValueError, match="missing"):
        small(arch, "external")(x, t, r, {"context": torch.zeros(N, 5, 12)})


def test_input_size_checks() -> None:
    with pytest.raises(ValueError, match="8x8"):
        small("dit")(torch.zeros(1, C, 6, 6), 0.5, 0.5)
    with pytest.raises(ValueError, match="divisible"):
        small("unet")(torch.zeros(1, C, 7, 7), 0.5, 0.5)
    with pytest.raises(ValueError, match="divisible"):
        UNet(sample_size=10, channel_mult=(1, 2, 2))
    with pytest.raises(ValueError, match="divisible"):
        DiT(sample_size=8, patch_size=3)


def test_scalar_times_broadcast() -> None:
    model = small("dit")
    x, _, _ = inputs()
    assert torch.equal(model(x, 0.7, 0.2), model(x, torch.full((N,), 0.7), torch.full((N,), 0.2)))


def test_dit_starts_as_zero_map_unet_near_zero() -> None:
    dit = DiT(sample_size=S, in_channels=C, hidden_size=32, depth=2, num_heads=2, condition="class", num_classes=3)
    x, t, r = inputs()
    assert torch.equal(dit(x, t, r, make_cond("class")), torch.zeros_like(x))  # adaLN-Zero + zero final layer
    unet = UNet(sample_size=S, in_channels=C, model_channels=16, channel_mult=(1, 2), num_blocks=1)
    assert unet(x, t, r).abs().max() < 1e-3  # DDPM++ near-zero output conv


@pytest.mark.parametrize("arch", ["unet", "dit"])
@pytest.mark.parametrize("cond", ["none", "text"])
def test_every_parameter_gets_a_gradient(arch: str, cond: str) -> None:
    """No dead parameters (DDP would refuse them) and the loss reaches the text encoder."""
    model = small(arch, cond).train()
    x, t, r = inputs()
    model(x, t, r, make_cond(cond)).square().mean().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead


@pytest.mark.parametrize("arch", ["unet", "dit", "dit-qk"])
@pytest.mark.parametrize("cond", ["none", "text"])
def test_jvp_equals_central_differences(arch: str, cond: str) -> None:
    """MeanFlow's JVP: tangent (v, 1, 0) in (x, t, r), through attention under the math backend."""
    model = small(arch, cond).double()
    x, t, r = inputs(dtype=torch.float64)
    c = make_cond(cond)
    v = torch.randn_like(x)
    ones, zeros = torch.ones_like(t), torch.zeros_like(r)

    def f(x_, t_, r_):
        return model(x_, t_, r_, c)

    with attention_backend("math"):
        u, dudt = torch.func.jvp(f, (x, t, r), (v, ones, zeros))
    eps = 1e-6
    fd = (f(x + eps * v, t + eps, r) - f(x - eps * v, t - eps, r)) / (2 * eps)
    assert torch.allclose(u, f(x, t, r), atol=1e-12)
    assert dudt.abs().max() > 1e-3
    assert torch.allclose(dudt, fd, rtol=1e-5, atol=1e-7 * fd.abs().max().item())


@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_forward_ad_in_r_matches_differences(arch: str) -> None:
    """The r direction too, with the dual-number API (torch.autograd.forward_ad)."""
    import torch.autograd.forward_ad as fwAD

    model = small(arch).double()
    x, t, r = inputs(dtype=torch.float64)
    with attention_backend("math"), fwAD.dual_level():
        out = model(x, t, fwAD.make_dual(r, torch.ones_like(r)))
        tangent = fwAD.unpack_dual(out).tangent
    eps = 1e-6
    fd = (model(x, t, r + eps) - model(x, t, r - eps)) / (2 * eps)
    assert torch.allclose(tangent, fd, rtol=1e-5, atol=1e-7 * fd.abs().max().item())


@pytest.mark.parametrize("arch", ["unet", "dit"])
@pytest.mark.parametrize("cond", ["class", "text", "external"])
def test_save_load_round_trip(arch: str, cond: str, tmp_path) -> None:
    model = small(arch, cond)
    x, t, r = inputs()
    c = make_cond(cond)
    model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path).eval()
    assert type(loaded) is type(model) and loaded.cond_kind == model.cond_kind
    assert torch.equal(loaded(x, t, r, c), model(x, t, r, c))
    again = type(model).from_pretrained(tmp_path).eval()
    assert torch.equal(again(x, t, r, c), model(x, t, r, c))


@pytest.mark.parametrize("arch", ["unet", "dit"])
@pytest.mark.parametrize("cond", ["none", "text"])
def test_bf16_autocast_cpu(arch: str, cond: str) -> None:
    model = small(arch, cond)
    x, t, r = inputs()
    c = make_cond(cond)
    ref = model(x, t, r, c)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, r, c)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - ref).abs().max() < 0.1 * ref.abs().max() + 1e-2
    with torch.autocast("cpu", dtype=torch.bfloat16), attention_backend("math"):
        _, dudt = torch.func.jvp(lambda t_: model(x, t_, r, c), (t,), (torch.ones_like(t),))
    assert torch.isfinite(dudt).all()


def test_pure_bf16_weights() -> None:
    model = small("dit", "text").to(torch.bfloat16)
    x, t, r = inputs()
    out = model(x.bfloat16(), t, r, make_cond("text"))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_cuda_bf16_jvp(arch: str) -> None:
    model = small(arch, "text").cuda()
    x, t, r = (a.cuda() for a in inputs())
    c = {k: v.cuda() for k, v in make_cond("text").items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = model(x, t, r, c)
        with attention_backend("math"):
            u, dudt = torch.func.jvp(lambda x_, t_: model(x_, t_, r, c), (x, t), (x, torch.ones_like(t)))
    assert torch.isfinite(u).all() and torch.isfinite(dudt).all()
    assert torch.allclose(u, ref, atol=2e-2)
