"""`selfe sample PROMPT_OR_CLASS [--ckpt RUN_DIR] [--steps N] [--cfg W] [--seed S] [--n K] [--out PATH]`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from selfe_cli.cli.app import app
from selfe_cli.recipes.schema import MAX_SAMPLE_STEPS, MAX_SEED


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "sample"


@app.command()
def sample(
    prompt: Annotated[str | None, typer.Argument(help="A prompt (text models), a class index or name (class models); omit for unconditional models.")] = None,
    ckpt: Annotated[str | None, typer.Option(help="Run directory. Default: the most recently trained run under ./runs.")] = None,
    steps: Annotated[int | None, typer.Option(min=1, max=MAX_SAMPLE_STEPS, help="Sampling steps (network evaluations, x2 with CFG). Default: the recipe's sample.steps.")] = None,
    cfg: Annotated[float | None, typer.Option(min=0.0, help="Classifier-free guidance scale (1 = off). Default: the recipe's sample.cfg_scale.")] = None,
    seed: Annotated[int, typer.Option(min=0, max=MAX_SEED, help="Seed of the first image; image i uses seed + i.")] = 0,
    n: Annotated[int, typer.Option(min=1, help="Number of images.")] = 16,
    out: Annotated[Path | None, typer.Option(help="Output folder (grid.png + one PNG per image). Default: outputs/<run>/<prompt>-<steps>steps/.")] = None,
    r_mode: Annotated[str | None, typer.Option(help="Landing time of each step: next (t_{k+1}; MeanFlow, Self-E), same (t_k; flow-matching Euler), mid, or zero (predict x0; with --eta 1: consistency sampling, alpha-Flow's 2-NFE sampler). Default: the recipe's / the method's rule.")] = None,
    eta: Annotated[float | None, typer.Option(min=0.0, max=1.0, help="Stochastic (DDIM-style) steps: 0 deterministic, 1 fresh noise each step. Default: the recipe's sample.eta.")] = None,
    weights: Annotated[str, typer.Option(help="'ema' (default), 'model', or an EMA decay such as 0.9999.")] = "ema",
    device: Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N (default: cuda when available).")] = None,
    force_cfg: Annotated[bool, typer.Option("--force-cfg", help="Apply --cfg even to a run whose guidance is trained into the network (MeanFlow method.guidance), which guides twice.")] = False,
) -> None:
    """Sample images from a trained run and write a grid plus the single images."""
    from selfe_cli.cli.checks import check_device, check_sampling_cfg, output_dir
    from selfe_cli.errors import UserError

    # everything the user typed is checked before the network is loaded
    if r_mode is not None and r_mode not in ("next", "same", "mid", "zero"):
        raise UserError(f"--r-mode: expected next, same, mid or zero, got {r_mode!r}")
    output_dir(out, "--out")
    device = check_device(device)
    from selfe_cli.sampling.generate import Generator, resolve_run_dir, save_grid

    run_dir = resolve_run_dir(ckpt)
    check_sampling_cfg(run_dir, cfg, force_cfg)
    from PIL import Image
    from rich.console import Console

    gen = Generator.from_run(run_dir, weights=weights, device=device)
    if gen.cond_kind != "none" and prompt is None:
        raise UserError(f"{run_dir}: this model is {gen.cond_kind}-conditional; give a "
                        + ("prompt, e.g. selfe sample \"a red cube\"" if gen.cond_kind == "text" else "class index or name"))
    if gen.cond_kind == "none" and prompt is not None:
        Console(stderr=True, soft_wrap=True).print(f"note: {run_dir} is unconditional; ignoring {prompt!r}")
    conds = [prompt] * n if gen.cond_kind != "none" else None
    steps = steps or gen.sample_cfg.steps
    extra = {k: v for k, v in (("r_mode", r_mode), ("eta", eta)) if v is not None}
    if out is None:
        out = output_dir(Path("outputs") / run_dir.name / f"{_slug(prompt or 'unconditional')}-{steps}steps", "--out")
    images = gen.generate(conds, [seed + i for i in range(n)], steps=steps, cfg_scale=cfg, **extra)
    out.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img.numpy()).save(out / f"{seed + i:06d}.png")
    grid = save_grid(images, out / "grid.png")
    Console(soft_wrap=True).print(f"wrote {grid} and {len(images)} images to {out}/ "
                    f"({run_dir.name}, {steps} step{'s' if steps != 1 else ''})")
