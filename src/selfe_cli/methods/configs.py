"""The recipe's ``method:`` sections as plain dataclasses, importable without torch.

Validating a recipe (``selfe train RECIPE --dry-run``, every user error) needs only these, so they live
apart from the method math: an unknown key or a bad value is reported before torch is imported.
``METHOD_CONFIGS`` names each method's config class as ``"module:Class"``; a method whose config still
lives next to its torch code is imported when a recipe uses it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Literal

from selfe_cli.config import spec


@dataclass
class TimeSamplerConfig:
    kind: Literal["uniform", "logit_normal"] = field(
        default="logit_normal", metadata=spec(help="uniform on [0,1] or t = sigmoid(n), n ~ N(mean, std)"))
    mean: float = field(default=0.0, metadata=spec(help="logit-normal location P_mean"))
    std: float = field(default=1.0, metadata=spec(gt=0, help="logit-normal scale P_std"))


@dataclass
class FlowMatchingConfig:
    time_sampler: TimeSamplerConfig = field(default_factory=TimeSamplerConfig,
                                            metadata=spec(help="distribution of t"))
    cond_dropout: float = field(default=0.1, metadata=spec(ge=0, le=1, help="null-condition rate (for CFG)"))


# Paper schedule (710k iterations in all): tau annealed over the first 300k, fake score from 550k.
PAPER_TOTAL_STEPS = 710_000
PAPER_TAU_ANNEAL_STEPS = 300_000
PAPER_FAKE_SCORE_START = 550_000


@dataclass
class SelfEConfig:
    """The recipe's ``method:`` section for ``name: selfe``. Defaults are the paper's choices."""

    # --- conditions
    cond_drop: float = field(default=0.1, metadata=spec(
        ge=0, lt=1, help="probability of replacing the prompt by the null (empty) prompt; paper silent, 10% usual"))
    # --- time sampling
    t_mean: float = field(default=0.0, metadata=spec(help="t = sigmoid(n), n ~ N(t_mean, t_std), before the shift"))
    t_std: float = field(default=1.0, metadata=spec(gt=0, help="scale of the logit-normal t sampler"))
    time_shift: bool = field(default=True, metadata=spec(
        help="resolution shift t <- e^mu / (e^mu + 1/t - 1), mu linear in the token count"))
    shift_mu: float | None = field(default=None, metadata=spec(
        help="fixed mu of the shift; null: mu from the token count (base_mu..max_mu over base_tokens..max_tokens)"))
    shift_base_tokens: int = field(default=512, metadata=spec(gt=0, help="token count where mu = shift_base_mu"))
    shift_max_tokens: int = field(default=4096, metadata=spec(gt=0, help="token count where mu = shift_max_mu"))
    shift_base_mu: float = field(default=0.5, metadata=spec(help="mu at shift_base_tokens"))
    shift_max_mu: float = field(default=1.15, metadata=spec(help="mu at shift_max_tokens"))
    tokens: int | None = field(default=None, metadata=spec(
        gt=0, help="token count L for the shift; null: H*W/patch^2 of the network input"))
    p_same: float = field(default=0.5, metadata=spec(ge=0, le=1, help="probability of s = t (pure data loss)"))
    tau_anneal_steps: int | None = field(default=None, metadata=spec(
        ge=0, help="steps over which tau goes 0 -> 1 (s ~ U((1-tau)t, t)); null: tau_anneal_fraction * total_steps"))
    tau_anneal_fraction: float = field(default=PAPER_TAU_ANNEAL_STEPS / PAPER_TOTAL_STEPS, metadata=spec(
        ge=0, le=1, help="fraction of training for the tau ramp when tau_anneal_steps is null (paper 300k/710k)"))
    # --- self-evaluation
    renoise: Literal["fresh", "shared"] = field(default="fresh", metadata=spec(
        help="noise eps' of the landing x_s_hat: a fresh draw, or the eps of x_t (paper silent)"))
    self_eval_cond_weights: Literal["ema", "online"] = field(default="ema", metadata=spec(
        help="weights of the conditional self-evaluation pass (paper: EMA)"))
    self_eval_uncond_weights: Literal["online", "ema"] = field(default="online", metadata=spec(
        help="weights of the unconditional self-evaluation pass (paper: online)"))
    target: Literal["energy", "sum"] = field(default="energy", metadata=spec(
        help="energy: ||x0_hat - renorm(x0 + lambda x_self)||^2 [18-20]; sum: [16] data + lambda self term"))
    norm: Literal["sample", "token"] = field(default="sample", metadata=spec(
        help="norm of the energy-preserving renormalisation: per sample, or per token (patch of the network)"))
    lambda_t_max: float = field(default=0.999, metadata=spec(
        gt=0, lt=1, help="guard: t and s are clamped to this in lambda = t/(1-t) - s/(1-s) (t -> 1 blows up)"))
    weighting: Literal["inv_t2", "none"] = field(default="inv_t2", metadata=spec(
        help="per-sample loss weight [21]: 1/t^2, or none"))
    weight_t_min: float = field(default=0.01, metadata=spec(
        gt=0, le=1, help="t is clamped to at least this in the 1/t^2 weight"))
    # --- late fake-score stage (App. S.1.2)
    fake_score: bool = field(default=False, metadata=spec(help="enable the late fake-score stage"))
    fake_score_start: int | None = field(default=None, metadata=spec(
        ge=0, help="first step of the fake-score stage; null: fake_score_start_fraction * total_steps"))
    fake_score_start_fraction: float = field(default=PAPER_FAKE_SCORE_START / PAPER_TOTAL_STEPS, metadata=spec(
        ge=0, le=1, help="start of the fake-score stage as a fraction of training (paper 550k/710k)"))
    fake_k: float = field(default=0.9, metadata=spec(
        ge=0, le=1, help="Delta = k (G_null - G_c) + (1 - k) (G_fake - G_c)"))
    fake_suffix: str = field(default=" fake image", metadata=spec(help="appended to the prompt to make c_fake"))
    fake_eval_weights: Literal["online", "ema"] = field(default="online", metadata=spec(
        help="weights of the stop-gradient c_fake pass (the fake score tracks the online model)"))
    fake_loss_weight: float = field(default=1.0, metadata=spec(ge=0, help="multiplier of the fake-score loss"))
    fake_time_weight: bool = field(default=True, metadata=spec(
        help="weight the fake-score loss by 1/s^2 like [21] (paper silent)"))
    # --- sampling [22] (guidance, scale, shift and eta live in the recipe's `sample:` section)
    sample_r_mode: Literal["next", "same", "mid"] = field(default="next", metadata=spec(
        help="landing time of a sampler step: next grid time (paper), same (= t, flow matching), mid"))

    def __post_init__(self) -> None:
        if self.shift_max_tokens == self.shift_base_tokens:
            raise ValueError("shift_max_tokens must differ from shift_base_tokens")


JvpMode = Literal["auto", "single_pass", "two_pass"]  # the forward-mode engine's routes (methods/jvp.py)
JvpDtype = Literal["float32", "bfloat16"]  # precision of the JVP pass


def _lognorm(mean: float, std: float) -> TimeSamplerConfig:
    return TimeSamplerConfig(kind="logit_normal", mean=mean, std=std)


@dataclass
class MeanFlowGuidanceConfig:
    """CFG trained into the target [19, 21]: ``v~ = w v + kappa u(z,t,t|c) + (1 - w - kappa) u(z,t,t|null)``.

    ``w = 1, kappa = 0`` (the default) is no guidance. Effective scale ``w' = w / (1 - kappa)``.
    """

    w: float = field(default=1.0, metadata=spec(ge=0, help="weight of the conditional velocity v in the guided target"))
    kappa: float = field(default=0.0, metadata=spec(ge=0, lt=1, help="weight of the network's own u(z,t,t|c)"))
    t_min: float = field(default=0.0, metadata=spec(ge=0, le=1, help="guide only for t in [t_min, t_max]"))
    t_max: float = field(default=1.0, metadata=spec(ge=0, le=1, help="guide only for t in [t_min, t_max]"))

    def __post_init__(self) -> None:
        if self.t_min > self.t_max:
            raise ValueError(f"guidance.t_min ({self.t_min}) exceeds guidance.t_max ({self.t_max})")

    @property
    def active(self) -> bool:
        return self.w != 1.0 or self.kappa != 0.0

    @property
    def effective_scale(self) -> float:
        return self.w / (1.0 - self.kappa)


@dataclass
class MeanFlowConfig:
    """The recipe's ``method:`` section. Defaults: the paper's ImageNet-256 configuration."""

    time_sampler_t: TimeSamplerConfig = field(
        default_factory=lambda: _lognorm(-0.4, 1.0), metadata=spec(help="distribution of the first time draw"))
    time_sampler_r: TimeSamplerConfig = field(
        default_factory=lambda: _lognorm(-0.4, 1.0), metadata=spec(help="distribution of the second time draw"))
    ratio_r_neq_t: float = field(
        default=0.25, metadata=spec(ge=0, le=1, help="fraction of the batch with r != t (others: r = t, flow matching)"))
    mask_before_minmax: bool = field(
        default=False, metadata=spec(help="apply the r = t mask before t = max, r = min (the authors' improved CIFAR config)"))
    weight_p: float = field(default=1.0, metadata=spec(ge=0, help="adaptive weight power p (0: plain squared error)"))
    weight_c: float = field(
        default=1e-3, metadata=spec(gt=0, help="adaptive weight constant c (paper text 1e-3; official JAX code 0.01)"))
    cond_dropout: float = field(default=0.1, metadata=spec(ge=0, le=1, help="null-condition rate"))
    guidance: MeanFlowGuidanceConfig = field(
        default_factory=MeanFlowGuidanceConfig, metadata=spec(help="CFG trained into the target"))
    jvp_dtype: JvpDtype = field(default="float32", metadata=spec(help="precision of the JVP pass, whatever the training precision"))
    jvp_mode: JvpMode = field(
        default="auto", metadata=spec(help="forward-mode route: auto (picked from the network and its wrappers), "
                                           "single_pass (dual tensors with the primal) or two_pass (JVP without "
                                           "graph, then the forward); exact in every mode"))



# alpha-Flow (Zhang et al. 2025, snap-research/alphaflow): values of experiments-alphaflow.yaml (docs/methods.md)
@dataclass
class AlphaFlowConfig:
    """The recipe's ``method:`` section for ``name: alphaflow``. Defaults: the official XL/2-cfg recipe where it
    is public, MeanFlow's ImageNet setting where it is not (docs/methods.md, alpha-Flow options)."""

    time_sampler_fm: TimeSamplerConfig = field(
        default_factory=lambda: _lognorm(-0.4, 1.0),
        metadata=spec(help="t of the r = t rows (official time_sampling_fm: not public; MeanFlow's)"))
    time_sampler_t: TimeSamplerConfig = field(
        default_factory=lambda: _lognorm(-0.4, 1.0), metadata=spec(help="first time draw of the r < t rows"))
    time_sampler_r: TimeSamplerConfig = field(
        default_factory=lambda: _lognorm(-0.4, 1.0), metadata=spec(help="second time draw; t = max, r = min"))
    ratio_fm: float = field(default=0.5, metadata=spec(
        ge=0, le=1, help="share of r = t rows, floor(ratio * N), placed first (official ratio_fm)"))
    alpha: float | None = field(default=None, metadata=spec(
        ge=0, le=1, help="a constant alpha (null: the sigmoid curriculum alpha_start..alpha_end)"))
    alpha_start: int | None = field(default=None, metadata=spec(
        ge=0, help="step where the alpha curriculum starts (null: alpha_start_fraction * total_steps)"))
    alpha_end: int | None = field(default=None, metadata=spec(
        ge=0, help="step where it ends (null: alpha_end_fraction * total_steps)"))
    alpha_start_fraction: float = field(default=0.5, metadata=spec(
        ge=0, le=1, help="start as a fraction of training (XL/2-cfg: 600k of 1.2M)"))
    alpha_end_fraction: float = field(default=5 / 6, metadata=spec(
        ge=0, le=1, help="end as a fraction of training (XL/2-cfg: 1M of 1.2M)"))
    alpha_initial: float = field(default=1.0, metadata=spec(ge=0, le=1, help="alpha before the curriculum"))
    alpha_final: float = field(default=0.0, metadata=spec(ge=0, le=1, help="alpha after the curriculum"))
    alpha_gamma: float = field(default=25.0, metadata=spec(gt=0, help="steepness of the sigmoid curriculum"))
    alpha_snap: float = field(default=0.005, metadata=spec(
        ge=0, lt=0.5, help="alpha below this is 0 (the JVP branch), above 1 - this is 1"))
    clamp_utgt: float | None = field(default=None, metadata=spec(
        gt=0, help="clip the discrete-branch target to +-this (XL/2-cfg: 4.0; null: off)"))
    weight_eps: float = field(default=1e-3, metadata=spec(
        gt=0, help="adaptive weight w / (mse + eps), mse a per-row mean (official value not public)"))
    weight_p: float = field(default=1.0, metadata=spec(ge=0, help="power of the adaptive weight (official: 1)"))
    cond_dropout: float = field(default=0.1, metadata=spec(ge=0, le=1, help="null-condition rate"))
    dropout_in_interval_only: bool = field(default=True, metadata=spec(
        help="drop labels only on rows inside the guidance interval (official)"))
    guidance: MeanFlowGuidanceConfig = field(
        default_factory=MeanFlowGuidanceConfig,
        metadata=spec(help="CFG trained into the target (w = omega, kappa; interval open: t_min < t < t_max)"))
    jvp_dtype: JvpDtype = field(default="float32", metadata=spec(help="precision of the JVP and target passes"))
    jvp_mode: JvpMode = field(default="auto", metadata=spec(help="forward-mode route at alpha = 0 (as MeanFlow)"))

    def __post_init__(self) -> None:
        if self.alpha_start is not None and self.alpha_end is not None and self.alpha_end < self.alpha_start:
            raise ValueError(f"alpha_end ({self.alpha_end}) is before alpha_start ({self.alpha_start})")
        if self.alpha_end_fraction < self.alpha_start_fraction:
            raise ValueError(f"alpha_end_fraction ({self.alpha_end_fraction}) is below alpha_start_fraction "
                             f"({self.alpha_start_fraction})")


