"""``train.init_from``: a new run starts from another run's weights, recorded in the run; resuming never re-applies
it; a missing or incompatible source is one line and writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from selfe_cli.errors import UserError
from selfe_cli.recipes.loader import load_recipe
from selfe_cli.training.run import train_recipe

TINY = Path(__file__).parents[1] / "e2e" / "tiny_recipe.yaml"
FAST = ["train.batch_size=2", "train.sample_every_steps=0", "train.log_every_steps=1", "data.size=16",
        "model.attn_resolutions=[]", "sample.grid_size=1", "sample.steps=1"]


def _train(run: Path, *extra: str, steps: int = 2) -> dict:
    rec = load_recipe(TINY, [f"run.dir={run}", f"train.total_steps={steps}", f"train.checkpoint_every_steps={steps}",
                             *FAST, *extra])
    return train_recipe(rec, progress=False, device="cpu")


def _last(run: Path) -> Path:
    return sorted((run / "checkpoints").glob("step-*"))[-1]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("init") / "source"
    _train(run)
    return run


def test_new_run_starts_from_the_source_ema_and_records_it(source, tmp_path):
    new = tmp_path / "new"
    _train(new, f"train.init_from={source}", "train.lr=1e-12", "train.warmup_steps=0", steps=1)
    want = load_file(str(_last(source) / "ema-0.9.safetensors"))
    got = load_file(str(_last(new) / "model.safetensors"))
    for key in want:  # one step at lr 1e-12: the source's EMA weights
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-9, msg=key)
    record = json.loads((new / "init_from.json").read_text())
    assert record["step"] == 2 and record["weights"] == "ema-0.9.safetensors" and len(record["sha256"]) == 64
    assert f"init_from: {source}" in (new / "recipe.yaml").read_text()

    # resume: the source is gone, the run continues from its own checkpoint and the record stays as it was
    moved = source.with_name("moved")
    source.rename(moved)
    try:
        out = _train(new, f"train.init_from={source}", "train.lr=1e-12", "train.warmup_steps=0",
                     "train.checkpoint_every_steps=1", steps=2)
    finally:
        moved.rename(source)
    assert out["resumed_from"] == 1 and out["step"] == 2
    assert json.loads((new / "init_from.json").read_text()) == record


def test_model_weights_and_a_checkpoint_directory(source):
    from selfe_cli.training.init_from import source_checkpoint

    ckpt, file = source_checkpoint(str(_last(source)), "model")
    assert (ckpt, file.name) == (_last(source), "model.safetensors")
    ckpt, file = source_checkpoint(str(source), "ema")
    assert file.name == "ema-0.9.safetensors"  # the source recipe's first decay


@pytest.mark.parametrize("what, extra, message", [
    ("missing", [], "no such run directory"),
    ("incompatible", ["model.model_channels=16"], "its network does not fit this recipe's model"),
    ("not a run", [], "not a run directory"),
])
def test_bad_source_is_one_line_and_writes_nothing(source, tmp_path, what, extra, message):
    target = {"missing": tmp_path / "nope", "incompatible": source, "not a run": tmp_path}[what]
    new = tmp_path / "new"
    with pytest.raises(UserError, match=message) as err:
        _train(new, f"train.init_from={target}", *extra, steps=1)
    assert str(err.value).startswith(f"train.init_from: {target}") and "\n" not in str(err.value)
    assert not new.exists()


def test_runs_started_before_init_from_existed_still_resume(tmp_path):
    """A saved recipe.yaml without the init keys (runs from before them) resumes; so does a changed init_from,
    which a resume never reads."""
    import yaml

    from selfe_cli.recipes.loader import dump_recipe
    from selfe_cli.training.run import check_resume_compatible

    rec = load_recipe(TINY, [f"run.dir={tmp_path}", *FAST])
    saved = yaml.safe_load(dump_recipe(rec))
    del saved["train"]["init_from"], saved["train"]["init_weights"]
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(saved))
    check_resume_compatible(tmp_path, rec)
    check_resume_compatible(tmp_path, load_recipe(TINY, [f"run.dir={tmp_path}", *FAST, "train.init_from=elsewhere"]))
    with pytest.raises(UserError, match="train.lr differs"):
        check_resume_compatible(tmp_path, load_recipe(TINY, [f"run.dir={tmp_path}", *FAST, "train.lr=0.5"]))
