"""Improved MeanFlow (iMF; Lyy-iiis/imeanflow ``imf.py``): MeanFlow as a v-loss with the network's own tangent.

Per row, with ``z = (1 - t) x0 + t eps``, ``v = eps - x0`` and guidance drawn as a condition of the network
(omega with density ~ omega^-beta on [1, omega_max], interval t_min ~ U[0, .5], t_max ~ U[.5, 1]; [0, 1] on
rows with r = t):

    omega'   = omega if t_min <= t <= t_max else 1
    v_c      = vhead(z, t, t | c, omega', [0, 1])          (no grad; the true label)
    v_u      = vhead(z, t, t | null, 1, [0, 1])           (no grad)
    v_g      = v + (1 - 1/omega') (v_c - v_u)             (v on dropped-label rows)
    u, du/dt = JVP of net(z, t, r | c_in, omega, t_min, t_max) along (dz, dt, dr) = (v_c, 1, 0)
    V        = u + (t - r) sg(du/dt)
    L        = mean_i [ AW(||V - v_g||^2) + AW(||v - v_g||^2) ],   AW(l) = l / sg(l + c)^p,  ||.||^2 a SUM

``vhead`` is the network's auxiliary v-head (``aux_v_head_blocks > 0``: the last k blocks duplicated on a shared
trunk) queried with ``output_head = "v"``; ``v`` in the second term is the v-head's output of the same forward as
``u`` (collected through ``v_sink``: one trunk pass for both). A network without a v-head (the U-Net) uses its
own ``u(z, t, t)`` as ``vhead`` and has no second term: on the r = t rows the first term already trains it as
the instantaneous velocity. The JVP goes through the package's engine (``two_time_jvp``) on the r != t rows only
(elsewhere ``(t - r) du/dt = 0``). docs/methods.md, iMF, lists the departures from the official code.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from selfe_cli.methods.base import LossOutput, Method, capture_sink, unwrap
from selfe_cli.methods.configs import IMFConfig, IMFGuidanceConfig, MeanFlowConfig
from selfe_cli.methods.jvp import as_jvp_input, jvp_precision, two_time_jvp
from selfe_cli.methods.meanflow import MeanFlow, adaptive_weight
from selfe_cli.methods.meanflow import sample_t_r as meanflow_sample_t_r
from selfe_cli.methods.paths import bcast, interpolate, velocity
from selfe_cli.models.conditioning import Cond, cond_cat, cond_index, cond_where, with_guidance

# ----------------------------------------------------------------------------- pure math


def sample_omega(g: IMFGuidanceConfig, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """omega in [1, omega_max] with density ~ omega^-beta (inverse CDF of a uniform draw, as the official code:
    beta = 1 gives omega = omega_max^U)."""
    u = torch.rand(n, device=device)
    log_max = math.log(g.omega_max)
    if g.beta == 1.0:
        return torch.exp(u * log_max)
    b = 1.0 - g.beta
    return torch.exp(torch.log1p(u * math.expm1(b * log_max)) / b)


def sample_interval(g: IMFGuidanceConfig, r_eq_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``t_min ~ U[0, t_min_high]``, ``t_max ~ U[t_max_low, 1]``; ``[0, 1]`` on rows with r = t."""
    n, device = r_eq_t.shape[0], r_eq_t.device
    t_min = torch.rand(n, device=device) * g.t_min_high
    t_max = g.t_max_low + torch.rand(n, device=device) * (1.0 - g.t_max_low)
    return torch.where(r_eq_t, torch.zeros_like(t_min), t_min), torch.where(r_eq_t, torch.ones_like(t_max), t_max)


def effective_omega(t: torch.Tensor, omega: torch.Tensor, t_min: torch.Tensor, t_max: torch.Tensor) -> torch.Tensor:
    """omega inside ``[t_min, t_max]`` (inclusive, as the official code), 1 outside."""
    return torch.where((t >= t_min) & (t <= t_max), omega, torch.ones_like(omega))


def guided_target(v: torch.Tensor, v_c: torch.Tensor, v_u: torch.Tensor, omega_eff: torch.Tensor) -> torch.Tensor:
    """``v_g = v + (1 - 1/omega') (v_c - v_u)``."""
    return v + bcast(1 - 1 / omega_eff, v) * (v_c - v_u)


