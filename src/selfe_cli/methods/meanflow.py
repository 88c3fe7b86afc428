"""MeanFlow (Geng et al. 2025, arXiv 2505.13447): one-step generation from the average velocity.

The two-time network ``net(z, t, r, c)`` is trained on the MeanFlow identity [6]
``u(z, r, t) = v(z, t) - (t - r) du/dt`` with ``du/dt = v d_z u + d_t u`` (Algorithm 1): the total
derivative is the JVP of the network along the tangent ``(dz, dr, dt) = (v, 0, 1)``, and the whole
target ``u_tgt = v - (t - r) du/dt`` is under stop-gradient.

The JVP comes from the package's forward-mode engine (``selfe_cli.methods.jvp.two_time_jvp``, explained
in docs/methods.md "The forward-mode engine"): only the rows with ``r != t`` get a tangent (elsewhere
``(t - r) du/dt = 0`` and the target is exactly ``v``), in one dual pass with the primal where the
network allows it (``single_pass``) or without graph before an ordinary forward (``two_pass``: FSDP2,
DDP with ``find_unused_parameters`` / ``static_graph``, compiled networks). Dropout is exact in both.
The 2-process gloo tests in ``tests/methods/test_meanflow_ddp.py`` check both modes against the
single-process gradient of the global batch.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from selfe_cli.methods.base import LossOutput, Method, drop_condition, is_sharded, rows_or_placeholder, unwrap
from selfe_cli.methods.configs import MeanFlowConfig, MeanFlowGuidanceConfig
from selfe_cli.methods.jvp import as_jvp_input, jvp_precision, two_time_jvp
from selfe_cli.methods.paths import bcast, interpolate, sample_time, velocity
from selfe_cli.models.conditioning import Cond, cond_cat, cond_index

# ----------------------------------------------------------------------------- pure math


def count_r_neq_t(n: int, ratio: float) -> int:
    """Rows with r != t: ``ratio * n`` rounded stochastically (exact when integral, unbiased otherwise)."""
    exact = ratio * n
    k = math.floor(exact + 1e-9)
    frac = exact - k
    if frac > 1e-9 and torch.rand(()).item() < frac:
        k += 1
    return min(k, n)


def sample_t_r(cfg: MeanFlowConfig, n: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(t, r)``, each ``(N,)`` with ``r <= t``; the first ``count_r_neq_t`` rows may have r < t.

    Paper (Algorithm 1 / official code): draw two times, ``t = max``, ``r = min``, then set ``r = t``
    on (1 - ratio) of the batch. ``mask_before_minmax``: set the second draw to the first on those
    rows *before* max/min, so r = t rows keep the first sampler's distribution (improved CIFAR).
    Rows are i.i.d., so taking the first k rows is the same as a random subset.
    """
    a = sample_time(cfg.time_sampler_t, n, device)  # (N,)
    b = sample_time(cfg.time_sampler_r, n, device)  # (N,)
    neq = torch.arange(n, device=device) < count_r_neq_t(n, cfg.ratio_r_neq_t)
    if cfg.mask_before_minmax:
        b = torch.where(neq, b, a)
        return torch.maximum(a, b), torch.minimum(a, b)
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    return t, torch.where(neq, r, t)


def adaptive_weight(sq_norm: torch.Tensor, p: float, c: float) -> torch.Tensor:
    """``w = 1 / (||delta||^2 + c)^p`` per sample, detached (the loss is ``sg(w) ||delta||^2``)."""
    return (sq_norm.detach() + c).pow(-p)


def guided_velocity(v: torch.Tensor, u_cond: torch.Tensor, u_null: torch.Tensor, w: float,
                    kappa: float) -> torch.Tensor:
    """``v~ = w v + kappa u(z,t,t|c) + (1 - w - kappa) u(z,t,t|null)`` (MeanFlow eqs. [19, 21])."""
    return w * v + kappa * u_cond + (1.0 - w - kappa) * u_null


def guidance_rows(t: torch.Tensor, dropped: torch.Tensor | None, cfg: MeanFlowGuidanceConfig) -> torch.Tensor:
    """Rows that get the guided velocity: t in [t_min, t_max] and label kept (bool ``(N,)``)."""
    rows = (t >= cfg.t_min) & (t <= cfg.t_max)
    if dropped is not None:
        rows = rows & ~dropped.to(t.device)
    return rows


# ----------------------------------------------------------------------------- the method


