"""ECT: easy consistency tuning / training (Geng et al. 2024, locuslab/ect ``training/loss.py``).

In EDM units (``x = y + sigma n``) the consistency function is regressed onto its own value at a smaller noise
level of the same noise draw, ``||f(x_t) - sg f(x_r)||_2 / (t_sigma - r_sigma)`` (unsquared L2, pseudo-Huber with
c = 0), with ``log t_sigma ~ N(-1.1, 2)`` and the staged gap ``r_sigma = t_sigma (1 - q^-(stage+1) (1 + k
sigmoid(-b t_sigma)))``, clamped at 0, where the target is the data itself. Here the path is the package's:
``t = sigma / (1 + sigma)``, ``x_t = (1 - t) x0 + t eps`` (the EDM point scaled by ``1 - t``, the same noise for
both times) and ``f(x_t) = x_t - t u(x_t, t, 0)`` on the two-time network; the weight stays in sigma units. Both
calls use the online weights, the same noise and the same dropout masks (the RNG is restored between them); the
target call has no graph. docs/methods.md, ECT.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from selfe_cli.methods.base import LossOutput, Method, drop_condition, unwrap
from selfe_cli.methods.configs import ECTConfig
from selfe_cli.methods.paths import bcast, interpolate
from selfe_cli.models.conditioning import Cond, cond_where


def sigma_to_t(sigma: torch.Tensor) -> torch.Tensor:
    """EDM noise level -> the linear path's time: ``t = sigma / (1 + sigma)``."""
    return sigma / (1 + sigma)


def stage_at(cfg: ECTConfig, step: int) -> int:
    return step // cfg.stage_steps


def r_sigma(cfg: ECTConfig, t_sigma: torch.Tensor, stage: int) -> torch.Tensor:
    """The staged landing level ``t_sigma (1 - q^-(stage+1) (1 + k sigmoid(-b t_sigma)))``, at least 0."""
    ratio = 1 - cfg.q ** -(stage + 1) * (1 + cfg.k * torch.sigmoid(-cfg.b * t_sigma))
    return (t_sigma * ratio).clamp(min=0)


def sample_sigmas(cfg: ECTConfig, n: int, stage: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    t_sigma = (torch.randn(n, device=device, dtype=torch.float64) * cfg.p_std + cfg.p_mean).exp()
    return t_sigma, r_sigma(cfg, t_sigma, stage)


def consistency_fn(net: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
    """``f(x_t) = x_t - t u(x_t, t, 0)``: the clean-image prediction of the two-time network."""
    u = net(x, t, torch.zeros_like(t), cond)
    return x - bcast(t, x) * u.to(x.dtype)


class ECT(Method):
    name = "ect"

    def __init__(self, config: ECTConfig | None = None):
        self.config = config or ECTConfig()

    def sampler_defaults(self, net: nn.Module | None = None) -> dict:
        return {"r_mode": "zero"}  # each step predicts x0; with sample.eta 1 it re-noises it (ct_eval.py)

    def loss_from(self, net: nn.Module, x0: torch.Tensor, eps: torch.Tensor, t_sig: torch.Tensor,
                  r_sig: torch.Tensor, cond: Cond = None, null_cond: Cond = None,
                  dropped: torch.Tensor | None = None) -> LossOutput:
        c = self.config
        cond_in = cond
        if dropped is not None and cond is not None:
            cond_in = cond_where(dropped.to(x0.device), null_cond, cond)
        t = sigma_to_t(t_sig).to(x0.dtype)
        r = sigma_to_t(r_sig).to(x0.dtype)
        x_t, x_r = interpolate(x0, eps, t), interpolate(x0, eps, r)
        devices = [x0.device] if x0.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=x0.device.type):
            state = torch.get_rng_state()
            cuda_state = torch.cuda.get_rng_state(x0.device) if devices else None
            f_t = consistency_fn(net, x_t, t, cond_in)  # with grad
            torch.set_rng_state(state)  # the same dropout masks for the target call
            if cuda_state is not None:
                torch.cuda.set_rng_state(cuda_state, x0.device)
            with torch.no_grad():
                f_r = consistency_fn(unwrap(net), x_r, r, cond_in)
        f_r = torch.where(bcast(r_sig == 0, x0).bool(), x0, f_r)  # r = 0: the target is the data
        work = torch.promote_types(f_t.dtype, torch.float32)
        d = (f_t.to(work) - f_r.detach().to(work)).pow(2).flatten(1).sum(1)
        dist = (d + c.huber_c ** 2).sqrt() - c.huber_c  # unsquared L2 (pseudo-Huber with c = 0)
        w = (1 / (t_sig - r_sig)).to(work)  # in sigma units
        loss = (w * dist).mean()
        logs = {"loss": loss.detach(), "distance": dist.detach().mean(), "frac_r_zero": (r_sig == 0).float().mean()}
        return LossOutput(loss, logs)

    def loss(self, net: nn.Module, x0: torch.Tensor, cond: Cond, *, null_cond: Cond, step: int,
             total_steps: int, ema_net: nn.Module | None = None) -> LossOutput:
        stage = stage_at(self.config, step)
        t_sig, r_sig = sample_sigmas(self.config, x0.shape[0], stage, x0.device)
        eps = torch.randn_like(x0)
        dropped = None
        if cond is not None:
            _, dropped = drop_condition(cond, null_cond, self.config.cond_dropout)
        out = self.loss_from(net, x0, eps, t_sig, r_sig, cond, null_cond, dropped)
        out.logs["stage"] = torch.tensor(float(stage))
        return out


def ect_config(**overrides: Any) -> ECTConfig:
    """A config from keyword overrides, validated like a recipe section (for scripts and tests)."""
    from selfe_cli.config import from_dict

    return from_dict(ECTConfig, overrides, "method")


__all__ = ["ECT", "ECTConfig", "consistency_fn", "ect_config", "r_sigma", "sample_sigmas", "sigma_to_t", "stage_at"]
