"""model.skip_sigma_data: data: the U-Net's input skip measured from the training data when a run starts,
recorded in the run, never measured again on resume; the per-method default; bad values refused at load."""

import json
import re

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from selfe_cli.config import ConfigError
from selfe_cli.data import build_dataset
from selfe_cli.data.stats import data_std, sample_indices
from selfe_cli.errors import UserError
from selfe_cli.recipes.loader import dump_recipe, load_recipe
from selfe_cli.training import run as run_mod
from selfe_cli.training.distributed import DistInfo

SINGLE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
N_IMAGES, RES = 6, 8

RECIPE = """\
run: {{dir: {run}}}
model: {{name: {model}, {model_keys}}}
data: {{name: image_folder, root: {root}, resolution: 8, num_workers: 0}}
method: {{name: {method}}}
train: {{total_steps: 2, batch_size: 2, lr: 1.0e-3, ema_decays: [0.9], log_every_steps: 1,
         checkpoint_every_steps: 1, keep_checkpoints: 1, sample_every_steps: 0}}
sample: {{steps: 1, grid_size: 1}}
"""
UNET = "model_channels: 8, channel_mult: [1], num_blocks: 1, attn_resolutions: [], num_heads: 1"
DIT = "depth: 1, hidden_size: 16, num_heads: 1, patch_size: 2"


@pytest.fixture
def folder(tmp_path):
    """A flat folder of 8x8 images with seeded random pixels (not a multiple of the resize: exact pixels)."""
    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    arrays = []
    for i in range(N_IMAGES):
        arr = rng.integers(0, 256, size=(RES, RES, 3), dtype=np.uint8)
        arr[:, : i + 1] = 255  # images differ in mean too, so the pooled std is not a per-image std
        Image.fromarray(arr).save(root / f"{i}.png")
        arrays.append(arr)
    return root, arrays


def write_recipe(tmp_path, root, method="meanflow", model="unet", model_keys=UNET, extra=""):
    path = tmp_path / f"{method}.yaml"
    path.write_text(RECIPE.format(run=tmp_path / "run", model=model, model_keys=model_keys + extra, root=root,
                                  method=method))
    return path


def pixels(arrays):
    """The images as the dataset gives them (float32 in [-1, 1], (3, H, W)), in float64 for the reference std."""
    return torch.stack([torch.from_numpy(a).permute(2, 0, 1).float().div(127.5).sub(1) for a in arrays]).double()


def test_data_std_is_torch_std_of_the_sample(folder):
    root, arrays = folder
    dataset = build_dataset(load_recipe(write_recipe(root.parent, root)).data)
    std, n = data_std(dataset)
    assert n == N_IMAGES and std == pytest.approx(float(pixels(arrays).std()), rel=1e-12)
    # fewer items than the dataset: a fixed, seeded sample, whatever torch's global random state
    torch.manual_seed(123)
    first = sample_indices(N_IMAGES, 4)
    state = torch.get_rng_state()
    std4, n4 = data_std(dataset, max_items=4)
    assert torch.equal(torch.get_rng_state(), state)  # training's randomness is untouched
    torch.manual_seed(7)
    assert sample_indices(N_IMAGES, 4) == first and len(set(first)) == 4 and n4 == 4
    assert std4 == pytest.approx(float(pixels([arrays[i] for i in first]).std()), rel=1e-12)


def test_absent_key_is_measured_for_few_step_methods_only(folder, tmp_path):
    root, arrays = folder
    expected = float(f"{float(pixels(arrays).std()):.4g}")
    recipe = load_recipe(write_recipe(tmp_path, root, "meanflow"))
    dataset = build_dataset(recipe.data)
    resolved, note = run_mod.resolve_skip_sigma_data(recipe, dataset, tmp_path / "run", SINGLE)
    assert "skip_sigma_data" not in recipe.model.kwargs  # the recipe itself is left as written
    assert resolved.model.kwargs["skip_sigma_data"] == expected
    assert note == f"skip_sigma_data = {expected:.4g}, measured over {N_IMAGES} images of image_folder {root}"
    net = run_mod.build_network(resolved, dataset.info)
    assert net.skip_sigma_data == expected and net.config["skip_sigma_data"] == expected
    assert yaml.safe_load(dump_recipe(resolved))["model"]["skip_sigma_data"] == expected
    assert "meanflow" in run_mod.MEASURED_SKIP_METHODS and "flow_matching" not in run_mod.MEASURED_SKIP_METHODS

    plain = load_recipe(write_recipe(tmp_path, root, "flow_matching"))
    resolved, note = run_mod.resolve_skip_sigma_data(plain, dataset, tmp_path / "run", SINGLE)
    assert resolved is plain and note is None
    assert run_mod.build_network(resolved, dataset.info).skip_sigma_data == 0.0


