"""Row tangents: the tangent of a forward pass, computed beside the primal on the rows that need it.

MeanFlow's target needs ``du = J u . (dx, dt, dr)`` only on the rows with ``r != t`` (a quarter of the batch),
but ``u`` with its autograd graph on every row. PyTorch's forward mode (``torch.autograd.forward_ad``) gives
every activation a tangent of the activation's full shape: rows that are known to be zero are stored, padded,
and carried through every op, and each dual op pays bookkeeping (measured on 2 CPU cores: a U-Net's dual pass
cost 1.45 plain forward + backward passes where the tangent arithmetic alone is worth 1.1).

``row_jvp`` runs the network once, as it is, with graph, under a ``TorchFunctionMode`` that keeps a tangent
beside each activation that depends on the perturbed inputs, as a plain tensor attribute, narrowed to the
first ``k`` entries of the activation's batch dimension (``bd``; the rest are exactly zero and never stored).
Every op's primal is the op itself, unchanged. Its tangent comes from:

* a closed-form rule (below) for the ops that carry the cost or reshape the batch: conv / linear without a
  weight tangent, group / layer norm and silu / gelu from their backward kernels (symmetric or diagonal
  Jacobians), attention from the explicit softmax JVP (or ``jvp_flash_attention`` on CUDA), arithmetic with
  broadcasting, elementwise functions, reductions and views that keep the batch dimension apart;
* otherwise PyTorch's own forward-mode rule for that one op, on full-size tangents (exact for any op,
  random ones included: dropout draws its mask once for primal and tangent), after which the tangent is
  narrowed again where the rows past ``k`` are checked to be zero.

So the result is exact for any network (``tests/methods/test_jvp_engine.py`` compares the U-Net, DiT and
MMDiT with ``torch.func.jvp`` in float64, dropout active), and the rules only decide how fast it is.
Tangents are computed under ``no_grad`` and returned detached: the targets that use them are under
stop-gradient. The tangent attributes are removed when the pass ends.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

_ATTR = "_selfe_row_tangent"

# Functions whose result carries no tangent whatever their inputs (metadata, comparisons, integer results):
# answered without looking for tangents (``x.shape`` alone is called a few hundred times a pass).
_NO_TANGENT_NAMES = frozenset({
    "size", "dim", "numel", "stride", "is_contiguous", "is_floating_point", "is_complex", "element_size",
    "data_ptr", "storage_offset", "get_device", "nelement", "ndimension", "__len__", "__bool__", "item",
    "tolist", "__format__", "__repr__", "__hash__", "untyped_storage", "detach", "detach_", "requires_grad_",
    "eq", "ne", "lt", "le", "gt", "ge", "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__",
    "isfinite", "isnan", "isinf", "argmax", "argmin", "argsort", "any", "all", "sign", "logical_not",
    "logical_and", "logical_or", "__and__", "__or__", "__invert__", "new_zeros", "new_ones", "new_empty",
    "new_full", "new_tensor", "zeros_like", "ones_like", "empty_like", "full_like", "randn_like", "rand_like",
    "bernoulli", "floor", "ceil", "round", "trunc", "__index__", "__int__", "__float__", "is_nonzero",
    "equal", "allclose", "isclose", "count_nonzero", "nonzero", "bincount", "__contains__",
})


# Properties that are views of the data (the others, ``shape``, ``dtype``, ``data``..., carry no tangent).
_VIEW_PROPERTIES = frozenset({"T", "mT", "H", "mH", "real", "imag"})


class _Pass:
    """State of one ``row_jvp`` pass: ``n`` batch rows, tangents on the first ``k``."""

    __slots__ = ("n", "k", "tagged", "fallbacks")

    def __init__(self, n: int, k: int):
        self.n, self.k = n, k
        self.tagged: list[weakref.ref] = []
        self.fallbacks: dict[str, int] = {}  # op name -> count (PyTorch's rule on full tangents)


# ----------------------------------------------------------------------------- tangent bookkeeping


def _entry(p: _Pass, x: Any) -> tuple[torch.Tensor, int | None] | None:
    """``(tangent, bd)`` of ``x`` in this pass: ``bd`` the batch dim the tangent is narrowed along, None = full."""
    if not isinstance(x, torch.Tensor):
        return None
    e = getattr(x, _ATTR, None)
    if e is None or e[0] is not p:
        return None
    return e[1], e[2]


def _attach(p: _Pass, out: torch.Tensor, tangent: torch.Tensor, bd: int | None) -> None:
    if bd is not None and out.shape[bd] == p.k:  # narrowing to all rows is no narrowing
        bd = None
    if tangent.dtype != out.dtype:
        tangent = tangent.to(out.dtype)
    setattr(out, _ATTR, (p, tangent, bd))  # computed under no_grad: nothing to detach
    p.tagged.append(weakref.ref(out))


def _full(p: _Pass, x: torch.Tensor, e: tuple[torch.Tensor, int | None]) -> torch.Tensor:
    """The tangent of ``x`` at full size (zeros past row k)."""
    tangent, bd = e
    if bd is None:
        return tangent
    full = tangent.new_zeros(x.shape)
    full.narrow(bd, 0, p.k).copy_(tangent)
    return full


def _rows(p: _Pass, x: Any, dim: int) -> Any:
    """The first k entries of ``x`` along ``dim`` where it has the batch's size there; else ``x`` (broadcast)."""
    if isinstance(x, torch.Tensor) and 0 <= dim < x.dim() and x.shape[dim] == p.n:
        return x.narrow(dim, 0, p.k)
    return x


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