def guidance_tensor(omega: torch.Tensor, t_min: torch.Tensor, t_max: torch.Tensor) -> torch.Tensor:
    g = torch.stack([omega, t_min, t_max], dim=1)
    return g.to(torch.promote_types(g.dtype, torch.float32))  # float64 stays (tests), else float32


@contextlib.contextmanager
def output_head(net: nn.Module, head: str) -> Iterator[None]:
    """Make the (bare) network return its ``u`` or ``v`` head for the calls inside."""
    bare = unwrap(net)
    old = bare.output_head
    bare.output_head = head
    try:
        yield
    finally:
        bare.output_head = old


def capture_v(net: nn.Module) -> contextlib.AbstractContextManager[list]:
    """Collect the v-head outputs of the forwards inside (``(grad enabled, tensor)`` per call)."""
    return capture_sink(net, "v_sink")


def has_v_head(net: nn.Module) -> bool:
    return bool(getattr(unwrap(net), "has_v_head", False))


# ----------------------------------------------------------------------------- the method


class IMF(Method):
    """improved MeanFlow: v-loss, own-tangent JVP, guidance as a condition, auxiliary v-head."""

    name = "imf"

    def __init__(self, config: IMFConfig | None = None):
        self.config = config or IMFConfig()
        cfg = self.config
        self._meanflow = MeanFlow(MeanFlowConfig(
            time_sampler_t=cfg.time_sampler, time_sampler_r=cfg.time_sampler, ratio_r_neq_t=cfg.ratio_r_neq_t,
            jvp_mode=cfg.jvp_mode, jvp_dtype=cfg.jvp_dtype))

    def describe_jvp(self, **kw: Any) -> str:
        return self._meanflow.describe_jvp(**kw)

    def sampler_defaults(self, net: nn.Module | None = None) -> dict:
        # One NFE per step: omega (--cfg) and the interval enter the network as a condition (Generator).
        g = self.config.guidance
        return {"r_mode": "next", "guidance_condition": (g.sample_t_min, g.sample_t_max)}

    # -- targets -----------------------------------------------------------------------------

    def v_targets(self, net: nn.Module, z: torch.Tensor, t: torch.Tensor, v: torch.Tensor, cond: Cond,
                  null_cond: Cond, omega_eff: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(v_c, v_g)`` without graph: the v-head at (z, t, h = 0) with the true label and ``omega'``, and the
        guided target. One batched call: the conditional rows, then the null rows where ``omega' != 1``."""
        n = z.shape[0]
        bare = unwrap(net)
        head = "v" if has_v_head(bare) else "u"
        unit = torch.zeros_like(t)
        guided = (omega_eff != 1).nonzero().squeeze(1) if cond is not None else t.new_zeros(0, dtype=torch.long)
        k = guided.numel()
        zz = as_jvp_input(torch.cat([z, z.index_select(0, guided)]))
        tt = torch.cat([t, t.index_select(0, guided)])
        om = torch.cat([omega_eff, torch.ones(k, dtype=omega_eff.dtype, device=omega_eff.device)])
        g = guidance_tensor(om, torch.cat([unit, unit.index_select(0, guided)]),
                            torch.cat([unit + 1, unit.index_select(0, guided) + 1]))
        c = cond if k == 0 else cond_cat(cond, cond_index(null_cond, guided))
        with torch.no_grad(), jvp_precision(z.device, self.config.jvp_dtype), output_head(bare, head):
            out = bare(zz, tt, tt, with_guidance(c, g.to(z.device))).to(v.dtype)
        v_c = out[:n]
        if k == 0:
            return v_c, v
        v_u = torch.zeros_like(v).index_copy(0, guided, out[n:])
        return v_c, guided_target(v, v_c, v_u, omega_eff)

    def u_v_and_du(self, net: nn.Module, z: torch.Tensor, t: torch.Tensor, r: torch.Tensor, cond_g: Cond,
                   v_c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``u`` (with graph), ``du/dt`` along ``(v_c, 1, 0)`` (detached; zero where r = t) and the v-head output
        of the same forward (with graph; None without a v-head)."""
        neq = r != t
        k = int(neq.sum())
        order = None
        if k and not bool(neq[:k].all()):  # not a prefix: move the r != t rows to the front
            order = torch.argsort((~neq).to(torch.int8), stable=True)
            z, t, r, v_c, cond_g = z[order], t[order], r[order], v_c[order], cond_index(cond_g, order)
        head = has_v_head(net)
        with capture_v(net) if head else contextlib.nullcontext([]) as sink:
            u, du = two_time_jvp(net, z, t, r, cond_g, v_c, torch.ones_like(t), None, jvp_rows=k,
                                 mode=self.config.jvp_mode, dtype=self.config.jvp_dtype)
        v_pred = None
        if head:
            parts = [p for grad, p in sink if grad] if torch.is_grad_enabled() else []
            if sum(p.shape[0] for p in parts) == z.shape[0]:
                v_pred = torch.cat(parts).to(u.dtype)
            else:  # no forward with graph reported the v-head (e.g. under no_grad): evaluate it
                with output_head(net, "v"):
                    v_pred = net(z, t, r, cond_g).to(u.dtype)
        if order is not None:
            inverse = torch.argsort(order)
            u, du = u[inverse], du[inverse]
            v_pred = v_pred[inverse] if v_pred is not None else None
        return u, du.detach(), v_pred

    # -- loss --------------------------------------------------------------------------------

    def loss_from(self, net: nn.Module, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, r: torch.Tensor,
                  omega: torch.Tensor, t_min: torch.Tensor, t_max: torch.Tensor, cond: Cond = None,
                  null_cond: Cond = None, dropped: torch.Tensor | None = None) -> LossOutput:
        """The loss for given noise, times, guidance draws and dropout mask (``loss`` draws them)."""
        cfg = self.config
        z = interpolate(x0, eps, t)
        v = velocity(x0, eps)
        omega_eff = effective_omega(t, omega, t_min, t_max)
        v_c, v_g = self.v_targets(net, z, t, v, cond, null_cond, omega_eff)
        cond_in = cond
        if dropped is not None and cond is not None:
            dropped = dropped.to(t.device)
            cond_in = cond_where(dropped, null_cond, cond)
            v_g = torch.where(bcast(dropped, v).bool(), v, v_g)  # dropped label: the unguided velocity
        cond_g = with_guidance(cond_in, guidance_tensor(omega, t_min, t_max).to(z.device))
        u, du, v_pred = self.u_v_and_du(net, z, t, r, cond_g, v_c)
        work = torch.promote_types(u.dtype, torch.float32)
        big_v = u.to(work) + bcast(t - r, du).to(work) * du.to(work)  # V = u + (t - r) sg(du/dt)
        target = v_g.detach().to(work)
        sq_u = (big_v - target).pow(2).flatten(1).sum(1)
        loss_rows = adaptive_weight(sq_u, cfg.weight_p, cfg.weight_c) * sq_u
        logs = {"loss_u": (sq_u / big_v[0].numel()).detach().mean()}
        if v_pred is not None and cfg.v_loss_weight > 0:
            sq_v = (v_pred.to(work) - target).pow(2).flatten(1).sum(1)
            loss_rows = loss_rows + cfg.v_loss_weight * adaptive_weight(sq_v, cfg.weight_p, cfg.weight_c) * sq_v
            logs["loss_v"] = (sq_v / big_v[0].numel()).detach().mean()
        loss = loss_rows.mean()
        logs.update({"loss": loss.detach(), "omega": omega.float().mean().detach(),
                     "frac_r_neq_t": (r != t).float().mean()})
        return LossOutput(loss, logs)

    def loss(self, net: nn.Module, x0: torch.Tensor, cond: Cond, *, null_cond: Cond, step: int,
             total_steps: int, ema_net: nn.Module | None = None) -> LossOutput:
        cfg = self.config
        n, device = x0.shape[0], x0.device
        t, r = meanflow_sample_t_r(self._meanflow.config, n, device)  # r != t rows first
        eps = torch.randn_like(x0)
        t_min, t_max = sample_interval(cfg.guidance, r == t)
        omega = sample_omega(cfg.guidance, n, device)
        dropped = (torch.rand(n) < cfg.cond_dropout) if cond is not None else None
        return self.loss_from(net, x0, eps, t, r, omega, t_min, t_max, cond, null_cond, dropped)


def imf_config(**overrides: Any) -> IMFConfig:
    """A config from keyword overrides, validated like a recipe section (for scripts and tests)."""
    from selfe_cli.config import from_dict

    return from_dict(IMFConfig, overrides, "method")


__all__ = ["IMF", "IMFConfig", "capture_v", "effective_omega", "guidance_tensor", "guided_target", "has_v_head",
           "imf_config", "output_head", "sample_interval", "sample_omega"]
