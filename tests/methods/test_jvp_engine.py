"""The forward-mode engine (``methods/jvp.py``) against ``torch.func.jvp``, in float64.

For every network family (U-Net, DiT, MMDiT) with active dropout, both modes of ``two_time_jvp`` must give
``u`` and ``du`` equal to ``torch.func.jvp`` of the same rows with the same dropout masks (relative 1e-10),
zero ``du`` on the rows that were not asked for, and the primal's gradients of an ordinary forward.
The reference draws its masks in the order each mode promises: ``single_pass`` as one forward of the whole
batch (its dual pass covers every row, the tangent zero past the asked rows), ``two_pass`` the tangent rows
first, then the others.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from selfe_cli.errors import UserError
from selfe_cli.methods.jvp import attention_jvp_backend, dual_jvp, plan_jvp, two_time_jvp
from selfe_cli.methods.row_tangents import row_jvp
from selfe_cli.models.conditioning import cond_index
from selfe_cli.models.registry import build_model

REL = 1e-10


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


def _unet():
    return build_model("unet", sample_size=8, in_channels=2, model_channels=8, channel_mult=(1, 2), num_blocks=1,
                       attn_resolutions=(4,), num_heads=2, dropout=0.2, time_freq_dim=16, condition="class",
                       num_classes=3)


def _dit():
    return build_model("dit", sample_size=8, in_channels=2, patch_size=2, hidden_size=32, depth=2, num_heads=2,
                       time_freq_dim=16, condition="class", num_classes=3, dropout=0.2)


def _mmdit():
    return build_model("mmdit", sample_size=8, in_channels=2, patch_size=2, hidden_size=32, num_heads=2,
                       depth_double=1, depth_single=1, time_freq_dim=16, condition="class", num_classes=3,
                       dropout=0.2)


NETS = {"unet": _unet, "dit": _dit, "mmdit": _mmdit}


def _inputs(n: int = 5):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, 2, 8, 8, generator=g, dtype=torch.float64)
    t = torch.rand(n, generator=g, dtype=torch.float64) * 0.9 + 0.05
    r = t * torch.rand(n, generator=g, dtype=torch.float64)
    cond = torch.tensor([0, 1, 2, 3, 1][:n])  # 3 = the null label
    dx = torch.randn(n, 2, 8, 8, generator=g, dtype=torch.float64)
    return x, t, r, cond, dx, torch.ones_like(t)


def _reference(net, x, t, r, cond, dx, dt, k: int, *, functorch: bool = True):
    """The JVP of the first k rows, then an ordinary forward of the rest (masks drawn in that order).

    ``functorch``: ``torch.func.jvp``; otherwise PyTorch's own forward-mode rules (``forward_ad`` without
    the engine's tangent rules). The U-Net's activations are channels-last, and ``torch.func.jvp`` draws
    dropout masks of channels-last tensors in another element order than a plain forward does (checked:
    ``F.dropout`` under ``torch.func.jvp`` differs from the plain call with the same seed, ``forward_ad``
    does not), so with active dropout the U-Net is compared with ``forward_ad``'s own rules.
    """
    def f(x_, t_):
        return net(x_, t_, r[:k], cond_index(cond, slice(0, k)))

    with sdpa_kernel(SDPBackend.MATH):  # the only SDPA backend with a forward-AD rule
        if functorch:
            u_head, du_head = torch.func.jvp(f, (x[:k], t[:k]), (dx[:k], dt[:k]))
        else:
            u_head, du_head = dual_jvp(f, (x[:k], t[:k]), (dx[:k], dt[:k]))
    if k == x.shape[0]:
        return u_head, du_head
    u_tail = net(x[k:], t[k:], r[k:], cond_index(cond, slice(k, None)))
    return torch.cat([u_head, u_tail]), du_head


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("mode", ["single_pass", "two_pass"])
@pytest.mark.parametrize("kind", sorted(NETS))
def test_engine_equals_torch_func_jvp_with_dropout(kind, mode):
    torch.manual_seed(0)
    net = _roughen(NETS[kind]()).double().train()
    x, t, r, cond, dx, dt = _inputs()
    k = 3
    torch.manual_seed(11)
    if mode == "single_pass":  # one dual pass over every row (masks drawn as by one forward), tangent zero past k
        keep = (torch.arange(5) < k).double()
        dx0, dt0 = dx * keep.view(-1, 1, 1, 1), dt * keep
        u_ref, du_ref = _reference(net, x, t, r, cond, dx0, dt0, 5, functorch=kind != "unet")
        du_ref = du_ref[:k]
    else:  # the JVP of the first k rows, then the forward of the rest
        u_ref, du_ref = _reference(net, x, t, r, cond, dx, dt, k, functorch=kind != "unet")
    torch.manual_seed(11)
    u, du = two_time_jvp(net, x, t, r, cond, dx, dt, None, jvp_rows=k, mode=mode)
    assert du_ref.abs().max() > 1e-3  # a real derivative
    assert _rel(u, u_ref) < REL and _rel(du[:k], du_ref) < REL
    assert (du[k:] == 0).all()  # rows not asked for: no tangent
    # other masks give another answer: the comparison above is not vacuous
    torch.manual_seed(12)
    _, du_other = two_time_jvp(net, x, t, r, cond, dx, dt, None, jvp_rows=k, mode=mode)
    assert _rel(du_other[:k], du_ref) > 1e-6


@pytest.mark.parametrize("kind", sorted(NETS))
def test_engine_equals_torch_func_jvp_without_dropout(kind):
    torch.manual_seed(0)
    net = _roughen(NETS[kind]()).double().eval()
    x, t, r, cond, dx, dt = _inputs()
    u_ref, du_ref = _reference(net, x, t, r, cond, dx, dt, 5)
    for mode in ("single_pass", "two_pass"):
        u, du = two_time_jvp(net, x, t, r, cond, dx, dt, None, mode=mode)
        assert _rel(u, u_ref) < REL and _rel(du, du_ref) < REL, mode


@pytest.mark.parametrize("mode", ["single_pass", "two_pass"])
@pytest.mark.parametrize("kind", sorted(NETS))
def test_engine_primal_back_propagates_like_a_plain_forward(kind, mode):
    """``u`` from the engine carries the graph of an ordinary forward (dropout off: one forward to compare)."""
    torch.manual_seed(0)
    net = _roughen(NETS[kind]()).double().eval()  # eval: no dropout, so a single forward is the reference
    x, t, r, cond, dx, dt = _inputs()
    u, _ = two_time_jvp(net, x, t, r, cond, dx, dt, None, jvp_rows=2, mode=mode)
    (u ** 2).sum().backward()
    got = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    (net(x, t, r, cond) ** 2).sum().backward()
    for a, b in zip(got, (p.grad for p in net.parameters()), strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("k", [0, 5])
def test_engine_all_or_no_rows(k):
    torch.manual_seed(0)
    net = _roughen(_dit()).double().eval()
    x, t, r, cond, dx, dt = _inputs()
    u, du = two_time_jvp(net, x, t, r, cond, dx, dt, None, jvp_rows=k)
    torch.testing.assert_close(u, net(x, t, r, cond), atol=1e-12, rtol=0)
    if k == 0:
        assert (du == 0).all()
    else:
        _, du_ref = dual_jvp(net, (x, t, r, cond), (dx, dt, None, None))
        assert _rel(du, du_ref) < REL
    with pytest.raises(ValueError, match="jvp_rows"):
        two_time_jvp(net, x, t, r, cond, dx, dt, None, jvp_rows=6)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_activation_rules_equal_pytorch_forward_ad(approximate):
    """silu / gelu tangents from their backward kernels equal PyTorch's own forward-mode rules."""
    x = torch.randn(4, 7, dtype=torch.float64) * 3
    dx = torch.randn_like(x)
    for fn in (F.silu, lambda y: F.gelu(y, approximate=approximate)):
        out, tan = engine_jvp(fn, (x,), (dx,))
        ref_out, ref_tan = dual_jvp(fn, (x,), (dx,))
        torch.testing.assert_close(out, ref_out, atol=0, rtol=0)
        torch.testing.assert_close(tan, ref_tan, atol=1e-13, rtol=1e-12)