@dataclass
class IMFGuidanceConfig:
    """iMF's guidance as a network condition: omega and the interval [t_min, t_max] are sampled per row and
    embedded; at sampling ``--cfg`` is omega and ``sample_t_min`` / ``sample_t_max`` the interval."""

    omega_max: float = field(default=8.0, metadata=spec(ge=1, help="omega in [1, omega_max] (official s_max 7: 8)"))
    beta: float = field(default=1.0, metadata=spec(ge=0, help="density of omega ~ omega^-beta (1: omega = omega_max^U)"))
    t_min_high: float = field(default=0.5, metadata=spec(ge=0, le=1, help="t_min ~ U[0, t_min_high]"))
    t_max_low: float = field(default=0.5, metadata=spec(ge=0, le=1, help="t_max ~ U[t_max_low, 1]"))
    sample_t_min: float = field(default=0.0, metadata=spec(ge=0, le=1, help="guidance interval at sampling: start"))
    sample_t_max: float = field(default=1.0, metadata=spec(ge=0, le=1, help="guidance interval at sampling: end"))

    def __post_init__(self) -> None:
        if self.sample_t_min > self.sample_t_max:
            raise ValueError(f"sample_t_min ({self.sample_t_min}) exceeds sample_t_max ({self.sample_t_max})")
        if self.t_min_high > self.t_max_low:
            raise ValueError(f"t_min_high ({self.t_min_high}) exceeds t_max_low ({self.t_max_low})")


