"""The FLUX-style MMDiT: shapes, RoPE algebra, exact text trimming, bf16, save/load, paper sizes."""

from __future__ import annotations

import pytest
import torch

from selfe_cli.models import MODELS, build_model, count_parameters, load_model
from selfe_cli.models.mmdit import (
    MMDiT,
    apply_rope,
    default_rope_axes,
    position_ids,
    rope_angles,
)
from selfe_cli.models.text import null_input_ids, tokenize

SMALL = dict(sample_size=8, in_channels=3, patch_size=2, hidden_size=32, num_heads=2, depth_double=1,
             depth_single=1, text_width=16, text_layers=1, text_heads=2, time_freq_dim=32)


def _perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Move away from the adaLN-Zero init so every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _external(**kw) -> MMDiT:
    return MMDiT(**{**SMALL, "text_encoder": "external", "context_dim": 12, "pooled_dim": 6, **kw})


def _ext_cond(n: int, lengths: list[int], total: int = 7, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(total)[None] < torch.tensor(lengths)[:, None]
    return {"context": torch.randn(n, total, 12, generator=g), "mask": mask, "pooled": torch.randn(n, 6, generator=g)}


def test_rope_axes_defaults():
    assert default_rope_axes(128) == (16, 56, 56)
    assert default_rope_axes(64) == (8, 28, 28)
    assert sum(default_rope_axes(16)) == 16
    with pytest.raises(ValueError, match="rope_axes"):
        MMDiT(**{**SMALL, "rope_axes": (4, 6, 4)})


def test_rope_is_a_rotation_with_relative_positions():
    torch.manual_seed(0)
    axes = (4, 6, 6)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def at(x, pos):
        return apply_rope(x, rope_angles(torch.tensor([pos], dtype=torch.float32), axes))

    a = at(q, (0.0, 2.0, 3.0))
    assert torch.allclose(a.norm(), q.norm(), atol=1e-5)
    # <R(p) q, R(p') k> depends on p - p' only
    d1 = (at(q, (0.0, 2.0, 3.0)) * at(k, (0.0, 5.0, 1.0))).sum()
    d2 = (at(q, (0.0, 4.0, 7.0)) * at(k, (0.0, 7.0, 5.0))).sum()
    d3 = (at(q, (0.0, 4.0, 7.0)) * at(k, (0.0, 7.0, 6.0))).sum()
    assert torch.allclose(d1, d2, atol=1e-5) and not torch.allclose(d1, d3, atol=1e-4)
    # position 0 is the identity (text tokens)
    assert torch.allclose(at(q, (0.0, 0.0, 0.0)), q)


def test_position_ids_layout():
    ids = position_ids(2, 2, 3, torch.device("cpu"))
    assert ids.shape == (8, 3)
    assert ids[:2].abs().sum() == 0
    assert ids[2:].tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 1, 1], [0, 1, 2]]


def test_patchify_roundtrip():
    m = MMDiT(**SMALL)
    x = torch.randn(2, 3, 8, 8)
    tokens = m.patchify(x)
    assert tokens.shape == (2, 16, 12)
    assert torch.equal(m.unpatchify(tokens, 8, 8), x)
    assert torch.equal(tokens[0, 1], x[0, :, 0:2, 2:4].permute(1, 2, 0).reshape(-1))  # row-major tokens


def test_zero_init_then_conditioning_and_times_matter():
    m = MMDiT(**SMALL)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([0.7, 0.3])
    ids = {"input_ids": tokenize(["a red cube", "two blue balls"])}
    assert torch.equal(m(x, t, t, ids), torch.zeros_like(x))  # adaLN-Zero + zero final layer
    _perturb(m)
    base = m(x, t, t, ids)
    assert base.shape == x.shape
    assert not torch.allclose(base, m(x, t, 0.5 * t, ids))  # depends on t - s
    assert not torch.allclose(base, m(x, t, t, {"input_ids": tokenize(["a green ball", "one cube"])}))
    # null condition: cond=None is the empty prompt
    null = {"input_ids": null_input_ids(2)}
    assert torch.allclose(m(x, t, t, None), m(x, t, t, null), atol=1e-6)


