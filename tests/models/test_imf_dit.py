"""iMF's DiT (models/imf_dit.py): paper sizes, shapes, zero-initialised gates, the v-head, exact JVPs."""

from __future__ import annotations

import pytest
import torch

from selfe_cli.methods.imf import capture_v, output_head
from selfe_cli.methods.jvp import two_time_jvp
from selfe_cli.models.conditioning import with_guidance
from selfe_cli.models.embeddings import attention_backend
from selfe_cli.models.registry import build_model

# The sampled network, without the auxiliary v-head, as the paper counts: B/2 89M is the paper's figure (its
# model table, as quoted by secondary sources); M/2, L/2, XL/2 are the official imfDiT configs' counts (the
# paper's table for them was not read: check against it).
PAPER_PARAMS = {"iMF-B/2": 89e6, "iMF-M/2": 174e6, "iMF-L/2": 409e6, "iMF-XL/2": 610e6}
LAYOUT = {"iMF-B/2": (12, 768), "iMF-M/2": (24, 768), "iMF-L/2": (32, 1024), "iMF-XL/2": (48, 1024)}


@pytest.mark.parametrize("name", list(PAPER_PARAMS))
def test_paper_sizes_on_the_meta_device(name):
    with torch.device("meta"):
        net = build_model(name)
    depth, width = LAYOUT[name]
    assert len(net.blocks) == depth and len(net.v_blocks) == 8 and net.blocks[0].norm1.weight.shape == (width,)
    assert net.blocks[0].mlp.w1.out_features == int(width * 8 / 3)
    total = sum(p.numel() for p in net.parameters())
    v_head = sum(p.numel() for n, p in net.named_parameters() if n.startswith("v_"))
    assert abs((total - v_head) / PAPER_PARAMS[name] - 1) < 0.01
    assert net.prefix_tokens == 8 + 4 + 2 + 2 + 4


def _tiny(**kw):
    torch.manual_seed(0)
    net = build_model("imf-dit", sample_size=8, in_channels=2, hidden_size=32, depth=3, num_heads=2, num_classes=3,
                      aux_v_head_blocks=1, **kw)
    return net


def test_starts_as_the_zero_map_and_blocks_as_identities():
    net = _tiny()
    x = torch.randn(2, 2, 8, 8)
    t = torch.tensor([0.9, 0.4])
    out = net(x, t, 0.5 * t, torch.tensor([0, 1]))
    assert out.shape == x.shape and float(out.abs().max()) == 0.0
    seq = torch.randn(2, 5, 32)
    cos, sin = torch.ones(5, 8), torch.zeros(5, 8)
    torch.testing.assert_close(net.blocks[0](seq, cos, sin), seq)


def _rough(net):
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net.double()


def test_conditions_reach_the_output_and_only_h_is_embedded():
    net = _rough(_tiny())
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    t = torch.tensor([0.9, 0.4], dtype=torch.float64)
    c = torch.tensor([0, 1])
    g = torch.tensor([[3.0, 0.2, 0.7]] * 2, dtype=torch.float64)
    base = net(x, t, t - 0.3, with_guidance(c, g))
    assert not torch.allclose(base, net(x, t, t - 0.3, with_guidance(c, g * torch.tensor([2.0, 1, 1]))))
    assert not torch.allclose(base, net(x, t, t - 0.3, with_guidance(torch.tensor([2, 2]), g)))
    torch.testing.assert_close(base, net(x, t - 0.1, t - 0.4, with_guidance(c, g)))  # same h = t - r
    with_t = _rough(_tiny(embed_t=True))
    a = with_t(x, t, t - 0.3, with_guidance(c, g))
    assert not torch.allclose(a, with_t(x, t - 0.1, t - 0.4, with_guidance(c, g)))


def test_v_head_protocol_and_drop():
    net = _rough(_tiny())
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    t = torch.tensor([0.9, 0.5, 0.2], dtype=torch.float64)
    with capture_v(net) as sink:
        u = net(x, t, 0 * t, torch.tensor([0, 1, 2]))
    with output_head(net, "v"):
        v = net(x, t, 0 * t, torch.tensor([0, 1, 2]))
    torch.testing.assert_close(sink[0][1], v)
    net.drop_v_head()
    torch.testing.assert_close(net(x, t, 0 * t, torch.tensor([0, 1, 2])), u)
    assert not any(k.startswith("v_") for k in net.state_dict())


@pytest.mark.parametrize("mode", ["single_pass", "two_pass"])
def test_engine_jvp_equals_torch_func_jvp(mode):
    net = _rough(_tiny())
    n = 4
    x = torch.randn(n, 2, 8, 8, dtype=torch.float64)
    t = torch.tensor([0.9, 0.7, 0.5, 0.3], dtype=torch.float64)
    r = torch.tensor([0.1, 0.2, 0.5, 0.3], dtype=torch.float64)
    cond = with_guidance(torch.tensor([0, 1, 2, 3]), torch.tensor([[2.0, 0.1, 0.9]] * n, dtype=torch.float64))
    dx = torch.randn_like(x)
    ones = torch.ones_like(t)
    u, du = two_time_jvp(net, x, t, r, cond, dx, ones, None, jvp_rows=2, mode=mode, dtype="float32")
    with attention_backend("math"):  # the only SDPA kernel with a forward-AD rule
        ref_u, ref_du = torch.func.jvp(lambda a, b: net(a, b, r[:2], {k: v[:2] for k, v in cond.items()}),
                                       (x[:2], t[:2]), (dx[:2], ones[:2]))
    torch.testing.assert_close(du[:2], ref_du, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(u[:2], ref_u, rtol=1e-12, atol=1e-12)
    assert float(du[2:].abs().max()) == 0.0
