"""Forward-mode Jacobian-vector products of a network, exact, cheap and safe under DDP.

Why forward-mode dual tensors (``torch.autograd.forward_ad``) and not ``torch.func.jvp``:
  * dual tensors flow through ``DistributedDataParallel.forward`` like ordinary tensors, so the
    reducer sees the primal's autograd graph and all-reduces the gradients on ``backward``.
    ``torch.func.jvp`` cannot trace through the DDP wrapper (pytorch #102197) and on
    ``ddp.module`` it silently skips the all-reduce;
  * PyTorch's forward-mode rules are exact but wasteful here: for ``convolution`` / ``linear`` an
    undefined weight tangent becomes a materialised zero tensor that is convolved / multiplied
    (measured on 2 CPU cores: a dual conv costs 2.5 plain convs, a dual linear 6, conv through
    ``torch.func.jvp`` 4.5), norms and activations decompose into many small ops, and when the primal
    needs grad every tangent op is recorded in the autograd graph although nothing back-propagates
    through it. ``TangentOps`` intercepts conv / linear / group_norm / layer_norm / silu / gelu /
    scaled_dot_product_attention while a dual pass runs: the primal is the op itself (with its
    graph; attention may use the fast kernels for it), the tangent its closed form under ``no_grad``.

The tangent this module returns is always detached: MeanFlow puts the whole target under
stop-gradient, so no backward graph is needed through it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

# Ops that are linear in their input for fixed (weight, bias): tangent = op(x_t, weight, no bias).
# All take (input, weight, bias, *rest) positionally.
_LINEAR_IN_INPUT = {
    F.linear, torch.conv1d, torch.conv2d, torch.conv3d,
    torch.conv_transpose1d, torch.conv_transpose2d, torch.conv_transpose3d,
}
_FAST_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                  SDPBackend.MATH]


def _tangent_of(x: Any) -> torch.Tensor | None:
    if not isinstance(x, torch.Tensor):
        return None
    return fwAD.unpack_dual(x).tangent


def _bind(args: tuple, kwargs: dict, names: tuple[str, ...], defaults: tuple) -> list[Any]:
    """Positional + keyword arguments -> values in ``names`` order (defaults fill the rest)."""
    out = list(args) + [kwargs[n] if n in kwargs else d for n, d in zip(names[len(args):], defaults[len(args):], strict=True)]
    return out


def _f(x: torch.Tensor) -> torch.Tensor:
    """Tangent math in fp32 at least (bf16/fp16 activations), float64 kept (exact tests)."""
    return x if x.dtype == torch.float64 else x.float()


def _norm_tangent(x: torch.Tensor, dx: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                  reduce: Callable[[torch.Tensor], torch.Tensor], expand: Callable[[torch.Tensor], torch.Tensor],
                  gamma: torch.Tensor | None) -> torch.Tensor:
    """Tangent of ``gamma (x - mean) rstd`` given the primal's statistics (per group / row).

    ``d x^ = r (dx - m1 - x^ mean(x^ dx))`` with ``m1 = mean(dx)``, ``mean(x^ dx) = r (m2 - mean m1)``,
    ``m2 = mean(x dx)``, r = rstd; that is ``dx S + x K + B`` with per-group coefficients, so the
    full-size work is one product and two reductions for the moments and two fused multiply-adds
    (recomputing the statistics as well cost ~12 full-size ops per norm, the bottleneck of a U-Net's JVP).
    ``reduce`` averages a full-size tensor to the statistics' shape; ``expand`` makes a per-group
    coefficient broadcastable against ``x`` (with the per-channel gamma folded in).
    """
    x, dx, mean, rstd = _f(x), _f(dx), _f(mean), _f(rstd)
    m1 = reduce(dx)
    m2 = reduce(x * dx)
    a2 = rstd * rstd * (m2 - mean * m1)  # rstd * mean(x^ dx)
    g = None if gamma is None else _f(gamma)
    scale = expand(rstd, g)  # S = gamma rstd
    k = expand(-a2 * rstd, g)  # K
    b = expand(rstd * (a2 * mean - m1), g)  # B
    return torch.addcmul(torch.addcmul(b, dx, scale), x, k)


def _group_norm_rule(func, args, kwargs):  # noqa: ANN001, ANN202
    """F.group_norm: the primal and its statistics from one ``native_group_norm`` (keeps the graph)."""
    x, groups, weight, bias, eps = _bind(args, kwargs, ("input", "num_groups", "weight", "bias", "eps"),
                                         (None, None, None, None, 1e-5))
    primal, dx = fwAD.unpack_dual(x)
    if dx is None or _tangent_of(weight) is not None or _tangent_of(bias) is not None:
        return func(*args, **kwargs)
    n, c = primal.shape[:2]
    hw = primal.numel() // max(n * c, 1)
    out, mean, rstd = torch.native_group_norm(primal, weight, bias, n, c, hw, groups, eps)  # (N, G) stats
    spatial = tuple(range(2, primal.dim()))
    per = c // groups

    def reduce(y: torch.Tensor) -> torch.Tensor:  # (N, C, ...) -> (N, G) group means
        y = y.sum(spatial) if spatial else y
        return y.view(n, groups, per).sum(-1) / (per * hw)

    def expand(coef: torch.Tensor, gamma: torch.Tensor | None) -> torch.Tensor:  # (N, G) -> (N, C, 1, ...)
        full = coef.view(n, groups, 1).expand(n, groups, per).reshape(n, c)
        if gamma is not None:
            full = full * gamma
        return full.view(n, c, *[1] * len(spatial))

    with torch.no_grad():
        tangent = _norm_tangent(primal.detach(), dx, mean.detach(), rstd.detach(), reduce, expand, weight)
    return _dual(out, tangent)  # outside no_grad: keeps the primal graph


def _layer_norm_rule(func, args, kwargs):  # noqa: ANN001, ANN202
    """F.layer_norm: the primal and its statistics from one ``native_layer_norm`` (keeps the graph)."""
    x, shape, weight, bias, eps = _bind(args, kwargs, ("input", "normalized_shape", "weight", "bias", "eps"),
                                        (None, None, None, None, 1e-5))
    primal, dx = fwAD.unpack_dual(x)
    if dx is None or _tangent_of(weight) is not None or _tangent_of(bias) is not None:
        return func(*args, **kwargs)
    out, mean, rstd = torch.native_layer_norm(primal, list(shape), weight, bias, eps)  # (..., 1, ...) stats
    dims = tuple(range(-len(shape), 0))

    def reduce(y: torch.Tensor) -> torch.Tensor:
        return y.mean(dims, keepdim=True)

    def expand(coef: torch.Tensor, gamma: torch.Tensor | None) -> torch.Tensor:
        return coef if gamma is None else coef * gamma  # (..., 1) * (D,) -> (..., D)

    with torch.no_grad():
        tangent = _norm_tangent(primal.detach(), dx, mean.detach(), rstd.detach(), reduce, expand, weight)
    return _dual(out, tangent)  # outside no_grad: keeps the primal graph


def _silu(xp, xt):  # noqa: ANN001, ANN202
    s = torch.sigmoid(_f(xp))
    return _f(xt) * s * (1 + _f(xp) * (1 - s))


def _gelu(xp, xt, approximate):  # noqa: ANN001, ANN202
    x = _f(xp)
    if approximate == "tanh":
        k = math.sqrt(2 / math.pi)
        th = torch.tanh(k * (x + 0.044715 * x ** 3))
        d = 0.5 * (1 + th) + 0.5 * x * (1 - th ** 2) * k * (1 + 3 * 0.044715 * x ** 2)
    else:
        d = 0.5 * (1 + torch.erf(x / math.sqrt(2))) + x * torch.exp(-0.5 * x ** 2) / math.sqrt(2 * math.pi)
    return _f(xt) * d


def _attention_tangent(q, k, v, dq, dk, dv, mask, is_causal, scale):  # noqa: ANN001, ANN202
    """d softmax(q k^T s + m) v = dP v + P dv, dP = P (dS - rowsum(P dS)), dS = s (dq k^T + q dk^T)."""
    q, k, v = _f(q), _f(k), _f(v)
    scores = q @ k.transpose(-2, -1) * scale  # (..., L, S)
    if is_causal:
        causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + _f(mask)
    probs = scores.softmax(-1)  # (..., L, S)
    d_scores = torch.zeros_like(scores)
    if dq is not None:
        d_scores = d_scores + _f(dq) @ k.transpose(-2, -1) * scale
    if dk is not None:
        d_scores = d_scores + q @ _f(dk).transpose(-2, -1) * scale
    d_probs = probs * (d_scores - (probs * d_scores).sum(-1, keepdim=True))
    out = d_probs @ v
    if dv is not None:
        out = out + probs @ _f(dv)
    return out


class TangentOps(TorchFunctionMode):
    """Inside a ``fwAD.dual_level``: exact tangent rules for the common layers, computed without graph.

    PyTorch's built-in forward-mode rules are exact but slow here: they materialise zero tangents for
    the weights (conv, linear, norms) and, when the primal needs grad, record every tangent op in the
    autograd graph although MeanFlow never back-propagates through the tangent. For conv / linear /
    group_norm / layer_norm / silu / gelu / scaled_dot_product_attention with a dual input and
    constant (non-dual) weights, the primal is computed by the op itself (with its autograd graph;
    attention may use the fast kernels) and the tangent by its closed form under ``no_grad``.
    Anything else falls through to PyTorch's own rules, so the result is exact either way
    (``tests/methods/test_meanflow.py`` compares both paths and finite differences).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = dict(kwargs or {})
        rule = _RULES.get(func)
        if rule is None:
            return func(*args, **kwargs)
        return rule(func, args, kwargs)


def _dual(out: torch.Tensor, tangent: torch.Tensor) -> torch.Tensor:
    return fwAD.make_dual(out, tangent.to(out.dtype))


def _linear_rule(func, args, kwargs):  # noqa: ANN001, ANN202
    args = list(args)
    for i, name in enumerate(("input", "weight", "bias")):  # keyword input/weight/bias -> positions
        if name in kwargs and len(args) == i:
            args.append(kwargs.pop(name))
    if len(args) < 2:
        return func(*args, **kwargs)
    if len(args) < 3:
        args.append(kwargs.pop("bias", None))
    x, weight, bias = args[0], args[1], args[2]
    primal, x_tangent = fwAD.unpack_dual(x)
    if x_tangent is None or _tangent_of(weight) is not None or _tangent_of(bias) is not None:
        return func(*args, **kwargs)
    out = func(primal, weight, bias, *args[3:], **kwargs)
    with torch.no_grad():
        tangent = func(x_tangent, weight, None, *args[3:], **kwargs)
    return _dual(out, tangent)  # outside no_grad: keeps the primal graph


def _silu_rule(func, args, kwargs):  # noqa: ANN001, ANN202
    x, inplace = _bind(args, kwargs, ("input", "inplace"), (None, False))
    primal, x_tangent = fwAD.unpack_dual(x)
    if x_tangent is None or inplace:
        return func(*args, **kwargs)
    out = func(primal)
    with torch.no_grad():
        tangent = _silu(primal, x_tangent)
    return _dual(out, tangent)  # outside no_grad: keeps the primal graph


def _gelu_rule(func, args, kwargs):  # noqa: ANN001, ANN202
    x, approximate = _bind(args, kwargs, ("input", "approximate"), (None, "none"))
    primal, x_tangent = fwAD.unpack_dual(x)
    if x_tangent is None:
        return func(*args, **kwargs)
    out = func(primal, approximate=approximate)
    with torch.no_grad():
        tangent = _gelu(primal, x_tangent, approximate)
    return _dual(out, tangent)  # outside no_grad: keeps the primal graph


def _sdpa_rule(func, args, kwargs):  # noqa: ANN001, ANN202
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    q, k, v, mask, dropout_p, is_causal, scale, gqa = _bind(args, kwargs, names,
                                                            (None, None, None, None, 0.0, False, None, False))
    (qp, dq), (kp, dk), (vp, dv) = (fwAD.unpack_dual(a) for a in (q, k, v))
    if (dq is None and dk is None and dv is None) or dropout_p or gqa or _tangent_of(mask) is not None \
            or qp.shape[:-2] != kp.shape[:-2]:
        return func(*args, **kwargs)  # PyTorch's rule (MATH kernel, forced by dual_jvp)
    scale = scale if scale is not None else 1.0 / math.sqrt(qp.shape[-1])
    with sdpa_kernel(_FAST_BACKENDS):  # the primal (with its graph) may use flash / efficient kernels
        out = func(qp, kp, vp, attn_mask=mask, dropout_p=0.0, is_causal=is_causal, scale=scale)
    with torch.no_grad():
        tangent = _attention_tangent(qp, kp, vp, dq, dk, dv, mask, is_causal, scale)
    return _dual(out, tangent)  # outside no_grad: keeps the primal graph


_RULES = {f: _linear_rule for f in _LINEAR_IN_INPUT}
_RULES.update({
    F.group_norm: _group_norm_rule,
    F.layer_norm: _layer_norm_rule,
    F.silu: _silu_rule,
    F.gelu: _gelu_rule,
    F.scaled_dot_product_attention: _sdpa_rule,
})


JvpDtype = Literal["float32", "bfloat16"]


@contextlib.contextmanager
def jvp_precision(device: torch.device, dtype: JvpDtype) -> Iterator[None]:
    """Run the JVP in fp32 (autocast off) or bf16 autocast, whatever the surrounding autocast is.

    fp16 is not offered: MeanFlow ports report NaN losses with it (SPEC §2).
    """
    if dtype == "float32":
        with torch.autocast(device.type, enabled=False):
            yield
    else:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=True):
            yield