def test_text_trim_is_exact_and_padding_ignored():
    torch.manual_seed(0)
    m, m_full = _external(), _external(trim_text=False)
    _perturb(m)
    m_full.load_state_dict(m.state_dict())
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([0.9, 0.5, 0.2])
    cond = _ext_cond(3, [2, 4, 3])
    out = m(x, t, t, cond)
    assert torch.allclose(out, m_full(x, t, t, cond), atol=1e-5)
    # the values of padded tokens do not matter
    noisy = dict(cond, context=cond["context"].clone())
    noisy["context"][0, 2:] += 100.0
    assert torch.allclose(out, m_full(x, t, t, noisy), atol=1e-5)
    # a sample's output does not depend on the rest of the batch (no leakage through joint attention)
    single = {k: v[:1] for k, v in cond.items()}
    assert torch.allclose(out[:1], m(x[:1], t[:1], t[:1], single), atol=1e-5)


def test_bf16_autocast_forward_backward_with_null():
    m = MMDiT(**SMALL)
    _perturb(m)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([0.8, 0.1])
    ids = {"input_ids": torch.cat([tokenize(["a red cube"]), null_input_ids(1)])}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, t, 0.5 * t, ids)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    out.float().pow(2).mean().backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert m.blocks[0].img.qkv.weight.grad.abs().sum() > 0
    assert m.cond_embedder.text_encoder.token_embedding.weight.grad.abs().sum() > 0  # text trained jointly


def test_gradient_checkpointing_same_grads():
    torch.manual_seed(0)
    m = _external()
    _perturb(m)
    x, t, cond = torch.randn(2, 3, 8, 8), torch.tensor([0.8, 0.4]), _ext_cond(2, [3, 5])
    m(x, t, t * 0.5, cond).pow(2).sum().backward()
    ref = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m.enable_gradient_checkpointing()
    m(x, t, t * 0.5, cond).pow(2).sum().backward()
    for a, p in zip(ref, m.parameters(), strict=True):
        assert torch.allclose(a, p.grad, atol=1e-5)


def test_class_condition_image_tokens_only():
    m = MMDiT(**{**SMALL, "condition": "class", "num_classes": 4})
    _perturb(m)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 0.5])
    a, b = m(x, t, t, torch.tensor([0, 1])), m(x, t, t, torch.tensor([2, 2]))
    assert a.shape == x.shape and not torch.allclose(a, b)


def test_save_load_roundtrip(tmp_path):
    m = _external()
    _perturb(m)
    m.save_pretrained(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert isinstance(loaded, MMDiT) and loaded.cond_kind == "text" and loaded.text_encoder_kind == "external"
    x, t, cond = torch.randn(2, 3, 8, 8), torch.tensor([0.6, 0.2]), _ext_cond(2, [2, 7])
    assert torch.equal(m(x, t, t * 0.3, cond), loaded(x, t, t * 0.3, cond))


def test_registry_presets_and_paper_sizes():
    assert {"mmdit", "mmdit-tiny", "mmdit-0.5b", "mmdit-2b"} <= set(MODELS)
    with torch.device("meta"):
        big = build_model("mmdit-2b")
        half = build_model("mmdit-0.5b")
    cfg = big.config
    assert (cfg.hidden_size, cfg.num_heads, cfg.depth_double, cfg.depth_single) == (2048, 16, 8, 16)
    assert big.rope_axes == (16, 56, 56) and cfg.in_channels == 16 and cfg.patch_size == 2
    assert 2.0e9 < count_parameters(big) < 2.4e9  # "2B"
    assert half.config.hidden_size // half.config.num_heads == 64
    assert 0.45e9 < count_parameters(half) < 0.65e9  # "0.5B"
    blocks = [type(b) for b in big.blocks]
    # the FSDP units (train.parallel: fsdp shards each block named in _no_split_modules)
    assert {b.__name__ for b in blocks} == set(big._no_split_modules) and len(blocks) == 24
