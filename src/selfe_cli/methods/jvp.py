"""The package's one forward-mode engine: exact Jacobian-vector products of a network, without waste.

Every method whose target contains a total derivative along the probability-flow trajectory (MeanFlow
and its successors, continuous consistency training) needs ``u = net(x, t, r, c)`` *with* its autograd
graph and ``du = J net . (dx, dt, dr)`` *without* one, on the rows where the target uses it (MeanFlow:
rows with ``r != t``; elsewhere ``(t - r) du = 0``). ``two_time_jvp`` computes exactly that:

* ``single_pass`` (the default where it applies): the rows that need the tangent go through the network
  once as forward-mode dual tensors (``torch.autograd.forward_ad``), which gives their ``u`` with its
  graph and their tangent in the same pass; the other rows go through an ordinary forward. Dropout draws
  one mask per row that serves primal and tangent alike (it is one op), so active dropout is exact, and
  both calls go through the network *as passed*: under ``DistributedDataParallel`` the reducer sees the
  graph and all-reduces on ``backward`` (``torch.func.jvp`` can trace neither through the DDP wrapper nor
  through ``ddp.module`` without silently skipping the all-reduce, pytorch #102197).
* ``two_pass``: the tangent rows' JVP runs under ``no_grad`` on the bare module, then ordinary forwards
  with graph give ``u``; the RNG is forked around the JVP so that the forward of the same rows draws the
  same dropout masks. One more forward of the tangent rows, but nothing forward-mode inside the graph:
  this is the mode for FSDP2 (its post-backward hook is an autograd Function without a forward-AD rule)
  and for DDP with ``find_unused_parameters`` / ``static_graph`` (which insert such a Function too).

Inside a dual pass, ``TangentOps`` replaces PyTorch's built-in forward-mode rules for the layers that
carry the cost. The built-in rules are exact but wasteful: for convolution and linear layers they
convolve / multiply a materialised zero *weight* tangent (measured on 2 CPU cores: a dual conv costs 2.5
plain convs, a dual linear 6), norms and activations decompose into many small ops, and with grad enabled
every tangent op is recorded in the autograd graph although nothing back-propagates through the tangent.
With ``TangentOps`` the primal is the op itself (with its graph; attention keeps its fused kernels) and the
tangent is its closed form under ``no_grad``, from fused kernels where PyTorch has them (norms and
activations reuse their backward kernels: their Jacobians are symmetric or diagonal). Anything without a
rule falls through to PyTorch's own rule, so the result is exact either way
(``tests/methods/test_jvp_engine.py`` compares every network with ``torch.func.jvp`` in float64).

The tangent returned is always detached: the targets that use it are under stop-gradient.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from selfe_cli.methods.base import is_sharded, unwrap
from selfe_cli.methods.configs import JvpDtype, JvpMode
from selfe_cli.methods.paths import bcast
from selfe_cli.models.conditioning import cond_index

# Ops that are linear in their input for fixed (weight, bias): tangent = op(x_t, weight, no bias).
# All take (input, weight, bias, *rest) positionally.
_LINEAR_IN_INPUT = {
    F.linear, torch.conv1d, torch.conv2d, torch.conv3d,
    torch.conv_transpose1d, torch.conv_transpose2d, torch.conv_transpose3d,
}
_FAST_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                  SDPBackend.MATH]



def _unpack(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``fwAD.unpack_dual`` at the running level without its Python wrapper (4 us instead of 12, ~450 calls a
    pass)."""
    return torch._unpack_dual(x, level=fwAD._current_level)


def _tangent_of(x: Any) -> torch.Tensor | None:
    if not isinstance(x, torch.Tensor):
        return None
    return _unpack(x)[1]


def _bind(args: tuple, kwargs: dict, names: tuple[str, ...], defaults: tuple) -> list[Any]:
    """Positional + keyword arguments -> values in ``names`` order (defaults fill the rest)."""
    return list(args) + [kwargs[n] if n in kwargs else d
                         for n, d in zip(names[len(args):], defaults[len(args):], strict=True)]


def _dual(out: torch.Tensor, tangent: torch.Tensor) -> torch.Tensor:
    return fwAD.make_dual(out, tangent.to(out.dtype))


