"""`selfe train RECIPE [--set k=v ...] [--dry-run]`."""

from __future__ import annotations

from typing import Annotated

import typer

from selfe_cli.cli.app import app


@app.command()
def train(
    recipe: Annotated[str, typer.Argument(help="Recipe file, or a bundled recipe name (see `selfe recipes`).")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a recipe value: --set train.lr=1e-4 (repeatable).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved recipe and exit.")] = False,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda when available).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Train a model from a recipe. Running the same command again resumes from the latest checkpoint.

    Multi-GPU / multi-node: `torchrun --nproc_per_node=8 -m selfe_cli train RECIPE`.
    """
    from rich.console import Console

    from selfe_cli.recipes import dump_recipe, load_recipe

    rec = load_recipe(recipe, set_ or [])
    console = Console(soft_wrap=True)
    if dry_run:
        print(f"# resolved recipe: {rec.source}")
        print(dump_recipe(rec), end="")
        summary = _model_summary(rec)
        if summary:
            print(f"# {summary}")
        return
    from selfe_cli.training.run import train_recipe

    result = train_recipe(rec, progress=not quiet, device=device)
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        if result["resumed_from"] >= result["step"]:
            console.print(f"{rec.run.dir}: already trained to step {result['step']}; nothing to do")
        else:
            console.print(f"done: {rec.run.dir} (step {result['step']}"
                          + (f", resumed from {result['resumed_from']}" if result["resumed_from"] else "") + ")")
            console.print(f"sample it: selfe sample ... --ckpt {rec.run.dir}")


def _model_summary(rec) -> str | None:
    """Parameter count of the recipe's network, built on the meta device (no memory, no time)."""
    import torch

    from selfe_cli.models.registry import build_model
    from selfe_cli.training.run import model_kwargs

    try:
        from selfe_cli.data import dataset_info

        try:
            info = dataset_info(rec.data)
            note = ""
        except Exception:  # noqa: BLE001 - data not here yet: count with the recipe's own sizes
            info, note = None, " (data not found: sizes from the recipe and the model defaults)"
        with torch.device("meta"):
            net = build_model(rec.model.name, **model_kwargs(rec, info))
        n = sum(p.numel() for p in net.parameters())
        return f"model {rec.model.name}: {n / 1e6:.1f}M parameters{note}"
    except Exception as err:  # noqa: BLE001 - a summary line must never break --dry-run
        return f"model {rec.model.name}: parameter count unavailable ({type(err).__name__}: {err})"
