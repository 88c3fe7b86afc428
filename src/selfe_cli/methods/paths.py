"""The linear (rectified-flow) path and the time samplers shared by all methods. Pure math."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from selfe_cli.config import spec


def bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N,) -> (N, 1, 1, ...) to broadcast against ``like``."""
    return t.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def interpolate(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t eps (docs/methods.md §1); t = 1 is noise."""
    tb = bcast(t, x0)
    return (1 - tb) * x0 + tb * eps


def velocity(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Conditional velocity v = d x_t / dt = eps - x0."""
    return eps - x0


@dataclass
class TimeSamplerConfig:
    kind: Literal["uniform", "logit_normal"] = field(
        default="logit_normal", metadata=spec(help="uniform on [0,1] or t = sigmoid(n), n ~ N(mean, std)"))
    mean: float = field(default=0.0, metadata=spec(help="logit-normal location P_mean"))
    std: float = field(default=1.0, metadata=spec(gt=0, help="logit-normal scale P_std"))


def sample_time(cfg: TimeSamplerConfig, n: int, device: torch.device | str = "cpu",
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw n times in [0, 1] (float32)."""
    if cfg.kind == "uniform":
        return torch.rand(n, device=device, generator=generator)
    noise = torch.randn(n, device=device, generator=generator)
    return torch.sigmoid(noise * cfg.std + cfg.mean)
