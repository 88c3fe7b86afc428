"""The any-step sampler shared by all methods: ``x_r = x_t - (t - r) net(x_t, t, r, c)``.

MF Algorithm 2 and SE [22]; docs/methods.md §1 (update, grid, ``r_mode``) and §4.3 (energy CFG, eta).

Pure tensor code: no I/O, no model loading. A sampler is a time grid 1 = t_0 > ... > t_N = 0 and a
rule for the landing time r of each step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from selfe_cli.models.conditioning import Cond, cond_cat

RMode = Literal["next", "same", "mid", "zero"]
Guidance = Literal["standard", "energy"]


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Resolution shift ``t -> s t / (1 + (s - 1) t)`` (= e^mu / (e^mu + 1/t - 1) with s = e^mu)."""
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def time_grid(steps: int, shift: float = 1.0, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32, t_start: float = 1.0) -> torch.Tensor:
    """``(steps + 1,)`` times from ``t_start`` (default 1) to 0: uniform, warped by ``shift``, scaled by ``t_start``."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0.0 < t_start <= 1.0:
        raise ValueError(f"t_start must be in (0, 1], got {t_start}")
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return (t_start * shift_time(t, shift)).to(device=device, dtype=dtype)


def guided_velocity(net: nn.Module, x: torch.Tensor, t: torch.Tensor, r: torch.Tensor, cond: Cond,
                    null_cond: Cond, cfg_scale: float, guidance: str = "standard") -> torch.Tensor:
    """``v_u + w (v_c - v_u)`` with one batched call of the network (2 NFE); w = 1 is one call.

    ``guidance="energy"`` (Self-E's energy-preserving CFG, our reading): the guided velocity is rescaled,
    per sample, to the L2 norm (over all elements) of the conditional velocity,
    ``v = v_g * ||v_c|| / ||v_g||``, so a large w steers the direction without inflating the step.
    """
    if cfg_scale == 1.0 or cond is None:
        return net(x, t, r, cond)
    both = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([r, r]), cond_cat(cond, null_cond))
    v_c, v_u = both.chunk(2)
    v = v_u + cfg_scale * (v_c - v_u)
    if guidance == "energy":
        dims = tuple(range(1, v.dim()))
        n_c = v_c.float().pow(2).sum(dim=dims, keepdim=True).sqrt()
        n_g = v.float().pow(2).sum(dim=dims, keepdim=True).sqrt()
        v = (v.float() * (n_c / n_g.clamp(min=1e-12))).to(v.dtype)
    return v


def landing_times(t_k: torch.Tensor, t_next: torch.Tensor, r_mode: str) -> torch.Tensor:
    """Landing time r of a step from t_k to t_next: next (t_next), same (t_k, flow matching), mid (average;
    for one step from 1 to 0 that is Self-E's s = 0.5), zero (0: the clean-image prediction
    ``x0 = x - t u(x, t, 0)``; with ``eta = 1`` that is consistency sampling, alpha-Flow's 2-NFE sampler)."""
    if r_mode == "zero":
        return torch.zeros_like(t_k)
    if r_mode == "same":
        return t_k
    if r_mode == "mid":
        return 0.5 * (t_k + t_next)
    return t_next


@torch.no_grad()
def sample(net: nn.Module, noise: torch.Tensor, cond: Cond = None, null_cond: Cond = None, *,
           steps: int, r_mode: str = "next", cfg_scale: float = 1.0, shift: float = 1.0,
           grid: torch.Tensor | None = None, guidance: str = "standard", eta: float = 0.0,
           generator: torch.Generator | None = None,
           step_noise: Callable[[int], torch.Tensor] | None = None, t_start: float = 1.0) -> torch.Tensor:
    """Integrate from noise (t = 1) to data (t = 0) in ``steps`` network evaluations (x2 with CFG).

    ``r_mode``: ``"next"`` lands each step at the next grid time (MeanFlow, Self-E: the network
    predicts the average velocity over the step); ``"same"`` evaluates at ``r = t`` (flow-matching
    Euler: the instantaneous velocity); ``"mid"`` at the middle of the step (Self-E's s = 0.5 for 1 step);
    ``"zero"`` at r = 0 (each step predicts the clean image; with ``eta = 1`` the step re-noises it to the next
    time with fresh noise: consistency sampling, ``x' = (1 - t') (x - t u(x, t, 0)) + t' z``).

    ``eta`` > 0: DDIM-style stochastic update (Self-E appendix, eta = 1). From ``V`` at (t, r) the clean and
    noise estimates are ``x0 = x - t V`` and ``e = x + (1 - t) V`` (so that ``(1 - t) x0 + t e = x``); the
    step lands at ``(1 - t') x0 + t' (sqrt(1 - eta^2) e + eta z)``, ``z ~ N(0, I)`` from ``step_noise(k)``
    (per-image seeded noise of step k, shaped like x), else from ``generator``, else torch's global RNG.
    eta = 0 is exactly the deterministic update ``x - (t - t') V``; eta = 1 re-noises with fresh noise.

    ``t_start`` < 1 starts the grid below pure noise (ECT's sigma_max = 80 is t = 80/81, IMM's 0.994) from
    ``x = t_start * noise``: the path's point ``(1 - t) x0 + t eps`` without its data part, as EDM-style samplers
    start from ``sigma_max * n``.
    """
    if r_mode not in ("next", "same", "mid", "zero"):
        raise ValueError(f"r_mode must be 'next', 'same', 'mid' or 'zero', got {r_mode!r}")
    if guidance not in ("standard", "energy"):
        raise ValueError(f"guidance must be 'standard' or 'energy', got {guidance!r}")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    grid = time_grid(steps, shift, noise.device, t_start=t_start) if grid is None else grid.to(noise.device)
    x = noise if t_start == 1.0 else grid[0].to(noise.dtype) * noise
    n = x.shape[0]
    for k in range(len(grid) - 1):
        t_k, t_next = grid[k], grid[k + 1]
        t = t_k.expand(n)
        r = landing_times(t_k, t_next, r_mode).expand(n)
        v = guided_velocity(net, x, t, r, cond, null_cond, cfg_scale, guidance).to(x.dtype)
        if eta == 0.0:
            x = x - (t_k - t_next).to(x.dtype) * v
        else:
            tk, tn = t_k.to(x.dtype), t_next.to(x.dtype)
            x0_hat, eps_hat = x - tk * v, x + (1 - tk) * v
            if step_noise is not None:
                z = step_noise(k).to(x)
            elif generator is not None:
                z = torch.randn(x.shape, generator=generator, device=generator.device).to(x)
            else:
                z = torch.randn_like(x)
            eps_mix = (1 - eta ** 2) ** 0.5 * eps_hat + eta * z
            x = (1 - tn) * x0_hat + tn * eps_mix
    return x
