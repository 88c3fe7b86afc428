"""`selfe train RECIPE [--set k=v ...] [--dry-run]`."""

from __future__ import annotations

from typing import Annotated

import typer

from selfe_cli.cli.app import app


def _has_dropout(rec, info) -> bool:  # noqa: ANN001
    """Whether the recipe's network has dropout (built on the meta device: no memory, no weights)."""
    import torch

    from selfe_cli.models.registry import build_model
    from selfe_cli.training.run import model_kwargs

    with torch.device("meta"):
        net = build_model(rec.model.name, **model_kwargs(rec, info))
    return any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in net.modules())


def _skip_sigma_data_note(rec) -> str | None:  # noqa: ANN001
    """--dry-run's line for ``model.skip_sigma_data: data`` (set, or the method's default): measured when a new run
    starts, not now (no data is read for a dry run)."""
    from selfe_cli.data.stats import STD_SAMPLE_SIZE
    from selfe_cli.recipes.loader import MEASURED, SKIP_SIGMA_DATA_KEY
    from selfe_cli.training.run import skip_sigma_data_setting

    if skip_sigma_data_setting(rec) != MEASURED:
        return None
    origin = "" if SKIP_SIGMA_DATA_KEY in rec.model.kwargs else f" (the default for method {rec.method.name})"
    return (f"model.skip_sigma_data: data{origin}: measured when training starts (the data's standard deviation "
            f"over up to {STD_SAMPLE_SIZE} items; a started run reads the value its recipe.yaml records)")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@app.command()
def train(
    recipe: Annotated[str, typer.Argument(help="Recipe file, or a bundled recipe name (see `selfe recipes`).")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a recipe value: --set train.lr=1e-4 (repeatable).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved recipe and exit.")] = False,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda when available; under torchrun each process takes its LOCAL_RANK GPU).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Train a model from a recipe. Running the same command again resumes from the latest checkpoint.

    Multi-GPU / multi-node: `torchrun --nproc_per_node=8 -m selfe_cli train RECIPE`.
    """
    from rich.console import Console

    from selfe_cli.cli.checks import check_device
    from selfe_cli.recipes import dump_recipe, load_recipe
    from selfe_cli.recipes.loader import check_model, data_info_or_none

    rec = load_recipe(recipe, set_ or [], check_network=False)
    device = check_device(device, allowed=("cpu", "cuda"))
    # the network is built on the meta device now, so a model that cannot train is refused before a run starts
    info = data_info_or_none(rec.data)
    n_params = check_model(rec, info)
    console = Console(soft_wrap=True)
    jvp_plan = None
    if rec.method.name in ("meanflow", "alphaflow", "imf", "tim", "sct"):  # the forward-mode route training takes
        import os  # (refused here if impossible)

        from selfe_cli.methods import build_method

        world = int(os.environ.get("WORLD_SIZE", "1"))
        where = device or ("cuda" if _cuda_available() else "cpu")
        jvp_plan = build_method(rec.method.name, rec.method.config).describe_jvp(
            sharded=rec.train.parallel == "fsdp" and world > 1, compiled=rec.train.compile, device=where,
            precision=rec.train.precision, dropout=_has_dropout(rec, info))
    if dry_run:
        print(f"# resolved recipe: {rec.source}")
        print(dump_recipe(rec), end="")
        note = "" if info is not None else " (data not found: sizes from the recipe and the model defaults)"
        print(f"# model {rec.model.name}: {n_params / 1e6:.1f}M parameters{note}")
        if jvp_plan is not None:
            print(f"# jvp: {jvp_plan}")
        note = _skip_sigma_data_note(rec)
        if note:
            print(f"# {note}")
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

