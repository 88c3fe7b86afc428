"""User mistakes: one line on stderr, exit code 2, no traceback."""

import pytest

from .conftest import selfe


@pytest.mark.parametrize("recipe_text, words", [
    ("model: {name: unet}\ntrain: {lrr: 1}\n", ["train.lrr", "did you mean 'lr'"]),
    ("model: {name: unet}\ntrain: {lr: fast}\n", ["train.lr", "expected a number"]),
    ("model: {name: unet}\ntrain: {total_steps: 0}\n", ["train.total_steps", ">= 1"]),
    ("model: {name: unett}\n", ["model.name", "did you mean 'unet'"]),
    ("model: {name: unet, chanels: 3}\n", ["model.chanels"]),
    ("model: {name: unet}\nmethod: {name: flow_matchin}\n", ["method.name", "flow_matching"]),
    ("model: {name: unet}\ndata: {name: cifar10, root: /no/such/dir}\n", ["data.root", "/no/such/dir"]),
    ("model: {name: unet}\ntrain: [1, 2\n", ["invalid YAML", "line"]),
])
def test_recipe_mistakes(tmp_path, recipe_text, words):
    path = tmp_path / "bad.yaml"
    path.write_text(recipe_text)
    proc = selfe("train", path, cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert str(path) in lines[0] or "bad.yaml" in lines[0]
    for w in words:
        assert w in lines[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("args, words", [
    (["train", "no-such-recipe.yaml"], ["no-such-recipe.yaml", "not found"]),
    (["train", "quickstart", "--set", "train.lr"], ["KEY=VALUE"]),
    (["train", "quickstart", "--set", "trian.lr=1"], ["did you mean 'train'"]),
    (["sample", "a red cube", "--ckpt", "no/such/run"], ["no/such/run"]),
    (["sample", "a red cube"], ["no trained run"]),
    (["train", "quickstart", "--set", "train.activation_checkpointing=true"],
     ["train.activation_checkpointing", "UNet"]),
    (["train", "quickstart", "--set", "train.parallel=zero3"], ["train.parallel", "fsdp"]),
])
def test_cli_mistakes(tmp_path, args, words):
    proc = selfe(*args, cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for w in words:
        assert w in proc.stderr


def test_dry_run_and_recipes_list(tmp_path):
    proc = selfe("train", "quickstart", "--dry-run", "--set", "train.lr=3e-4", cwd=tmp_path)
    assert "lr: 0.0003" in proc.stdout and "name: flow_matching" in proc.stdout
    assert "parameters" in proc.stdout
    assert not (tmp_path / "runs").exists()
    listing = selfe("recipes", cwd=tmp_path)
    assert "quickstart" in listing.stdout
