"""The recipe: typed sections validated from YAML. See README "Recipe reference"."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from selfe_cli.config import spec

# Upper bounds of values that could not train or sample anyway (typos such as 1e30 or a missing decimal point).
MAX_SEED = 2**40  # seeds are mixed as seed * 1_000_003 + ... into torch's 64-bit seeds
MAX_STEPS = 10**9
MAX_BATCH = 2**24
MAX_SAMPLE_STEPS = 100_000
MAX_GRID = 4096


@dataclass
class RunConfig:
    name: str | None = field(default=None, metadata=spec(help="run name; default: the recipe file's stem"))
    dir: str | None = field(default=None, metadata=spec(help="run directory; default: runs/<name>"))
    seed: int = field(default=0, metadata=spec(ge=0, le=MAX_SEED, help="seed of all randomness (data order, noise, init)"))


@dataclass
class TrainConfig:
    total_steps: int = field(default=1000, metadata=spec(ge=1, le=MAX_STEPS, help="optimiser steps in the whole run"))
    batch_size: int = field(default=64, metadata=spec(ge=1, le=MAX_BATCH, help="global batch: all ranks and accumulation rounds"))
    grad_accum_rounds: int = field(default=1, metadata=spec(ge=1, help="micro-batches per step on each rank"))
    optimizer: Literal["adam", "adamw"] = field(default="adam", metadata=spec(help="Adam or AdamW (decoupled decay)"))
    lr: float = field(default=1e-4, metadata=spec(gt=0, help="peak learning rate"))
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata=spec(help="Adam betas"))
    eps: float = field(default=1e-8, metadata=spec(gt=0, help="Adam epsilon"))
    weight_decay: float = field(default=0.0, metadata=spec(ge=0, help="weight decay"))
    warmup_steps: int = field(default=0, metadata=spec(ge=0, help="linear learning-rate warm-up from 0"))
    lr_schedule: Literal["constant", "linear", "cosine"] = field(
        default="constant", metadata=spec(help="decay after warm-up, down to final_lr at total_steps"))
    final_lr: float = field(default=0.0, metadata=spec(ge=0, help="learning rate at the end of linear/cosine decay"))
    grad_clip: float | None = field(default=1.0, metadata=spec(gt=0, help="max global gradient norm; null: off"))
    ema_decays: list[float] = field(default_factory=lambda: [0.999],
                                    metadata=spec(ge=0, lt=1, help="one EMA copy per decay; the first is used to sample"))
    precision: Literal["fp32", "bf16"] = field(default="fp32", metadata=spec(help="bf16: autocast on CUDA, fp32 weights"))
    compile: bool = field(default=False, metadata=spec(help="torch.compile the network"))
    parallel: Literal["ddp", "fsdp"] = field(
        default="ddp", metadata=spec(help="under torchrun: ddp (a replica per GPU) or fsdp (FSDP2: parameters, "
                                          "gradients and optimiser state sharded over GPUs)"))
    activation_checkpointing: bool = field(
        default=False, metadata=spec(help="recompute each block's activations in backward (mmdit models)"))
    log_every_steps: int = field(default=50, metadata=spec(ge=1, help="metrics.jsonl / TensorBoard interval"))
    checkpoint_every_steps: int = field(default=500, metadata=spec(ge=1, help="checkpoint interval"))
    keep_checkpoints: int = field(default=2, metadata=spec(ge=1, help="how many recent checkpoints to keep"))
    sample_every_steps: int = field(default=1000, metadata=spec(ge=0, help="sample-grid interval (0: only at the end)"))
    max_nonfinite_in_a_row: int = field(default=20, metadata=spec(ge=1, help="stop after this many skipped non-finite steps in a row"))
    init_from: str | None = field(default=None, metadata=spec(
        help="a run directory (or one of its checkpoints/step-* directories) whose weights start this run; "
             "new runs only, a resumed run continues from its own checkpoint"))
    init_weights: Literal["ema", "model"] = field(default="ema", metadata=spec(
        help="which weights of init_from: its first EMA, or the online model"))

    def __post_init__(self) -> None:
        if self.warmup_steps > self.total_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) exceeds total_steps ({self.total_steps})")
        if not self.ema_decays:
            raise ValueError("ema_decays: expected at least one decay")
        if any(not 0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas: expected two values in [0, 1), got {list(self.betas)}")
        if self.grad_accum_rounds > self.batch_size or self.batch_size % self.grad_accum_rounds:
            raise ValueError(f"batch_size ({self.batch_size}) is not divisible into grad_accum_rounds "
                             f"({self.grad_accum_rounds}) micro-batches")


@dataclass
class SampleConfig:
    steps: int = field(default=50, metadata=spec(ge=1, le=MAX_SAMPLE_STEPS, help="default number of sampling steps"))
    cfg_scale: float = field(default=1.0, metadata=spec(ge=0, help="classifier-free guidance scale (1: off)"))
    guidance: Literal["standard", "energy"] = field(default="standard", metadata=spec(help="CFG combination rule"))
    r_mode: Literal["next", "same", "mid", "zero"] | None = field(
        default=None, metadata=spec(help="landing time of each step: next | same | mid | zero (with eta 1: "
                                         "consistency sampling); null: the method's rule"))
    shift: float = field(default=1.0, metadata=spec(gt=0, help="time-grid shift s: t -> s t / (1 + (s - 1) t)"))
    eta: float = field(default=0.0, metadata=spec(ge=0, le=1, help="stochastic (DDIM-style) update strength"))
    t_start: float = field(default=1.0, metadata=spec(
        gt=0, le=1, help="first time of the grid (< 1: start below pure noise, from t_start * noise; "
                         "ECT sigma_max 80 = 0.9877, IMM 0.994)"))
    grid_size: int = field(default=16, metadata=spec(ge=1, le=MAX_GRID, help="images in the training sample grids"))
    grid_prompts: list[str] = field(default_factory=list, metadata=spec(help="prompts/classes of the training grids"))
    seed: int = field(default=0, metadata=spec(ge=0, le=MAX_SEED, help="noise seed of the training grids"))


@dataclass
class ModelSpec:
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodSpec:
    name: str
    config: Any = None


@dataclass
class Recipe:
    run: RunConfig
    model: ModelSpec
    data: Any  # selfe_cli.data.config.DataConfig
    method: MethodSpec
    train: TrainConfig
    sample: SampleConfig
    source: str = "<recipe>"  # where it was loaded from (not saved)