# Tangent rows of the running dual pass: (k, n) when only the first k of n batch rows carry a tangent (the
# others are exactly zero), so the rules below compute the costly tangents on k rows and pad with zeros.
# Valid for networks whose every conv / linear / norm / activation / attention input has the batch as its
# leading dimension and that mix no rows (``batch_major_jvp = True``; checked against torch.func.jvp in the
# tests); tensors whose leading size is not n are handled whole.
_ROWS: list[tuple[int, int]] = []


def _head(x: torch.Tensor) -> torch.Tensor | None:
    """The first k rows of a batch-major tensor of the running pass, or None (use the whole tensor)."""
    if not _ROWS:
        return None
    k, n = _ROWS[-1]
    if x.dim() == 0 or x.shape[0] != n:
        return None
    return x[:k]


def _pad(head: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``head`` (k rows) followed by zero rows: a tangent shaped (and laid out) like ``like``."""
    k = head.shape[0]
    out = torch.empty_like(like, dtype=head.dtype)
    out[:k].copy_(head)
    out[k:].zero_()
    return out


# ----------------------------------------------------------------------------- tangent rules


def _linear_rule(func, args, kwargs):  # noqa: ANN001, ANN202
    """conv / linear: ``d op(x; W, b) = op(dx; W, no bias)``, one GEMM, no weight tangent."""
    args = list(args)
    for i, name in enumerate(("input", "weight", "bias")):  # keyword input/weight/bias -> positions
        if name in kwargs and len(args) == i:
            args.append(kwargs.pop(name))
    if len(args) < 2:
        return func(*args, **kwargs)
    if len(args) < 3:
        args.append(kwargs.pop("bias", None))
    x, weight, bias = args[0], args[1], args[2]
    primal, x_tangent = _unpack(x)
    if x_tangent is None or _tangent_of(weight) is not None or _tangent_of(bias) is not None:
        return func(*args, **kwargs)
    out = func(primal, weight, bias, *args[3:], **kwargs)
    with torch.no_grad():
        dx = x_tangent.to(primal.dtype)
        head = _head(dx)
        if head is None:
            tangent = func(dx, weight, None, *args[3:], **kwargs)
        else:
            tangent = _pad(func(head, weight, None, *args[3:], **kwargs), out)
    return _dual(out, tangent)  # outside no_grad: keeps the primal graph


def _group_norm_rule(func, args, kwargs):  # noqa: ANN001, ANN202
    """F.group_norm: primal and statistics from one ``native_group_norm`` (keeps the graph).

    The plain normalisation ``n(x) = (x - mean) rstd`` has the symmetric Jacobian
    ``rstd (I - 11^T / m - n n^T / m)`` per group, so its JVP is its VJP: the fused backward kernel with
    ``weight=None`` gives it in one pass (spelt out, it cost 5-12 full-size ops per norm, the bottleneck of
    a U-Net's JVP). ``gamma`` acts per channel after the normalisation, so it multiplies the result.
    """
    x, groups, weight, bias, eps = _bind(args, kwargs, ("input", "num_groups", "weight", "bias", "eps"),
                                         (None, None, None, None, 1e-5))
    primal, dx = _unpack(x)
    if dx is None or _tangent_of(weight) is not None or _tangent_of(bias) is not None:
        return func(*args, **kwargs)
    n, c = primal.shape[:2]
    hw = primal.numel() // max(n * c, 1)
    out, mean, rstd = torch.native_group_norm(primal, weight, bias, n, c, hw, groups, eps)  # (N, G) stats
    with torch.no_grad():
        dx, x_ = dx.to(primal.dtype), primal.detach()
        head = _head(dx)
        if head is not None:
            k = head.shape[0]
            dx, x_, mean, rstd = head, x_[:k], mean[:k], rstd[:k]
        tangent = torch.ops.aten.native_group_norm_backward(
            dx, x_, mean.detach(), rstd.detach(), None, dx.shape[0], c, hw, groups, [True, False, False])[0]
        if weight is not None:
            tangent = tangent * weight.view((1, c) + (1,) * (primal.dim() - 2))
        if head is not None:
            tangent = _pad(tangent, out)
    return _dual(out, tangent)  # outside no_grad: keeps the primal graph


def _layer_norm_rule(func, args, kwargs):  # noqa: ANN001, ANN202
    """F.layer_norm: like ``_group_norm_rule`` (symmetric Jacobian, fused backward kernel as the JVP)."""
    x, shape, weight, bias, eps = _bind(args, kwargs, ("input", "normalized_shape", "weight", "bias", "eps"),
                                        (None, None, None, None, 1e-5))
    primal, dx = _unpack(x)
    if dx is None or _tangent_of(weight) is not None or _tangent_of(bias) is not None:
        return func(*args, **kwargs)
    shape = list(shape)
    out, mean, rstd = torch.native_layer_norm(primal, shape, weight, bias, eps)  # (..., 1) stats
    with torch.no_grad():
        dx, x_ = dx.to(primal.dtype), primal.detach()
        head = _head(dx) if primal.dim() > len(shape) else None
        if head is not None:
            k = head.shape[0]
            dx, x_, mean, rstd = head, x_[:k], mean[:k], rstd[:k]
        tangent = torch.ops.aten.native_layer_norm_backward(
            dx, x_, shape, mean.detach(), rstd.detach(), None, None, [True, False, False])[0]
        if weight is not None:
            tangent = tangent * weight
        if head is not None:
            tangent = _pad(tangent, out)
    return _dual(out, tangent)  # outside no_grad: keeps the primal graph


def _silu_rule(func, args, kwargs):  # noqa: ANN001, ANN202
    """F.silu: the Jacobian is diagonal, so the backward kernel ``silu'(x) * dx`` is the tangent (1 op)."""
    x, inplace = _bind(args, kwargs, ("input", "inplace"), (None, False))
    primal, x_tangent = _unpack(x)
    if x_tangent is None or inplace:
        return func(*args, **kwargs)
    out = func(primal)
    with torch.no_grad():
        dx, x_ = x_tangent.to(primal.dtype), primal.detach()
        head = _head(dx)
        if head is None:
            tangent = torch.ops.aten.silu_backward(dx, x_)
        else:
            tangent = _pad(torch.ops.aten.silu_backward(head, x_[:head.shape[0]]), out)
    return _dual(out, tangent)  # outside no_grad: keeps the primal graph


def _gelu_rule(func, args, kwargs):  # noqa: ANN001, ANN202
    """F.gelu (exact and tanh): diagonal Jacobian, the backward kernel is the tangent."""
    x, approximate = _bind(args, kwargs, ("input", "approximate"), (None, "none"))
    primal, x_tangent = _unpack(x)
    if x_tangent is None:
        return func(*args, **kwargs)
    out = func(primal, approximate=approximate)
    with torch.no_grad():
        dx, x_ = x_tangent.to(primal.dtype), primal.detach()
        head = _head(dx)
        if head is None:
            tangent = torch.ops.aten.gelu_backward(dx, x_, approximate=approximate)
        else:
            tangent = _pad(torch.ops.aten.gelu_backward(head, x_[:head.shape[0]], approximate=approximate), out)
    return _dual(out, tangent)  # outside no_grad: keeps the primal graph


def _dropout_rule(func, args, kwargs):  # noqa: ANN001, ANN202
    """F.dropout that drops nothing (p = 0, or not training) is the identity, tangent included.

    PyTorch's forward-mode formula still multiplies the tangent by a mask through a decomposition (measured:
    0.6 ms per call on an 8 x 32 x 8 x 8 tangent on 2 CPU cores); real dropout falls through to PyTorch's
    rule, which shares its mask between primal and tangent and draws it like the plain op.
    """
    x, p, training, inplace = _bind(args, kwargs, ("input", "p", "training", "inplace"), (None, 0.5, True, False))
    if (p == 0 or not training) and not inplace:
        return x
    return func(*args, **kwargs)


# Binary arithmetic. Where only one operand is dual (a Python number, a constant tensor, or a tensor without
# tangent on the other side), PyTorch's formulas meet an undefined tangent as an "efficient zero tensor", whose
# fallback path costs about 1 ms per op on 2 CPU cores whatever the size (measured: ``dual * 0.7`` on an
# 8 x 32 x 8 x 8 tensor, 1.0 ms against 15 us plain), the largest overhead of a U-Net's JVP; and a product of
# two duals costs ~9 plain products there (DiT's modulation). The closed forms:
_ARITH = {
    torch.add: "add", torch.Tensor.add: "add", torch.Tensor.__add__: "add", torch.Tensor.__radd__: "add",
    torch.sub: "sub", torch.Tensor.sub: "sub", torch.Tensor.__sub__: "sub", torch.Tensor.__rsub__: "rsub",
    torch.mul: "mul", torch.Tensor.mul: "mul", torch.Tensor.__mul__: "mul", torch.Tensor.__rmul__: "mul",
    torch.div: "div", torch.Tensor.div: "div", torch.Tensor.__truediv__: "div", torch.Tensor.__rtruediv__: "rdiv",
}


def _arith_rule(func, args, kwargs):  # noqa: ANN001, ANN202
    kind = _ARITH[func]
    alpha = kwargs.get("alpha", 1)
    if len(args) != 2 or set(kwargs) - ({"alpha"} if kind in ("add", "sub", "rsub") else set()):
        return func(*args, **kwargs)
    (a, da), (b, db) = ((_unpack(x) if isinstance(x, torch.Tensor) else (x, None)) for x in args)
    if da is None and db is None:
        return func(*args, **kwargs)
    if da is not None and db is not None and kind not in ("mul", "div"):  # dual +- dual: PyTorch's rule is fine
        return func(*args, **kwargs)
    out = func(a, b, **kwargs)
    with torch.no_grad():
        a_, b_ = (x.detach() if isinstance(x, torch.Tensor) else x for x in (a, b))
        if da is not None and db is not None:  # PyTorch's rule costs ~9 plain products here (measured)
            if kind == "mul":
                tangent = torch.addcmul(da * b_, a_, db)
            else:  # a / b: (da - (a / b) db) / b
                tangent = torch.addcmul(da, a_ / b_, db, value=-1) / b_
        elif kind == "add":
            tangent = da if da is not None else db * alpha
        elif kind == "sub":  # a - alpha b
            tangent = da if da is not None else db * -alpha
        elif kind == "rsub":  # b - alpha a (Tensor.__rsub__(a, b))
            tangent = da * -alpha if da is not None else db
        elif kind == "mul":
            tangent = da * b_ if da is not None else a_ * db
        elif kind == "div":  # a / b
            tangent = da / b_ if da is not None else -(a_ / b_) / b_ * db
        else:  # rdiv: b / a (Tensor.__rtruediv__(a, b))
            tangent = -(b_ / a_) / a_ * da if da is not None else db / a_
        if tangent.shape != out.shape:  # broadcasting: the tangent has the output's shape
            tangent = tangent.expand(out.shape)
    return _dual(out, tangent)  # outside no_grad: keeps the primal graph


def _attention_tangent(q, k, v, dq, dk, dv, mask, is_causal, scale):  # noqa: ANN001, ANN202
    """d softmax(q k^T s + m) v = dP v + P dv, dP = P (dS - rowsum(P dS)), dS = s (dq k^T + q dk^T).

    Explicit (O(L S) memory per head): the fallback where no fused attention kernel has a JVP.
    """
    work = torch.promote_types(q.dtype, torch.float32)  # bf16 activations: the softmax JVP in fp32
    q, k, v = q.to(work), k.to(work), v.to(work)
    scores = q @ k.transpose(-2, -1) * scale  # (..., L, S)
    if is_causal:
        causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.to(work)
    probs = scores.softmax(-1)  # (..., L, S)
    d_scores = None
    if dq is not None:
        d_scores = dq.to(work) @ k.transpose(-2, -1) * scale
    if dk is not None:
        term = q @ dk.to(work).transpose(-2, -1) * scale
        d_scores = term if d_scores is None else d_scores + term
    out = probs @ dv.to(work) if dv is not None else None
    if d_scores is not None:
        d_probs = probs * (d_scores - (probs * d_scores).sum(-1, keepdim=True))
        out = d_probs @ v if out is None else out + d_probs @ v
    return out


def _triton_jvp_attention() -> Callable[..., torch.Tensor] | None:
    """``jvp_flash_attention``'s Triton kernel (forward with JVP, and backward) where it can run: CUDA only."""
    if not torch.cuda.is_available():
        return None
    try:
        from jvp_flash_attention.jvp_attention import attention
    except ImportError:
        return None
    return attention


def attention_jvp_backend(device: torch.device | str) -> str:
    """Which attention JVP a dual pass on ``device`` uses: ``triton`` (fused, O(L) memory) or ``explicit``."""
    device = torch.device(device)
    return "triton" if device.type == "cuda" and _triton_jvp_attention() is not None else "explicit"


def _sdpa_rule(func, args, kwargs):  # noqa: ANN001, ANN202
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    q, k, v, mask, dropout_p, is_causal, scale, gqa = _bind(args, kwargs, names,
                                                            (None, None, None, None, 0.0, False, None, False))
    (qp, dq), (kp, dk), (vp, dv) = (_unpack(a) for a in (q, k, v))
    if (dq is None and dk is None and dv is None) or dropout_p or gqa or _tangent_of(mask) is not None \
            or qp.shape[:-2] != kp.shape[:-2]:
        return func(*args, **kwargs)  # PyTorch's rule (MATH kernel, forced by dual_jvp)
    scale = scale if scale is not None else 1.0 / math.sqrt(qp.shape[-1])
    fused = _triton_jvp_attention() if qp.is_cuda else None
    if fused is not None and mask is None and qp.shape == kp.shape == vp.shape and qp.dim() == 4 \
            and qp.dtype in (torch.float16, torch.bfloat16, torch.float32):
        # Self-attention on CUDA: jvp_flash_attention's kernel gives primal (with its own backward) and
        # tangent in one fused pass, O(L) memory. Zero tangents where PyTorch left them undefined.
        duals = [fwAD.make_dual(p, d if d is not None else torch.zeros_like(p)) for p, d in ((qp, dq), (kp, dk), (vp, dv))]
        out = fused(*duals, causal=bool(is_causal), sm_scale=scale)
        primal, tangent = _unpack(out)
        return _dual(primal, tangent.detach())
    with sdpa_kernel(_FAST_BACKENDS):  # the primal (with its graph) may use flash / efficient kernels
        out = func(qp, kp, vp, attn_mask=mask, dropout_p=0.0, is_causal=is_causal, scale=scale)
    with torch.no_grad():
        k, m = None, mask
        if _ROWS and qp.dim() == 4 and qp.shape[0] == kp.shape[0] == _ROWS[-1][1]:
            if mask is None or mask.dim() < 4 or mask.shape[0] == 1:  # broadcast over the batch as it is
                k = _ROWS[-1][0]
            elif mask.shape[0] == qp.shape[0]:
                k = _ROWS[-1][0]
                m = mask[:k]
        if k is None:
            tangent = _attention_tangent(qp.detach(), kp.detach(), vp.detach(), dq, dk, dv, mask, is_causal, scale)
        else:
            rows = [None if d is None else d[:k] for d in (dq, dk, dv)]
            tangent = _pad(_attention_tangent(qp.detach()[:k], kp.detach()[:k], vp.detach()[:k], *rows, m,
                                              is_causal, scale), out)
    return _dual(out, tangent)  # outside no_grad: keeps the primal graph


_RULES = {f: _linear_rule for f in _LINEAR_IN_INPUT}
_RULES.update({f: _arith_rule for f in _ARITH})
_RULES.update({
    F.group_norm: _group_norm_rule,
    F.layer_norm: _layer_norm_rule,
    F.silu: _silu_rule,
    F.gelu: _gelu_rule,
    F.dropout: _dropout_rule,
    F.scaled_dot_product_attention: _sdpa_rule,
})


class TangentOps(TorchFunctionMode):
    """Inside a ``fwAD.dual_level``: exact tangent rules for the layers that carry the cost, without graph.

    For conv / linear / group_norm / layer_norm / silu / gelu / scaled_dot_product_attention with a dual
    input and constant (non-dual) weights, the primal is the op itself (with its autograd graph) and the
    tangent its closed form under ``no_grad``; everything else falls through to PyTorch's own rules.
    """

    def __init__(self, rows: tuple[int, int] | None = None):
        super().__init__()
        self.rows = rows  # (k, n): only the first k of n batch rows carry a tangent

    def __enter__(self):  # noqa: ANN204
        if self.rows is not None:
            _ROWS.append(self.rows)
        return super().__enter__()

    def __exit__(self, *exc):  # noqa: ANN002, ANN204
        if self.rows is not None:
            _ROWS.pop()
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        rule = _RULES.get(func)
        if rule is None:
            return func(*args, **(kwargs or {}))
        return rule(func, args, dict(kwargs or {}))


# ----------------------------------------------------------------------------- precision


@contextlib.contextmanager
def jvp_precision(device: torch.device, dtype: JvpDtype) -> Iterator[None]:
    """Run the JVP in fp32 (autocast off) or bf16 autocast, whatever the surrounding autocast is.

    fp16 is not offered: MeanFlow ports report NaN losses with it.
    """
    if dtype == "float32":
        with torch.autocast(device.type, enabled=False):
            yield
    else:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=True):
            yield


def as_jvp_input(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 activations go into the JVP as fp32 (float64 stays float64 for tests)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


# ----------------------------------------------------------------------------- one dual pass


def dual_jvp(fn: Callable[..., torch.Tensor], primals: Sequence[Any],
             tangents: Sequence[torch.Tensor | None], *, fast_linear_tangents: bool = True,
             math_sdpa: bool = True, tangent_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fn(*primals), J fn . tangents)`` by forward-mode AD; ``None`` tangents are zero.

    Non-tensor primals (conditions, dicts) pass through unchanged. The primal output keeps its
    autograd graph when grad mode is on (so ``fn`` may be a DDP wrapper); the tangent is detached.
    Attention that ``TangentOps`` does not handle runs on the MATH SDPA kernel (the flash /
    memory-efficient kernels have no forward-AD rule). ``fast_linear_tangents=False`` uses PyTorch's
    own rules throughout (the reference in tests). ``tangent_rows=k``: the tangents are zero past the first
    ``k`` rows (the caller guarantees it) and ``fn`` is batch-major (``_ROWS``): the costly tangents are
    computed on ``k`` rows only.
    """
    if len(primals) != len(tangents):
        raise ValueError(f"{len(primals)} primals but {len(tangents)} tangents")
    n = next((p.shape[0] for p in primals if isinstance(p, torch.Tensor) and p.dim()), None)
    rows = (tangent_rows, n) if tangent_rows is not None and n is not None and tangent_rows < n else None
    mode = TangentOps(rows) if fast_linear_tangents else contextlib.nullcontext()
    attention = sdpa_kernel(SDPBackend.MATH) if math_sdpa else contextlib.nullcontext()
    with fwAD.dual_level(), attention, mode:
        args = [p if d is None else fwAD.make_dual(p, d.to(p.dtype)) for p, d in zip(primals, tangents, strict=True)]
        out = fn(*args)
        primal, tangent = fwAD.unpack_dual(out)
    if tangent is None:  # the output does not depend on the perturbed inputs
        tangent = torch.zeros_like(primal)
    return primal, tangent.detach()


# ----------------------------------------------------------------------------- the engine


def _uses_ddp_sink(net: nn.Module) -> bool:
    """DDP inserts ``_DDPSink`` (no forward-AD rule) with find_unused_parameters / static_graph."""
    return isinstance(net, nn.parallel.DistributedDataParallel) and bool(
        net.find_unused_parameters or getattr(net, "static_graph", False))


def _is_compiled(net: nn.Module) -> bool:
    while isinstance(net, nn.parallel.DistributedDataParallel):
        net = net.module
    return hasattr(net, "_orig_mod")


def has_active_dropout(net: nn.Module) -> bool:
    bare = unwrap(net)
    return bare.training and any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in bare.modules())


@dataclass(frozen=True)
class JvpPlan:
    """How ``two_time_jvp`` runs for a network: the mode and why (printed by ``selfe train --dry-run``)."""

    mode: Literal["single_pass", "two_pass"]
    reason: str
    attention: str  # "explicit" (softmax JVP in PyTorch ops) or "triton" (jvp_flash_attention)

    def describe(self) -> str:
        return f"{self.mode} ({self.reason}; attention JVP: {self.attention})"


def plan_for(requested: JvpMode = "auto", *, sharded: bool = False, ddp_sink: bool = False,
             compiled: bool = False, device: torch.device | str = "cpu", mixed_precision: bool = False,
             dropout: bool = False) -> JvpPlan:
    """The forward-mode route from the facts that decide it (``plan_jvp`` reads them off a network).

    ``two_pass`` is the default: measured on 2 CPU cores (docs/benchmarks.md) it is as fast as one dual pass
    (its extra forward of the tangent rows costs what the dual pass spends on full-batch tangents) and keeps
    flow matching's peak memory, where the dual pass holds a tangent per activation (1.3x). ``two_pass`` is
    also the only route where a wrapper inserts an autograd Function without a forward-AD rule (FSDP2, DDP
    with ``find_unused_parameters`` or ``static_graph``) and for ``torch.compile``d networks (the compiled
    module runs the forward with graph and its backward, the JVP pass runs eagerly on the bare module), and
    it keeps the forward with graph in bf16 when a bf16-autocast run asks for a float32 JVP
    (``mixed_precision``). ``single_pass`` is chosen for networks with active dropout: one dual pass draws
    each row's mask once for primal and tangent, where ``two_pass`` must split the forward (5-10% slower).
    """
    attention = attention_jvp_backend(device)
    blocker = None
    if sharded:
        blocker = "FSDP2's post-backward hooks have no forward-AD rule"
    elif ddp_sink:
        blocker = "DDP with find_unused_parameters / static_graph inserts a Function without a forward-AD rule"
    elif compiled:
        blocker = "torch.compile: the forward with graph and the backward are compiled, the JVP pass runs eagerly"
    if requested == "single_pass":
        if blocker is not None:
            from selfe_cli.errors import UserError
            raise UserError(f"method.jvp_mode: single_pass cannot run here ({blocker}); use auto or two_pass")
        return JvpPlan("single_pass", "requested", attention)
    if requested == "two_pass":
        return JvpPlan("two_pass", "requested", attention)
    if blocker is not None:
        return JvpPlan("two_pass", blocker, attention)
    if mixed_precision:
        return JvpPlan("two_pass", "bf16 training with jvp_dtype float32: the forward with graph stays in bf16, "
                                   "the JVP rows run in float32", attention)
    if dropout:
        return JvpPlan("single_pass", "active dropout: one dual pass with the primal draws each row's mask once",
                       attention)
    return JvpPlan("two_pass", "no dropout: the JVP rows without graph, then one forward of the batch "
                               "(as fast as one dual pass, with flow matching's memory)", attention)


def plan_jvp(net: nn.Module, requested: JvpMode = "auto", device: torch.device | str | None = None,
             dtype: JvpDtype = "float32") -> JvpPlan:
    """``plan_for`` with the facts of ``net`` (DDP / FSDP / compiled wrappers included) and of the running
    autocast."""
    if device is None:
        p = next(unwrap(net).parameters(), None)
        device = p.device if p is not None else "cpu"
    device_type = torch.device(device).type
    mixed = dtype == "float32" and torch.is_autocast_enabled(device_type) \
        and torch.get_autocast_dtype(device_type) != torch.float32
    return plan_for(requested, sharded=is_sharded(net), ddp_sink=_uses_ddp_sink(net), compiled=_is_compiled(net),
                    device=device, mixed_precision=mixed, dropout=has_active_dropout(net))


def _cat_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    if len(parts) == 1:
        return parts[0]
    dtype = parts[0].dtype
    for p in parts[1:]:
        dtype = torch.promote_types(dtype, p.dtype)
    return torch.cat([p.to(dtype) for p in parts])


def two_time_jvp(net: nn.Module, x: torch.Tensor, t: torch.Tensor, r: torch.Tensor, cond: Any,
                 dx: torch.Tensor, dt: torch.Tensor | None, dr: torch.Tensor | None = None, *,
                 jvp_rows: int | None = None, mode: JvpMode = "auto",
                 dtype: JvpDtype = "float32") -> tuple[torch.Tensor, torch.Tensor]:
    """``u = net(x, t, r, cond)`` with its graph, and ``du = J u . (dx, dt, dr)`` detached.

    Only the first ``jvp_rows`` rows (default: all) get the tangent; ``du`` is zero on the others (callers
    put the rows whose target uses ``du`` first: MeanFlow's ``sample_t_r`` does). ``cond`` is constant.
    ``mode``: ``auto`` picks with ``plan_jvp``; ``dtype``: the JVP's precision (``jvp_precision``).
    """
    n = x.shape[0]
    k = n if jvp_rows is None else int(jvp_rows)
    if not 0 <= k <= n:
        raise ValueError(f"jvp_rows must be in [0, {n}], got {k}")
    plan = plan_jvp(net, mode, x.device, dtype)
    sharded = is_sharded(net)
    head, tail = slice(0, k), slice(k, n)

    def dual_args(sl: slice) -> tuple[tuple, tuple]:
        primals = (as_jvp_input(x[sl]), t[sl], r[sl], cond_index(cond, sl))
        tangents = (dx[sl], None if dt is None else dt[sl], None if dr is None else dr[sl], None)
        return primals, tangents

    du = torch.zeros_like(dx)
    if plan.mode == "single_pass" and 0 < k < n and getattr(unwrap(net), "batch_major_jvp", False):
        # One dual pass over every row, the tangent zero past row k: the costly tangent rules work on k rows
        # (``tangent_rows``), and the batch is not split (two smaller passes cost 5-10% more on 2 CPU cores).
        zero_tail = torch.arange(n, device=x.device) < k  # (N,)
        dx_rows = dx * bcast(zero_tail, dx)
        dt_rows = None if dt is None else dt * zero_tail
        dr_rows = None if dr is None else dr * zero_tail
        with jvp_precision(x.device, dtype):
            u, du_all = dual_jvp(net, (as_jvp_input(x), t, r, cond), (dx_rows, dt_rows, dr_rows, None), tangent_rows=k)
        du[head] = du_all[head].to(du.dtype)
        return u.to(x.dtype), du
    if plan.mode == "single_pass":
        parts = []
        if k:
            with jvp_precision(x.device, dtype):
                u_head, du_head = dual_jvp(net, *dual_args(head))
            parts.append(u_head)
            du[head] = du_head.to(du.dtype)
        if k < n:
            parts.append(net(x[tail], t[tail], r[tail], cond_index(cond, tail)))
        return _cat_rows(parts).to(x.dtype), du

    # two_pass: JVP without graph on the bare module, then forwards with graph through the wrappers.
    bare = unwrap(net)
    dropout = has_active_dropout(net)
    collective = sharded or _uses_ddp_sink(net)  # every rank must make the same calls, one forward each
    if dropout and collective:
        k, head, tail = n, slice(0, n), slice(n, n)  # same shapes as the forward, so the same masks
    jvp_sl = head if (k or not sharded) else slice(0, 1)  # FSDP: a placeholder row keeps ranks in step
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=x.device.type):
        if jvp_sl.stop > jvp_sl.start:
            with torch.no_grad(), jvp_precision(x.device, dtype):
                _, du_head = dual_jvp(bare, *dual_args(jvp_sl))
            if k:
                du[head] = du_head.to(du.dtype)
    # RNG restored: the forward of the same rows draws the dropout masks the JVP pass drew.
    if dropout and not collective and 0 < k < n:
        u = _cat_rows([net(x[head], t[head], r[head], cond_index(cond, head)),
                       net(x[tail], t[tail], r[tail], cond_index(cond, tail))])
    else:
        u = net(x, t, r, cond)
    return u.to(x.dtype), du


__all__ = ["JvpDtype", "JvpMode", "JvpPlan", "TangentOps", "as_jvp_input", "attention_jvp_backend", "dual_jvp",
           "has_active_dropout", "jvp_precision", "plan_for", "plan_jvp", "two_time_jvp"]
