"""sCT: continuous-time consistency training (Lu & Song 2024, no official code) on the linear path.

The consistency function ``f(x_t, t) = x_t - t u(x_t, t, 0)`` is constant along the probability-flow ODE, so
``df/dt = 0`` gives ``u = v - t du/dt`` with ``du/dt`` the total derivative along ``(v, 0, 1)``: MeanFlow's target
with ``r = 0``. sCT's stabilisers act on the tangent ``g = v - sg(u) - w_k t du/dt`` (the negative gradient
direction): the warm-up ``w_k = min(1, step / warmup)`` and the normalisation ``g / (||g|| + c)``; the regression
target is ``sg(u + g)``. The JVP runs through the package's forward-mode engine (``two_time_jvp``) on the ``r = 0``
rows; a share ``ratio_fm`` of rows can be flow matching (``r = t``, target ``eps - x0``, ESC's linear variant).
The row weight is the paper's learned log-variance, ``e^{-l(t)} ||u - u_tgt||^2 / D + l(t)`` with ``l`` a head of the
network (``model.logvar_channels > 0``, ``models.embeddings.LogVarHead``), or MeanFlow's adaptive weight
(``weighting``). docs/methods.md, sCT, lists every departure.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import nn

from selfe_cli.methods.base import LossOutput, Method, capture_sink, drop_condition, unwrap
from selfe_cli.methods.configs import MeanFlowConfig, SCTConfig
from selfe_cli.methods.jvp import two_time_jvp
from selfe_cli.methods.meanflow import MeanFlow, adaptive_weight
from selfe_cli.methods.paths import bcast, interpolate, sample_time, velocity
from selfe_cli.models.conditioning import Cond, cond_where


def sample_t_r(cfg: SCTConfig, n: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` from the sampler; ``r = 0`` on the first ``n - floor(ratio_fm n)`` rows, ``r = t`` on the rest."""
    t = sample_time(cfg.time_sampler, n, device)
    n_fm = min(n, math.floor(cfg.ratio_fm * n + 1e-9))
    r = torch.where(torch.arange(n, device=device) < n - n_fm, torch.zeros_like(t), t)
    return t, r


def warmup_factor(cfg: SCTConfig, step: int) -> float:
    """``w_k = min(1, step / tangent_warmup_steps)`` (1 without warm-up)."""
    return 1.0 if cfg.tangent_warmup_steps == 0 else min(1.0, step / cfg.tangent_warmup_steps)


def normalise_tangent(g: torch.Tensor, kind: str, c: float) -> torch.Tensor:
    """``g / (||g|| + c)`` per sample: the L2 norm over all elements, or their root mean square; or ``g``."""
    if kind == "none":
        return g
    sq = g.pow(2).flatten(1)
    norm = sq.sum(1).sqrt() if kind == "l2" else sq.mean(1).sqrt()
    return g / bcast(norm + c, g)


def has_logvar_head(net: nn.Module) -> bool:
    return bool(getattr(unwrap(net), "has_logvar_head", False))


def capture_logvar(net: nn.Module) -> contextlib.AbstractContextManager[list]:
    """Collect the log-variance ``l(t)`` of the forwards inside (``(grad enabled, tensor)`` per call)."""
    return capture_sink(net, "logvar_sink")


def logvar_of(sink: list, n: int) -> torch.Tensor | None:
    """The log-variance of the last forwards of this grad mode that cover ``n`` rows (``two_time_jvp`` ends with the
    forward(s) of the whole batch, after any JVP pass): (N,), or None if they do not add up to ``n``."""
    grad, parts, rows = torch.is_grad_enabled(), [], 0
    for g, lv in reversed(sink):
        if g == grad and rows < n:
            parts.append(lv)
            rows += lv.shape[0]
    return torch.cat(parts[::-1]) if rows == n else None


