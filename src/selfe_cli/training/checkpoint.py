"""Atomic checkpoints of weights (safetensors) and training state (safetensors + JSON).

A checkpoint is a directory ``checkpoints/step-0001000/`` written as ``.tmp-step-0001000`` and then
renamed, so a kill at any moment leaves only complete checkpoints; ``latest_checkpoint`` ignores
temporary directories. No pickles: tensors go to safetensors, everything else to JSON.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

STEP_DIR = re.compile(r"^step-(\d+)$")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Save with safetensors; contiguous CPU copies, shared storage broken (safetensors refuses aliasing)."""
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    save_file(clean, str(path))


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def optimizer_to_tensors(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimiser state dict (``optimizer.state_dict()``) into tensors and JSON-able metadata."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """The inverse of ``optimizer_to_tensors``: an ``optimizer.state_dict()``-shaped dict."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for idx, values in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def write_checkpoint(ckpt_root: Path, step: int, *, model: dict[str, torch.Tensor],
                     emas: dict[float, dict[str, torch.Tensor]], optimizer: dict[str, Any],
                     state: dict[str, Any], keep: int) -> Path:
    """Write ``step-XXXXXXX`` atomically, then prune to the ``keep`` most recent.

    ``optimizer`` is a state dict in ``torch.optim.Optimizer.state_dict()`` form (integer parameter keys).
    """
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step:07d}"
    tmp = ckpt_root / f".tmp-step-{step:07d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_tensors(model, tmp / "model.safetensors")
    for decay, weights in emas.items():
        save_tensors(weights, tmp / f"ema-{decay:g}.safetensors")
    opt_tensors, opt_meta = optimizer_to_tensors(optimizer)
    save_tensors(opt_tensors, tmp / "optimizer.safetensors")
    with open(tmp / "state.json", "w") as f:
        json.dump({**state, "optimizer": opt_meta}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    for file in tmp.iterdir():
        with open(file, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if final.exists():  # a re-run of the same step (e.g. after a crash during pruning)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(ckpt_root)
    for old in list_checkpoints(ckpt_root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))
             and (p / "state.json").is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    ckpts = list_checkpoints(ckpt_root)
    return ckpts[-1] if ckpts else None


def read_checkpoint_state(ckpt: Path) -> dict[str, Any]:
    with open(ckpt / "state.json") as f:
        return json.load(f)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def ema_files(ckpt: Path) -> dict[float, Path]:
    out = {}
    for p in ckpt.glob("ema-*.safetensors"):
        out[float(p.stem[len("ema-"):])] = p
    return dict(sorted(out.items()))