@dataclass
class IMFConfig:
    """The recipe's ``method:`` section for ``name: imf``. Defaults: the official B/2 code (imf.py)."""

    time_sampler: TimeSamplerConfig = field(
        default_factory=lambda: _lognorm(-0.4, 1.0), metadata=spec(help="both time draws; t = max, r = min"))
    ratio_r_neq_t: float = field(default=0.5, metadata=spec(
        ge=0, le=1, help="share of rows with r != t (official data_proportion 0.5 of r = t rows)"))
    weight_p: float = field(default=1.0, metadata=spec(ge=0, help="adaptive weight power (official norm_p)"))
    weight_c: float = field(default=0.01, metadata=spec(gt=0, help="adaptive weight constant (official norm_eps)"))
    cond_dropout: float = field(default=0.1, metadata=spec(ge=0, le=1, help="null-label rate (v_g = v there)"))
    guidance: IMFGuidanceConfig = field(default_factory=IMFGuidanceConfig,
                                        metadata=spec(help="omega and interval, sampled and embedded"))
    v_loss_weight: float = field(default=1.0, metadata=spec(
        ge=0, help="weight of the auxiliary v-head loss (official 1; used when the network has a v-head)"))
    jvp_dtype: JvpDtype = field(default="float32", metadata=spec(help="precision of the JVP and target passes"))
    jvp_mode: JvpMode = field(default="auto", metadata=spec(help="forward-mode route (as MeanFlow)"))