def logvar_loss(sq_mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``mean_i e^{-l_i} m_i + l_i`` for per-row mean squared errors ``m_i`` (the paper's weight; for fixed ``m``
    each term is smallest at ``l_i = log m_i``)."""
    return (torch.exp(-logvar) * sq_mean + logvar).mean()


class SCT(Method):
    name = "sct"

    def __init__(self, config: SCTConfig | None = None):
        self.config = config or SCTConfig()
        self._meanflow = MeanFlow(MeanFlowConfig(jvp_mode=self.config.jvp_mode, jvp_dtype=self.config.jvp_dtype))

    def describe_jvp(self, **kw: Any) -> str:
        return self._meanflow.describe_jvp(**kw)

    def sampler_defaults(self, net: nn.Module | None = None) -> dict:
        # each step predicts x0 = x - t u(x, t, 0); with sample.eta 1 it re-noises it (the paper's 2-step sampler)
        return {"r_mode": "zero"}

    def loss_from(self, net: nn.Module, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, r: torch.Tensor,
                  cond: Cond = None, null_cond: Cond = None, dropped: torch.Tensor | None = None,
                  warmup: float = 1.0) -> LossOutput:
        """The loss for given noise, times, dropout mask and warm-up factor; the ``r = 0`` rows first."""
        c = self.config
        cond_in = cond
        if dropped is not None and cond is not None:
            cond_in = cond_where(dropped.to(t.device), null_cond, cond)
        z, v = interpolate(x0, eps, t), velocity(x0, eps)
        ct = r != t  # consistency rows (r = 0 < t)
        k = int(ct.sum())
        if k and not bool(ct[:k].all()):
            raise ValueError("sct: the rows with r = 0 must come first")
        head = has_logvar_head(net)
        if c.weighting == "logvar" and not head:
            raise ValueError("method.weighting: logvar needs a network built with model.logvar_channels > 0")
        use_logvar = head and c.weighting != "adaptive"
        with capture_logvar(net) if use_logvar else contextlib.nullcontext([]) as sink:
            u, dudt = two_time_jvp(net, z, t, r, cond_in, v, torch.ones_like(t), None, jvp_rows=k,
                                   mode=c.jvp_mode, dtype=c.jvp_dtype)
        work = torch.promote_types(u.dtype, torch.float32)
        u_sg, v_w = u.detach().to(work), v.to(work)
        g = v_w - u_sg - warmup * bcast(t, v_w) * dudt.to(work)  # (t - r) = t on these rows
        g = normalise_tangent(g, c.tangent_norm, c.tangent_norm_c)
        u_tgt = torch.where(bcast(ct, v_w).bool(), u_sg + g, v_w)  # flow-matching rows: eps - x0
        delta = u.to(work) - u_tgt
        logvar = None
        if use_logvar:  # the paper's weight: e^{-l(t)} ||delta||^2 / D + l(t)
            logvar = logvar_of(sink, z.shape[0])
            if logvar is None:  # evaluating the head here, outside the (DDP) forward, would skip its all-reduce
                raise RuntimeError("sct: the network's forwards did not report l(t) for every row (a network whose "
                                   "forward does not end with TwoTimeModel._finish)")
            logvar = logvar.to(work)
            loss = logvar_loss(delta.pow(2).flatten(1).mean(1), logvar)
        else:
            sq = delta.pow(2).flatten(1).sum(1)  # per-sample SUM (MeanFlow's adaptive weight)
            loss = (adaptive_weight(sq, c.weight_p, c.weight_c) * sq).mean()
        logs = {"loss": loss.detach(), "mse": delta.detach().pow(2).flatten(1).mean(1).mean(),
                "tangent_warmup": torch.tensor(float(warmup)), "frac_consistency": ct.float().mean()}
        if logvar is not None:
            logs["logvar"] = logvar.detach().mean()
        return LossOutput(loss, logs)

    def loss(self, net: nn.Module, x0: torch.Tensor, cond: Cond, *, null_cond: Cond, step: int,
             total_steps: int, ema_net: nn.Module | None = None) -> LossOutput:
        t, r = sample_t_r(self.config, x0.shape[0], x0.device)
        eps = torch.randn_like(x0)
        dropped = None
        if cond is not None:
            _, dropped = drop_condition(cond, null_cond, self.config.cond_dropout)
        return self.loss_from(net, x0, eps, t, r, cond, null_cond, dropped, warmup_factor(self.config, step))


def sct_config(**overrides: Any) -> SCTConfig:
    """A config from keyword overrides, validated like a recipe section (for scripts and tests)."""
    from selfe_cli.config import from_dict

    return from_dict(SCTConfig, overrides, "method")


__all__ = ["SCT", "SCTConfig", "capture_logvar", "has_logvar_head", "logvar_loss", "logvar_of", "normalise_tangent",
           "sample_t_r", "sct_config", "warmup_factor"]