def test_explicit_values_kept_and_other_networks_untouched(folder, tmp_path, monkeypatch):
    root, _ = folder
    monkeypatch.setattr("selfe_cli.data.stats.data_std", lambda *a, **k: pytest.fail("measured"))
    for value in ("0.3", "0"):
        recipe = load_recipe(write_recipe(tmp_path, root, "meanflow"), [f"model.skip_sigma_data={value}"])
        resolved, note = run_mod.resolve_skip_sigma_data(recipe, None, tmp_path / "run", SINGLE)
        assert resolved.model.kwargs["skip_sigma_data"] == float(value) and note is None
    # a network without the option (the DiT): nothing measured, nothing added
    dit = load_recipe(write_recipe(tmp_path, root, "meanflow", model="dit", model_keys=DIT))
    resolved, note = run_mod.resolve_skip_sigma_data(dit, None, tmp_path / "run", SINGLE)
    assert resolved is dit and note is None and "skip_sigma_data" not in dump_recipe(resolved)


def test_resume_reads_the_recorded_value(folder, tmp_path, monkeypatch, capsys):
    """A run records the measured value (recipe.yaml, final/config.json); the rerun uses it without measuring."""
    root, arrays = folder
    path = write_recipe(tmp_path, root, "meanflow")
    run_mod.train_recipe(load_recipe(path, ["train.total_steps=1"]), progress=False, device="cpu")
    run = tmp_path / "run"
    value = yaml.safe_load((run / "recipe.yaml").read_text())["model"]["skip_sigma_data"]
    assert value == float(f"{float(pixels(arrays).std()):.4g}")
    assert json.loads((run / "final" / "config.json").read_text())["skip_sigma_data"] == value
    assert re.search(rf"^skip_sigma_data = {value:.4g}, measured over 6 images of", capsys.readouterr().out, re.M)

    monkeypatch.setattr("selfe_cli.data.stats.data_std", lambda *a, **k: pytest.fail("measured again on resume"))
    result = run_mod.train_recipe(load_recipe(path, ["train.total_steps=2"]), progress=False, device="cpu")
    assert result["resumed_from"] == 1 and result["step"] == 2
    assert "as recorded in" in capsys.readouterr().out
    assert json.loads((run / "final" / "config.json").read_text())["skip_sigma_data"] == value
    # bit-exact: the same weights as an uninterrupted run (which measures, in its own directory)
    monkeypatch.undo()
    whole = tmp_path / "whole"
    run_mod.train_recipe(load_recipe(path, [f"run.dir={whole}"]), progress=False, device="cpu")
    for name in ("model.safetensors", "ema-0.9.safetensors"):
        a, b = (load_file(str(d / "checkpoints" / "step-0000002" / name)) for d in (run, whole))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # an explicit value that differs from the recorded one is a changed recipe
    with pytest.raises(UserError, match="model.skip_sigma_data differs"):
        run_mod.train_recipe(load_recipe(path, ["model.skip_sigma_data=0.5"]), progress=False, device="cpu")


def test_run_started_before_the_key_keeps_its_network(folder, tmp_path, monkeypatch):
    """A run whose recipe.yaml records no skip_sigma_data (started before the default) resumes with 0."""
    root, _ = folder
    monkeypatch.setattr("selfe_cli.data.stats.data_std", lambda *a, **k: pytest.fail("measured"))
    recipe = load_recipe(write_recipe(tmp_path, root, "meanflow"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(dump_recipe(recipe))  # no skip_sigma_data key
    resolved, note = run_mod.resolve_skip_sigma_data(recipe, None, run, SINGLE)
    assert resolved is recipe and note is None
    run_mod.check_resume_compatible(run, resolved)
    explicit = load_recipe(write_recipe(tmp_path, root, "meanflow"), ["model.skip_sigma_data=data"])
    resolved, _ = run_mod.resolve_skip_sigma_data(explicit, None, run, SINGLE)
    with pytest.raises(UserError, match="model.skip_sigma_data differs"):
        run_mod.check_resume_compatible(run, resolved)


@pytest.mark.parametrize("value", ["-1", "foo", "true", ".inf", "[0.5]", "Data"])
def test_bad_values_refused_at_load(folder, tmp_path, value):
    root, _ = folder
    path = write_recipe(tmp_path, root, "meanflow", extra=f", skip_sigma_data: {value}")
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}: model.skip_sigma_data: expected a number >= 0")
    assert "'data'" in message


def test_dry_run_note(folder, tmp_path):
    from selfe_cli.cli.train_cmd import _skip_sigma_data_note

    root, _ = folder
    note = _skip_sigma_data_note(load_recipe(write_recipe(tmp_path, root, "meanflow")))
    assert note.startswith("model.skip_sigma_data: data (the default for method meanflow): measured when training")
    assert _skip_sigma_data_note(load_recipe(write_recipe(tmp_path, root, "flow_matching"))) is None
    assert _skip_sigma_data_note(load_recipe(write_recipe(tmp_path, root, "meanflow"),
                                             ["model.skip_sigma_data=0.25"])) is None
