"""Shortcut models (Frans et al. 2024, kvfrans/shortcut-models ``targets_shortcut.py``), in this package's time
convention.

The official network ``s(x, t_s, d)`` takes the time from the noise side (``t_s = 0`` noise) and a step size ``d``
toward the data; here ``t = 1 - t_s`` and ``r = t - d``, so the two-time network ``u(x, t, r)`` is ``-s`` and a
sampler step is the any-step update ``x_r = x_t - d u``. A batch is split:

* flow-matching rows (``1 - 1/bootstrap_every``): ``t`` on the grid ``{1/T, ..., 1}`` (``t_s`` in
  ``{0, ..., (T-1)/T}``), the finest step ``d = 1/T``, target ``eps - x0``; label dropout on these rows only;
* bootstrap rows (``1/bootstrap_every``): ``d = 2^-k`` for ``k = 0 .. log2(T) - 1`` in equal shares, ``t`` on the
  grid of its own step, target the average of two half steps of the EMA network (``delta = d / 2``)

      u_a = u(x_t, t, t - delta),  x' = clip(x_t - delta u_a),  u_b = u(x', t - delta, t - 2 delta),
      u_tgt = clip((u_a + u_b) / 2)

  with guided half steps ``v_u + s (v_c - v_u)`` on the finest bootstrap rows (``bootstrap_cfg_scale``).

The loss is the plain mean squared error over all rows and elements. Sampling takes ``N`` steps of ``d = 1/N``
on the linear grid with ``r`` the next grid time; ``N`` must be a power of two up to ``T`` (the trained steps).
docs/methods.md, Shortcut.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn

from selfe_cli.methods.base import LossOutput, Method, unwrap
from selfe_cli.methods.configs import ShortcutConfig
from selfe_cli.methods.paths import bcast, interpolate, velocity
from selfe_cli.models.conditioning import Cond, cond_cat, cond_index, cond_where


def levels(cfg: ShortcutConfig) -> int:
    """log2(T): the bootstrap levels ``k = 0 .. levels - 1`` (``d = 2^-k``); the flow-matching rows are ``d = 1/T``."""
    return int(math.log2(cfg.denoise_timesteps))


def sample_rows(cfg: ShortcutConfig, n: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
    """``(t, r, level)``: the first ``n // bootstrap_every`` rows bootstrap, at levels ``K-1, K-2, ...`` round-robin
    (equal shares when their number is a multiple of K; otherwise from a random level, so that every level gets its
    share over steps), ``t = 1 - j d`` with ``j`` uniform on ``{0 .. 1/d - 1}``; the others flow matching at
    ``d = 1/T`` (level ``K``)."""
    big_k = levels(cfg)
    n_boot = n // cfg.bootstrap_every
    level = torch.full((n,), big_k, dtype=torch.long, device=device)
    offset = int(torch.randint(big_k, ())) if n_boot % big_k else 0  # every level in turn, whatever n_boot
    level[:n_boot] = big_k - 1 - (torch.arange(n_boot, device=device) + offset) % big_k
    sections = 2 ** level  # 1/d
    j = (torch.rand(n, device=device) * sections).floor().clamp(max=sections - 1)
    d = 1.0 / sections.to(torch.float32)
    t = 1.0 - j / sections.to(torch.float32)
    return t, (t - d).clamp(min=0.0), level


class Shortcut(Method):
    name = "shortcut"

    def __init__(self, config: ShortcutConfig | None = None):
        self.config = config or ShortcutConfig()
        self._warned_no_ema = False

    def sampler_defaults(self, net: nn.Module | None = None) -> dict:
        # N steps of d = 1/N, each landing at the next grid time; N a power of two up to T (checked by Generator)
        return {"r_mode": "next", "power_of_two_steps": self.config.denoise_timesteps}

    def _target_net(self, net: nn.Module, ema_net: nn.Module | None) -> nn.Module:
        if self.config.bootstrap_ema:
            if ema_net is not None:
                return ema_net
            if not self._warned_no_ema:
                warnings.warn("shortcut: no EMA network passed to the loss; the bootstrap target uses the online "
                              "weights", stacklevel=3)
                self._warned_no_ema = True
        return unwrap(net)

    @torch.no_grad()
    def velocity_at(self, net: nn.Module, x: torch.Tensor, t: torch.Tensor, r: torch.Tensor, cond: Cond,
                    null_cond: Cond, guided: torch.Tensor | None) -> torch.Tensor:
        """``u(x, t, r | c)``, and on the ``guided`` rows ``u_null + s (u_c - u_null)`` (one batched call)."""
        s = self.config.bootstrap_cfg_scale
        if guided is None or s == 1.0 or cond is None or not bool(guided.any()):
            return net(x, t, r, cond).to(x.dtype)
        g = guided.nonzero().squeeze(1)
        out = net(torch.cat([x, x[g]]), torch.cat([t, t[g]]), torch.cat([r, r[g]]),
                  cond_cat(cond, cond_index(null_cond, g))).to(x.dtype)
        u, u_null = out[: x.shape[0]], out[x.shape[0]:]
        return u.index_copy(0, g, u_null + s * (u[g] - u_null))

    def bootstrap_target(self, net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, d: torch.Tensor, cond: Cond,
                         null_cond: Cond = None, guided: torch.Tensor | None = None) -> torch.Tensor:
        """``clip((u(x_t, t, t - δ) + u(x', t - δ, t - 2δ)) / 2)`` with ``x' = clip(x_t - δ u_a)``, ``δ = d / 2``."""
        c = self.config
        half = d / 2
        u_a = self.velocity_at(net, x_t, t, t - half, cond, null_cond, guided)
        x_mid = x_t - bcast(half, x_t) * u_a
        if c.clip is not None:
            x_mid = x_mid.clamp(-c.clip, c.clip)
        u_b = self.velocity_at(net, x_mid, t - half, t - d, cond, null_cond, guided)
        tgt = (u_a + u_b) / 2
        return tgt.clamp(-c.clip, c.clip) if c.clip is not None else tgt

    def loss_from(self, net: nn.Module, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, r: torch.Tensor,
                  level: torch.Tensor, cond: Cond = None, null_cond: Cond = None,
                  dropped: torch.Tensor | None = None, ema_net: nn.Module | None = None) -> LossOutput:
        """The loss for given noise, rows and dropout mask (``loss`` draws them; bootstrap rows come first)."""
        big_k = levels(self.config)
        boot = level < big_k
        n_boot = int(boot.sum())
        x_t = interpolate(x0, eps, t)
        target = velocity(x0, eps).clone()
        if n_boot:
            b = slice(0, n_boot)
            guided = level[b] == big_k - 1  # the finest bootstrap step (official bootstrap_cfg)
            target[b] = self.bootstrap_target(self._target_net(net, ema_net), x_t[b], t[b], t[b] - r[b],
                                              cond_index(cond, b), cond_index(null_cond, b), guided)
        cond_in = cond
        if dropped is not None and cond is not None:
            cond_in = cond_where((dropped.to(t.device) & ~boot), null_cond, cond)  # bootstrap rows keep the label
        u = net(x_t, t, r, cond_in)
        work = torch.promote_types(u.dtype, torch.float32)
        err = (u.to(work) - target.detach().to(work)).pow(2).flatten(1).mean(1)  # (N,)
        loss = err.mean()
        m = boot.float()
        logs = {"loss": loss.detach(), "mse_fm": (err.detach() * (1 - m)).sum() / (1 - m).sum().clamp(min=1),
                "mse_bootstrap": (err.detach() * m).sum() / m.sum().clamp(min=1)}
        return LossOutput(loss, logs)

    def loss(self, net: nn.Module, x0: torch.Tensor, cond: Cond, *, null_cond: Cond, step: int,
             total_steps: int, ema_net: nn.Module | None = None) -> LossOutput:
        t, r, level = sample_rows(self.config, x0.shape[0], x0.device)
        eps = torch.randn_like(x0)
        dropped = torch.rand(x0.shape[0]) < self.config.cond_dropout if cond is not None else None
        return self.loss_from(net, x0, eps, t, r, level, cond, null_cond, dropped, ema_net=ema_net)


def check_steps(steps: int, max_steps: int) -> str | None:
    """None if a shortcut model can sample with ``steps``, else what is wrong."""
    if steps < 1 or steps & (steps - 1) or steps > max_steps:
        return (f"expected a power of two up to {max_steps} (1, 2, 4, ..., {max_steps}) for a shortcut model, "
                f"got {steps}: its step sizes are trained only there")
    return None


def shortcut_config(**overrides: Any) -> ShortcutConfig:
    """A config from keyword overrides, validated like a recipe section (for scripts and tests)."""
    from selfe_cli.config import from_dict

    return from_dict(ShortcutConfig, overrides, "method")


__all__ = ["Shortcut", "ShortcutConfig", "check_steps", "levels", "sample_rows", "shortcut_config"]
