"""The package's one forward-mode engine: exact Jacobian-vector products of a network, without waste.

Every method whose target contains a total derivative along the probability-flow trajectory (MeanFlow
and its successors, continuous consistency training) needs ``u = net(x, t, r, c)`` *with* its autograd
graph and ``du = J net . (dx, dt, dr)`` *without* one, on the rows where the target uses it (MeanFlow:
rows with ``r != t``; elsewhere ``(t - r) du = 0``). ``two_time_jvp`` computes exactly that, with the row
tangents of ``methods/row_tangents.py`` (one pass of the network as it is; each op's tangent beside it on
the tangent rows only, by closed-form rules, PyTorch's forward-mode rule where none applies):

* ``single_pass`` (the default): one pass over the whole batch, with graph, through the network *as passed*
  (so under ``DistributedDataParallel`` the reducer sees the graph and all-reduces on ``backward``;
  ``torch.func.jvp`` can trace neither through the DDP wrapper nor through ``ddp.module`` without silently
  skipping the all-reduce, pytorch #102197). Dropout draws one mask per row for primal and tangent.
* ``two_pass``: the tangent rows' JVP under ``no_grad`` on the bare module, then an ordinary forward with
  graph; the RNG is forked around the JVP so that the forward of the same rows draws the same dropout masks.
  One more forward of the tangent rows, but nothing runs inside a ``TorchFunctionMode`` while the graph is
  recorded: the route for FSDP2 and for DDP with ``find_unused_parameters`` / ``static_graph`` (their
  autograd Functions have no forward-AD rule), for ``torch.compile``d networks, and for bf16 training with a
  float32 JVP.

``dual_jvp`` is PyTorch's own forward mode (``torch.autograd.forward_ad``), kept as the reference the tests
compare the engine with.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from selfe_cli.methods.base import is_sharded, unwrap
from selfe_cli.methods.configs import JvpDtype, JvpMode
from selfe_cli.methods.row_tangents import row_jvp, triton_jvp_attention
from selfe_cli.models.conditioning import cond_index

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
             tangents: Sequence[torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fn(*primals), J fn . tangents)`` by PyTorch's own forward mode; ``None`` tangents are zero.

    The reference the tests hold the engine to. Non-tensor primals pass through unchanged; attention runs
    on the MATH SDPA kernel (the fused kernels have no forward-AD rule); the tangent is detached.
    """
    if len(primals) != len(tangents):
        raise ValueError(f"{len(primals)} primals but {len(tangents)} tangents")
    with fwAD.dual_level(), sdpa_kernel(SDPBackend.MATH):
        args = [p if d is None else fwAD.make_dual(p, d.to(p.dtype)) for p, d in zip(primals, tangents, strict=True)]
        primal, tangent = fwAD.unpack_dual(fn(*args))
    if tangent is None:  # the output does not depend on the perturbed inputs
        tangent = torch.zeros_like(primal)
    return primal, tangent.detach()


def attention_jvp_backend(device: torch.device | str) -> str:
    """Which attention JVP a pass on ``device`` uses: ``triton`` (fused, O(L) memory) or ``explicit``."""
    device = torch.device(device)
    return "triton" if device.type == "cuda" and triton_jvp_attention() is not None else "explicit"


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

    ``single_pass`` is the default: one pass of the batch with graph, the tangents computed beside it on the
    tangent rows only (measured on 2 CPU cores, docs/benchmarks.md: the cheapest route, where ``two_pass``
    pays one more forward of those rows; with dropout, each row's mask is drawn once for both). ``two_pass`` is
    the route where a wrapper inserts an autograd Function without a forward-AD rule (FSDP2, DDP with
    ``find_unused_parameters`` or ``static_graph``), for ``torch.compile``d networks (the compiled module runs
    the forward with graph and its backward, the JVP pass runs eagerly on the bare module), and it keeps the
    forward with graph in bf16 when a bf16-autocast run asks for a float32 JVP (``mixed_precision``).
    ``dropout`` only changes the explanation.
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
    why = "one pass of the batch with graph, tangents on the JVP rows only"
    if dropout:
        why += ", each row's dropout mask drawn once for both"
    return JvpPlan("single_pass", why, attention)


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

    if plan.mode == "single_pass":
        if k == 0:  # no row needs the tangent: a plain forward
            return net(x, t, r, cond).to(x.dtype), torch.zeros_like(dx)
        # One pass of every row through the network as passed, with graph; tangents on the first k rows only.
        tangents = (dx[:k], None if dt is None else dt[:k], None if dr is None else dr[:k], None)
        with jvp_precision(x.device, dtype):
            u, du, _ = row_jvp(net, (as_jvp_input(x), t, r, cond), tangents, rows=k)
        return u.to(x.dtype), du.to(dx.dtype)

    # two_pass: JVP without graph on the bare module, then forwards with graph through the wrappers.
    du = torch.zeros_like(dx)
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
                _, du_head, _ = row_jvp(bare, *dual_args(jvp_sl))
            if k:
                du[head] = du_head.to(du.dtype)
    # RNG restored: the forward of the same rows draws the dropout masks the JVP pass drew.
    if dropout and not collective and 0 < k < n:
        u = _cat_rows([net(x[head], t[head], r[head], cond_index(cond, head)),
                       net(x[tail], t[tail], r[tail], cond_index(cond, tail))])
    else:
        u = net(x, t, r, cond)
    return u.to(x.dtype), du


__all__ = ["JvpDtype", "JvpMode", "JvpPlan", "as_jvp_input", "attention_jvp_backend", "dual_jvp",
           "has_active_dropout", "jvp_precision", "plan_for", "plan_jvp", "two_time_jvp"]
