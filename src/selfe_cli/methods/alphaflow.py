"""alpha-Flow (Zhang et al. 2025, snap-research/alphaflow): MeanFlow's target interpolated with flow matching.

On the rows with ``r < t`` the network regresses the alpha-interpolated average velocity

    s     = t - dt,  dt = alpha (t - r)
    u_tgt = sg[ (dt v~ + (s - r) u(z_t - dt v~, s, r)) / (t - r) ]      discrete branch, alpha in (0, 1]

with one extra forward without graph (none at alpha = 1, where ``u_tgt = v~``: trajectory flow matching), and
at alpha = 0 MeanFlow's ``u_tgt = v~ - (t - r) du/dt`` through the package's forward-mode engine
(``two_time_jvp``, via ``MeanFlow.u_and_target``). alpha follows a sigmoid curriculum over training steps from
1 to 0, snapped to 0 and 1 near the ends (``alpha_at``). ``v~`` is the velocity with CFG trained in (MeanFlow's
``w, kappa`` form, applied on an open interval). The loss is ``w_i mse_i / sg(mse_i + eps)`` with the per-row
*mean* squared error and ``w_i = alpha`` on discrete rows, 1 elsewhere. docs/methods.md, alpha-Flow, lists every
departure from the official code.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from selfe_cli.methods.base import LossOutput, Method, is_sharded, rows_or_placeholder, unwrap
from selfe_cli.methods.configs import AlphaFlowConfig, MeanFlowConfig
from selfe_cli.methods.jvp import as_jvp_input, jvp_precision
from selfe_cli.methods.meanflow import MeanFlow, guided_velocity
from selfe_cli.methods.paths import bcast, interpolate, sample_time, velocity
from selfe_cli.models.conditioning import Cond, cond_cat, cond_index, cond_where

# ----------------------------------------------------------------------------- pure math


def alpha_at(cfg: AlphaFlowConfig, step: int, total_steps: int) -> float:
    """alpha at an optimiser step: constant ``cfg.alpha``, or the official sigmoid curriculum

    ``alpha = a0 + (a1 - a0) sigmoid(gamma (step - mid) / (end - start))``, ``mid = (start + end) / 2``,
    ``a0`` before ``start``, ``a1`` after ``end``; then snapped: below ``alpha_snap`` it is 0 (the JVP branch),
    above ``1 - alpha_snap`` it is 1.
    """
    if cfg.alpha is not None:
        a = float(cfg.alpha)
    else:
        start = cfg.alpha_start if cfg.alpha_start is not None else round(cfg.alpha_start_fraction * total_steps)
        end = cfg.alpha_end if cfg.alpha_end is not None else round(cfg.alpha_end_fraction * total_steps)
        if step < start:
            a = cfg.alpha_initial
        elif step > end or end <= start:
            a = cfg.alpha_final
        else:
            progress = (step - (start + end) / 2) / (end - start)
            a = cfg.alpha_initial + (cfg.alpha_final - cfg.alpha_initial) / (1 + math.exp(-cfg.alpha_gamma * progress))
    if a < cfg.alpha_snap:
        return 0.0
    if a > 1 - cfg.alpha_snap:
        return 1.0
    return a


def sample_t_r(cfg: AlphaFlowConfig, n: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(t, r)``: the first ``floor(ratio_fm n)`` rows have ``r = t`` (t from ``time_sampler_fm``); the others
    ``t = max(a, b)``, ``r = min(a, b)`` (official ``sample_traj_params`` with the ``minmax`` pair)."""
    n_fm = min(n, math.floor(cfg.ratio_fm * n + 1e-9))
    t_fm = sample_time(cfg.time_sampler_fm, n_fm, device)
    a = sample_time(cfg.time_sampler_t, n - n_fm, device)
    b = sample_time(cfg.time_sampler_r, n - n_fm, device)
    t = torch.cat([t_fm, torch.maximum(a, b)])
    r = torch.cat([t_fm, torch.minimum(a, b)])
    return t, r