# TiM (2025, WZDTHU/TiM): tim/schedulers/transition.py and transports.py (OT_FM), docs/methods.md
TimeWeight = Literal["constant", "reciprocal", "sqrt", "square", "soft_min_snr"]


@dataclass
class TiMConfig:
    """The recipe's ``method:`` section for ``name: tim``. Defaults: the official ``TransitionSchedule`` with the
    OT_FM transport as the C2I XL/2 configuration uses it (docs/methods.md, TiM options)."""

    time_sampler: TimeSamplerConfig = field(
        default_factory=lambda: _lognorm(-0.4, 1.0), metadata=spec(help="both time draws; t = max, r = min"))
    ratio_r_eq_t: float = field(default=0.5, metadata=spec(
        ge=0, le=1, help="share of rows with r = t, round(ratio * N) (official diffusion_ratio)"))
    ratio_r_zero: float = field(default=0.1, metadata=spec(
        ge=0, le=1, help="share of rows with r = 0, round(ratio * N) (official consistency_ratio)"))
    derivative: Literal["dde", "jvp"] = field(default="dde", metadata=spec(
        help="dF/dt by the central finite difference along the path (dde: no JVP, works with fused attention "
             "and FSDP) or by the forward-mode engine (jvp)"))
    dde_epsilon: float = field(default=0.005, metadata=spec(gt=0, le=0.1, help="finite-difference half-step"))
    time_weight: TimeWeight = field(default="sqrt", metadata=spec(
        help="weight of r != t rows as a function of d = t - r: 1/sqrt(d + c) (sqrt), 1/(d + c), 1/(d + c)^2, "
             "1/(d^2 + c^2) (soft_min_snr), or constant"))
    time_weight_tangent: bool = field(default=True, metadata=spec(help="d = tan t - tan r (official weight_time_tangent)"))
    time_weight_c: float = field(default=1.0, metadata=spec(gt=0, help="c in the time weight (OT_FM's sigma_d = 1)"))
    weight_eps: float = field(default=1e-5, metadata=spec(gt=0, help="adaptive weight 1 / sg(loss_i + eps)"))
    dir_loss: bool = field(default=True, metadata=spec(
        help="add 1 - cos(F, F_tgt) over channels, averaged over positions (official use_dir_loss)"))
    cond_dropout: float = field(default=0.1, metadata=spec(ge=0, le=1, help="null-condition rate"))
    guidance: MeanFlowGuidanceConfig = field(
        default_factory=MeanFlowGuidanceConfig,
        metadata=spec(help="enhanced target v' = w v + kappa F(z,t,t|c) + (1 - w - kappa) F(z,t,t|null) on "
                           "[t_min, t_max] (official w_gt, w_cond, w_start, w_end; _mg configs: w 1, kappa 0.75)"))
    guidance_weights: Literal["ema", "online"] = field(default="ema", metadata=spec(
        help="network of the enhanced target's two passes (official: the EMA model)"))
    jvp_dtype: JvpDtype = field(default="float32", metadata=spec(help="precision of the DDE / JVP and guidance passes"))
    jvp_mode: JvpMode = field(default="auto", metadata=spec(help="forward-mode route with derivative: jvp"))

    def __post_init__(self) -> None:
        if self.ratio_r_eq_t + self.ratio_r_zero > 1 + 1e-9:
            raise ValueError(f"ratio_r_eq_t + ratio_r_zero ({self.ratio_r_eq_t} + {self.ratio_r_zero}) exceeds 1")


