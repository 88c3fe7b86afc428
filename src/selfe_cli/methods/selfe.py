"""Self-E: self-evaluating any-step text-to-image training (Yu et al., arXiv 2512.22374; docs/methods.md §4).

The two-time network ``V = net(x_t, t, s, c)`` is read through the clean-image estimate [6]
``G(x_t, t, s, c) = x_t - t * V``. One training step:

1. ``t = shift(sigmoid(n))``, ``s = t`` (prob. ``p_same``) else ``s ~ U((1 - tau) t, t)``;
2. long jump ``x0_hat = G(x_t, t, s, c)`` (the only pass with gradients);
3. landing ``x_s_hat = (1 - s) sg[x0_hat] + s eps'``;
4. self-evaluation [14] ``x_self = sg[x0_hat - (G(x_s_hat, s, s, null) - G(x_s_hat, s, s, c))]``
   (conditional branch on EMA weights, unconditional on online weights by default);
5. energy-preserving target [18-20] ``x_tar = x0 + lambda x_self`` renormalised to ``||x0||``, with
   ``lambda = t/(1-t) - s/(1-s)`` [17], loss ``w(t) ||x0_hat - x_renorm||^2``, ``w = 1/t^2`` [21].

Optional late "fake score" stage (App. S.1.2) mixes in ``G(x_s_hat, s, s, c_fake)`` and trains that
branch on the model's own landings. All math lives in small pure functions below; ``SelfE.loss``
only wires them to the network.

Reductions: squared norms are *means over elements* of a sample (as in flow matching, so loss
magnitudes are comparable across methods and resolutions), then means over the batch.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import nn

from selfe_cli.errors import UserError
from selfe_cli.methods.base import LossOutput, Method, drop_condition, is_sharded, rows_or_placeholder, unwrap
from selfe_cli.methods.configs import (  # noqa: F401 - re-exported
    PAPER_FAKE_SCORE_START,
    PAPER_TAU_ANNEAL_STEPS,
    PAPER_TOTAL_STEPS,
    SelfEConfig,
)
from selfe_cli.methods.paths import bcast, interpolate
from selfe_cli.models.conditioning import Cond, cond_cat, cond_index

# ----------------------------------------------------------------------------------------------
# Pure math


def shift_mu(tokens: int | float, base_tokens: int = 512, max_tokens: int = 4096, base_mu: float = 0.5,
             max_mu: float = 1.15) -> float:
    """mu linear in the token count L: ``base_mu`` at ``base_tokens``, ``max_mu`` at ``max_tokens``.

    Like FLUX, the line is extended beyond the two anchors (no clamping)."""
    slope = (max_mu - base_mu) / (max_tokens - base_tokens)
    return base_mu + slope * (tokens - base_tokens)


def shift_time(t: torch.Tensor, mu: float) -> torch.Tensor:
    """Resolution shift ``t <- e^mu / (e^mu + (1/t - 1))`` = ``a t / (1 + (a - 1) t)``, a = e^mu.

    The second form is used: it is exact at t = 0 and t = 1 (no 1/0)."""
    a = math.exp(mu)
    return a * t / (1 + (a - 1) * t)


def tau_at(step: int, anneal_steps: int) -> float:
    """tau annealed linearly from 0 at step 0 to 1 at ``anneal_steps`` (then 1)."""
    if anneal_steps <= 0:
        return 1.0
    return min(max(step / anneal_steps, 0.0), 1.0)


def sample_s(t: torch.Tensor, tau: float, p_same: float) -> torch.Tensor:
    """``s = t`` with probability ``p_same``, else ``s ~ U((1 - tau) t, t)``. Draws 2 x (N,) uniforms."""
    same = torch.rand(t.shape, device=t.device) < p_same
    u = torch.rand(t.shape, device=t.device)
    s = t * (1 - tau * u)  # U((1 - tau) t, t)
    return torch.where(same, t, s)


def lambda_st(t: torch.Tensor, s: torch.Tensor, t_max: float = 0.999) -> torch.Tensor:
    """Self-evaluation weight [17] ``t/(1-t) - s/(1-s)``, t and s clamped to ``t_max`` (t -> 1 guard).

    Zero when s = t; non-negative for s <= t (the map t -> t/(1-t) is increasing)."""
    tc = t.double().clamp(max=t_max)  # float64: 1 - t loses digits near 1 in float32
    sc = s.double().clamp(max=t_max)
    return (tc / (1 - tc) - sc / (1 - sc)).clamp(min=0).to(t.dtype)


def loss_weight(t: torch.Tensor, kind: str = "inv_t2", t_min: float = 0.01) -> torch.Tensor:
    """Per-sample weight [21]: ``1 / max(t, t_min)^2``. With it, ``||G - x0||^2 / t^2 = ||V - v||^2``."""
    if kind == "none":
        return torch.ones_like(t)
    return 1.0 / t.clamp(min=t_min) ** 2


def _work(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (half precision is promoted; float64 stays float64)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def clean_estimate(x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[6] ``G = x_t - t V`` in >= float32 (bf16 rounding of G would be amplified by the 1/t^2 weight)."""
    v = _work(v)
    return _work(x_t).to(v.dtype) - bcast(t, v) * v