# ----------------------------------------------------------------------------- rules
# Each rule: (pass, func, args, kwargs) -> output (with the tangent attached), or NotImplemented to use PyTorch's
# forward-mode rule. Tangents are computed under ``no_grad`` (inputs need no ``detach``: nothing is recorded).


def _bind(args: tuple, kwargs: dict, names: tuple[str, ...], defaults: tuple) -> list[Any]:
    return list(args) + [kwargs[n] if n in kwargs else d
                         for n, d in zip(names[len(args):], defaults[len(args):], strict=True)]


def _only_first_arg(p: _Pass, args: tuple, kwargs: dict) -> tuple[torch.Tensor, int | None] | None:
    """The first argument's entry when no other argument carries a tangent; else None."""
    e = _entry(p, args[0]) if args else None
    if e is None:
        return None
    for a in args[1:]:
        if _entry(p, a) is not None:
            return None
    for a in kwargs.values():
        if _entry(p, a) is not None:
            return None
    return e


_GN_NCHW = True

_LINEAR_IN_INPUT = {F.linear, torch.conv1d, torch.conv2d, torch.conv3d,
                    torch.conv_transpose1d, torch.conv_transpose2d, torch.conv_transpose3d}


def _linear_rule(p, func, args, kwargs):  # noqa: ANN001, ANN202
    """conv / linear: ``d op(x; W, b) = op(dx; W, no bias)``: one GEMM, no weight tangent."""
    args = list(args)
    for i, name in enumerate(("input", "weight", "bias")):
        if name in kwargs and len(args) == i:
            args.append(kwargs.pop(name))
    if len(args) < 2:
        return NotImplemented
    if len(args) < 3:
        args.append(kwargs.pop("bias", None))
    e = _only_first_arg(p, tuple(args), kwargs)
    if e is None:
        return NotImplemented
    tangent, bd = e
    if bd is not None and bd == args[0].dim() - 1 and func is F.linear:
        return NotImplemented  # the batch in the feature dim: not a layout any network uses
    if bd not in (None, 0) and func is not F.linear:
        return NotImplemented
    out = func(*args, **kwargs)
    with torch.no_grad():
        _attach(p, out, func(tangent.to(args[0].dtype), args[1], None, *args[3:], **kwargs), bd)
    return out


def _group_norm_rule(p, func, args, kwargs):  # noqa: ANN001, ANN202
    """Primal and statistics from one ``native_group_norm``; the tangent from its backward kernel.

    The plain normalisation ``(x - mean) rstd`` has the symmetric Jacobian ``rstd (I - 11^T/m - n n^T/m)`` per
    group, so its JVP is its VJP (the fused kernel, ``weight=None``); ``gamma`` scales the result per channel.
    """
    x, groups, weight, bias, eps = _bind(args, kwargs, ("input", "num_groups", "weight", "bias", "eps"),
                                         (None, None, None, None, 1e-5))
    e = _only_first_arg(p, (x, weight, bias), {})
    if e is None or (e[1] not in (None, 0)):
        return NotImplemented
    tangent, bd = e
    n, c = x.shape[:2]
    hw = x.numel() // max(n * c, 1)
    out, mean, rstd = torch.native_group_norm(x, weight, bias, n, c, hw, groups, eps)  # (N, G) stats
    with torch.no_grad():
        xs = x
        if bd == 0:
            xs, mean, rstd = xs[:p.k], mean[:p.k], rstd[:p.k]
        d = tangent.to(x.dtype)
        channels_last = _GN_NCHW and x.dim() == 4 and not xs.is_contiguous() and xs.is_contiguous(memory_format=torch.channels_last)
        if channels_last:  # the CPU kernel is 3-9x slower on channels-last tensors than the copies it takes
            xs, d = xs.contiguous(), d.contiguous()
        d = torch.ops.aten.native_group_norm_backward(d, xs, mean, rstd, None, xs.shape[0], c, hw, groups,
                                                      [True, False, False])[0]
        if channels_last:
            d = d.contiguous(memory_format=torch.channels_last)
        if weight is not None:
            d = d * weight.view((1, c) + (1,) * (x.dim() - 2))
        _attach(p, out, d, bd)
    return out


