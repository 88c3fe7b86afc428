"""Flow matching (docs/methods.md §2): the baseline, trained only on the diagonal r = t."""

from __future__ import annotations

import torch
from torch import nn

from selfe_cli.methods.base import LossOutput, Method, drop_condition
from selfe_cli.methods.configs import FlowMatchingConfig
from selfe_cli.methods.paths import interpolate, sample_time, velocity
from selfe_cli.models.conditioning import Cond


class FlowMatching(Method):
    """Loss ``|| net(x_t, t, t, c) - v ||^2``, mean over elements (docs/methods.md §2)."""

    name = "flow_matching"

    def __init__(self, config: FlowMatchingConfig | None = None):
        self.config = config or FlowMatchingConfig()

    def loss(self, net: nn.Module, x0: torch.Tensor, cond: Cond, *, null_cond: Cond, step: int,
             total_steps: int, ema_net: nn.Module | None = None) -> LossOutput:
        n = x0.shape[0]
        t = sample_time(self.config.time_sampler, n, x0.device)  # (N,)
        eps = torch.randn_like(x0)
        cond, _ = drop_condition(cond, null_cond, self.config.cond_dropout)
        x_t = interpolate(x0, eps, t)  # (N, C, H, W)
        pred = net(x_t, t, t, cond)
        err = (pred.float() - velocity(x0, eps).float()) ** 2
        loss = err.mean()
        per_sample = err.flatten(1).mean(1)
        near_data = (t < 0.5).float()
        logs = {"mse": loss.detach(),
                "mse_t<0.5": (per_sample * near_data).sum().detach() / near_data.sum().clamp(min=1)}
        return LossOutput(loss, logs)

    def sampler_defaults(self, net: nn.Module | None = None) -> dict:
        # Trained only at r = t, so every step evaluates the instantaneous velocity (Euler).
        return {"r_mode": "same"}


def flow_matching_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The regression target v = eps - x0 (exposed for tests and other methods)."""
    return velocity(x0, eps)


__all__ = ["FlowMatching", "FlowMatchingConfig", "flow_matching_target"]
