"""From a run directory to images: load the resolved recipe and the EMA weights, sample, decode."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from selfe_cli.errors import UserError
from selfe_cli.models.conditioning import Conditioner, cond_to, with_guidance
from selfe_cli.sampling.sampler import sample

RUNS_ROOT = Path("runs")
STEP_NOISE_SEED_OFFSET = 1 << 40  # seeds of the per-step noise of eta > 0 sampling: seed + offset


def resolve_run_dir(ckpt: str | Path | None, runs_root: Path = RUNS_ROOT) -> Path:
    """A run directory as given, or (None) the most recently trained run under ``./runs``."""
    if ckpt is not None:
        path = Path(ckpt)
        if not path.exists():
            raise UserError(f"--ckpt {ckpt}: no such run directory")
        if path.is_dir() and path.name.startswith("step-") and path.parent.name == "checkpoints":
            return path.parent.parent  # a checkpoint directory inside a run
        if not (path / "recipe.yaml").is_file():
            raise UserError(f"--ckpt {ckpt}: not a run directory (expected {path / 'recipe.yaml'})")
        return path
    candidates = [p for p in runs_root.glob("*") if (p / "recipe.yaml").is_file() and
                  ((p / "checkpoints").is_dir() or (p / "final").is_dir())]
    if not candidates:
        raise UserError(f"no trained run found under {runs_root}/; train one with `selfe train RECIPE` "
                        "or pass --ckpt RUN_DIR")

    def last_write(p: Path) -> float:
        times = [c.stat().st_mtime for c in (p / "checkpoints").glob("step-*")] if (p / "checkpoints").is_dir() else []
        return max(times + [p.stat().st_mtime])

    return max(candidates, key=last_write)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) in [-1, 1] -> uint8 (N, H, W, 3), quantised like a saved PNG: round(clamp(x,0,1)*255)."""
    x = ((x.float() + 1) / 2).clamp(0, 1)
    x = torch.round(x * 255).to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.permute(0, 2, 3, 1).contiguous().cpu()


def save_grid(images: torch.Tensor, path: Path, nrow: int | None = None, pad: int = 2) -> Path:
    """uint8 (N, H, W, 3) -> one PNG grid."""
    from PIL import Image

    n, h, w, _ = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = images[i].numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return path


class Generator:
    """A trained network ready to sample: conditions in, uint8 images out, one noise seed per image."""

    def __init__(self, net: nn.Module, conditioner: Conditioner, *, sampler_defaults: dict[str, Any],
                 sample_cfg: Any, in_channels: int, resolution: int, vae: Any = None, name: str = "model",
                 device: torch.device | str = "cpu"):
        self.net = net.eval()
        self.conditioner = conditioner
        self.sampler_defaults = dict(sampler_defaults)
        self.sample_cfg = sample_cfg
        self.in_channels = in_channels
        self.resolution = resolution  # spatial size of the network input (latent size for latent models)
        self.vae = vae
        self.name = name
        self.device = torch.device(device)

    @property
    def cond_kind(self) -> str:
        return self.conditioner.kind

    @classmethod
    def from_run(cls, run_dir: str | Path, *, weights: str = "ema", device: str | torch.device | None = None) -> Generator:
        from selfe_cli.training.run import build_for_sampling

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return build_for_sampling(Path(run_dir), weights=weights, device=device)

    def noise(self, seeds: Sequence[int]) -> torch.Tensor:
        """Per-image noise: image i depends only on seeds[i] (batching does not change it)."""
        shape = (self.in_channels, self.resolution, self.resolution)
        return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])

    def encode(self, conds: Sequence[Any] | None, n: int) -> Any:
        if self.cond_kind == "none":
            return None
        if conds is None:
            raise UserError("this model is conditional: give a prompt or a class")
        try:
            return self.conditioner.encode(list(conds))
        except ValueError as err:
            raise UserError(str(err)) from None

    @torch.no_grad()
    def generate_latents(self, conds: Sequence[Any] | None, seeds: Sequence[int], *, steps: int | None = None,
                         cfg_scale: float | None = None, r_mode: str | None = None, **sampler_kw: Any) -> torch.Tensor:
        n = len(seeds)
        if conds is not None and len(conds) != n:
            raise ValueError(f"{len(conds)} conditions for {n} seeds")
        steps = steps or self.sample_cfg.steps
        pot = self.sampler_defaults.get("power_of_two_steps")  # Shortcut: only the trained step sizes
        if pot and (steps & (steps - 1) or steps > pot):
            raise UserError(f"--steps {steps}: expected a power of two up to {pot} (1, 2, 4, ..., {pot}) for a "
                            f"shortcut model: its step sizes are trained only there")
        # The method gives the landing-time rule; the recipe's `sample:` section gives the rest and may
        # override the rule; explicit arguments override both.
        kw = {"r_mode": self.sampler_defaults.get("r_mode", "next"), "shift": self.sample_cfg.shift,
              "guidance": self.sample_cfg.guidance, "eta": self.sample_cfg.eta,
              "t_start": getattr(self.sample_cfg, "t_start", 1.0)}
        if self.sample_cfg.r_mode is not None:
            kw["r_mode"] = self.sample_cfg.r_mode
        if r_mode is not None:
            kw["r_mode"] = r_mode
        kw.update(sampler_kw)
        if kw["eta"] > 0 and "generator" not in kw:
            # Stochastic steps draw fresh noise per image from its own seed, so image i stays a function of
            # seeds[i] alone, whatever the batch (the seeds are offset from those of the initial noise).
            gens = [torch.Generator().manual_seed(STEP_NOISE_SEED_OFFSET + int(s)) for s in seeds]
            shape = (self.in_channels, self.resolution, self.resolution)
            kw.setdefault("step_noise", lambda k: torch.stack([torch.randn(shape, generator=g) for g in gens]))
        cfg = self.sample_cfg.cfg_scale if cfg_scale is None else cfg_scale
        cond = cond_to(self.encode(conds, n), self.device)
        null = cond_to(self.conditioner.null(n), self.device)
        interval = self.sampler_defaults.get("guidance_condition")
        if interval is not None:
            # Guidance as a condition of the network (iMF): the scale and the interval are inputs, 1 NFE per step.
            g = torch.tensor([[float(cfg), float(interval[0]), float(interval[1])]], device=self.device).expand(n, 3)
            cond, null, cfg = with_guidance(cond, g), with_guidance(null, g), 1.0
        noise = self.noise(seeds).to(self.device)
        return sample(self.net, noise, cond, null, steps=steps, cfg_scale=cfg, **kw)

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Network space -> uint8 (N, H, W, 3)."""
        if self.vae is not None:
            from selfe_cli.data.latents import decode_latents

            x = decode_latents(self.vae, x)
        return to_uint8(x)

    @torch.no_grad()
    def generate(self, conds: Sequence[Any] | None, seeds: Sequence[int], *, steps: int | None = None,
                 cfg_scale: float | None = None, batch_size: int = 64, **sampler_kw: Any) -> torch.Tensor:
        """uint8 (N, H, W, 3) images; generated in batches of ``batch_size``."""
        out = []
        for i in range(0, len(seeds), batch_size):
            part = list(conds[i:i + batch_size]) if conds is not None else None
            x = self.generate_latents(part, seeds[i:i + batch_size], steps=steps, cfg_scale=cfg_scale, **sampler_kw)
            out.append(self.decode(x))
        if not out:
            return torch.zeros((0, self.resolution, self.resolution, 3), dtype=torch.uint8)
        return torch.cat(out)