def _layer_norm_rule(p, func, args, kwargs):  # noqa: ANN001, ANN202
    """Like ``_group_norm_rule``: the fused backward kernel is the JVP of the normalisation."""
    x, shape, weight, bias, eps = _bind(args, kwargs, ("input", "normalized_shape", "weight", "bias", "eps"),
                                        (None, None, None, None, 1e-5))
    e = _only_first_arg(p, (x, weight, bias), {})
    shape = list(shape) if shape is not None else None
    if e is None or shape is None or (e[1] is not None and e[1] >= x.dim() - len(shape)):
        return NotImplemented
    tangent, bd = e
    out, mean, rstd = torch.native_layer_norm(x, shape, weight, bias, eps)  # (..., 1) stats
    with torch.no_grad():
        xs = x
        if bd is not None:
            xs, mean, rstd = xs.narrow(bd, 0, p.k), mean.narrow(bd, 0, p.k), rstd.narrow(bd, 0, p.k)
        d = torch.ops.aten.native_layer_norm_backward(tangent.to(x.dtype), xs, shape, mean, rstd, None, None,
                                                      [True, False, False])[0]
        if weight is not None:
            d = d * weight
        _attach(p, out, d, bd)
    return out


def _diag_rule(backward: Callable[..., torch.Tensor], names: tuple[str, ...], defaults: tuple,
               forbid: Callable[[list[Any]], bool] = lambda bound: False):
    """Activations with a diagonal Jacobian: the backward kernel applied to the tangent is the tangent."""
    def rule(p, func, args, kwargs):  # noqa: ANN001, ANN202
        bound = _bind(args, kwargs, names, defaults)
        e = _only_first_arg(p, args, kwargs)
        if e is None or forbid(bound):
            return NotImplemented
        tangent, bd = e
        out = func(*args, **kwargs)
        with torch.no_grad():
            x = bound[0] if bd is None else bound[0].narrow(bd, 0, p.k)
            _attach(p, out, backward(tangent.to(x.dtype), x, bound), bd)
        return out
    return rule


_silu_rule = _diag_rule(lambda d, x, b: torch.ops.aten.silu_backward(d, x), ("input", "inplace"), (None, False),
                        forbid=lambda b: bool(b[1]))
_gelu_rule = _diag_rule(lambda d, x, b: torch.ops.aten.gelu_backward(d, x, approximate=b[1]),
                        ("input", "approximate"), (None, "none"))


