"""Atomic, checksummed checkpoints of weights (safetensors) and training state (safetensors + JSON).

A checkpoint is a directory ``checkpoints/step-0001000/`` written as ``.tmp-step-0001000`` and then
renamed, so a kill at any moment leaves only complete checkpoints; temporary directories are ignored.
The last file written before the rename is ``manifest.json``: the size and sha256 of every other file.
``verify_checkpoint`` checks them (or, for checkpoints written before manifests, the safetensors headers
and lengths), so a file cut short or altered later (a full disk, an interrupted copy, bit rot) is found
before it is loaded. No pickles: tensors go to safetensors, everything else to JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

STEP_DIR = re.compile(r"^step-(\d+)$")
MANIFEST = "manifest.json"
STATE = "state.json"
REQUIRED_FILES = ("model.safetensors", "optimizer.safetensors", STATE)
DELETING_PREFIX = ".deleting-"


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


def _test_kill_point(stage: str, step: int) -> None:
    """Test hook: ``SELFE_TEST_KILL_AT=<stage>:<step>`` SIGKILLs this process at that point of a write.

    Stages: ``manifest`` (every file written into the temporary directory, not yet renamed), ``renamed`` (renamed, not yet pruned), ``pruning`` (an old checkpoint
    moved aside for deletion, not yet deleted). Used by the kill-and-resume tests only.
    """
    if os.environ.get("SELFE_TEST_KILL_AT") == f"{stage}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


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


def _sha256(path: Path, *, fsync: bool = False) -> str:
    """sha256 of a file's bytes as read back; ``fsync``: also flush the file to the device."""
    digest = hashlib.sha256()
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
        if fsync:
            os.fsync(f.fileno())
    return digest.hexdigest()


def _sha256_many(paths: list[Path], *, fsync: bool = False) -> list[str]:
    """``_sha256`` of several files at once: hashlib releases the GIL, so large files hash in parallel."""
    if len(paths) <= 1:
        return [_sha256(p, fsync=fsync) for p in paths]
    with ThreadPoolExecutor(max_workers=min(len(paths), os.cpu_count() or 1, 8)) as pool:
        return list(pool.map(lambda p: _sha256(p, fsync=fsync), paths))


