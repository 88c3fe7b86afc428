"""Row tangents (``methods/row_tangents.py``): exact on any op, fast where the rules apply.

The networks' exactness against ``torch.func.jvp`` lives in ``test_jvp_engine.py``; here: every op of the
package's networks has a rule (no fallback to PyTorch's full-size rule on the training path), ops without a
rule and ops that mix batch rows are still exact, in-place ops too, and nothing outlives a pass.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_jvp_engine import NETS, _inputs, _roughen

from selfe_cli.methods.jvp import dual_jvp
from selfe_cli.methods.row_tangents import _ATTR, row_jvp
from selfe_cli.models.conditioning import cond_index
from selfe_cli.models.registry import build_model
from selfe_cli.models.text import TextConditioner


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-300))


def _masked(d: torch.Tensor | None, k: int) -> torch.Tensor | None:
    if d is None:
        return None
    out = d.clone()
    out[k:] = 0
    return out


@pytest.mark.parametrize("kind", sorted(NETS))
def test_networks_take_no_fallback_and_match_pytorch_forward_ad(kind):
    """The U-Net, DiT and MMDiT (dropout off) run on rules alone; u and du equal PyTorch's forward mode with the
    same tangents zero past row k."""
    net = _roughen(NETS[kind]().double()).eval()
    x, t, r, cond, dx, dt = _inputs()
    k = 2
    u, du, fallbacks = row_jvp(net, (x, t, r, cond), (dx[:k], dt[:k], None, None), rows=k)
    assert fallbacks == {}
    u_ref, du_ref = dual_jvp(net, (x, t, r, cond), (_masked(dx, k), _masked(dt, k), None, None))
    assert du_ref[:k].abs().max() > 1e-3
    assert _rel(u, u_ref) < 1e-12 and _rel(du, du_ref) < 1e-10
    assert (du[k:] == 0).all()


def test_text_unet_takes_no_fallback():
    net = _roughen(build_model(
        "unet", sample_size=8, in_channels=2, model_channels=8, channel_mult=(1, 2), num_blocks=1,
        attn_resolutions=(4,), num_heads=2, time_freq_dim=16, condition="text", text_width=32, text_layers=1,
        text_heads=2, text_context_length=16, skip_sigma_data=0.5)).double()
    cond = TextConditioner(16).encode(["a red cube", "two blue spheres", "", "a cat", "x"])
    x, t, r, _, dx, dt = _inputs()
    _, du, fallbacks = row_jvp(net, (x, t, r, cond), (dx[:3], dt[:3], None, None), rows=3)
    assert fallbacks == {}
    _, du_ref = dual_jvp(net, (x, t, r, cond), (_masked(dx, 3), _masked(dt, 3), None, None))
    assert _rel(du, du_ref) < 1e-10


def _mixing(y: torch.Tensor) -> torch.Tensor:
    """Ops without a rule, a batch-mixing reduction, a batch-dim reshape, expand, pad and in-place updates."""
    h = F.softplus(y) * y.mean(0, keepdim=True)  # softplus: no rule; mean over the batch mixes rows
    h = h.reshape(-1, h.shape[-1])  # (N * C, W): the batch merged with the channels
    h = F.pad(h, (1, 1), value=2.0).reshape(y.shape[0], y.shape[1], -1)
    g = h[:, :1].expand(-1, y.shape[1], -1).clone()
    g.mul_(h)  # in place with a tangent on both sides
    g[:, 0] = y[:, 0, :1] * 3  # __setitem__ with a tangent source
    return g + torch.cumsum(h, dim=0)  # cumsum along the batch: row j depends on rows <= j


@pytest.mark.parametrize("rows", [None, 2])
def test_ops_without_rules_and_row_mixing_ops_are_exact(rows):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, 4, generator=g, dtype=torch.float64)
    dx = torch.randn(5, 3, 4, generator=g, dtype=torch.float64)
    k = 5 if rows is None else rows
    out, tan, fallbacks = row_jvp(_mixing, (x,), (dx[:k],), rows=rows)
    ref_out, ref_tan = dual_jvp(_mixing, (x,), (_masked(dx, k),))
    assert fallbacks  # the PyTorch-rule path was taken
    torch.testing.assert_close(out, ref_out, atol=0, rtol=0)
    torch.testing.assert_close(tan, ref_tan, atol=1e-13, rtol=1e-12)
    if rows is not None:
        assert tan[k:].abs().max() > 1e-3  # the mixing ops spread the tangent past row k, and it is kept


def test_primal_graph_and_no_attribute_outlives_the_pass():
    net = _roughen(NETS["dit"]().double()).eval()
    x, t, r, cond, dx, dt = _inputs()
    x.requires_grad_(True)
    u, _, _ = row_jvp(net, (x, t, r, cond), (dx[:2], dt[:2], None, None), rows=2)
    assert not hasattr(u, _ATTR) and not hasattr(x, _ATTR) and not hasattr(t, _ATTR)
    u.square().sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    gx = x.grad.clone()
    net.zero_grad()
    x.grad = None
    net(x, t, r, cond_index(cond, slice(None))).square().sum().backward()
    for a, b in zip(grads, (p.grad for p in net.parameters()), strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(gx, x.grad, atol=1e-12, rtol=1e-10)


def test_in_place_update_of_a_view_is_refused_not_miscomputed():
    def fn(y):
        h = y * 2
        h[:, :1].mul_(3)  # the base's tangent would go stale
        return h

    with pytest.raises(RuntimeError, match="in-place update of a view"):
        row_jvp(fn, (torch.randn(4, 3),), (torch.randn(2, 3),), rows=2)


def test_bad_tangent_shapes_are_refused():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="2 rows"):
        row_jvp(torch.sin, (x,), (torch.randn(3, 3),), rows=2)
    with pytest.raises(ValueError, match="shape"):
        row_jvp(torch.sin, (x,), (torch.randn(4, 2),))