def _out_rule(derivative: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
    """Unary functions whose derivative is cheapest from (input, output): tangent = derivative * dx."""
    def rule(p, func, args, kwargs):  # noqa: ANN001, ANN202
        e = _only_first_arg(p, args, kwargs)
        if e is None or len(args) != 1 or kwargs:
            return NotImplemented
        tangent, bd = e
        out = func(*args)
        with torch.no_grad():
            x, y = args[0], out
            if bd is not None:
                x, y = x.narrow(bd, 0, p.k), y.narrow(bd, 0, p.k)
            _attach(p, out, derivative(x, y) * tangent, bd)
        return out
    return rule


_UNARY = {
    "exp": lambda x, y: y, "sin": lambda x, y: torch.cos(x), "cos": lambda x, y: -torch.sin(x),
    "sqrt": lambda x, y: 0.5 / y, "rsqrt": lambda x, y: -0.5 * y * y * y, "sigmoid": lambda x, y: y * (1 - y),
    "tanh": lambda x, y: 1 - y * y, "log": lambda x, y: 1 / x, "neg": lambda x, y: -torch.ones_like(x),
    "__neg__": lambda x, y: -torch.ones_like(x),
}


def _pow_rule(p, func, args, kwargs):  # noqa: ANN001, ANN202
    if len(args) != 2 or kwargs or isinstance(args[1], torch.Tensor):
        return NotImplemented
    e = _only_first_arg(p, args, kwargs)
    if e is None:
        return NotImplemented
    tangent, bd = e
    exponent = args[1]
    out = func(*args)
    with torch.no_grad():
        x = args[0] if bd is None else args[0].narrow(bd, 0, p.k)
        _attach(p, out, tangent * (exponent * x.pow(exponent - 1)), bd)
    return out


def _dropout_rule(p, func, args, kwargs):  # noqa: ANN001, ANN202
    """Dropout that drops nothing is the identity (same object, same tangent); real dropout takes PyTorch's
    rule, one mask for primal and tangent drawn like the plain op."""
    x, prob, training, inplace = _bind(args, kwargs, ("input", "p", "training", "inplace"), (None, 0.5, True, False))
    if (prob == 0 or not training) and not inplace:
        return x
    return NotImplemented


# Binary arithmetic with broadcasting, by closed form on the tangent rows.
_ARITH = {
    torch.add: "add", torch.Tensor.add: "add", torch.Tensor.__add__: "add", torch.Tensor.__radd__: "add",
    torch.sub: "sub", torch.Tensor.sub: "sub", torch.Tensor.__sub__: "sub", torch.Tensor.__rsub__: "rsub",
    torch.rsub: "rsub",
    torch.mul: "mul", torch.Tensor.mul: "mul", torch.Tensor.__mul__: "mul", torch.Tensor.__rmul__: "mul",
    torch.div: "div", torch.Tensor.div: "div", torch.Tensor.__truediv__: "div", torch.Tensor.__rtruediv__: "rdiv",
}


def _arith_rule(p, func, args, kwargs):  # noqa: ANN001, ANN202
    kind = _ARITH[func]
    if len(args) != 2 or set(kwargs) - ({"alpha"} if kind in ("add", "sub", "rsub") else set()):
        return NotImplemented
    alpha = kwargs.get("alpha", 1)
    a, b = args
    ea, eb = _entry(p, a), _entry(p, b)
    out = func(*args, **kwargs)
    if not isinstance(out, torch.Tensor) or not (out.is_floating_point() or out.is_complex()):
        return out
    nd = out.dim()

    def out_dim(x, bd):  # noqa: ANN001, ANN202
        return None if bd is None else bd + nd - x.dim()

    ba = out_dim(a, ea[1]) if ea is not None else None
    bb = out_dim(b, eb[1]) if eb is not None else None
    if ea is not None and eb is not None and (ea[1] is None) != (eb[1] is None) or \
            (ba is not None and bb is not None and ba != bb):  # the tangents disagree on the rows: full size
        ea = (_full(p, a, ea), None)
        eb = (_full(p, b, eb), None)
        ba = bb = None
    bd = ba if ba is not None else bb

    def primal(x):  # noqa: ANN001, ANN202
        if not isinstance(x, torch.Tensor):
            return x
        if bd is None:
            return x
        return _rows(p, x, bd - (nd - x.dim()))

    with torch.no_grad():
        da = ea[0] if ea is not None else None
        db = eb[0] if eb is not None else None
        if kind == "add":
            d = da if db is None else (db * alpha if da is None else da + db * alpha)
        elif kind == "sub":  # a - alpha b
            d = da if db is None else (db * -alpha if da is None else da - db * alpha)
        elif kind == "rsub":  # b - alpha a  (Tensor.__rsub__(a, b) / torch.rsub(a, b))
            d = (da * -alpha) if db is None else (db if da is None else db - da * alpha)
        elif kind == "mul":
            d = None if da is None else da * primal(b)
            if db is not None:
                d = primal(a) * db if d is None else torch.addcmul(d, primal(a), db)
        elif kind == "div":  # a / b
            b_ = primal(b)
            d = None if da is None else da / b_
            if db is not None:
                term = -(primal(a) / b_) / b_ * db
                d = term if d is None else d + term
        else:  # rdiv: b / a  (Tensor.__rtruediv__(a, b))
            a_ = primal(a)
            d = None if da is None else -(primal(b) / a_) / a_ * da
            if db is not None:
                d = db / a_ if d is None else d + db / a_
        shape = list(out.shape)
        if bd is not None:
            shape[bd] = p.k
        if list(d.shape) != shape:
            d = d.expand(shape)
        _attach(p, out, d, bd)
    return out


def _reduce_rule(p, func, args, kwargs):  # noqa: ANN001, ANN202
    """sum / mean over dims that do not hold the batch: the same reduction of the tangent rows."""
    e = _only_first_arg(p, args, kwargs)
    if e is None:
        return NotImplemented
    x = args[0]
    dims = args[1] if len(args) > 1 else kwargs.get("dim")
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    if dims is None or set(kwargs) - {"dim", "keepdim"} or len(args) > 3:
        return NotImplemented
    dims = [_norm_dim(d, x.dim()) for d in ([dims] if isinstance(dims, int) else list(dims))]
    tangent, bd = e
    if bd is not None and bd in dims:
        return NotImplemented
    out = func(*args, **kwargs)
    with torch.no_grad():
        d = func(tangent, *args[1:], **kwargs)
        nbd = None if bd is None else (bd if keepdim else bd - sum(1 for k in dims if k < bd))
        _attach(p, out, d, nbd)
    return out


# ----------------------------------------------------------------------------- shape ops


def _same_op_rule(new_bd: Callable[..., int | None]):
    """Ops that act on the tangent exactly as on the primal (views, casts, linear resamplers) provided the batch
    dimension stays apart; ``new_bd(x, bd, out, args, kwargs)`` gives its place in the output, or -1 if the op
    mixes it (then PyTorch's rule)."""
    def rule(p, func, args, kwargs):  # noqa: ANN001, ANN202
        e = _only_first_arg(p, args, kwargs)
        if e is None:
            return NotImplemented
        tangent, bd = e
        out = func(*args, **kwargs)
        if not isinstance(out, torch.Tensor):
            return NotImplemented
        if not (out.is_floating_point() or out.is_complex()):  # an integer view / cast: no tangent
            return out
        nbd = None if bd is None else new_bd(args[0], bd, out, args, kwargs)
        if nbd == -1:
            return NotImplemented
        with torch.no_grad():
            if out is args[0]:  # .contiguous() / .to() returning self: the tangent is already there
                return out
            targs = list(args)
            targs[0] = tangent
            if bd is not None and func in _SHAPE_ARG_OPS:  # the target shape names the batch: k rows instead
                shape = list(out.shape)
                shape[nbd] = p.k
                targs[1:] = [shape]
                kw = {}
            else:
                kw = kwargs
            d = func(*targs, **kw)
            if not (d.is_floating_point() or d.is_complex()):
                return out
            _attach(p, out, d, nbd)
        return out
    return rule


def _keep_bd(x, bd, out, args, kwargs):  # noqa: ANN001, ANN202
    return bd if out.dim() == x.dim() and out.shape[bd] == x.shape[bd] else -1


def _reshape_bd(x, bd, out, args, kwargs):  # noqa: ANN001, ANN202
    """A reshape keeps the rows of the batch dim when every dim up to it is unchanged (row-major order)."""
    return bd if out.dim() > bd and tuple(out.shape[:bd + 1]) == tuple(x.shape[:bd + 1]) else -1


def _permute_bd(x, bd, out, args, kwargs):  # noqa: ANN001, ANN202
    dims = args[1:] if len(args) > 2 or (len(args) == 2 and isinstance(args[1], int)) else \
        (args[1] if len(args) > 1 else kwargs["dims"])
    dims = [_norm_dim(d, x.dim()) for d in dims]
    return dims.index(bd)


def _transpose_bd(x, bd, out, args, kwargs):  # noqa: ANN001, ANN202
    d0 = _norm_dim(args[1] if len(args) > 1 else kwargs["dim0"], x.dim())
    d1 = _norm_dim(args[2] if len(args) > 2 else kwargs["dim1"], x.dim())
    return d1 if bd == d0 else d0 if bd == d1 else bd


def _unsqueeze_bd(x, bd, out, args, kwargs):  # noqa: ANN001, ANN202
    d = _norm_dim(args[1] if len(args) > 1 else kwargs["dim"], x.dim() + 1)
    return bd + 1 if d <= bd else bd


def _flatten_bd(x, bd, out, args, kwargs):  # noqa: ANN001, ANN202
    start = _norm_dim(args[1] if len(args) > 1 else kwargs.get("start_dim", 0), x.dim())
    end = _norm_dim(args[2] if len(args) > 2 else kwargs.get("end_dim", -1), x.dim())
    if start <= bd <= end:
        return bd if start == end else -1
    return bd if bd < start else bd - (end - start)


def _getitem_bd(x, bd, out, args, kwargs):  # noqa: ANN001, ANN202
    """Basic indexing (ints, slices, None, Ellipsis) that takes every row of the batch dim."""
    index = args[1]
    index = index if isinstance(index, tuple) else (index,)
    if any(not (i is None or i is Ellipsis or isinstance(i, (int, slice))) or isinstance(i, bool) for i in index):
        return -1
    if sum(i is Ellipsis for i in index) > 1:
        return -1
    consumed = sum(1 for i in index if i is not None and i is not Ellipsis)
    expanded: list[Any] = []
    for i in index:
        if i is Ellipsis:
            expanded.extend([slice(None)] * (x.dim() - consumed))
        else:
            expanded.append(i)
    in_dim, out_dim = 0, 0
    for i in expanded:
        if i is None:
            out_dim += 1
            continue
        if in_dim == bd:
            return out_dim if isinstance(i, slice) and i == slice(None) else -1
        in_dim += 1
        out_dim += 0 if isinstance(i, int) else 1
    return out_dim + (bd - in_dim)  # the batch dim lies past the index: taken whole


def _squeeze_bd(x, bd, out, args, kwargs):  # noqa: ANN001, ANN202
    if len(args) < 2 and "dim" not in kwargs:
        return -1
    d = args[1] if len(args) > 1 else kwargs["dim"]
    dims = [_norm_dim(i, x.dim()) for i in ([d] if isinstance(d, int) else d)]
    if bd in dims:
        return -1
    removed = sum(1 for i in dims if i < bd and x.shape[i] == 1)
    return bd - removed


def _interpolate_bd(x, bd, out, args, kwargs):  # noqa: ANN001, ANN202
    return 0 if bd == 0 else -1


_SHAPE_ARG_OPS = {torch.Tensor.reshape, torch.Tensor.view, torch.reshape}

_SAME_OP = {
    torch.Tensor.reshape: _reshape_bd, torch.Tensor.view: _reshape_bd, torch.reshape: _reshape_bd,
    torch.Tensor.permute: _permute_bd, torch.permute: _permute_bd,
    torch.Tensor.transpose: _transpose_bd, torch.transpose: _transpose_bd, torch.Tensor.swapaxes: _transpose_bd,
    torch.Tensor.unsqueeze: _unsqueeze_bd, torch.unsqueeze: _unsqueeze_bd,
    torch.Tensor.squeeze: _squeeze_bd, torch.squeeze: _squeeze_bd,
    torch.Tensor.flatten: _flatten_bd, torch.flatten: _flatten_bd,
    torch.Tensor.__getitem__: _getitem_bd,
    torch.Tensor.contiguous: _keep_bd, torch.Tensor.clone: _keep_bd, torch.clone: _keep_bd,
    torch.Tensor.to: _keep_bd, torch.Tensor.float: _keep_bd, torch.Tensor.double: _keep_bd,
    torch.Tensor.half: _keep_bd, torch.Tensor.bfloat16: _keep_bd, torch.Tensor.type_as: _keep_bd,
    F.interpolate: _interpolate_bd, F.avg_pool1d: _interpolate_bd, F.avg_pool2d: _interpolate_bd,
    F.avg_pool3d: _interpolate_bd,
    torch.view_as_complex: lambda x, bd, out, a, kw: bd if bd < x.dim() - 1 else -1,
    torch.view_as_real: lambda x, bd, out, a, kw: bd,
}


def _split_rule(p, func, args, kwargs):  # noqa: ANN001, ANN202
    """unbind / chunk / split along a dim other than the batch's: the same split of the tangent rows."""
    e = _only_first_arg(p, args, kwargs)
    if e is None:
        return NotImplemented
    tangent, bd = e
    x = args[0]
    name = getattr(func, "__name__", "")
    default = 0
    dim = args[2] if name in ("chunk", "split") and len(args) > 2 else \
        (args[1] if name == "unbind" and len(args) > 1 else kwargs.get("dim", default))
    dim = _norm_dim(dim, x.dim())
    if bd is not None and dim == bd:
        return NotImplemented
    outs = func(*args, **kwargs)
    with torch.no_grad():
        targs = list(args)
        targs[0] = tangent
        touts = func(*targs, **kwargs)
        nbd = None if bd is None else (bd - 1 if name == "unbind" and dim < bd else bd)
        for o, d in zip(outs, touts, strict=True):
            _attach(p, o, d, nbd)
    return outs


def _cat_rule(p, func, args, kwargs):  # noqa: ANN001, ANN202
    """cat / stack along a dim other than the batch's: the tangent rows of each part (zeros where none)."""
    tensors = args[0] if args else kwargs.get("tensors")
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    if not isinstance(tensors, (list, tuple)) or set(kwargs) - {"tensors", "dim"}:
        return NotImplemented
    entries = [_entry(p, x) for x in tensors]
    out = func(*args, **kwargs)
    stack = func is torch.stack
    bds = {e[1] for e in entries if e is not None}
    nd_in = tensors[0].dim()
    dim_in = _norm_dim(dim, nd_in + (1 if stack else 0))
    if len(bds) != 1 or None in bds or (not stack and dim_in == next(iter(bds))):
        bd = None
    else:
        bd = next(iter(bds))
    with torch.no_grad():
        parts = []
        for x, e in zip(tensors, entries, strict=True):
            if bd is None:
                parts.append(_full(p, x, e) if e is not None else torch.zeros_like(x, dtype=out.dtype))
            elif e is not None:
                parts.append(e[0])
            else:
                shape = list(x.shape)
                shape[bd] = p.k
                parts.append(x.new_zeros(shape, dtype=out.dtype))
        d = func([t.to(out.dtype) for t in parts], dim)
        nbd = None if bd is None else (bd + 1 if stack and dim_in <= bd else bd)
        _attach(p, out, d, nbd)
    return out


# ----------------------------------------------------------------------------- attention


def attention_tangent(q, k, v, dq, dk, dv, mask, is_causal, scale):  # noqa: ANN001, ANN201
    """d softmax(q k^T s + m) v = dP v + P dv, dP = P (dS - rowsum(P dS)), dS = s (dq k^T + q dk^T).

    Explicit (O(L S) memory per head): where no fused attention kernel has a JVP.
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


_FAST_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                  SDPBackend.MATH]


def triton_jvp_attention() -> Callable[..., torch.Tensor] | None:
    """``jvp_flash_attention``'s Triton kernel (forward with JVP) where it can run: CUDA only."""
    if not torch.cuda.is_available():
        return None
    try:
        from jvp_flash_attention.jvp_attention import attention
    except ImportError:
        return None
    return attention


def _sdpa_rule(p, func, args, kwargs):  # noqa: ANN001, ANN202
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    q, k, v, mask, dropout_p, is_causal, scale, gqa = _bind(args, kwargs, names,
                                                            (None, None, None, None, 0.0, False, None, False))
    eq, ek, ev = _entry(p, q), _entry(p, k), _entry(p, v)
    if dropout_p or gqa or _entry(p, mask) is not None or q.dim() != 4 or q.shape[:-2] != k.shape[:-2]:
        return NotImplemented
    bds = {e[1] for e in (eq, ek, ev) if e is not None}
    if not bds <= {None, 0}:
        return NotImplemented
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    with sdpa_kernel(_FAST_BACKENDS):  # the primal (with its graph) keeps the fused kernels
        out = func(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=is_causal, scale=scale)
    rows = bds == {0} and (mask is None or mask.dim() < 4 or mask.shape[0] in (1, p.n))
    with torch.no_grad():
        if rows:
            qs, ks, vs = (_rows(p, a, 0) for a in (q, k, v))
            m = _rows(p, mask, 0) if mask is not None and mask.dim() == 4 else mask
            tq, tk, tv = (None if e is None else e[0] for e in (eq, ek, ev))
        else:
            qs, ks, vs, m = q, k, v, mask
            tq, tk, tv = (None if e is None else _full(p, a, e) for a, e in ((q, eq), (k, ek), (v, ev)))
        fused = triton_jvp_attention() if q.is_cuda else None
        if fused is not None and m is None and qs.shape == ks.shape == vs.shape \
                and qs.dtype in (torch.float16, torch.bfloat16, torch.float32):
            # jvp_flash_attention: primal and tangent of these rows in one fused pass, O(L) memory
            duals = [fwAD.make_dual(a, d if d is not None else torch.zeros_like(a))  # the pass's dual level
                     for a, d in ((qs, tq), (ks, tk), (vs, tv))]
            d = fwAD.unpack_dual(fused(*duals, causal=bool(is_causal), sm_scale=scale)).tangent
        else:
            d = attention_tangent(qs, ks, vs, tq, tk, tv, m, is_causal, scale)
        _attach(p, out, d, 0 if rows else None)
    return out


_RULES: dict[Any, Callable[..., Any]] = {f: _linear_rule for f in _LINEAR_IN_INPUT}
_RULES.update({f: _arith_rule for f in _ARITH})
_RULES.update({f: _same_op_rule(bd) for f, bd in _SAME_OP.items()})
_RULES.update({
    F.group_norm: _group_norm_rule, F.layer_norm: _layer_norm_rule,
    F.silu: _silu_rule, F.gelu: _gelu_rule, F.dropout: _dropout_rule,
    F.scaled_dot_product_attention: _sdpa_rule,
    torch.pow: _pow_rule, torch.Tensor.pow: _pow_rule, torch.Tensor.__pow__: _pow_rule,
    torch.Tensor.mean: _reduce_rule, torch.mean: _reduce_rule, torch.Tensor.sum: _reduce_rule, torch.sum: _reduce_rule,
    torch.Tensor.unbind: _split_rule, torch.unbind: _split_rule, torch.Tensor.chunk: _split_rule,
    torch.chunk: _split_rule, torch.Tensor.split: _split_rule, torch.split: _split_rule,
    torch.cat: _cat_rule, torch.concat: _cat_rule, torch.stack: _cat_rule,
})
for _name, _derivative in _UNARY.items():
    for _owner in (torch, torch.Tensor):
        if hasattr(_owner, _name):
            _RULES[getattr(_owner, _name)] = _out_rule(_derivative)


# ----------------------------------------------------------------------------- the mode


def _flat_args(args: tuple, kwargs: dict) -> list[Any]:
    flat: list[Any] = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, (list, tuple)):
            flat.extend(a)
        else:
            flat.append(a)
    return flat


