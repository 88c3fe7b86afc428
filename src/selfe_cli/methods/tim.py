"""Transition Models (TiM 2025, WZDTHU/TiM ``tim/schedulers/transition.py``, OT_FM transport).

The MeanFlow identity on the two-time network ``F(x_t, t, r)``: ``F_tgt = v' - (t - r) dF/dt`` with the total
derivative along the path, taken by default as a **central finite difference** (the official "DDE")

    dF/dt ~ [F(x_{t+e}, t + e, r) - F(x_{t-e}, t - e, r)] / (2 e),   x_{t+-e} = (1 - t -+ e) x0 + (t +- e) eps

on the online network without graph (two plain forwards of the ``r != t`` rows: no forward-mode AD, so fused
attention kernels and FSDP need nothing special), or (``derivative: jvp``) exactly by the package's forward-mode
engine ``two_time_jvp``. ``v'`` is ``eps - x0``, or the enhanced (guided) velocity of the EMA network on an
interval. Per row, ``loss_i = mean (F - F_tgt)^2 [+ mean over positions of 1 - cos_channels(F, F_tgt)]``, weighted
by ``w_time(t, r) / sg(loss_i + eps)``. docs/methods.md, TiM, lists every departure from the official code.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from selfe_cli.methods.base import LossOutput, Method, drop_condition, is_sharded, rows_or_placeholder, unwrap
from selfe_cli.methods.configs import MeanFlowConfig, TiMConfig
from selfe_cli.methods.jvp import as_jvp_input, jvp_precision
from selfe_cli.methods.meanflow import MeanFlow
from selfe_cli.methods.paths import bcast, interpolate, sample_time, velocity
from selfe_cli.models.conditioning import Cond, cond_index, cond_where

# ----------------------------------------------------------------------------- pure math


def sample_t_r(cfg: TiMConfig, n: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(t, r)``: two draws, ``t = max``, ``r = min``; ``round(ratio_r_eq_t n)`` rows get ``r = t`` and
    ``round(ratio_r_zero n)`` rows ``r = 0`` (official ``sample_t_and_r``). Rows needing ``dF/dt`` come first:
    the ``r = 0`` rows, then the other ``r < t`` rows, then the ``r = t`` rows (rows are i.i.d., so the order
    does not change the distribution)."""
    a = sample_time(cfg.time_sampler, n, device)
    b = sample_time(cfg.time_sampler, n, device)
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    n_eq = min(n, round(cfg.ratio_r_eq_t * n))
    n_zero = min(n - n_eq, round(cfg.ratio_r_zero * n))
    idx = torch.arange(n, device=device)
    r = torch.where(idx < n_zero, torch.zeros_like(r), r)
    r = torch.where(idx >= n - n_eq, t, r)
    return t, r


