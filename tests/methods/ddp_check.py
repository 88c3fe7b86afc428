"""The harness the DDP gradient tests share: a body run on two gloo processes, with the real traceback of a
failing rank, and the check that DDP's gradients are the all-reduced ones (not the rank's own)."""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _entry(rank: int, body: Callable[[int], None], init_file: str, error_file: str) -> None:
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
        body(rank)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # report the real traceback to the parent
        with open(f"{error_file}.{rank}", "w") as fh:
            fh.write(traceback.format_exc())
        raise


def run_on_two_ranks(body: Callable[[int], None], tmp_path: Path) -> None:
    """``body(rank)`` on ``WORLD`` gloo processes (``body`` a module-level function, so that spawn can pickle it)."""
    init_file, error_file = str(tmp_path / "init"), str(tmp_path / "error")
    try:
        mp.spawn(_entry, args=(body, init_file, error_file), nprocs=WORLD, join=True)
    except Exception:
        reports = [open(f"{error_file}.{r}").read() for r in range(WORLD) if os.path.exists(f"{error_file}.{r}")]
        raise AssertionError("\n".join(reports) or "a DDP worker died") from None


def grads(net: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in net.parameters()]


def assert_all_reduced(name: str, got: list[torch.Tensor], want: list[torch.Tensor], own: list[torch.Tensor], *,
                       atol: float = 1e-12, rtol: float = 1e-9) -> None:
    """``got`` (a DDP rank's gradients) equals ``want`` (the gradient over both ranks' rows) and differs from
    ``own`` (this rank's rows alone), so the check fails if the all-reduce were skipped."""
    assert len(got) == len(want) > 0, name
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")
    assert any(not torch.allclose(o, w) for o, w in zip(own, want, strict=True)), name
