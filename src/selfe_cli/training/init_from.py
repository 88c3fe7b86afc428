"""``train.init_from: RUN_DIR``: start a new run from another run's weights (docs/methods.md §7, "Starting from
another run").

ECT, consistency tuning and many users start few-step training from a flow-matching model. The source is a run
directory (its newest intact checkpoint) or one checkpoint directory inside it; ``train.init_weights`` picks its
EMA (the source recipe's first decay, the default) or online weights. The weights go into the new network before
the EMA copies are made, so the online network and every EMA start from them; the optimiser starts fresh.

It applies to a **new** run only (no checkpoint yet): a resumed run continues from its own checkpoint and never
re-reads the source, which may have moved since. What was loaded (run, checkpoint, file, sha256) is written to
``<run>/init_from.json`` beside the recipe, which keeps ``train.init_from`` itself.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from selfe_cli.errors import UserError

RECORD = "init_from.json"


def is_new_run(run_dir: Path) -> bool:
    """True when the run has no checkpoint to resume from (the only case ``init_from`` applies)."""
    from selfe_cli.training import checkpoint as ckpt_io

    return not ckpt_io.list_checkpoints(Path(run_dir) / "checkpoints")


def source_checkpoint(init_from: str, weights: str) -> tuple[Path, Path]:
    """``(checkpoint dir, weights file)`` of the source, or a one-line ``UserError`` naming ``train.init_from``."""
    from selfe_cli.recipes.loader import load_resolved
    from selfe_cli.training import checkpoint as ckpt_io

    key = f"train.init_from: {init_from}"
    path = Path(init_from)
    if not path.exists():
        raise UserError(f"{key}: no such run directory")
    single = path.is_dir() and path.parent.name == "checkpoints" and path.name.startswith("step-")
    run_dir = path.parent.parent if single else path
    if not (run_dir / "recipe.yaml").is_file():
        raise UserError(f"{key}: not a run directory (expected {run_dir / 'recipe.yaml'})")
    try:
        first_decay = load_resolved(run_dir).train.ema_decays[0]
    except UserError as err:
        raise UserError(f"{key}: cannot read its recipe ({err})") from None
    candidates = [path] if single else ckpt_io.list_checkpoints(run_dir / "checkpoints")[::-1]
    if not candidates:
        raise UserError(f"{key}: the run has no checkpoint yet (expected {run_dir / 'checkpoints'}/step-*)")
    problems = []
    for ckpt in candidates:  # newest first
        if weights == "model":
            file = ckpt / "model.safetensors"
        else:
            found = ckpt_io.ema_files(ckpt)
            file = found.get(first_decay) or next(iter(found.values()), ckpt / f"ema-{first_decay:g}.safetensors")
        problem = ckpt_io.verify_checkpoint(ckpt, files=[file.name])
        if problem is None:
            return ckpt, file
        problems.append(f"{ckpt.name}: {problem}")
    raise UserError(f"{key}: no intact checkpoint ({'; '.join(problems[:3])})")


def check_fits(state: dict[str, torch.Tensor], net: torch.nn.Module, where: str, model_name: str) -> None:
    """The source's tensors must be exactly the new network's (names and shapes): else one line naming both."""
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if not (missing or extra or shapes):
        return
    if shapes:
        k = shapes[0]
        what = f"{k} has shape {list(state[k].shape)}, model.{model_name} expects {list(own[k].shape)}"
    elif missing:
        what = f"it lacks {len(missing)} tensor(s) of model {model_name} (e.g. {missing[0]})"
    else:
        what = f"it has {len(extra)} tensor(s) model {model_name} lacks (e.g. {extra[0]})"
    raise UserError(f"train.init_from: {where}: its network does not fit this recipe's model: {what}; "
                    f"start from a run with the same model settings")


def check_init_from(recipe: Any, info: Any, run_dir: Path) -> None:
    """Refuse a missing, damaged or incompatible source before the new run writes anything: the network is
    built on the meta device (no memory) and only the safetensors header of the source file is read."""
    if not recipe.train.init_from or not is_new_run(run_dir):
        return
    from safetensors import safe_open

    from selfe_cli.training.run import build_network

    ckpt, file = source_checkpoint(recipe.train.init_from, recipe.train.init_weights)
    with safe_open(str(file), framework="pt") as f:
        state = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    with torch.device("meta"):
        net = build_network(recipe, info)
    check_fits(state, net, f"{recipe.train.init_from} ({ckpt.name}/{file.name})", recipe.model.name)


def apply_init_from(recipe: Any, net: torch.nn.Module, run_dir: Path, is_main: bool) -> str | None:
    """Load the source weights into ``net`` when the run is new; returns a note for the log (or None)."""
    init_from = recipe.train.init_from
    if not init_from or not is_new_run(run_dir):
        return None
    from selfe_cli.training import checkpoint as ckpt_io

    ckpt, file = source_checkpoint(init_from, recipe.train.init_weights)
    state = ckpt_io.load_weights(file)
    check_fits(state, net, f"{init_from} ({ckpt.name}/{file.name})", recipe.model.name)
    net.load_state_dict(state, strict=True)
    if is_main:
        from selfe_cli.training.checkpoint import atomic_write_text

        record = {"init_from": str(init_from), "checkpoint": str(ckpt), "step": ckpt_io.checkpoint_step(ckpt),
                  "weights": file.name, "sha256": hashlib.sha256(file.read_bytes()).hexdigest()}
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / RECORD, json.dumps(record, indent=1) + "\n")
    return f"initialised from {ckpt}/{file.name} (recorded in {run_dir / RECORD})"


__all__ = ["RECORD", "apply_init_from", "check_fits", "check_init_from", "is_new_run", "source_checkpoint"]