def dual_jvp(fn: Callable[..., torch.Tensor], primals: Sequence[Any],
             tangents: Sequence[torch.Tensor | None], *, fast_linear_tangents: bool = True,
             math_sdpa: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fn(*primals), J fn . tangents)`` by forward-mode AD; ``None`` tangents are zero.

    Non-tensor primals (conditions, dicts) pass through unchanged. The primal output keeps its
    autograd graph when grad mode is on (so ``fn`` may be a DDP wrapper); the tangent is detached.
    Attention runs on the MATH SDPA kernel (flash / memory-efficient kernels have no forward AD).
    """
    if len(primals) != len(tangents):
        raise ValueError(f"{len(primals)} primals but {len(tangents)} tangents")
    mode = TangentOps() if fast_linear_tangents else contextlib.nullcontext()
    attention = sdpa_kernel(SDPBackend.MATH) if math_sdpa else contextlib.nullcontext()
    with fwAD.dual_level(), attention, mode:
        args = [p if d is None else fwAD.make_dual(p, d.to(p.dtype)) for p, d in zip(primals, tangents, strict=True)]
        out = fn(*args)
        primal, tangent = fwAD.unpack_dual(out)
    if tangent is None:  # the output does not depend on the perturbed inputs
        tangent = torch.zeros_like(primal)
    return primal, tangent.detach()


__all__ = ["JvpDtype", "TangentOps", "dual_jvp", "jvp_precision"]