# sCT (Lu & Song 2024, no official code) in its linear-path form, docs/methods.md
@dataclass
class SCTConfig:
    """The recipe's ``method:`` section for ``name: sct``: continuous-time consistency training on the linear path
    (MeanFlow with r = 0) with the tangent warm-up and normalisation. Defaults: the paper's CIFAR-10 choices as
    ZOO.md reads them (docs/methods.md, sCT options)."""

    time_sampler: TimeSamplerConfig = field(
        default_factory=lambda: _lognorm(-1.0, 1.4),
        metadata=spec(help="distribution of t: sigma = exp(N(P_mean, P_std)), t = sigma / (1 + sigma)"))
    ratio_fm: float = field(default=0.0, metadata=spec(
        ge=0, le=1, help="share of flow-matching rows (r = t, target eps - x0); pure sCT 0, ESC's linear variant 0.25"))
    tangent_warmup_steps: int = field(default=10_000, metadata=spec(
        ge=0, help="w_k = min(1, step / this) multiplies the t du/dt term of the tangent (0: no warm-up)"))
    tangent_norm: Literal["l2", "rms", "none"] = field(default="l2", metadata=spec(
        help="g <- g / (||g|| + c) per sample: L2 over all elements (paper), RMS (ESC's port), or none"))
    tangent_norm_c: float = field(default=0.1, metadata=spec(gt=0, help="c of the tangent normalisation"))
    weighting: Literal["auto", "logvar", "adaptive"] = field(default="auto", metadata=spec(
        help="row weight: logvar = the paper's e^-l(t) ||delta||^2 / D + l(t), l learned by the network (needs "
             "model.logvar_channels > 0); adaptive = MeanFlow's 1/sg(||delta||^2 + c)^p; auto = logvar where the "
             "network has the head, else adaptive"))
    weight_p: float = field(default=1.0, metadata=spec(
        ge=0, help="p of MeanFlow's adaptive weight 1/(||delta||^2 + c)^p (weighting adaptive; 0: off)"))
    weight_c: float = field(default=1e-3, metadata=spec(gt=0, help="c of the adaptive weight"))
    cond_dropout: float = field(default=0.1, metadata=spec(ge=0, le=1, help="null-condition rate"))
    jvp_dtype: JvpDtype = field(default="float32", metadata=spec(help="precision of the JVP pass"))
    jvp_mode: JvpMode = field(default="auto", metadata=spec(help="forward-mode route (as MeanFlow)"))


