"""FSDP2 (train.parallel: fsdp) through the real CLI: 2 gloo processes on CPU against one process.

Sharded training must give the weights of an unsharded run with the same global batch, through a
checkpoint and a resume (full tensors gathered to rank 0, the optimiser state re-sharded on load), for
every method. With one sample per rank the ranks disagree on which data-dependent passes they need
(Self-E's self-evaluation rows, MeanFlow's guided and r != t rows): every rank must still run the same
forwards, or the parameter all-gathers deadlock.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import HERE, TINY, selfe

pytestmark = pytest.mark.slow


def torchrun(recipe: Path, run_dir: Path, *overrides: str, cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    sets = [a for o in overrides for a in ("--set", o)]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "selfe_cli", "train", str(recipe), "--set", f"run.dir={run_dir}",
                           "--set", "train.parallel=fsdp", *sets, "-q", "--device", "cpu"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-6000:]


def last_checkpoint(run_dir: Path) -> Path:
    return sorted((run_dir / "checkpoints").glob("step-*"))[-1]


@pytest.mark.parametrize("recipe, steps", [(TINY, 6), (HERE / "tiny_mmdit_selfe.yaml", 6),
                                           (HERE / "tiny_mmdit_meanflow.yaml", 6)],
                         ids=["unet-flow_matching", "mmdit-selfe", "mmdit-meanflow"])
def test_fsdp_two_processes_with_resume_equal_one_process(tmp_path, recipe, steps):
    common = [f"train.total_steps={steps}", "train.sample_every_steps=0", f"train.checkpoint_every_steps={steps // 2}"]
    single = tmp_path / "single"
    selfe("train", recipe, "--set", f"run.dir={single}", "--set", "train.grad_accum_rounds=2",
          *[a for o in common for a in ("--set", o)], "-q", cwd=tmp_path)

    sharded = tmp_path / "fsdp"
    # first half, then the same command with the full length: resumes from the sharded run's checkpoint
    torchrun(recipe, sharded, *common, f"train.total_steps={steps // 2}", cwd=tmp_path)
    assert last_checkpoint(sharded).name == f"step-{steps // 2:07d}"
    torchrun(recipe, sharded, *common, cwd=tmp_path)

    a, b = last_checkpoint(single), last_checkpoint(sharded)
    assert b.name == f"step-{steps:07d}"
    for name in ("model.safetensors", "ema-0.9.safetensors", "optimizer.safetensors"):
        want, got = load_file(str(a / name)), load_file(str(b / name))
        assert want.keys() == got.keys(), name  # full, unsharded tensors under the same names
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=2e-6, msg=f"{name}: {key}")
    # the EMA export and the final grid come from an unsharded copy on rank 0
    assert (sharded / "final" / "config.json").is_file()
    assert (sharded / "samples" / f"step-{steps:07d}.png").is_file()
    init = load_file(str(b / "model.safetensors"))
    ema = load_file(str(b / "ema-0.9.safetensors"))
    assert any(not torch.equal(init[k], ema[k]) for k in init)  # training really moved the weights