def time_weight(cfg: TiMConfig, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """The official ``time_weighting`` with ``weight_t_and_r``: ``d = t - r`` (``tan t - tan r`` with
    ``time_weight_tangent``), then ``1/sqrt(d + c)`` etc.; 1 on rows with ``r = t``."""
    tt, rr = (torch.tan(t), torch.tan(r)) if cfg.time_weight_tangent else (t, r)
    d, c = tt - rr, cfg.time_weight_c
    kind = cfg.time_weight
    if kind == "constant":
        w = torch.ones_like(d)
    elif kind == "reciprocal":
        w = 1 / (d + c)
    elif kind == "sqrt":
        w = 1 / (d + c).sqrt()
    elif kind == "square":
        w = 1 / (d + c) ** 2
    else:  # soft_min_snr
        w = 1 / (d ** 2 + c ** 2)
    return torch.where(r == t, torch.ones_like(w), w)


def directional_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per row: the mean over positions of ``1 - cos(pred, target)`` taken over the channel dimension."""
    return (1 - F.cosine_similarity(pred, target, dim=1)).flatten(1).mean(1)


@torch.no_grad()
def dde_derivative(net: nn.Module, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, r: torch.Tensor,
                   cond: Cond, epsilon: float, dtype: str = "float32") -> torch.Tensor:
    """``[F(x_{t+e}, t+e, r) - F(x_{t-e}, t-e, r)] / 2e`` on the conditional path, both passes from the same RNG
    state (one dropout mask), without graph, on ``net`` as given (pass the bare module)."""
    outs = []
    devices = [x0.device] if x0.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=x0.device.type):
        state = torch.get_rng_state()
        cuda_state = torch.cuda.get_rng_state(x0.device) if devices else None
        for sign in (1.0, -1.0):
            torch.set_rng_state(state)
            if cuda_state is not None:
                torch.cuda.set_rng_state(cuda_state, x0.device)
            ts = t + sign * epsilon  # may leave [0, 1] by epsilon, as the official code
            with jvp_precision(x0.device, dtype):
                out = net(as_jvp_input(interpolate(x0, eps, ts)), ts, r, cond)
                outs.append(out.to(torch.promote_types(out.dtype, torch.float32)))
    return (outs[0] - outs[1]) / (2 * epsilon)


# ----------------------------------------------------------------------------- the method


class TiM(Method):
    """TiM's transition loss: the MeanFlow identity with a finite-difference (or JVP) time derivative."""

    name = "tim"

    def __init__(self, config: TiMConfig | None = None):
        self.config = config or TiMConfig()
        c = self.config
        # MeanFlow's guided velocity (w, kappa on [t_min, t_max]) and its JVP path (derivative: jvp)
        self._meanflow = MeanFlow(MeanFlowConfig(guidance=c.guidance, jvp_mode=c.jvp_mode, jvp_dtype=c.jvp_dtype))
        self._warned_no_ema = False

    def describe_jvp(self, **kw: Any) -> str:
        if self.config.derivative == "dde":
            return "none (derivative: dde, central finite difference, two forwards without graph)"
        return self._meanflow.describe_jvp(**kw)

    def sampler_defaults(self, net: nn.Module | None = None) -> dict:
        return {"r_mode": "next"}  # x_r = x_t - (t - r) F (OT_FM from_x_t_to_x_r)

    def _guide_net(self, net: nn.Module, ema_net: nn.Module | None) -> nn.Module:
        if self.config.guidance_weights == "ema" and self.config.guidance.active:
            if ema_net is not None:
                return ema_net
            if not self._warned_no_ema:
                warnings.warn("tim: no EMA network passed to the loss; the enhanced target uses the online weights",
                              stacklevel=3)
                self._warned_no_ema = True
        return net

    def f_and_target(self, net: nn.Module, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, r: torch.Tensor,
                     cond_in: Cond, v_target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``F = net(z, t, r, c)`` with grad and ``F_tgt = v' - (t - r) dF/dt`` (detached); the rows with
        ``r != t`` must come first (``sample_t_r`` puts them there)."""
        c = self.config
        z = interpolate(x0, eps, t)
        neq = r != t
        k = int(neq.sum())
        if k and not bool(neq[:k].all()):
            raise ValueError("tim: the rows with r != t must come first")
        if c.derivative == "jvp":
            v = velocity(x0, eps)
            from selfe_cli.methods.jvp import two_time_jvp

            f, dfdt = two_time_jvp(net, z, t, r, cond_in, v, torch.ones_like(t), None, jvp_rows=k,
                                   mode=c.jvp_mode, dtype=c.jvp_dtype)
        else:
            dfdt = torch.zeros_like(x0, dtype=torch.promote_types(x0.dtype, torch.float32))
            rows, real = rows_or_placeholder(torch.arange(k, device=x0.device), is_sharded(net))
            if rows is not None:
                d = dde_derivative(unwrap(net), x0.index_select(0, rows), eps.index_select(0, rows),
                                   t.index_select(0, rows), r.index_select(0, rows), cond_index(cond_in, rows),
                                   c.dde_epsilon, c.jvp_dtype)
                if real:
                    dfdt[:k] = d
            f = net(z, t, r, cond_in)
        f_tgt = v_target - bcast(t - r, v_target) * dfdt.to(v_target.dtype)  # transports.py OT_FM.target
        return f, f_tgt.detach()

    def loss_from(self, net: nn.Module, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, r: torch.Tensor,
                  cond: Cond = None, null_cond: Cond = None, dropped: torch.Tensor | None = None,
                  ema_net: nn.Module | None = None) -> LossOutput:
        """The loss for given noise, times and dropout mask (``loss`` draws them). Deterministic without dropout."""
        c = self.config
        cond_in = cond
        if dropped is not None and cond is not None:
            cond_in = cond_where(dropped.to(t.device), null_cond, cond)
        v = velocity(x0, eps)
        z = interpolate(x0, eps, t)
        # the enhanced target (official get_enhanced_target): the EMA network at (t, t), true label, guided rows only
        v_target = self._meanflow.guided_tangent(self._guide_net(net, ema_net), z, t, v, cond, null_cond, dropped)
        f, f_tgt = self.f_and_target(net, x0, eps, t, r, cond_in, v_target)
        work = torch.promote_types(f.dtype, torch.float32)
        f, f_tgt = f.to(work), f_tgt.to(work)
        mse = (f - f_tgt).pow(2).flatten(1).mean(1)  # (N,) per-row MEAN (official mean_flat)
        per_row = mse + directional_loss(f, f_tgt) if c.dir_loss else mse
        w = time_weight(c, t, r).to(work) / (per_row.detach() + c.weight_eps)
        loss = (w * per_row).mean()
        neq = (r != t).float()
        logs = {"loss": loss.detach(), "mse": mse.detach().mean(), "per_row": per_row.detach().mean(),
                "frac_r_neq_t": neq.mean(), "frac_r_zero": (r == 0).float().mean()}
        return LossOutput(loss, logs)

    def loss(self, net: nn.Module, x0: torch.Tensor, cond: Cond, *, null_cond: Cond, step: int,
             total_steps: int, ema_net: nn.Module | None = None) -> LossOutput:
        t, r = sample_t_r(self.config, x0.shape[0], x0.device)
        eps = torch.randn_like(x0)
        dropped = None
        if cond is not None:
            _, dropped = drop_condition(cond, null_cond, self.config.cond_dropout)
        return self.loss_from(net, x0, eps, t, r, cond, null_cond, dropped, ema_net=ema_net)


def tim_config(**overrides: Any) -> TiMConfig:
    """A config from keyword overrides, validated like a recipe section (for scripts and tests)."""
    from selfe_cli.config import from_dict

    return from_dict(TiMConfig, overrides, "method")


__all__ = ["TiM", "TiMConfig", "dde_derivative", "directional_loss", "sample_t_r", "tim_config", "time_weight"]