def test_attention_rule_with_mask_equals_pytorch_forward_ad():
    """The explicit softmax JVP (CPU fallback) with a float key mask and tangents on q, k and v."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64) for _ in range(3))
    dq, dk, dv = (torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.zeros(2, 1, 1, 5, dtype=torch.float64)
    mask[0, ..., -2:] = float("-inf")

    def fn(a, b, c):
        return F.scaled_dot_product_attention(a, b, c, attn_mask=mask)

    out, tan = engine_jvp(fn, (q, k, v), (dq, dk, dv))
    ref_out, ref_tan = dual_jvp(fn, (q, k, v), (dq, dk, dv))
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=0)
    torch.testing.assert_close(tan, ref_tan, atol=1e-12, rtol=1e-10)
    assert attention_jvp_backend("cpu") == "explicit"


def test_plan_picks_two_pass_for_compiled_networks_and_refuses_impossible_requests():
    net = _dit()  # dropout 0.2, training mode
    plan = plan_jvp(net)
    assert plan.mode == "single_pass" and "dropout" in plan.describe()
    plain = plan_jvp(_dit().eval())  # no active dropout: still one pass, the cheapest route
    assert plain.mode == "single_pass" and "dropout" not in plain.describe()
    compiled = torch.compile(net)  # lazy: nothing is compiled until called
    assert plan_jvp(compiled).mode == "two_pass"
    assert plan_jvp(compiled, "two_pass").reason == "requested"
    with pytest.raises(UserError, match="jvp_mode"):
        plan_jvp(compiled, "single_pass")
    # bf16 training with a float32 JVP: the forward with graph stays in bf16 (two_pass); a bf16 JVP: one pass
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert plan_jvp(net, dtype="float32").mode == "two_pass"
        assert plan_jvp(net, dtype="bfloat16").mode == "single_pass"
        assert plan_jvp(net, "single_pass", dtype="float32").mode == "single_pass"  # asked for: all in float32


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_attention_jvp_equals_math(dtype):
    """On CUDA with jvp_flash_attention: its fused JVP equals the MATH kernel's forward-mode rule."""
    pytest.importorskip("jvp_flash_attention")
    assert attention_jvp_backend("cuda") == "triton"
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (2, 4, 128, 64)
    q, k, v, dq, dk, dv = (torch.randn(shape, generator=g, device="cuda", dtype=dtype) for _ in range(6))

    def fn(a, b, c):
        return F.scaled_dot_product_attention(a, b, c)

    out, tan = engine_jvp(fn, (q, k, v), (dq, dk, dv))  # the engine: the Triton kernel
    ref_out, ref_tan = dual_jvp(fn, (q, k, v), (dq, dk, dv))  # MATH rule
    tol = {torch.float32: 2e-3, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(out.float(), ref_out.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(tan.float(), ref_tan.float(), atol=tol * 4, rtol=tol * 4)


ARITH = {
    "x*s": lambda y, c: y * 0.7, "s*x": lambda y, c: 0.7 * y, "x/s": lambda y, c: y / 2.0,
    "s/x": lambda y, c: 2.0 / (y + 5), "x+s": lambda y, c: y + 1.0, "s+x": lambda y, c: 1.0 + y,
    "x-s": lambda y, c: y - 1.0, "s-x": lambda y, c: 1.0 - y, "x*c": lambda y, c: y * c, "c*x": lambda y, c: c * y,
    "c/x": lambda y, c: c / (y + 5), "x/c": lambda y, c: y / c, "c-x": lambda y, c: c - y,
    "x-c": lambda y, c: y - c, "add-alpha": lambda y, c: torch.add(c, y, alpha=2.0),
    "sub-alpha": lambda y, c: torch.sub(c, y, alpha=3.0), "rsub": lambda y, c: torch.rsub(y, c),
    "broadcast": lambda y, c: y[:, :1] + torch.zeros(3, 4, 5, dtype=torch.float64),
    "dual-dual": lambda y, c: (y * 2 + 1) / (y + 4) - 3 * y, "dual*dual": lambda y, c: y * y[:, :1] * (1 + y),
}


@pytest.mark.parametrize("name", sorted(ARITH))
def test_arithmetic_with_constants_equals_pytorch_forward_ad(name):
    """dual (+ - * /) constant: the engine's closed forms equal PyTorch's rules (which take a slow zero-tangent
    path there), broadcasting and alpha included."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    dx = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    c = torch.randn(3, 1, 5, generator=g, dtype=torch.float64) + 3

    def fn(y):
        return ARITH[name](y, c)

    out, tan = engine_jvp(fn, (x,), (dx,))
    ref_out, ref_tan = dual_jvp(fn, (x,), (dx,))
    torch.testing.assert_close(out, ref_out, atol=0, rtol=0)
    torch.testing.assert_close(tan, ref_tan, atol=1e-14, rtol=1e-12)
    assert tan.abs().max() > 1e-3


def test_dropout_rule_is_the_identity_only_when_nothing_is_dropped():
    x = torch.randn(4, 6, dtype=torch.float64)
    dx = torch.randn_like(x)
    out, tan = engine_jvp(lambda y: F.dropout(y, 0.0, training=True), (x,), (dx,))
    assert torch.equal(out, x) and torch.equal(tan, dx)
    torch.manual_seed(0)
    out, tan = engine_jvp(lambda y: F.dropout(y, 0.5, training=True), (x,), (dx,))
    kept = out != 0
    assert 0 < kept.sum() < x.numel()  # real dropout: one mask for primal and tangent
    torch.testing.assert_close(tan[kept], 2 * dx[kept], atol=0, rtol=0)
    assert (tan[~kept] == 0).all()


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_engine_on_text_models_with_padding_masks(kind):
    """Text conditions: cross-attention with a key-padding mask per row (sliced with the tangent rows)."""
    from selfe_cli.models.text import TextConditioner

    torch.manual_seed(0)
    common = dict(sample_size=8, in_channels=2, time_freq_dim=16, condition="text", text_width=32, text_layers=1,
                  text_heads=2, text_context_length=16)
    if kind == "unet":
        net = build_model("unet", model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,),
                          num_heads=2, **common)
    else:
        net = build_model("dit", patch_size=2, hidden_size=32, depth=1, num_heads=2, **common)
    net = _roughen(net).double().eval()
    cond = TextConditioner(16).encode(["a red cube", "two blue spheres left of a green cube", "", "a cat", "x"])
    x, t, r, _, dx, dt = _inputs()
    u_ref, du_ref = _reference(net, x, t, r, cond, dx * (torch.arange(5) < 3).double().view(-1, 1, 1, 1),
                               dt * (torch.arange(5) < 3).double(), 5)
    u, du = two_time_jvp(net, x, t, r, cond, dx, dt, None, jvp_rows=3)
    assert du_ref.abs().max() > 1e-3
    assert _rel(u, u_ref) < REL and _rel(du[:3], du_ref[:3]) < REL and (du[3:] == 0).all()
