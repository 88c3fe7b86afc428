"""The few-step zoo of issue 14 through the real CLI: train a tiny recipe, then sample at 1, 2 and 4 steps
(docs/methods.md, one section per method)."""

from __future__ import annotations

import json

import pytest

from .conftest import HERE, selfe

pytestmark = pytest.mark.slow

RECIPES = {"tim": "tiny_tim.yaml", "sct": "tiny_sct.yaml", "ect": "tiny_ect.yaml"}


@pytest.mark.parametrize("method", sorted(RECIPES))
def test_train_and_sample(tmp_path, method):
    run = tmp_path / "runs" / "tiny"
    selfe("train", HERE / RECIPES[method], "--set", f"run.dir={run}", "--set", "train.total_steps=4",
          "--set", "train.sample_every_steps=0", "-q", cwd=tmp_path)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(m["loss"] > 0 for m in metrics)
    selfe("sample", "a red square", "--ckpt", run, "--steps", "2", "--n", "1", cwd=tmp_path)
    assert (tmp_path / "outputs" / "tiny" / "a-red-square-2steps" / "grid.png").is_file()
    # 1 and 4 steps in this process (a CLI start costs seconds)
    from selfe_cli.sampling.generate import Generator

    gen = Generator.from_run(run, device="cpu")
    for steps in (1, 4):
        images = gen.generate(["a red square"], [0], steps=steps)
        assert images.shape == (1, 16, 16, 3)