class MeanFlow(Method):
    """MeanFlow loss (Algorithm 1) with adaptive weighting, CFG-in-target and DDP-safe JVPs."""

    name = "meanflow"

    def __init__(self, config: MeanFlowConfig | None = None):
        self.config = config or MeanFlowConfig()

    def describe_jvp(self, *, sharded: bool, compiled: bool, device: str, precision: str = "fp32",
                     dropout: bool = False) -> str:
        """The forward-mode route training will take (``selfe train --dry-run`` and the run log print it)."""
        from selfe_cli.methods.jvp import plan_for

        mixed = precision == "bf16" and str(device).startswith("cuda") and self.config.jvp_dtype == "float32"
        return plan_for(self.config.jvp_mode, sharded=sharded, compiled=compiled, device=device,
                        mixed_precision=mixed, dropout=dropout).describe()

    def sampler_defaults(self, net: nn.Module | None = None) -> dict:
        # Algorithm 2: each step lands at the next grid time, x_r = x_t - (t - r) u(x_t, r, t).
        return {"r_mode": "next"}

    # -- target ------------------------------------------------------------------------------

    def guided_tangent(self, net: nn.Module, z: torch.Tensor, t: torch.Tensor, v: torch.Tensor, cond: Cond,
                       null_cond: Cond, dropped: torch.Tensor | None) -> torch.Tensor:
        """The velocity used as JVP tangent and in the target: ``v~`` on guided rows, else ``v``."""
        g = self.config.guidance
        if not g.active or cond is None:
            return v
        rows, real = rows_or_placeholder(guidance_rows(t, dropped, g).nonzero().squeeze(1), is_sharded(net))  # (K,)
        if rows is None:
            return v
        zk, tk = as_jvp_input(z.index_select(0, rows)), t.index_select(0, rows)
        both_cond = cond_cat(cond_index(cond, rows), cond_index(null_cond, rows))
        with torch.no_grad(), jvp_precision(z.device, self.config.jvp_dtype):
            # One batched call for both branches, on the bare module (no graph, no DDP hooks).
            both = unwrap(net)(torch.cat([zk, zk]), torch.cat([tk, tk]), torch.cat([tk, tk]), both_cond)
        u_cond, u_null = both.to(v.dtype).chunk(2)  # (K, ...) each
        guided = guided_velocity(v.index_select(0, rows), u_cond, u_null, g.w, g.kappa)
        return v.index_copy(0, rows, guided) if real else v

    def u_and_target(self, net: nn.Module, z: torch.Tensor, t: torch.Tensor, r: torch.Tensor, cond: Cond,
                     v_tan: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``u = net(z, t, r, c)`` (with grad) and ``u_tgt = v - (t - r) du/dt`` (detached).

        ``du/dt`` is the JVP along ``(dz, dr, dt) = (v_tan, 0, 1)``, computed on the leading rows with
        ``r != t`` only (``sample_t_r`` puts them first; any other order is sorted here and restored).
        """
        neq = r != t  # (N,)
        k = int(neq.sum())
        order = None
        if k and not bool(neq[:k].all()):  # not a prefix: move the r != t rows to the front
            order = torch.argsort((~neq).to(torch.int8), stable=True)
            z, t, r, v_tan = z[order], t[order], r[order], v_tan[order]
            cond = cond_index(cond, order)
        u, dudt = two_time_jvp(net, z, t, r, cond, v_tan, torch.ones_like(t), None, jvp_rows=k,
                               mode=self.config.jvp_mode, dtype=self.config.jvp_dtype)
        u_tgt = v_tan - bcast(t - r, v_tan) * dudt.to(v_tan.dtype)  # MeanFlow identity [6]
        if order is not None:
            inverse = torch.argsort(order)
            u, u_tgt = u[inverse], u_tgt[inverse]
        return u, u_tgt.detach()

    # -- loss --------------------------------------------------------------------------------

    def loss_from(self, net: nn.Module, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, r: torch.Tensor,
                  cond: Cond, null_cond: Cond = None, dropped: torch.Tensor | None = None) -> LossOutput:
        """The loss for given noise, times and dropout mask (``loss`` draws them). Deterministic.

        ``cond`` is the true condition; rows where ``dropped`` is set are fed ``null_cond``.
        """
        cfg = self.config
        z = interpolate(x0, eps, t)  # (N, C, H, W)
        v = velocity(x0, eps)  # (N, C, H, W)
        cond_in = cond
        if dropped is not None and cond is not None:
            from selfe_cli.models.conditioning import cond_where
            cond_in = cond_where(dropped, null_cond, cond)
        v_tan = self.guided_tangent(net, z, t, v, cond, null_cond, dropped)
        u, u_tgt = self.u_and_target(net, z, t, r, cond_in, v_tan)
        work = torch.promote_types(u.dtype, torch.float32)  # bf16 outputs: the loss in fp32 (float64 stays)
        delta = u.to(work) - u_tgt.to(work)  # (N, C, H, W)
        sq = delta.pow(2).flatten(1).sum(1)  # (N,) per-sample SUM of squares (docs/methods.md, adaptive weight)
        w = adaptive_weight(sq, cfg.weight_p, cfg.weight_c)  # (N,)
        loss = (w * sq).mean()
        return LossOutput(loss, self._logs(loss, delta, w, t, r))

    def loss(self, net: nn.Module, x0: torch.Tensor, cond: Cond, *, null_cond: Cond, step: int,
             total_steps: int, ema_net: nn.Module | None = None) -> LossOutput:
        t, r = sample_t_r(self.config, x0.shape[0], x0.device)  # (N,), (N,)
        eps = torch.randn_like(x0)
        dropped = None
        if cond is not None:
            _, dropped = drop_condition(cond, null_cond, self.config.cond_dropout)
        return self.loss_from(net, x0, eps, t, r, cond, null_cond, dropped)

    @staticmethod
    def _logs(loss: torch.Tensor, delta: torch.Tensor, w: torch.Tensor, t: torch.Tensor,
              r: torch.Tensor) -> dict[str, torch.Tensor]:
        per_sample = delta.detach().pow(2).flatten(1).mean(1)  # (N,) element mean, comparable to FM's mse
        neq = (r != t).float()
        eq = 1.0 - neq

        def masked_mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
            return (x * m).sum() / m.sum().clamp(min=1)

        return {
            "loss": loss.detach(),
            "mse": per_sample.mean(),
            "mse_r_eq_t": masked_mean(per_sample, eq),
            "mse_r_neq_t": masked_mean(per_sample, neq),
            "frac_r_neq_t": neq.mean(),
            "adaptive_weight": w.detach().mean(),
        }


def meanflow_config(**overrides: Any) -> MeanFlowConfig:
    """A config from keyword overrides, validated like a recipe section (for scripts and tests)."""
    from selfe_cli.config import from_dict

    return from_dict(MeanFlowConfig, overrides, "method")


__all__ = ["MeanFlow", "MeanFlowConfig", "MeanFlowGuidanceConfig", "adaptive_weight", "count_r_neq_t",
           "guidance_rows", "guided_velocity", "meanflow_config", "sample_t_r"]
