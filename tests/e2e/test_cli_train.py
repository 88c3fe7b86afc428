"""End-to-end runs of the real CLI on a tiny recipe: train, resume after SIGKILL, sample, DDP."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from .conftest import selfe

pytestmark = pytest.mark.slow


def final_weights(run_dir):
    ckpts = sorted((run_dir / "checkpoints").glob("step-*"))
    return load_file(str(ckpts[-1] / "model.safetensors")), load_file(str(ckpts[-1] / "ema-0.9.safetensors"))


def test_train_sample_and_rerun(tmp_path, tiny_recipe):
    run = tmp_path / "runs" / "tiny"
    selfe("train", tiny_recipe, "--set", f"run.dir={run}", "-q", cwd=tmp_path)
    assert (run / "recipe.yaml").is_file()
    assert [p.name for p in sorted((run / "checkpoints").glob("step-*"))] == \
        ["step-0000008", "step-0000010", "step-0000012"]  # keep_checkpoints: 3
    assert (run / "final" / "config.json").is_file()
    assert (run / "samples" / "step-0000006.png").is_file() and (run / "samples" / "step-0000012.png").is_file()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2, 4, 6, 8, 10, 12]
    assert all(m["loss"] > 0 for m in metrics)
    assert list((run / "tb").iterdir())
    # the same command again: nothing to do, weights unchanged
    before = final_weights(run)[0]
    proc = selfe("train", tiny_recipe, "--set", f"run.dir={run}", "-q", cwd=tmp_path)
    assert "already trained" in proc.stdout
    after = final_weights(run)[0]
    assert all(torch.equal(before[k], after[k]) for k in before)
    # sample: --ckpt defaults to the most recent run under ./runs
    proc = selfe("sample", "a red square", "--steps", "2", "--n", "3", "--seed", "5", cwd=tmp_path)
    out = tmp_path / "outputs" / "tiny" / "a-red-square-2steps"
    assert (out / "grid.png").is_file()
    assert sorted(p.name for p in out.glob("0*.png")) == ["000005.png", "000006.png", "000007.png"]
    # per-image seeds: image 6 is the same whether it is generated alone or in a batch
    alone = tmp_path / "alone"
    selfe("sample", "a red square", "--steps", "2", "--n", "1", "--seed", "6", "--out", alone, cwd=tmp_path)
    from PIL import Image

    assert (torch.from_numpy(np.array(Image.open(alone / "000006.png"))) ==
            torch.from_numpy(np.array(Image.open(out / "000006.png")))).all()
    # sampler options: stochastic steps with midpoint landing differ from the default, bad values are one line
    mid = tmp_path / "mid"
    selfe("sample", "a red square", "--steps", "2", "--n", "1", "--seed", "6", "--r-mode", "mid", "--eta", "1",
          "--out", mid, cwd=tmp_path)
    assert not (torch.from_numpy(np.array(Image.open(mid / "000006.png"))) ==
                torch.from_numpy(np.array(Image.open(out / "000006.png")))).all()
    proc = selfe("sample", "a red square", "--r-mode", "middle", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "--r-mode" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    # a changed recipe does not silently continue an old run
    proc = selfe("train", tiny_recipe, "--set", f"run.dir={run}", "--set", "train.lr=0.5", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "train.lr differs" in proc.stderr


def test_sigkill_resume_equals_uninterrupted(tmp_path, tiny_recipe):
    common = ["--set", "train.total_steps=16", "--set", "train.checkpoint_every_steps=4",
              "--set", "train.sample_every_steps=0", "-q"]
    full = tmp_path / "full"
    selfe("train", tiny_recipe, "--set", f"run.dir={full}", *common, cwd=tmp_path)

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "selfe_cli", "train", str(tiny_recipe), "--set", f"run.dir={killed}", *common]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not (killed / "checkpoints" / "step-0000004").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpts = sorted((killed / "checkpoints").glob("step-*"))
    assert ckpts and ckpts[-1].name != "step-0000016", "the kill came too late to test resuming"
    selfe("train", tiny_recipe, "--set", f"run.dir={killed}", *common, cwd=tmp_path)
    a_model, a_ema = final_weights(full)
    b_model, b_ema = final_weights(killed)
    for k in a_model:
        assert torch.equal(a_model[k], b_model[k]), k
        assert torch.equal(a_ema[k], b_ema[k]), k
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 16  # no duplicated metric lines after resuming


def test_ddp_two_processes_equal_one_process(tmp_path, tiny_recipe):
    """2 gloo processes x 1 round == 1 process x 2 accumulation rounds (same global batch)."""
    common = ["--set", "train.total_steps=6", "--set", "train.sample_every_steps=0",
              "--set", "train.checkpoint_every_steps=100", "-q"]
    single = tmp_path / "single"
    selfe("train", tiny_recipe, "--set", f"run.dir={single}", "--set", "train.grad_accum_rounds=2", *common,
          cwd=tmp_path)
    ddp = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "selfe_cli", "train", str(tiny_recipe), "--set", f"run.dir={ddp}", *common,
                           "--device", "cpu"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    a_model, a_ema = final_weights(single)
    b_model, b_ema = final_weights(ddp)
    for k in a_model:
        torch.testing.assert_close(b_model[k], a_model[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b_ema[k], a_ema[k], rtol=1e-5, atol=1e-6)
    # and the updates really happened (not a trivially equal pair of untouched networks)
    init = load_file(str(sorted((single / "checkpoints").glob("step-*"))[-1] / "model.safetensors"))
    assert any(not torch.equal(init[k], a_ema[k]) for k in init)