def landing(x0_hat: torch.Tensor, s: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Re-noise the long-jump estimate to the landing time: ``(1 - s) x0_hat + s eps'``."""
    return interpolate(x0_hat, eps, s)


def _patchify_norm(x: torch.Tensor, patch: int) -> torch.Tensor:
    """Per-token L2 norm: x (N, C, H, W) -> (N, 1, H/p, 1, W/p, 1), broadcastable after a view."""
    n, c, h, w = x.shape
    xp = x.reshape(n, c, h // patch, patch, w // patch, patch)
    return xp.pow(2).sum(dim=(1, 3, 5), keepdim=True).sqrt()


def energy_renorm(x_tar: torch.Tensor, x0: torch.Tensor, mode: str = "sample", patch: int = 1,
                  eps: float = 1e-6) -> torch.Tensor:
    """[18-20] rescale ``x_tar`` to the norm of ``x0``: per sample, or per token (p x p patch, all channels)."""
    if mode == "sample":
        dims = tuple(range(1, x0.dim()))
        n_tar = x_tar.pow(2).sum(dim=dims, keepdim=True).sqrt()
        n_x0 = x0.pow(2).sum(dim=dims, keepdim=True).sqrt()
        return x_tar * (n_x0 / n_tar.clamp(min=eps))
    if x0.dim() != 4 or x0.shape[-1] % patch or x0.shape[-2] % patch:
        raise ValueError(f"per-token renormalisation needs (N, C, H, W) divisible by patch {patch}, got {tuple(x0.shape)}")
    n, c, h, w = x0.shape
    ratio = _patchify_norm(x0, patch) / _patchify_norm(x_tar, patch).clamp(min=eps)
    xp = x_tar.reshape(n, c, h // patch, patch, w // patch, patch) * ratio
    return xp.reshape(n, c, h, w)


def sample_mean_sq(x: torch.Tensor) -> torch.Tensor:
    """Squared norm as a mean over the elements of each sample: (N, ...) -> (N,)."""
    return x.pow(2).flatten(1).mean(dim=1)


def self_eval_target(x0_hat: torch.Tensor, g_cond: torch.Tensor, g_null: torch.Tensor,
                     g_fake: torch.Tensor | None = None, k: float = 0.9) -> torch.Tensor:
    """[14] ``x_self = sg[x0_hat - Delta]``, ``Delta = G_null - G_c`` (or the App. S.1.2 mix with G_fake)."""
    delta = g_null - g_cond
    if g_fake is not None:
        delta = k * delta + (1 - k) * (g_fake - g_cond)
    return (x0_hat - delta).detach()


def per_sample_loss(x0_hat: torch.Tensor, x0: torch.Tensor, x_self: torch.Tensor, lam: torch.Tensor,
                    target: str = "energy", norm: str = "sample", patch: int = 1) -> torch.Tensor:
    """Unweighted per-sample Self-E loss (N,).

    energy [18-20]: ``||x0_hat - renorm(x0 + lambda x_self)||^2``; sum [16]:
    ``||x0_hat - x0||^2 + lambda ||x0_hat - x_self||^2``. ``x_self`` must already be detached."""
    lam_b = bcast(lam, x0)
    if target == "sum":
        return sample_mean_sq(x0_hat - x0) + lam * sample_mean_sq(x0_hat - x_self)
    x_tar = x0 + lam_b * x_self
    return sample_mean_sq(x0_hat - energy_renorm(x_tar, x0, norm, patch))


def fake_captions(captions: Sequence[str], suffix: str = " fake image") -> list[str]:
    """``c_fake``: each prompt with the words "fake image" appended (App. S.1.2)."""
    return [f"{c}{suffix}" for c in captions]


# ----------------------------------------------------------------------------------------------
# Network plumbing


def _patch_size(net: nn.Module) -> int:
    cfg = getattr(net, "config", None)
    p = getattr(cfg, "patch_size", None) if cfg is not None else None
    p = p if p is not None else getattr(net, "patch_size", 1)
    return int(p or 1)


def token_count(net: nn.Module, x: torch.Tensor) -> int:
    """Tokens of the network input: (H / patch) * (W / patch) (a pixel U-Net counts pixels)."""
    p = _patch_size(net)
    return (x.shape[-2] // p) * (x.shape[-1] // p)


def _g(net: Callable, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, cond: Cond) -> torch.Tensor:
    return clean_estimate(x, t, net(x, t, s, cond))


def _batched_g(requests: list[tuple[nn.Module, Cond]], x: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor]:
    """G(x, t, t, c) for several (network, condition) pairs; one forward per distinct network."""
    out: list[torch.Tensor | None] = [None] * len(requests)
    groups: dict[int, list[int]] = {}
    for i, (m, _) in enumerate(requests):
        groups.setdefault(id(m), []).append(i)
    n = x.shape[0]
    for idxs in groups.values():
        m = requests[idxs[0]][0]
        cond = requests[idxs[0]][1]
        for i in idxs[1:]:
            cond = cond_cat(cond, requests[i][1])
        k = len(idxs)
        g = _g(m, x.repeat(k, *([1] * (x.dim() - 1))), t.repeat(k), t.repeat(k), cond)
        for j, i in enumerate(idxs):
            out[i] = g[j * n:(j + 1) * n]
    return out  # type: ignore[return-value]


class SelfE(Method):
    """Self-E training objective (SE (6)-(21), App. S.1.2; docs/methods.md §4.1-4.2). See the module docstring for the algorithm."""

    name = "selfe"

    def __init__(self, cfg: SelfEConfig | None = None):
        self.cfg = cfg or SelfEConfig()
        # None: fuse the grad-carrying passes only under DDP (one forward per backward); tests force it.
        self.fuse_grad_passes: bool | None = None
        self._warned_no_ema = False

    # -- schedule helpers (the loop may use them too)
    @property
    def needs_fake_cond(self) -> bool:
        """When True the loop passes ``fake_cond=`` at every step: the batch's captions with
        ``fake_suffix`` appended (``fake_captions``), encoded like ``cond``, batch-aligned with it."""
        return self.cfg.fake_score

    def fake_start(self, total_steps: int) -> int:
        c = self.cfg
        return c.fake_score_start if c.fake_score_start is not None else round(c.fake_score_start_fraction * total_steps)

    def tau_anneal_steps(self, total_steps: int) -> int:
        c = self.cfg
        return c.tau_anneal_steps if c.tau_anneal_steps is not None else round(c.tau_anneal_fraction * total_steps)

    def mu(self, tokens: int) -> float:
        c = self.cfg
        if c.shift_mu is not None:
            return c.shift_mu
        return shift_mu(c.tokens or tokens, c.shift_base_tokens, c.shift_max_tokens, c.shift_base_mu, c.shift_max_mu)

    def sample_t(self, n: int, tokens: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """t = sigmoid(N(t_mean, t_std)), then the resolution shift. Draws one (N,) normal."""
        c = self.cfg
        t = torch.sigmoid(torch.randn(n, device=device) * c.t_std + c.t_mean)
        return shift_time(t, self.mu(tokens)) if c.time_shift else t

    def sampler_defaults(self, net: nn.Module | None = None, sample_size: int | None = None) -> dict:
        """[22] ``{"r_mode": "next"}``; with ``net``, also the training shift ``e^mu`` of its token count.

        Guidance (paper: energy-preserving, w = 5), the shift and eta are the recipe's ``sample:`` keys; the
        bundled Self-E recipes set them to the paper's values."""
        out: dict = {"r_mode": self.cfg.sample_r_mode}
        if net is not None:
            bare = unwrap(net)
            size = sample_size or getattr(bare, "sample_size", None)
            if size is not None:
                out["shift"] = self.sampling_shift((int(size) // _patch_size(bare)) ** 2)
        return out

    def sampling_shift(self, tokens: int) -> float:
        """The time-grid shift ``e^mu`` matching the training time shift at ``tokens`` tokens (1 if off)."""
        return math.exp(self.mu(tokens)) if self.cfg.time_shift else 1.0

    # -- the objective
    def loss(self, net: nn.Module, x0: torch.Tensor, cond: Cond, *, null_cond: Cond, step: int,
             total_steps: int, ema_net: nn.Module | None = None, fake_cond: Cond = None) -> LossOutput:
        c = self.cfg
        if cond is None:
            raise UserError("method.name: selfe needs a conditional model (model condition 'text' or 'class'); "
                            "its self-evaluation compares conditional and null predictions")
        if c.fake_score and fake_cond is None:
            # checked from step 0, not only at the stage's start: a long run must not fail at 550k
            raise UserError("method.fake_score: the training loop did not pass fake_cond (captions + "
                            "fake_suffix); the fake-score stage needs a text dataset and loop support")
        n, device = x0.shape[0], x0.device
        bare = unwrap(net)
        tokens = token_count(bare, x0)

        # Times (RNG order fixed: t, s, eps, eps', dropout) so a seeded step is reproducible.
        t = self.sample_t(n, tokens, device)  # (N,)
        tau = tau_at(step, self.tau_anneal_steps(total_steps))
        s = sample_s(t, tau, c.p_same)  # (N,), s <= t
        eps = torch.randn_like(x0)
        eps_land = torch.randn_like(x0) if c.renoise == "fresh" else eps
        x_t = interpolate(x0, eps, t)  # (N, C, H, W)
        cond_in, dropped = drop_condition(cond, null_cond, c.cond_drop)
        dropped = dropped.to(device) if dropped is not None else torch.zeros(n, dtype=torch.bool, device=device)
        lam = lambda_st(t, s, c.lambda_t_max)
        # A dropped prompt has Delta = G_null - G_null = 0: in the sum form [16] its self term has zero
        # gradient, so lambda = 0 (pure data loss) is the exact equivalent; it keeps renorm from pulling
        # unconditional samples towards their own estimate.
        lam = torch.where(dropped, torch.zeros_like(lam), lam)

        fake_on = c.fake_score and step >= self.fake_start(total_steps)
        fake_idx = (~dropped).nonzero().squeeze(1) if fake_on else None
        sharded = is_sharded(net)
        # DDP and FSDP: one forward with grad per backward
        fused = self.fuse_grad_passes if self.fuse_grad_passes is not None else \
            (isinstance(net, nn.parallel.DistributedDataParallel) or sharded)

        # --- grad-carrying passes: the long jump (and the fake-score branch) -----------------
        v_fake = None
        if fake_on and fused and (fake_idx.numel() > 0 or sharded):  # FSDP: the same passes on every rank
            # DDP allows one forward with grad per backward, and the fake branch's input depends on
            # x0_hat: get sg[x0_hat] from a no-grad pass first, then one forward on [x_t ; x_s_hat].
            with torch.no_grad():
                x0_hat_sg = _g(bare, x_t, t, s, cond_in)
            x_s_hat = landing(x0_hat_sg, s, eps_land)
            fi = fake_idx
            v_all = net(torch.cat([x_t, x_s_hat[fi].to(x_t.dtype)]), torch.cat([t, s[fi]]),
                        torch.cat([s, s[fi]]), cond_cat(cond_in, cond_index(fake_cond, fi)))
            v, v_fake = v_all[:n], v_all[n:]
            x0_hat = clean_estimate(x_t, t, v)
        else:
            v = net(x_t, t, s, cond_in)  # (N, C, H, W)
            x0_hat = clean_estimate(x_t, t, v)
            x_s_hat = landing(x0_hat.detach(), s, eps_land)
            if fake_on and fake_idx.numel() > 0:
                fi = fake_idx
                v_fake = net(x_s_hat[fi].to(x_t.dtype), s[fi], s[fi], cond_index(fake_cond, fi))

        # --- self-evaluation: stop-gradient passes in flow-matching mode (s, s) [14] ---------
        # On the unwrapped module: no DDP bookkeeping or buffer broadcast (collectives would hang
        # when ranks select different numbers of samples), and no graph is built.
        x_self = x0_hat.detach().clone()  # lambda = 0 where unused, any finite value will do
        active, real = rows_or_placeholder((lam > 0).nonzero().squeeze(1), sharded)
        used_ema = 0.0
        if active is not None:
            def pick(which: str) -> nn.Module:
                nonlocal used_ema
                if which == "ema":
                    if ema_net is not None:
                        used_ema = 1.0
                        return ema_net
                    if not self._warned_no_ema:
                        warnings.warn("selfe: no EMA network passed to the loss; the EMA self-evaluation "
                                      "branch uses the online weights", stacklevel=2)
                        self._warned_no_ema = True
                return bare

            a = active
            reqs = [(pick(c.self_eval_cond_weights), cond_index(cond, a)),
                    (pick(c.self_eval_uncond_weights), cond_index(null_cond, a))]
            if fake_on:
                reqs.append((pick(c.fake_eval_weights), cond_index(fake_cond, a)))
            with torch.no_grad():
                gs = _batched_g(reqs, x_s_hat[a].to(x_t.dtype), s[a])
            if real:
                x_self[a] = self_eval_target(x0_hat[a].detach(), gs[0], gs[1], gs[2] if fake_on else None, c.fake_k)

        # --- loss [16]-[21] --------------------------------------------------------------------
        x0f = _work(x0).to(x0_hat.dtype)
        per = per_sample_loss(x0_hat, x0f, x_self, lam, c.target, c.norm, _patch_size(bare))  # (N,)
        w = loss_weight(t, c.weighting, c.weight_t_min)
        loss = (w * per).mean()
        logs = {
            "loss_main": loss.detach(),
            "loss_data": (w * sample_mean_sq(x0_hat.detach() - x0f)).mean(),
            "lambda_mean": lam.mean(),
            "frac_self_eval": (lam > 0).float().mean(),
            "tau": torch.tensor(tau),
            "self_eval_ema": torch.tensor(used_ema),
        }
        if v_fake is not None:
            fi = fake_idx
            g_fake = clean_estimate(x_s_hat[fi].to(x_t.dtype), s[fi], v_fake)
            per_f = sample_mean_sq(g_fake - x0_hat[fi].detach())  # || G(sg x_s_hat, s, s, c_fake) - sg x0_hat ||^2
            w_f = loss_weight(s[fi], c.weighting, c.weight_t_min) if c.fake_time_weight else torch.ones_like(per_f)
            # Sum over the selected samples / N: a per-batch mean that is 0 for dropped samples.
            loss_fake = (w_f * per_f).sum() / n
            loss = loss + c.fake_loss_weight * loss_fake
            logs["loss_fake"] = loss_fake.detach()
        elif fake_on:  # every prompt of this batch was dropped
            logs["loss_fake"] = torch.zeros((), device=device)
        return LossOutput(loss=loss, logs={k: v.detach().float() for k, v in logs.items()})