def write_checkpoint(ckpt_root: Path, step: int, *, model: dict[str, torch.Tensor],
                     emas: dict[float, dict[str, torch.Tensor]], optimizer: dict[str, Any],
                     state: dict[str, Any], keep: int) -> Path:
    """Write ``step-XXXXXXX`` atomically with its manifest, then prune to the ``keep`` most recent.

    ``optimizer`` is a state dict in ``torch.optim.Optimizer.state_dict()`` form (integer parameter keys).
    Pruning removes only checkpoints older than this one, so a damaged or foreign newer directory can
    never cost the checkpoint just written.
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
    with open(tmp / STATE, "w") as f:
        json.dump({**state, "optimizer": opt_meta, "checksums": MANIFEST}, f, indent=1)
    written = sorted(tmp.iterdir())
    files = {p.name: {"bytes": p.stat().st_size, "sha256": digest}
             for p, digest in zip(written, _sha256_many(written, fsync=True), strict=True)}
    with open(tmp / MANIFEST, "w") as f:
        json.dump({"algorithm": "sha256", "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    _test_kill_point("manifest", step)
    if final.exists():  # a re-run of the same step (e.g. after a crash during pruning)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(ckpt_root)
    _test_kill_point("renamed", step)
    older = [p for p in list_checkpoints(ckpt_root) if checkpoint_step(p) < step]
    for old in older[:max(0, len(older) - (keep - 1))]:
        doomed = old.with_name(DELETING_PREFIX + old.name)  # renamed first: a kill never leaves half a step-*
        os.rename(old, doomed)
        _test_kill_point("pruning", step)
        shutil.rmtree(doomed, ignore_errors=True)
    for leftover in ckpt_root.glob(DELETING_PREFIX + "step-*"):  # from a run killed while pruning
        shutil.rmtree(leftover, ignore_errors=True)
    return final


def checkpoint_step(ckpt: Path) -> int:
    m = STEP_DIR.match(ckpt.name)
    if m is None:
        raise ValueError(f"{ckpt}: not a step-XXXXXXX checkpoint directory")
    return int(m.group(1))


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Checkpoint directories (``step-XXXXXXX``; complete by construction, intact or not), oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file that its own header can show (None: header and length agree)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                return f"{path.name} is cut short ({size} bytes, not even a safetensors header)"
            n = int.from_bytes(prefix, "little")
            if n > size - 8:
                return f"{path.name} is cut short ({size} bytes; its header alone needs {n + 8})"
            header = json.loads(f.read(n))
    except FileNotFoundError:
        return f"{path.name} is missing"
    except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return f"{path.name} has an unreadable safetensors header ({type(err).__name__})"
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):
        return f"{path.name} has a malformed safetensors header"
    if 8 + n + end != size:
        return f"{path.name} has {size} bytes, its safetensors header describes {8 + n + end}"
    return None


def _read_json(path: Path) -> tuple[Any, str | None]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f), None
    except FileNotFoundError:
        return None, f"{path.name} is missing"
    except (OSError, ValueError) as err:
        return None, f"{path.name} is not readable JSON ({type(err).__name__})"


def verify_checkpoint(ckpt: Path, files: Iterable[str] | None = None) -> str | None:
    """None when the checkpoint is intact, else what is wrong with it (one short phrase naming the file).

    With a manifest, every listed file (or only ``files``, and state.json) must have its recorded size
    and sha256. A checkpoint written before manifests has no checksums: its state.json must parse and
    its safetensors files must have a readable header that accounts for their length.
    """
    state, problem = _read_json(ckpt / STATE)
    if problem:
        return problem
    if not isinstance(state, dict) or "step" not in state:
        return f"{STATE} has no training step"
    if state.get("checksums") or (ckpt / MANIFEST).exists():
        manifest, problem = _read_json(ckpt / MANIFEST)
        if problem:
            return problem
        listed = manifest.get("files") if isinstance(manifest, dict) else None
        if not isinstance(listed, dict) or any(not isinstance(v, dict) for v in listed.values()):
            return f"{MANIFEST} has no file list"
        wanted = [*REQUIRED_FILES, *listed] if files is None else [STATE, *files]
        names = sorted(set(wanted))
        for name in names:  # cheap checks first
            if name not in listed:
                return f"{name} is not in {MANIFEST}"
            path = ckpt / name
            if not path.is_file():
                return f"{name} is missing"
            size = path.stat().st_size
            if size != listed[name].get("bytes"):
                return f"{name} has {size} bytes, {MANIFEST} records {listed[name].get('bytes')}"
        for name, digest in zip(names, _sha256_many([ckpt / n for n in names]), strict=True):
            if digest != listed[name].get("sha256"):
                return f"{name} does not match its sha256 in {MANIFEST}"
        return None
    if files is None:
        names = sorted({*REQUIRED_FILES, *(p.name for p in ckpt.glob("*.safetensors"))} - {STATE})
    else:
        names = [f for f in files if f != STATE]
    for name in names:
        if not (ckpt / name).is_file():
            return f"{name} is missing"
        if name.endswith(".safetensors") and (problem := safetensors_problem(ckpt / name)):
            return problem
    return None


def newest_intact(ckpt_root: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint that ``verify_checkpoint`` passes, and the damaged ones newer than it
    (newest first, each with its problem). Older checkpoints are not read."""
    damaged: list[tuple[Path, str]] = []
    for ckpt in reversed(list_checkpoints(ckpt_root)):
        problem = verify_checkpoint(ckpt)
        if problem is None:
            return ckpt, damaged
        damaged.append((ckpt, problem))
    return None, damaged


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest intact checkpoint (damaged newer ones are passed over, not moved)."""
    return newest_intact(ckpt_root)[0]


def set_aside(ckpt: Path) -> Path:
    """Rename a damaged checkpoint to ``step-XXXXXXX.damaged`` (``.damaged-2`` ... if taken) and return the
    new path. Nothing is deleted: the directory no longer counts as a checkpoint, so neither resuming
    nor pruning touches it again."""
    aside = ckpt.with_name(f"{ckpt.name}.damaged")
    k = 2
    while aside.exists():
        aside = ckpt.with_name(f"{ckpt.name}.damaged-{k}")
        k += 1
    os.rename(ckpt, aside)
    _fsync_dir(ckpt.parent)
    return aside


def read_checkpoint_state(ckpt: Path) -> dict[str, Any]:
    with open(ckpt / STATE) as f:
        return json.load(f)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def ema_files(ckpt: Path) -> dict[float, Path]:
    out = {}
    for p in ckpt.glob("ema-*.safetensors"):
        out[float(p.stem[len("ema-"):])] = p
    return dict(sorted(out.items()))