# ECT (Geng et al. 2024, locuslab/ect training/loss.py), docs/methods.md
@dataclass
class ECTConfig:
    """The recipe's ``method:`` section for ``name: ect``: easy consistency tuning in EDM sigma units, mapped to the
    linear path by t = sigma / (1 + sigma). Defaults: the official CIFAR-10 run (run_ecm.sh, training/loss.py)."""

    p_mean: float = field(default=-1.1, metadata=spec(help="log sigma_t ~ N(p_mean, p_std) (EDM units)"))
    p_std: float = field(default=2.0, metadata=spec(gt=0, help="scale of log sigma_t"))
    q: float = field(default=2.0, metadata=spec(gt=1, help="r_sigma = t_sigma (1 - q^-(stage+1) (1 + k sigmoid(-b t_sigma)))"))
    k: float = field(default=8.0, metadata=spec(ge=0, help="k of the r schedule"))
    b: float = field(default=1.0, metadata=spec(help="b of the r schedule"))
    stage_steps: int = field(default=25_000, metadata=spec(
        gt=0, help="optimiser steps per stage (official: 3.2M images at batch 128 = 25k)"))
    huber_c: float = field(default=0.0, metadata=spec(
        ge=0, help="pseudo-Huber sqrt(||d||^2 + c^2) - c over all elements of a sample (0: unsquared L2, official)"))
    cond_dropout: float = field(default=0.1, metadata=spec(ge=0, le=1, help="null-condition rate"))


