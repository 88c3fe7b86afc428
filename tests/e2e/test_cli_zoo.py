"""The few-step zoo of issue 14 end to end: train a tiny recipe, then sample at 1, 2 and 4 steps (docs/methods.md,
one section per method). One method goes through the real CLI (train and sample: the same path for every method);
the others through ``train_recipe`` and ``Generator`` in this process (a CLI start costs seconds of imports)."""

from __future__ import annotations

import json

import pytest

from .conftest import HERE, selfe

pytestmark = pytest.mark.slow

RECIPES = {"tim": "tiny_tim.yaml", "sct": "tiny_sct.yaml", "ect": "tiny_ect.yaml", "shortcut": "tiny_shortcut.yaml",
           "imm": "tiny_imm.yaml"}
SHORT = ["train.total_steps=3", "train.sample_every_steps=0", "train.checkpoint_every_steps=3", "train.batch_size=4"]


def _sample_1_2_4(run):
    from selfe_cli.sampling.generate import Generator

    gen = Generator.from_run(run, device="cpu")
    for steps in (1, 2, 4):
        assert gen.generate(["a red square"], [0], steps=steps).shape == (1, 16, 16, 3)


def test_cli_train_and_sample(tmp_path):
    run = tmp_path / "runs" / "tiny"
    selfe("train", HERE / RECIPES["tim"], "--set", f"run.dir={run}", *[a for o in SHORT for a in ("--set", o)], "-q",
          cwd=tmp_path)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(m["loss"] > 0 for m in metrics)
    selfe("sample", "a red square", "--ckpt", run, "--steps", "2", "--n", "1", cwd=tmp_path)
    assert (tmp_path / "outputs" / "tiny" / "a-red-square-2steps" / "grid.png").is_file()
    _sample_1_2_4(run)


@pytest.mark.parametrize("method", sorted(set(RECIPES) - {"tim"}))
def test_train_and_sample(tmp_path, method):
    from selfe_cli.recipes.loader import load_recipe
    from selfe_cli.training.run import train_recipe

    run = tmp_path / "run"
    out = train_recipe(load_recipe(HERE / RECIPES[method], [f"run.dir={run}", *SHORT]), progress=False, device="cpu")
    assert out["step"] == 3
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(m["loss"] > 0 for m in metrics)
    _sample_1_2_4(run)
