"""torchrun / torch.distributed helpers: one process per GPU (NCCL) or per CPU worker (gloo)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> DistInfo:
    """Initialise from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_flag(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is True on any rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _broadcast(value: float, dtype: torch.dtype, device: torch.device) -> float:
    """Rank 0's ``value`` on every rank, through a one-element tensor of ``dtype`` (the value itself without
    torchrun)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=dtype, device=device)
    dist.broadcast(t, src=0)
    return t.item()


def broadcast_int(value: int, device: torch.device) -> int:
    """Rank 0's ``value`` on every rank (the value itself without torchrun)."""
    return int(_broadcast(value, torch.long, device))


def broadcast_float(value: float, device: torch.device) -> float:
    """Rank 0's ``value`` (float64, NaN included) on every rank (the value itself without torchrun)."""
    return float(_broadcast(value, torch.float64, device))


def all_reduce_mean(values: dict[str, torch.Tensor], device: torch.device) -> dict[str, float]:
    """Mean over ranks of scalar metrics, in one collective."""
    keys = sorted(values)
    if not keys:
        return {}
    t = torch.stack([values[k].detach().float().to(device).reshape(()) for k in keys])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return {k: float(v) for k, v in zip(keys, t.tolist(), strict=True)}


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
