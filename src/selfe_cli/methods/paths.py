"""The linear (rectified-flow) path and the time samplers shared by all methods. Pure math."""

from __future__ import annotations

import torch

from selfe_cli.methods.configs import TimeSamplerConfig  # noqa: F401 - re-exported (its home before configs.py)


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


def sample_time(cfg: TimeSamplerConfig, n: int, device: torch.device | str = "cpu",
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw n times in [0, 1] (float32)."""
    if cfg.kind == "uniform":
        return torch.rand(n, device=device, generator=generator)
    noise = torch.randn(n, device=device, generator=generator)
    return torch.sigmoid(noise * cfg.std + cfg.mean)