def _is_inplace(func: Any) -> bool:
    name = getattr(func, "__name__", "")
    return name == "__setitem__" or (name.endswith("_") and not name.endswith("__")) or \
        (name.startswith("__i") and name.endswith("__") and name not in ("__index__", "__int__", "__invert__"))


class RowTangents(TorchFunctionMode):
    """The mode of one ``row_jvp`` pass (see the module docstring)."""

    def __init__(self, state: _Pass):
        super().__init__()
        self.p = state

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if (name == "__get__" and getattr(getattr(func, "__self__", None), "__name__", "") not in _VIEW_PROPERTIES) \
                or name in _NO_TANGENT_NAMES:
            return func(*args, **kwargs)
        p = self.p
        if not any(_entry(p, a) is not None for a in _flat_args(args, kwargs)):
            return func(*args, **kwargs)
        rule = _RULES.get(func)
        if rule is not None and not _is_inplace(func):
            out = rule(p, func, args, kwargs)
            if out is not NotImplemented:
                return out
        return self._pytorch_rule(func, args, kwargs, name)

    def _pytorch_rule(self, func, args, kwargs, name):  # noqa: ANN001, ANN202
        """PyTorch's own forward-mode rule for this op, on full-size tangents; the result narrowed to the
        tangent rows again where the rest is zero (checked). Exact for any op, in-place ones included."""
        p = self.p
        p.fallbacks[name] = p.fallbacks.get(name, 0) + 1
        bd_hint = next((e[1] for e in (_entry(p, a) for a in _flat_args(args, kwargs)) if e is not None), None)

        def dual(a):  # noqa: ANN001, ANN202
            e = _entry(p, a)
            return a if e is None else fwAD.make_dual(a, _full(p, a, e).to(a.dtype))

        inplace = _is_inplace(func)
        d_args = tuple([dual(x) for x in a] if isinstance(a, list) else
                       tuple(dual(x) for x in a) if isinstance(a, tuple) else dual(a) for a in args)
        d_kwargs = {key: dual(a) for key, a in kwargs.items()}
        if inplace:
            target = args[0]
            if isinstance(target, torch.Tensor) and target._base is not None:
                # The tangents of the base and of its other views would go stale: refuse rather than be wrong.
                raise RuntimeError(
                    f"{name}: an in-place update of a view inside a forward-mode pass (selfe's JVP engine follows "
                    f"in-place updates of whole tensors only); write this step of the network out of place")
            if not isinstance(d_args[0], torch.Tensor) or d_args[0] is target:
                d_args = (fwAD.make_dual(target, torch.zeros_like(target)), *d_args[1:])
            func(*d_args, **d_kwargs)
            tangent = fwAD.unpack_dual(d_args[0]).tangent
            if tangent is not None:
                self._store(target, tangent, bd_hint)
            return target if name != "__setitem__" else None
        out = func(*d_args, **d_kwargs)
        return self._unpack_tree(out, bd_hint)

    def _unpack_tree(self, out, bd_hint):  # noqa: ANN001, ANN202
        if isinstance(out, (list, tuple)):
            return type(out)(self._unpack_tree(o, bd_hint) for o in out)
        if not isinstance(out, torch.Tensor):
            return out
        primal, tangent = fwAD.unpack_dual(out)
        if tangent is not None and (primal.is_floating_point() or primal.is_complex()):
            self._store(primal, tangent, bd_hint)
        return primal

    def _store(self, out: torch.Tensor, tangent: torch.Tensor, bd_hint: int | None) -> None:
        """Keep the full tangent, narrowed to the first k entries of a batch-sized dim whose rest is zero."""
        p = self.p
        with torch.no_grad():
            tangent = tangent.detach()
            if p.k < p.n:
                dims = [d for d in range(out.dim()) if out.shape[d] == p.n]
                if bd_hint in dims:  # the input's batch dim first
                    dims.remove(bd_hint)
                    dims.insert(0, bd_hint)
                for d in dims:
                    if not tangent.narrow(d, p.k, p.n - p.k).any():
                        _attach(p, out, tangent.narrow(d, 0, p.k).contiguous(), d)
                        return
            _attach(p, out, tangent, None)