def in_interval(t: torch.Tensor, t_min: float, t_max: float) -> torch.Tensor:
    """The official guidance mask, open at both ends: ``t_min < t < t_max``."""
    return (t > t_min) & (t < t_max)


def discrete_target(v: torch.Tensor, u_next: torch.Tensor | None, t: torch.Tensor, r: torch.Tensor,
                    dt: torch.Tensor, clamp: float | None) -> torch.Tensor:
    """``(dt v + (t - dt - r) u_next) / (t - r)``, clipped to +-clamp (``u_next`` None: its coefficient is 0)."""
    out = bcast(dt / (t - r), v) * v
    if u_next is not None:
        out = out + bcast((t - dt - r) / (t - r), v) * u_next.to(v.dtype)
    return out.clamp(-clamp, clamp) if clamp is not None else out


# ----------------------------------------------------------------------------- the method


class AlphaFlow(Method):
    name = "alphaflow"

    def __init__(self, config: AlphaFlowConfig | None = None):
        self.config = config or AlphaFlowConfig()
        # MeanFlow's JVP path (alpha = 0) with this method's engine settings; its own options are unused.
        self._meanflow = MeanFlow(MeanFlowConfig(jvp_mode=self.config.jvp_mode, jvp_dtype=self.config.jvp_dtype))

    def describe_jvp(self, **kw: Any) -> str:
        return self._meanflow.describe_jvp(**kw)

    def sampler_defaults(self, net: nn.Module | None = None) -> dict:
        return {"r_mode": "next"}

    # -- target ------------------------------------------------------------------------------

    def guided_tangent(self, net: nn.Module, z: torch.Tensor, t: torch.Tensor, v: torch.Tensor, cond_in: Cond,
                       null_cond: Cond) -> torch.Tensor:
        """``v~ = w v + kappa u(z,t,t|c) + (1 - w - kappa) u(z,t,t|null)`` on rows with ``t_min < t < t_max``.

        As the official code: ``c`` is the label after dropout (a dropped row in the interval gets
        ``w v + (1 - w) u(null)``), and a branch whose coefficient is 0 is not evaluated."""
        g = self.config.guidance
        if not g.active or cond_in is None:
            return v
        rows, real = rows_or_placeholder(in_interval(t, g.t_min, g.t_max).nonzero().squeeze(1), is_sharded(net))
        if rows is None:
            return v
        zk, tk = as_jvp_input(z.index_select(0, rows)), t.index_select(0, rows)
        k = rows.numel()
        conds = ([cond_index(cond_in, rows)] if g.kappa != 0 else []) + \
                ([cond_index(null_cond, rows)] if 1 - g.w - g.kappa != 0 else [])
        outs: list[torch.Tensor] = []
        if conds:
            both = conds[0] if len(conds) == 1 else cond_cat(conds[0], conds[1])
            m = len(conds)
            with torch.no_grad(), jvp_precision(z.device, self.config.jvp_dtype):
                out = unwrap(net)(torch.cat([zk] * m), torch.cat([tk] * m), torch.cat([tk] * m), both)
            outs = list(out.to(v.dtype).split(k))
        zero = torch.zeros_like(v.index_select(0, rows))
        u_cond = outs.pop(0) if g.kappa != 0 else zero
        u_null = outs.pop(0) if 1 - g.w - g.kappa != 0 else zero
        guided = guided_velocity(v.index_select(0, rows), u_cond, u_null, g.w, g.kappa)
        return v.index_copy(0, rows, guided) if real else v

    def u_and_target(self, net: nn.Module, z: torch.Tensor, t: torch.Tensor, r: torch.Tensor, alpha: float,
                     v_tan: torch.Tensor, cond_in: Cond) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``u = net(z, t, r, c)`` (with grad), its detached target and the boolean mask of discrete rows.

        ``alpha = 0``: MeanFlow's JVP target on the ``r != t`` rows. ``alpha > 0``: the discrete target on the
        ``r < t`` rows (one forward without graph at ``(z - dt v~, t - dt, r)``, none at alpha = 1)."""
        dt = alpha * (t - r)  # (N,)
        discrete = dt > 0
        if alpha == 0.0:  # decided by alpha, not by the rows: every FSDP rank takes the same branch
            u, u_tgt = self._meanflow.u_and_target(net, z, t, r, cond_in, v_tan)
            return u, u_tgt, discrete
        u_tgt = v_tan.clone()
        rows, real = rows_or_placeholder(discrete.nonzero().squeeze(1), is_sharded(net))
        if rows is not None:
            tk, rk, dk, vk = (x.index_select(0, rows) for x in (t, r, dt, v_tan))
            u_next = None
            if alpha < 1.0:
                zk = as_jvp_input(z.index_select(0, rows) - bcast(dk, vk) * vk)
                with torch.no_grad(), jvp_precision(z.device, self.config.jvp_dtype):
                    u_next = unwrap(net)(zk, tk - dk, rk, cond_index(cond_in, rows))
            if real:
                u_tgt = u_tgt.index_copy(0, rows, discrete_target(vk, u_next, tk, rk, dk, self.config.clamp_utgt))
        u = net(z, t, r, cond_in)
        return u, u_tgt.detach(), discrete

    # -- loss --------------------------------------------------------------------------------

    def loss_from(self, net: nn.Module, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, r: torch.Tensor,
                  alpha: float, cond: Cond = None, null_cond: Cond = None,
                  dropped: torch.Tensor | None = None) -> LossOutput:
        """The loss for given noise, times, alpha and dropout mask (``loss`` draws them). Deterministic."""
        cfg = self.config
        z = interpolate(x0, eps, t)
        v = velocity(x0, eps)
        cond_in = cond
        if dropped is not None and cond is not None:
            cond_in = cond_where(dropped.to(t.device), null_cond, cond)
        v_tan = self.guided_tangent(net, z, t, v, cond_in, null_cond)
        u, u_tgt, discrete = self.u_and_target(net, z, t, r, alpha, v_tan, cond_in)
        work = torch.promote_types(u.dtype, torch.float32)
        delta = u.to(work) - u_tgt.to(work)
        mse = delta.pow(2).flatten(1).mean(1)  # (N,) per-row MEAN (official)
        row_w = torch.where(discrete, torch.full_like(mse, alpha), torch.ones_like(mse))
        w = row_w / (mse.detach() + cfg.weight_eps).pow(cfg.weight_p)
        loss = (w * mse).mean()
        logs = {"loss": loss.detach(), "mse": mse.detach().mean(), "alpha": torch.tensor(float(alpha)),
                "frac_discrete": discrete.float().mean()}
        return LossOutput(loss, logs)

    def loss(self, net: nn.Module, x0: torch.Tensor, cond: Cond, *, null_cond: Cond, step: int,
             total_steps: int, ema_net: nn.Module | None = None) -> LossOutput:
        cfg = self.config
        alpha = alpha_at(cfg, step, total_steps)
        t, r = sample_t_r(cfg, x0.shape[0], x0.device)
        eps = torch.randn_like(x0)
        dropped = None
        if cond is not None:
            dropped = torch.rand(x0.shape[0]) < cfg.cond_dropout
            if cfg.dropout_in_interval_only:
                g = cfg.guidance
                dropped = dropped & in_interval(t, g.t_min, g.t_max).cpu()
        return self.loss_from(net, x0, eps, t, r, alpha, cond, null_cond, dropped)


def alphaflow_config(**overrides: Any) -> AlphaFlowConfig:
    """A config from keyword overrides, validated like a recipe section (for scripts and tests)."""
    from selfe_cli.config import from_dict

    return from_dict(AlphaFlowConfig, overrides, "method")


__all__ = ["AlphaFlow", "AlphaFlowConfig", "alpha_at", "alphaflow_config", "discrete_target", "in_interval",
           "sample_t_r"]
