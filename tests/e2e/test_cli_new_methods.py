"""alpha-Flow and iMF through the real CLI: train a tiny recipe, export, sample (docs/methods.md)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from .conftest import HERE, selfe

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("recipe", ["tiny_alphaflow.yaml", "tiny_imf.yaml"])
def test_train_and_sample(tmp_path, recipe):
    run = tmp_path / "runs" / "tiny"
    proc = selfe("train", HERE / recipe, "--set", f"run.dir={run}", cwd=tmp_path)
    assert "jvp:" in proc.stdout  # the forward-mode route is reported
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(m["loss"] > 0 for m in metrics)
    ckpt = sorted((run / "checkpoints").glob("step-*"))[-1]
    final = json.loads((run / "final" / "config.json").read_text())
    if recipe == "tiny_imf.yaml":
        assert any(k.startswith("v_") for k in load_file(str(ckpt / "model.safetensors")))  # trained with it
        assert final["aux_v_head_blocks"] == 0  # exported without the v-head
        assert not any(k.startswith("v_") for k in load_file(str(run / "final" / "diffusion_pytorch_model.safetensors")))
        assert {"loss_u", "loss_v"} <= set(metrics[-1])
        extra = ["--cfg", "3"]  # omega: a network input, not a second pass (no refusal)
    else:
        alphas = [m["alpha"] for m in metrics]
        assert alphas[0] == 1.0 and alphas[-1] == 0.0  # the curriculum crossed to the JVP branch
        extra = ["--r-mode", "zero", "--eta", "1"]  # consistency sampling
    for steps in ("1", "2"):
        selfe("sample", "a red square", "--ckpt", run, "--steps", steps, "--n", "2", *extra, cwd=tmp_path)
        assert (tmp_path / "outputs" / "tiny" / f"a-red-square-{steps}steps" / "grid.png").is_file()


@pytest.mark.parametrize("args, message", [
    (["quickstart_imf", "--set", "model.guidance_embed=false"], "model.guidance_embed: expected true"),
    (["quickstart_alphaflow", "--set", "method.alpha_snap=0.6"], "method.alpha_snap: expected a value < 0.5"),
    (["quickstart_imf", "--set", "method.guidance.sample_t_min=0.9", "--set", "method.guidance.sample_t_max=0.1"],
     "sample_t_min (0.9) exceeds sample_t_max"),
])
def test_bad_method_settings_are_one_line(tmp_path, args, message):
    proc = selfe("train", *args, "--dry-run", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("recipe, extra", [
    ("tiny_imf.yaml", []),
    ("tiny_alphaflow.yaml", ["method.alpha_start=1", "method.alpha_end=4"]),  # discrete, then JVP steps
], ids=["dit-imf-vhead", "unet-alphaflow"])
def test_fsdp_two_processes_equal_one_process(tmp_path, recipe, extra):
    """One sample per rank: the ranks disagree on guided, discrete and r != t rows, yet make the same calls."""
    from .test_cli_fsdp import last_checkpoint, torchrun

    steps = 4
    common = [f"train.total_steps={steps}", "train.batch_size=2", "train.sample_every_steps=0",
              f"train.checkpoint_every_steps={steps}", *extra]
    single = tmp_path / "single"
    selfe("train", HERE / recipe, "--set", f"run.dir={single}", "--set", "train.grad_accum_rounds=2",
          *[a for o in common for a in ("--set", o)], "-q", cwd=tmp_path)
    sharded = tmp_path / "fsdp"
    torchrun(HERE / recipe, sharded, *common, cwd=tmp_path)
    want = load_file(str(last_checkpoint(single) / "model.safetensors"))
    got = load_file(str(last_checkpoint(sharded) / "model.safetensors"))
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=2e-6, msg=key)