# Shortcut models (Frans et al. 2024, kvfrans/shortcut-models targets_shortcut.py), docs/methods.md
@dataclass
class ShortcutConfig:
    """The recipe's ``method:`` section for ``name: shortcut``. Defaults: the official ImageNet settings
    (docs/methods.md, Shortcut options)."""

    denoise_timesteps: int = field(default=128, metadata=spec(
        ge=2, le=2**20, help="finest step 1/this (a power of two): the flow-matching rows' step and time grid"))
    bootstrap_every: int = field(default=8, metadata=spec(
        ge=1, help="one row in this many is a self-consistency (bootstrap) row; the others flow matching"))
    bootstrap_ema: bool = field(default=True, metadata=spec(
        help="the bootstrap target's two half steps come from the EMA network (official bootstrap_ema 1)"))
    bootstrap_cfg_scale: float = field(default=1.0, metadata=spec(
        ge=0, help="guided half steps v_u + s (v_c - v_u) on the finest bootstrap rows (official bootstrap_cfg with "
                   "scale 1.5; 1: off)"))
    clip: float | None = field(default=4.0, metadata=spec(
        gt=0, help="clip the half-step point and the target to +-this (official 4; null: off)"))
    cond_dropout: float = field(default=0.1, metadata=spec(
        ge=0, le=1, help="null-condition rate on the flow-matching rows (bootstrap rows keep their label)"))

    def __post_init__(self) -> None:
        if self.denoise_timesteps & (self.denoise_timesteps - 1):
            raise ValueError(f"denoise_timesteps: expected a power of two, got {self.denoise_timesteps}")


# IMM (Zhou et al. 2025, lumalabs/imm is inference only; the loss as ZOO.md reads the paper and ESC's imm_loss.py)
@dataclass
class IMMConfig:
    """The recipe's ``method:`` section for ``name: imm``: inductive moment matching (docs/methods.md, IMM)."""

    group_size: int = field(default=4, metadata=spec(
        ge=2, help="particles per group sharing (s, r, t); the micro-batch must be a multiple (ESC: 4)"))
    t_max: float = field(default=0.994, metadata=spec(gt=0, lt=1, help="t ~ U(0, t_max); also the sampler's start"))
    gap_power: int = field(default=12, metadata=spec(
        ge=0, le=30, help="r = eta^-1(eta_t - eta_max / 2^this), eta = t / (1 - t), at least s"))
    sigma_d: float = field(default=0.5, metadata=spec(gt=0, help="data scale in the kernel bandwidth |t - s| sigma_d"))
    weight_a: float = field(default=2.0, metadata=spec(
        help="w = 1/2 sigmoid(b - lambda) (-dlambda/dt) alpha^a / (alpha^2 + sigma^2) (a = 2 with the stride embedding)"))
    weight_b: float = field(default=4.0, metadata=spec(help="b of the weight"))
    cond_dropout: float = field(default=0.1, metadata=spec(
        ge=0, le=1, help="null-condition rate, per particle"))


# method name -> "module:Class" of its config (imported on first use)
METHOD_CONFIGS: dict[str, str] = {
    "flow_matching": "selfe_cli.methods.configs:FlowMatchingConfig",
    "meanflow": "selfe_cli.methods.configs:MeanFlowConfig",
    "selfe": "selfe_cli.methods.configs:SelfEConfig",
    "alphaflow": "selfe_cli.methods.configs:AlphaFlowConfig",
    "imf": "selfe_cli.methods.configs:IMFConfig",
    "tim": "selfe_cli.methods.configs:TiMConfig",
    "sct": "selfe_cli.methods.configs:SCTConfig",
    "ect": "selfe_cli.methods.configs:ECTConfig",
    "shortcut": "selfe_cli.methods.configs:ShortcutConfig",
    "imm": "selfe_cli.methods.configs:IMMConfig",
}


def method_config_class(name: str) -> type:
    """The config dataclass of method ``name`` (a key of ``METHOD_CONFIGS``)."""
    module, _, cls = METHOD_CONFIGS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["METHOD_CONFIGS", "AlphaFlowConfig", "FlowMatchingConfig", "IMFConfig", "IMFGuidanceConfig", "JvpDtype", "JvpMode", "MeanFlowConfig", "MeanFlowGuidanceConfig",
           "ECTConfig", "IMMConfig", "SCTConfig", "SelfEConfig", "ShortcutConfig", "TiMConfig", "TimeSamplerConfig", "method_config_class"]