def row_jvp(fn: Callable[..., Any], primals: Sequence[Any], tangents: Sequence[torch.Tensor | None],
            rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """``(fn(*primals), J fn . tangents, fallbacks)`` in one pass of ``fn`` (with graph when grad is enabled).

    ``rows=k``: each tangent holds the first ``k`` rows (along dim 0) of the perturbation, zero past them;
    ``None``: tangents have the primals' shapes. Non-tensor primals pass through; ``None`` tangents are zero.
    The returned tangent has the output's shape (zero past row k) and is detached; ``fallbacks`` counts the
    ops that took PyTorch's rule (for tests and profiling).
    """
    if len(primals) != len(tangents):
        raise ValueError(f"{len(primals)} primals but {len(tangents)} tangents")
    n = next((a.shape[0] for a in primals if isinstance(a, torch.Tensor) and a.dim()), None)
    k = n if rows is None or n is None else int(rows)
    state = _Pass(n or 0, k or 0)
    fn_args = []
    for a, d in zip(primals, tangents, strict=True):
        if d is not None and isinstance(a, torch.Tensor):
            # a fresh view, so that the caller's tensor carries no attribute
            a = a.view_as(a)
            if rows is not None and k < n:
                if d.shape[0] != k or d.shape[1:] != a.shape[1:]:
                    raise ValueError(f"a tangent of {k} rows must have shape {(k, *a.shape[1:])}, got "
                                     f"{tuple(d.shape)}")
                _attach(state, a, d.detach().to(a.dtype), 0)
            else:
                if d.shape != a.shape:
                    raise ValueError(f"tangent shape {tuple(d.shape)} != primal shape {tuple(a.shape)}")
                _attach(state, a, d.detach().to(a.dtype), None)
        fn_args.append(a)
    try:
        with fwAD.dual_level(), RowTangents(state):
            out = fn(*fn_args)
        e = _entry(state, out)
        if e is None:
            tangent = torch.zeros_like(out)
        else:
            tangent = _full(state, out, e)
    finally:
        for ref in state.tagged:  # no tangent outlives the pass
            x = ref()
            if x is not None and hasattr(x, _ATTR):
                delattr(x, _ATTR)
    return out, tangent.detach(), dict(state.fallbacks)


__all__ = ["RowTangents", "attention_tangent", "row_jvp", "triton_jvp_attention"]
