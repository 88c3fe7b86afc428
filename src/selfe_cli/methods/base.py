"""What every training method provides to the training loop and the sampler."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from selfe_cli.models.conditioning import Cond


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, the quantity to backpropagate (already averaged over the batch)
    logs: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars for metrics


def unwrap(net: nn.Module) -> nn.Module:
    """The bare module under DistributedDataParallel / torch.compile wrappers."""
    while True:
        if isinstance(net, nn.parallel.DistributedDataParallel):
            net = net.module
        elif hasattr(net, "_orig_mod"):
            net = net._orig_mod
        else:
            return net


@contextlib.contextmanager
def capture_sink(net: nn.Module, attr: str) -> Iterator[list]:
    """Collect what the bare network reports into its list attribute ``attr`` (``v_sink``, ``logvar_sink``:
    ``(grad enabled, tensor)`` per forward) during the calls inside; the attribute is reset to None after."""
    bare = unwrap(net)
    sink: list = []
    setattr(bare, attr, sink)
    try:
        yield sink
    finally:
        setattr(bare, attr, None)


def is_sharded(net: nn.Module) -> bool:
    """FSDP2-sharded (``fully_shard``): each forward all-gathers parameters, a collective.

    Every rank must then run the same forwards, so a data-dependent row selection that is empty on one
    rank may not skip a call there: the methods evaluate a placeholder row instead and discard it.
    """
    from torch.distributed.fsdp import FSDPModule

    return isinstance(unwrap(net), FSDPModule)


def rows_or_placeholder(rows: torch.Tensor, sharded: bool) -> tuple[torch.Tensor | None, bool]:
    """(rows to evaluate or None to skip the call, whether the result is real)."""
    if rows.numel() > 0:
        return rows, True
    return (rows.new_zeros(1), False) if sharded else (None, False)


class Method:
    """A training objective on the two-time network ``net(x, t, r, cond)``.

    ``loss`` draws its randomness from torch's global RNG, which the training loop seeds from
    (seed, rank, step) before every step, so a resumed run draws the same numbers.
    """

    name = "method"

    def loss(self, net: nn.Module, x0: torch.Tensor, cond: Cond, *, null_cond: Cond, step: int,
             total_steps: int, ema_net: nn.Module | None = None) -> LossOutput:
        raise NotImplementedError

    def sampler_defaults(self, net: nn.Module | None = None) -> dict:
        """Defaults for ``sampling.sample`` (e.g. ``{"r_mode": "next"}``); ``net``: the network to be
        sampled, for rules that depend on it (Self-E's time shift from its token count)."""
        return {"r_mode": "next"}


def drop_condition(cond: Cond, null_cond: Cond, p: float) -> tuple[Cond, torch.Tensor | None]:
    """Replace each sample's condition by the null one with probability ``p`` (for guidance).

    Returns the new condition and the boolean mask of dropped samples (None when unconditional).
    """
    from selfe_cli.models.conditioning import cond_batch_size, cond_where

    n = cond_batch_size(cond)
    if n is None:
        return cond, None
    dropped = torch.rand(n) < p
    if p <= 0:
        return cond, dropped
    return cond_where(dropped, null_cond, cond), dropped
