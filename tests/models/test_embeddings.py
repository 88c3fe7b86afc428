"""Closed-form checks of the shared building blocks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from selfe_cli.models.embeddings import (
    Attention,
    RMSNorm,
    TwoTimeEmbedder,
    as_time,
    attention_backend,
    key_padding_bias,
    sincos_2d,
    timestep_embedding,
)

pytestmark = pytest.mark.usefixtures("small_nets")


def test_timestep_embedding_hand_values() -> None:
    t = torch.tensor([0.0, 0.25])
    emb = timestep_embedding(t, 6, time_scale=1000.0, max_period=10000.0)
    # freqs 10000^(-k/3), k = 0, 1, 2
    freqs = [10000 ** (-k / 3) for k in range(3)]
    expected_row1 = [math.cos(250 * f) for f in freqs] + [math.sin(250 * f) for f in freqs]
    assert torch.allclose(emb[0], torch.tensor([1.0, 1, 1, 0, 0, 0]))
    assert torch.allclose(emb[1], torch.tensor(expected_row1), atol=1e-5)
    assert timestep_embedding(t, 7).shape == (2, 7)  # odd dims padded with a zero column


def test_timestep_embedding_smooth_for_tiny_gaps() -> None:
    """t - r -> 0 is a regular point: the embedding moves by O(gap * time_scale), no jump."""
    h = torch.tensor([0.0, 1e-7, 1e-5], dtype=torch.float64)
    emb = timestep_embedding(h, 256)
    assert (emb[1] - emb[0]).abs().max() < 1e-3
    assert (emb[2] - emb[0]).abs().max() < 2e-2
    assert emb.dtype == torch.float64


def test_two_time_embedder_uses_both_times() -> None:
    emb = TwoTimeEmbedder(16, 32)
    t = torch.tensor([0.7, 0.7])
    r = torch.tensor([0.7, 0.2])
    out = emb(t, r)
    assert not torch.allclose(out[0], out[1])
    # exactly emb_t(t) + emb_h(t - r)
    assert torch.allclose(out, emb.t_embedder(t) + emb.h_embedder(t - r))


def test_as_time_broadcasts_scalars_and_checks_shape() -> None:
    assert as_time(0.5, 3, torch.device("cpu")).tolist() == [0.5] * 3
    assert as_time(torch.tensor(1), 2, torch.device("cpu")).dtype == torch.float32
    with pytest.raises(ValueError, match="shape"):
        as_time(torch.zeros(4), 3, torch.device("cpu"))


def test_sincos_2d_matches_formula() -> None:
    dim, grid = 8, 3
    table = sincos_2d(dim, grid)
    assert table.shape == (9, 8)
    # token 5 = row 1, col 2; first half encodes the column, second the row; omega_k = 10000^(-k/2)
    omega = [1.0, 10000 ** -0.5]
    col, row = 2.0, 1.0
    expected = [math.sin(col * w) for w in omega] + [math.cos(col * w) for w in omega] + \
               [math.sin(row * w) for w in omega] + [math.cos(row * w) for w in omega]
    assert torch.allclose(table[5], torch.tensor(expected), atol=1e-6)
    with pytest.raises(ValueError):
        sincos_2d(6, 2)


def test_key_padding_bias_guards_empty_rows() -> None:
    mask = torch.tensor([[True, False, True], [False, False, False]])
    bias = key_padding_bias(mask)
    assert bias.shape == (2, 1, 1, 3)
    assert bias[0, 0, 0].tolist() == [True, False, True]
    assert bias[1, 0, 0].tolist() == [True, False, False]
    q = torch.randn(2, 1, 4, 8)
    k = torch.randn(2, 1, 3, 8)
    assert torch.isfinite(F.scaled_dot_product_attention(q, k, k, attn_mask=bias)).all()


def test_rms_norm() -> None:
    x = torch.tensor([[3.0, 4.0]])
    out = RMSNorm(2, eps=0.0)(x)
    assert torch.allclose(out, x / math.sqrt(12.5))


def test_attention_matches_manual_softmax() -> None:
    attn = Attention(8, 2).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    q, k, v = attn.qkv(x).reshape(2, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)
    manual = attn.proj((weights @ v).transpose(1, 2).reshape(2, 5, 8))
    assert torch.allclose(attn(x), manual, atol=1e-12)


def test_attention_backend_math_gives_forward_ad() -> None:
    """SDPA under torch.func.jvp: the math backend has a forward-AD rule; check it against differences."""
    attn = Attention(8, 2, qk_norm=True).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    v = torch.randn_like(x)
    with attention_backend("math"):
        _, jvp = torch.func.jvp(attn, (x,), (v,))
    eps = 1e-6
    fd = (attn(x + eps * v) - attn(x - eps * v)) / (2 * eps)
    assert torch.allclose(jvp, fd, atol=1e-7, rtol=1e-6)


def test_attention_backend_names() -> None:
    with attention_backend("auto"):
        pass
    with pytest.raises(ValueError, match="unknown attention backend"):
        with attention_backend("fastest"):
            pass


@pytest.mark.parametrize("sigma", [0.25, 0.5, 1.0])
def test_velocity_skip_is_the_least_squares_coefficient(sigma):
    """c_skip(t) = argmin_a E||v - a x_t||^2 for x0 ~ N(0, sigma^2), eps ~ N(0, 1) (checked by regression)."""
    from selfe_cli.models.embeddings import velocity_skip

    g = torch.Generator().manual_seed(0)
    x0 = sigma * torch.randn(200_000, generator=g, dtype=torch.float64)
    eps = torch.randn(200_000, generator=g, dtype=torch.float64)
    for t in (0.0, 0.1, 0.5, 0.9, 1.0):
        xt, v = (1 - t) * x0 + t * eps, eps - x0
        fitted = float((v * xt).mean() / (xt * xt).mean())
        assert float(velocity_skip(torch.tensor(t), sigma)) == pytest.approx(fitted, rel=0.05, abs=0.01)
    assert float(velocity_skip(torch.tensor(1.0), sigma)) == 1.0 and float(velocity_skip(torch.tensor(0.0), sigma)) == -1.0


def test_unet_input_skip_makes_one_step_samples_the_network_output():
    """With skip_sigma_data > 0 the U-Net outputs c_skip(t) x + F; at t = 1 the one-step sample x - V is -F."""
    from selfe_cli.models.embeddings import velocity_skip
    from selfe_cli.models.registry import build_model

    kw = dict(sample_size=8, in_channels=3, model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=())
    torch.manual_seed(0)
    plain = build_model("unet", **kw)
    torch.manual_seed(0)
    skip = build_model("unet", **kw, skip_sigma_data=0.5)
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([1.0, 0.3])
    torch.testing.assert_close(skip(x, t, t * 0), plain(x, t, t * 0) + velocity_skip(t, 0.5).view(2, 1, 1, 1) * x)
    one_step = x[:1] - skip(x[:1], t[:1], t[:1] * 0)
    torch.testing.assert_close(one_step, -plain(x[:1], t[:1], t[:1] * 0))
    from selfe_cli.errors import UserError

    with pytest.raises(UserError, match="skip_sigma_data"):
        build_model("unet", **kw, skip_sigma_data=-1.0)
