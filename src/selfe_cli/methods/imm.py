"""Inductive moment matching (IMM; Zhou et al. 2025). The official repository (lumalabs/imm) is inference only; the
loss follows the paper as ZOO.md reads it together with ``ExplicitShortCut/loss/imm_loss.py`` and lumalabs/imm#4.

IMM's times are ``t > r > s`` on the package's path. The flow map of the two-time network is
``f_{s,t}(x_t) = x_t - (t - s) u(x_t, t, s)`` (IMM's Euler-FM parameterisation, ``u = sigma_d F``). Per group of
``M`` particles sharing ``(s, r, t)``: ``y_t = f_{s,t}(x_t)`` with graph, ``y_r = sg f_{s,r}(x_r)`` (online weights),
``x_t`` and ``x_r`` from the same ``(x0, eps)``; the loss is the group's squared MMD with the Laplace kernel
``k(a, b) = exp(-||a - b||_2 / (D |t - s| sigma_d))``, weighted by
``w(t) = 1/2 sigmoid(b - lambda_t) (-d lambda/dt) alpha_t^a / (alpha_t^2 + sigma_t^2)``, ``lambda = 2 log((1-t)/t)``.
Times: ``t ~ U(0, t_max)``, ``s ~ U(0, t)``, ``r = eta^-1(eta_t - eta_max / 2^k)`` with ``eta = t/(1 - t)``, at least s.
docs/methods.md, IMM, lists every departure.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from selfe_cli.errors import UserError
from selfe_cli.methods.base import LossOutput, Method, drop_condition, unwrap
from selfe_cli.methods.configs import IMMConfig
from selfe_cli.methods.paths import bcast, interpolate
from selfe_cli.models.conditioning import Cond, cond_where


def eta_of(t: torch.Tensor) -> torch.Tensor:
    return t / (1 - t)


def sample_times(cfg: IMMConfig, groups: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
    """``(s, r, t)`` per group, each ``(G,)``: ``t ~ U(0, t_max)``, ``s ~ U(0, t)``, ``r`` one ``eta`` gap below t."""
    t = torch.rand(groups, device=device, dtype=torch.float64) * cfg.t_max
    s = torch.rand(groups, device=device, dtype=torch.float64) * t
    e = eta_of(t) - eta_of(torch.tensor(cfg.t_max, dtype=torch.float64)) / 2 ** cfg.gap_power
    r = torch.maximum((e / (1 + e)).clamp(min=0), s)
    return s, r, t


def laplace_mmd2(a: torch.Tensor, b: torch.Tensor, bandwidth: torch.Tensor) -> torch.Tensor:
    """Squared MMD per group (V-statistic: all pairs, the diagonal included) with ``k = exp(-||x - y|| / h)``.

    ``a``, ``b``: ``(G, M, D)``; ``bandwidth``: ``(G,)``. Returns ``(G,)``."""
    h = bandwidth.view(-1, 1, 1).to(a.dtype)

    def k(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        d2 = (x.unsqueeze(2) - y.unsqueeze(1)).pow(2).sum(-1)
        return torch.exp(-d2.clamp(min=1e-30).sqrt() / h)  # the clamp keeps the gradient finite at 0

    return k(a, a).mean((1, 2)) + k(b, b).mean((1, 2)) - 2 * k(a, b).mean((1, 2))


def time_weight(cfg: IMMConfig, t: torch.Tensor) -> torch.Tensor:
    """``1/2 sigmoid(b - lambda) (-d lambda / dt) alpha^a / (alpha^2 + sigma^2)`` with ``alpha = 1 - t``, ``sigma = t``."""
    alpha, sigma = 1 - t, t
    lam = 2 * torch.log(alpha / sigma)
    dlam = 2 / (t * (1 - t))  # -d lambda / dt
    return 0.5 * torch.sigmoid(cfg.weight_b - lam) * dlam * alpha ** cfg.weight_a / (alpha ** 2 + sigma ** 2)


def flow_map(net: nn.Module, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, cond: Cond) -> torch.Tensor:
    """``f_{s,t}(x) = x - (t - s) u(x, t, s)``."""
    return x - bcast(t - s, x) * net(x, t, s, cond).to(x.dtype)


class IMM(Method):
    name = "imm"

    def __init__(self, config: IMMConfig | None = None):
        self.config = config or IMMConfig()

    def sampler_defaults(self, net: nn.Module | None = None) -> dict:
        # the pushforward f_{t_{i+1}, t_i} on a grid from t_max (the recipes set sample.t_start to it; the benchmarks
        # read it here)
        return {"r_mode": "next", "t_start": self.config.t_max}

    def loss_from(self, net: nn.Module, x0: torch.Tensor, eps: torch.Tensor, s: torch.Tensor, r: torch.Tensor,
                  t: torch.Tensor, cond: Cond = None, null_cond: Cond = None,
                  dropped: torch.Tensor | None = None) -> LossOutput:
        """``s, r, t``: ``(G,)`` per group; ``x0``, ``eps``: ``(G M, ...)``, group ``g`` = rows ``g M .. g M + M - 1``."""
        c = self.config
        n, groups = x0.shape[0], s.shape[0]
        m = n // groups
        cond_in = cond
        if dropped is not None and cond is not None:
            cond_in = cond_where(dropped.to(x0.device), null_cond, cond)
        rows = lambda v: v.repeat_interleave(m).to(x0.dtype)  # noqa: E731 - (G,) -> (N,)
        sn, rn, tn = rows(s), rows(r), rows(t)
        y_t = flow_map(net, interpolate(x0, eps, tn), tn, sn, cond_in)
        with torch.no_grad():
            y_r = flow_map(unwrap(net), interpolate(x0, eps, rn), rn, sn, cond_in)
        work = torch.promote_types(y_t.dtype, torch.float32)
        d = y_t[0].numel()
        a, b = y_t.to(work).reshape(groups, m, d), y_r.detach().to(work).reshape(groups, m, d)
        mmd2 = laplace_mmd2(a, b, d * (t - s).to(work).abs() * c.sigma_d)
        w = time_weight(c, t).to(work)
        loss = (w * mmd2).mean()
        return LossOutput(loss, {"loss": loss.detach(), "mmd2": mmd2.detach().mean(), "weight": w.mean()})

    def loss(self, net: nn.Module, x0: torch.Tensor, cond: Cond, *, null_cond: Cond, step: int,
             total_steps: int, ema_net: nn.Module | None = None) -> LossOutput:
        n, m = x0.shape[0], self.config.group_size
        if n % m:
            raise UserError(f"method.group_size: the micro-batch ({n} samples per rank and accumulation round) is "
                            f"not a multiple of {m}; change train.batch_size or method.group_size")
        s, r, t = sample_times(self.config, n // m, x0.device)
        eps = torch.randn_like(x0)
        dropped = None
        if cond is not None:
            _, dropped = drop_condition(cond, null_cond, self.config.cond_dropout)
        return self.loss_from(net, x0, eps, s, r, t, cond, null_cond, dropped)


def imm_config(**overrides: Any) -> IMMConfig:
    """A config from keyword overrides, validated like a recipe section (for scripts and tests)."""
    from selfe_cli.config import from_dict

    return from_dict(IMMConfig, overrides, "method")


__all__ = ["IMM", "IMMConfig", "eta_of", "flow_map", "imm_config", "laplace_mmd2", "sample_times", "time_weight"]
