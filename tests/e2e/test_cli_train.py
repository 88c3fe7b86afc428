"""End-to-end runs of the real CLI on a tiny recipe: train, resume after SIGKILLs and damaged checkpoints,
sample, DDP."""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from .conftest import TINY, selfe

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


# The uninterrupted run that the killed and damaged runs must end equal to (bit for bit).
RESUME_ARGS = ["--set", "train.total_steps=20", "--set", "train.checkpoint_every_steps=2",
               "--set", "train.keep_checkpoints=3", "--set", "train.sample_every_steps=0", "-q"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    selfe("train", TINY, "--set", f"run.dir={run}", *RESUME_ARGS, cwd=run.parent)
    return run


def step_dirs(ckpts):
    """The checkpoints a resume would consider (not .tmp-*, .deleting-* or *.damaged*), oldest first."""
    return sorted(p for p in ckpts.iterdir() if re.fullmatch(r"step-\d+", p.name))


def assert_same_end(a, b):
    """The newest checkpoints hold identical tensors (weights, EMAs, optimizer), and so does final/."""
    ca, cb = (step_dirs(r / "checkpoints")[-1] for r in (a, b))
    assert ca.name == cb.name
    files = sorted(p.name for p in ca.glob("*.safetensors"))
    assert files == sorted(p.name for p in cb.glob("*.safetensors")) and "optimizer.safetensors" in files
    for name in [*(f"checkpoints/{ca.name}/{f}" for f in files), "final/diffusion_pytorch_model.safetensors"]:
        ta, tb = load_file(str(a / name)), load_file(str(b / name))
        assert ta.keys() == tb.keys(), name
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{name}: {k}"
    steps = [json.loads(line)["step"] for line in (b / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(2, 21, 2))  # no metric line lost or duplicated by the resumes


def test_sigkill_at_random_moments_resumes_bit_exact(tmp_path, tiny_recipe, uninterrupted):
    """SIGKILLed again and again (inside checkpoint writes, then at random moments), the run still ends
    with exactly the weights of the uninterrupted one."""
    killed = tmp_path / "killed"
    args = ["train", tiny_recipe, "--set", f"run.dir={killed}", *RESUME_ARGS]
    ckpts = killed / "checkpoints"
    # at the riskiest points of a checkpoint write (a test hook in checkpoint.py kills the process there)
    for point in ("manifest:6", "pruning:8"):
        proc = selfe(*args, cwd=tmp_path, check=False, env_extra={"SELFE_TEST_KILL_AT": point})
        assert proc.returncode == -signal.SIGKILL, f"{point}: {proc.returncode}\n{proc.stderr}"
    # left behind: a complete but unrenamed .tmp-step-0000006 (ignored, then rewritten) and a half-pruned
    # .deleting-step-0000002 (never read, removed at the next write)
    assert (ckpts / ".deleting-step-0000002").is_dir()
    assert [p.name for p in step_dirs(ckpts)] == ["step-0000004", "step-0000006", "step-0000008"]
    # at random moments soon after a new checkpoint appears: mid-step, mid-write or mid-pruning
    rng = random.Random(20250611)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for _ in range(2):
        newest = int(step_dirs(ckpts)[-1].name[5:])
        proc = subprocess.Popen([sys.executable, "-m", "selfe_cli", *map(str, args)], cwd=tmp_path, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and \
                int(step_dirs(ckpts)[-1].name[5:]) <= newest:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)  # a no-op if it already finished (a fast machine)
        assert proc.wait() in (0, -signal.SIGKILL)
    selfe(*args, cwd=tmp_path)
    assert_same_end(uninterrupted, killed)
    assert not list(ckpts.glob(".tmp-*")) and not list(ckpts.glob(".deleting-*"))
    assert len(step_dirs(ckpts)) == 3 and len(list(ckpts.iterdir())) == 3  # train.keep_checkpoints


def test_damaged_newest_checkpoint_resumes_from_the_previous_one(tmp_path, tiny_recipe, uninterrupted, capsys):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    args = ["train", tiny_recipe, "--set", f"run.dir={run}", *RESUME_ARGS]
    ckpts = run / "checkpoints"
    newest = ckpts / "step-0000020" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 3])  # cut short (a full disk, a cut copy)
    second = ckpts / "step-0000018" / "model.safetensors"
    raw = bytearray(second.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one byte of tensor data changed, size unchanged: only the checksum notices
    second.write_bytes(bytes(raw))
    # sampling passes over them as well (it verifies the file it loads): here to the model weights of step 16
    from selfe_cli.training.run import build_for_sampling

    gen = build_for_sampling(run, weights="model", device=torch.device("cpu"))
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all("sampling from step-0000016" in line for line in err), err
    expected = load_file(str(ckpts / "step-0000016" / "model.safetensors"))
    assert all(torch.equal(v, expected[k]) for k, v in gen.net.state_dict().items())
    proc = selfe(*args, cwd=tmp_path)
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2, proc.stderr  # one line per damaged checkpoint, naming it and the problem
    assert "step-0000020" in warnings[0] and "model.safetensors has" in warnings[0]
    assert "step-0000018" in warnings[1] and "sha256" in warnings[1] and "step-0000016" in warnings[1]
    assert "Traceback" not in proc.stderr and "resumed from 16" in proc.stdout
    assert_same_end(uninterrupted, run)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000016", "step-0000018", "step-0000018.damaged",
                                                       "step-0000020", "step-0000020.damaged"]  # kept, not pruned
    # nothing intact: one line, exit 2, nothing moved or trained
    for ckpt in step_dirs(ckpts):
        (ckpt / "state.json").write_text('{"step": ')
    before = sorted(p.name for p in ckpts.iterdir())
    proc = selfe(*args, cwd=tmp_path, check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "no intact checkpoint" in proc.stderr and "step-0000020: state.json" in proc.stderr
    assert sorted(p.name for p in ckpts.iterdir()) == before


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


def test_image_folder_with_bad_files(tmp_path):
    """A few unreadable images: skipped with one warning line naming them; too many: one error line."""
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(8):
        Image.new("RGB", (16, 16), (30 * i, 0, 255 - 30 * i)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a picture number {i}\n")
    for name in ("bad0.png", "bad1.jpg"):
        (folder / name).write_bytes(b"not an image at all")
        (folder / name).with_suffix(".txt").write_text("a broken picture\n")
    args = ["train", TINY, "--set", f"run.dir={tmp_path / 'run'}", "--set", "data.name=image_folder",
            "--set", f"data.root={folder}", "--set", "data.resolution=16", "--set", "train.total_steps=1",
            "--set", "train.sample_every_steps=0", "-q"]
    proc = selfe(*args, cwd=tmp_path, check=False)  # 2 of 10 is more than the default 1%
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "2 of 10 images" in lines[0] and "bad0.png (not an image)" in lines[0] and "bad1.jpg" in lines[0]
    assert "data.max_bad_fraction" in lines[0]
    proc = selfe(*args, "--set", "data.max_bad_fraction=0.2", cwd=tmp_path)
    warnings = [line for line in proc.stderr.splitlines() if "bad0.png" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: skipped 2 of 10 images"), proc.stderr
    assert (tmp_path / "run" / "final" / "config.json").is_file()
