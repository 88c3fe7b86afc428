"""Checks of what a user types, run by the commands before anything heavy is loaded or downloaded.

Every check raises a one-line ``UserError`` naming the option, the value and what was expected. Paths are
checked first (no imports beyond the standard library), then the device (imports torch), so a typo in a
path never waits for a model to load or a detector to download.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from selfe_cli.errors import UserError

DEVICE_FORMS = {"cpu": "cpu", "cuda": "cuda", "cuda:N": "cuda:N (a GPU index)", "mps": "mps (Apple silicon)"}


def check_device(device: str | None, flag: str = "--device", allowed: Sequence[str] = ("cpu", "cuda", "cuda:N", "mps"),
                 auto: str | None = None) -> str | None:
    """``device`` as given (or None: the command's default), refused unless the machine has it.

    ``allowed``: the forms the command accepts (``cuda:N`` means any GPU index); ``auto``: a word that
    means "the default" (returned as None).
    """
    if device is None or (auto is not None and device == auto):
        return None
    text = device.strip().lower()
    match = re.fullmatch(r"(cpu|cuda|mps)(?::(\d+))?", text)
    form = None if match is None else (f"{match.group(1)}:N" if match.group(2) is not None else match.group(1))
    if form not in allowed:
        words = ([auto] if auto else []) + [DEVICE_FORMS[a] for a in allowed]
        raise UserError(f"{flag} {device}: expected {', '.join(words[:-1])} or {words[-1]}")
    if form == "cpu":
        return "cpu"
    import torch

    if form.startswith("cuda"):
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise UserError(f"{flag} {device}: CUDA is not available ({why}); use {flag} cpu")
        index = match.group(2)
        if index is not None and int(index) >= torch.cuda.device_count():
            raise UserError(f"{flag} {device}: no such GPU (this machine has {torch.cuda.device_count()}: "
                            f"cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    if form == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError(f"{flag} {device}: the Apple-silicon GPU (mps) is not available on this machine; use {flag} cpu")
    return text


def existing_file(path: Path | str | None, flag: str, expected: str) -> Path | None:
    """A file that must be there (None passes)."""
    if path is None:
        return None
    p = Path(path).expanduser()
    if p.is_dir():
        raise UserError(f"{flag} {path}: is a folder (expected {expected})")
    if not p.is_file():
        raise UserError(f"{flag} {path}: file not found (expected {expected})")
    if not os.access(p, os.R_OK):
        raise UserError(f"{flag} {path}: not readable (expected {expected})")
    return p


def existing_dir(path: Path | str | None, flag: str, expected: str) -> Path | None:
    """A folder that must be there (None passes)."""
    if path is None:
        return None
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{flag} {path}: folder not found (expected {expected})")
    if not p.is_dir():
        raise UserError(f"{flag} {path}: not a folder (expected {expected})")
    return p


def existing_path(path: Path | str | None, flag: str, expected: str) -> Path | None:
    """A file or folder that must be there (None passes)."""
    if path is None:
        return None
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{flag} {path}: not found (expected {expected})")
    return p


def _nearest_existing(p: Path) -> Path:
    p = Path(os.path.abspath(p))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def output_dir(path: Path | str | None, flag: str) -> Path | None:
    """A folder the command will create or write into: it may not exist yet, but must be creatable."""
    if path is None:
        return None
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise UserError(f"{flag} {path}: exists and is not a folder (expected an output folder)")
    base = _nearest_existing(p)
    if not base.is_dir():
        raise UserError(f"{flag} {path}: cannot create it, {base} is a file (expected an output folder)")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: cannot write there ({base} is not writable)")
    return p


def output_file(path: Path | str | None, flag: str, expected: str) -> Path | None:
    """A file the command will write: not a folder, in a folder that exists or can be created."""
    if path is None:
        return None
    p = Path(path).expanduser()
    if p.is_dir():
        raise UserError(f"{flag} {path}: is a folder (expected {expected})")
    if p.exists() and not os.access(p, os.W_OK):
        raise UserError(f"{flag} {path}: not writable")
    base = _nearest_existing(p.parent)
    if not base.is_dir():
        raise UserError(f"{flag} {path}: cannot create its folder, {base} is a file")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: cannot write there ({base} is not writable)")
    return p


def check_sampling_cfg(run_dir: Path, cfg: float | None, force_cfg: bool, flag: str = "--cfg") -> None:
    """Refuse sampling CFG on a run whose guidance is trained into the target (MeanFlow ``method.guidance``
    with w != 1 or kappa != 0): the network already produces the guided velocity, so CFG on top applies
    guidance twice. ``--force-cfg`` does it anyway."""
    from selfe_cli.recipes.loader import guidance_trained_in, load_resolved

    if force_cfg or not (Path(run_dir) / "recipe.yaml").is_file():  # no recipe: loading the run reports it
        return
    recipe = load_resolved(run_dir)
    if not guidance_trained_in(recipe.method.config):
        return
    scale = recipe.sample.cfg_scale if cfg is None else cfg
    if scale == 1.0:
        return
    g: Any = recipe.method.config.guidance
    trained = f"method.guidance w={g.w:g}, kappa={g.kappa:g}"
    effective = getattr(g, "effective_scale", None)
    if effective is not None:
        trained += f", effective scale {effective:g}"
    source = f"{flag} {cfg:g}" if cfg is not None else f"its recipe's sample.cfg_scale {scale:g}"
    raise UserError(f"{source}: {run_dir} has guidance trained into the network ({trained}); CFG at sampling "
                    f"would apply it twice. Sample with {flag} 1, or pass --force-cfg to do it anyway")
