"""User mistakes: one line on stderr, exit code 2, no traceback."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
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


# ---------------------------------------------------------------------------------------------
# Issue 11: nothing a user types ends in a traceback. These run the real CLI in-process (`run_app`, the
# function `selfe` calls), so each case costs milliseconds after the first; the import test uses a
# subprocess because it inspects a fresh interpreter.
# ---------------------------------------------------------------------------------------------
MISSING = "no/such/path"


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under root with its size and mtime (ns): what a failed command must leave unchanged."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size if p.is_file() else 0, st.st_mtime_ns)
    return out


def run_inprocess(args, cwd: Path, monkeypatch, capsys) -> tuple[int, str, str]:
    """`selfe ARGS` in this process, from ``cwd``; (exit code, stdout, stderr)."""
    from selfe_cli.cli import commands  # noqa: F401 - registers the commands
    from selfe_cli.cli.app import run_app

    monkeypatch.chdir(cwd)
    capsys.readouterr()
    try:
        run_app([str(a) for a in args])
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(args, cwd: Path, monkeypatch, capsys, words=()) -> str:
    """Exit code 2, exactly one line on stderr naming ``words``, no traceback, nothing written or deleted."""
    before = _snapshot(cwd)
    code, out, err = run_inprocess(args, cwd, monkeypatch, capsys)
    lines = err.strip().splitlines()
    assert code == 2, (code, out, err)
    assert len(lines) == 1, err
    assert "Traceback" not in out + err
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert _snapshot(cwd) == before, "a failed command changed the directory"
    return lines[0]


@pytest.fixture
def work(tmp_path):
    """A working directory with a recipe to break, a file (where folders are expected) and a fake run."""
    (tmp_path / "a_file").write_text("not a folder\n")
    return tmp_path


def _fake_run(root: Path, recipe: str = "tiny", overrides=()) -> Path:
    """A run directory with only its resolved recipe.yaml (no checkpoint): enough for the checks before loading."""
    from selfe_cli.recipes.loader import dump_recipe, load_recipe

    source = Path(__file__).parent / "tiny_recipe.yaml" if recipe == "tiny" else recipe
    rec = load_recipe(source, list(overrides), check_network=False)
    run = root / "runs" / f"fake_{Path(str(recipe)).stem}"
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text(dump_recipe(rec))
    return run


SECTION_NOT_MAPPING = [
    *[(f"{section}: 5\n", [section, "expected a mapping", "got 5"])
      for section in ("run", "model", "data", "method", "train", "sample")],
    ("model: {name: unet}\ntrain: [1, 2]\n", ["train", "expected a mapping"]),
    ("model: {name: unet}\nsample: just text\n", ["sample", "expected a mapping"]),
    ("- model\n- train\n", ["expected a mapping of sections"]),
    ("42\n", ["expected a mapping of sections"]),
    ("", ["model.name", "required"]),
    ("model: {name: unet\n", ["invalid YAML", "line"]),
    ("model:\n  name: unet\n    channels: 3\n", ["invalid YAML", "line"]),
    ("model: {name: [unet]}\n", ["model.name", "expected a model name"]),
    ("model: {name: unet}\nmethod: {name: {a: 1}}\n", ["method.name", "expected a method name"]),
]


@pytest.mark.parametrize("recipe_text, words", SECTION_NOT_MAPPING)
def test_recipe_shape_mistakes(work, monkeypatch, capsys, recipe_text, words):
    (work / "bad.yaml").write_text(recipe_text)
    line = assert_user_error(["train", "bad.yaml", "--dry-run"], work, monkeypatch, capsys, ["bad.yaml", *words])
    assert line.startswith("error: bad.yaml: ")


def test_recipe_not_text(work, monkeypatch, capsys):
    (work / "bad.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    assert_user_error(["train", "bad.yaml", "--dry-run"], work, monkeypatch, capsys, ["bad.yaml", "not a text file"])


UNTRAINABLE = [
    # non-finite numbers, anywhere
    ("train: {lr: .inf}", ["train.lr", "finite"]),
    ("train: {lr: .nan}", ["train.lr", "finite"]),
    ("train: {grad_clip: -.inf}", ["train.grad_clip", "finite"]),
    ("train: {ema_decays: [0.9, .nan]}", ["train.ema_decays[1]", "finite"]),
    ("sample: {shift: .inf}", ["sample.shift", "finite"]),
    ("method: {name: selfe, t_mean: .nan}", ["method.t_mean", "finite"]),
    ("method: {name: flow_matching, time_sampler: {mean: .inf}}", ["method.time_sampler.mean", "finite"]),
    ("method: {name: meanflow, guidance: {w: .inf}}", ["method.guidance.w", "finite"]),
    ("model: {name: unet, dropout: .nan}", ["model.dropout", "finite"]),
    ("model: {name: unet, time_scale: .inf}", ["model.time_scale", "finite"]),
    # floats where integers are expected
    ("train: {total_steps: 1e30}", ["train.total_steps", "expected an integer"]),
    ("train: {total_steps: 1.0e+30}", ["train.total_steps", "expected an integer"]),
    ("train: {batch_size: 2.5}", ["train.batch_size", "expected an integer"]),
    ("train: {total_steps: .inf}", ["train.total_steps", "expected an integer"]),
    ("data: {size: 1e300}", ["data.size", "expected an integer"]),
    ("model: {name: unet, model_channels: 32.5}", ["model.model_channels", "expected an integer"]),
    ("model: {name: unet, num_blocks: 1e20}", ["model.num_blocks", "expected an integer"]),
    ("run: {seed: 100000000000000000000000}", ["run.seed", "integer"]),
    # absurd sizes
    ("train: {total_steps: 100000000000}", ["train.total_steps", "<="]),
    ("train: {batch_size: 1000000000}", ["train.batch_size", "<="]),
    ("sample: {steps: 10000000}", ["sample.steps", "<="]),
    ("data: {name: image_folder, root: x, resolution: 1000000}", ["data.resolution", "<="]),
    ("model: {name: unet, model_channels: 100000}", ["model", "parameters"]),
    ("model: {name: dit, hidden_size: 1000000, num_heads: 1}", ["model", "parameters"]),
    ("model: {name: unet, sample_size: 100000}", ["model.sample_size", "at most"]),
    # model kwargs the constructor rejects, or that build an empty or inert network
    ("model: {name: unet, model_channels: 0}", ["model.model_channels", ">= 1"]),
    ("model: {name: unet, model_channels: -8}", ["model.model_channels", ">= 1"]),
    ("model: {name: unet, channel_mult: []}", ["model.channel_mult", "at least one level"]),
    ("model: {name: unet, channel_mult: [1, 0]}", ["model.channel_mult", ">= 1"]),
    ("model: {name: unet, num_heads: 0}", ["model.num_heads", ">= 1"]),
    ("model: {name: unet, num_heads: 3}", ["model.num_heads", "divisible"]),
    ("model: {name: unet, emb_mult: 0}", ["model.emb_mult", ">= 1"]),
    ("model: {name: unet, time_freq_dim: 0}", ["model.time_freq_dim", ">= 2"]),
    ("model: {name: unet, time_scale: 0}", ["model.time_scale", "> 0"]),
    ("model: {name: unet, dropout: 1.5}", ["model.dropout", "[0, 1)"]),
    ("model: {name: unet, num_blocks: -1}", ["model.num_blocks", ">= 0"]),
    ("model: {name: unet, model_channels: 3}", ["model.model_channels", "GroupNorm"]),
    ("model: {name: unet, sample_size: 30}", ["model.sample_size", "divisible"]),
    ("model: {name: unet, channel_mult: [1, 2, 2, 2, 2, 2, 2]}", ["model.channel_mult", "divisible"]),
    ("model: {name: unet, condition: class}", ["model.num_classes", ">= 1"]),
    ("model: {name: unet, condition: text, text_heads: 3}", ["model.text_heads", "multiple of text_heads"]),
    ("model: {name: DiT-tiny/2, sample_size: 33}", ["model.sample_size", "patch_size"]),
    ("model: {name: dit, hidden_size: 100, num_heads: 3}", ["model.", "divisible by num_heads 3"]),
    ("model: {name: dit, depth: 0}", ["model.depth", ">= 1"]),
    ("model: {name: mmdit, depth_double: 0, depth_single: 0}", ["model.depth_", "at least one block"]),
    ("model: {name: mlp, width: 0}", ["model.width", ">= 1"]),
    # other values that cannot train
    ("train: {betas: [1.5, 0.9]}", ["train", "betas"]),
    ("train: {batch_size: 64, grad_accum_rounds: 3}", ["train", "grad_accum_rounds"]),
    ("train: {batch_size: 2, grad_accum_rounds: 4}", ["train", "grad_accum_rounds"]),
]


@pytest.mark.parametrize("snippet, words", UNTRAINABLE)
def test_untrainable_values_refused_at_load(work, monkeypatch, capsys, snippet, words):
    text = snippet + "\n"
    if not snippet.startswith("model:"):
        text = "model: {name: unet}\n" + text
    (work / "bad.yaml").write_text(text)
    assert_user_error(["train", "bad.yaml", "--dry-run"], work, monkeypatch, capsys, ["bad.yaml", *words])


@pytest.mark.parametrize("override, words", [
    ("train.lr=.inf", ["train.lr", "finite"]),
    ("train.total_steps=1e30", ["train.total_steps", "integer"]),
    ("model.model_channels=0", ["model.model_channels"]),
    ("model.channel_mult=[]", ["model.channel_mult"]),
    ("model=5", ["model", "expected a mapping"]),
    ("sample=[1]", ["sample", "expected a mapping"]),
])
def test_untrainable_overrides(work, monkeypatch, capsys, override, words):
    assert_user_error(["train", "quickstart", "--dry-run", "--set", override], work, monkeypatch, capsys, words)


def test_untrainable_refused_without_dry_run_before_writing(work, monkeypatch, capsys):
    (work / "bad.yaml").write_text("model: {name: unet, channel_mult: []}\nrun: {dir: runs/bad}\n")
    assert_user_error(["train", "bad.yaml"], work, monkeypatch, capsys, ["model.channel_mult"])
    assert not (work / "runs").exists()


def _no_cuda() -> bool:
    import torch

    return not torch.cuda.is_available()


def _device_commands(work: Path) -> list[list[str]]:
    """Every command that takes --device, with paths that pass the checks made before the device's."""
    run = str(_fake_run(work))
    np.savez(work / "ref.npz", mu=np.zeros(4), sigma=np.eye(4))
    return [
        ["train", "quickstart", "--dry-run"],
        ["train", "quickstart"],
        ["sample", "a red cube", "--ckpt", run],
        ["eval", "fid", "--ref", "ref.npz", "--ckpt", run],
        ["eval", "fid-ref", "shapes", "--out", "stats.npz"],
        ["eval", "geneval", "--suite", "shapes", "--ckpt", run],
        ["encode-latents", str(work), "latents"],
    ]


@pytest.mark.parametrize("index", range(7))
@pytest.mark.parametrize("device", ["tpu", "gpu", "cuda:x", ""])
def test_device_unknown(work, monkeypatch, capsys, index, device):
    args = _device_commands(work)[index]
    assert_user_error([*args, "--device", device], work, monkeypatch, capsys, ["--device", "expected"])


@pytest.mark.skipif(not _no_cuda(), reason="this machine has CUDA")
@pytest.mark.parametrize("index", range(7))
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_device_cuda_without_cuda(work, monkeypatch, capsys, index, device):
    args = _device_commands(work)[index]
    # train takes cpu or cuda (each torchrun process uses its LOCAL_RANK GPU): cuda:1 is refused as a form
    words = ["--device", "expected cpu or cuda" if args[0] == "train" and device == "cuda:1" else "CUDA is not available"]
    assert_user_error([*args, "--device", device], work, monkeypatch, capsys, words)


@pytest.fixture
def no_heavy_loading(monkeypatch):
    """Fail the test if a command gets as far as loading a detector, a feature network or a generator."""
    from selfe_cli.cli import eval_cmd
    from selfe_cli.evaluation import features
    from selfe_cli.sampling import generate

    def boom(*args, **kwargs):
        raise AssertionError("loaded something heavy before checking the user's paths")

    monkeypatch.setattr(eval_cmd, "_build_detector", boom)
    monkeypatch.setattr(eval_cmd, "_load_generator", boom)
    monkeypatch.setattr(features, "inception_features", boom)
    monkeypatch.setattr(generate.Generator, "from_run", boom)


def _path_cases(run: str) -> list[tuple[list[str], list[str]]]:
    return [
        (["eval", "geneval", "--images", MISSING], ["--images", MISSING, "not found"]),
        (["eval", "geneval", "--images", "a_file"], ["--images", "not a folder"]),
        (["eval", "geneval", "--images", ".", "--detector-path", MISSING], ["--detector-path", "not found"]),
        (["eval", "geneval", "--images", ".", "--clip-path", MISSING], ["--clip-path", "not found"]),
        (["eval", "geneval", "--images", ".", "--out", "a_file/x"], ["--out", "a_file"]),
        (["eval", "geneval", "--ckpt", MISSING], ["--ckpt", MISSING]),
        (["eval", "geneval", "--suite", "shapes", "--ckpt", run, "--out", "a_file"], ["--out", "not a folder"]),
        (["eval", "geneval", "--suite", "shapes", "--ckpt", run, "--steps", "1,x"], ["--steps"]),
        (["eval", "geneval", "--suite", "shapes", "--ckpt", run, "--steps", "10000000"], ["--steps", "<="]),
        (["eval", "fid", "--ref", MISSING, "--ckpt", run], ["--ref", "not found"]),
        (["eval", "fid", "--ref", "ref.npz", "--ckpt", MISSING], ["--ckpt", MISSING]),
        (["eval", "fid", "--ref", "ref.npz", "--ckpt", run, "--inception-weights", MISSING],
         ["--inception-weights", "not found"]),
        (["eval", "fid", "--ref", "ref.npz", "--ckpt", run, "--save-png", "a_file/png"], ["--save-png", "a_file"]),
        (["eval", "fid", "--ref", "ref.npz", "--ckpt", run, "--save-npz", "a_file/s.npz"], ["--save-npz", "a_file"]),
        (["eval", "fid", "--ref", "ref.npz", "--ckpt", run, "--out", "a_file"], ["--out", "not a folder"]),
        (["eval", "fid-ref", "shapes", "--out", "a_file/stats.npz"], ["--out", "a_file"]),
        (["eval", "fid-ref", "shapes", "--out", "."], ["--out", "is a folder"]),
        (["eval", "fid-ref", "shapes", "--inception-weights", MISSING], ["--inception-weights", "not found"]),
        (["sample", "a red cube", "--ckpt", run, "--out", "a_file"], ["--out", "not a folder"]),
        (["sample", "a red cube", "--ckpt", run, "--out", "a_file/sub"], ["--out", "a_file"]),
        (["sample", "a red cube", "--ckpt", run, "--r-mode", "sideways"], ["--r-mode"]),
        (["encode-latents", MISSING, "out"], ["SOURCE_DIR", "not a folder"]),
        (["encode-latents", ".", "a_file"], ["OUT_DIR", "not a folder"]),
    ]


@pytest.mark.parametrize("index", range(23))
def test_paths_checked_before_loading(work, monkeypatch, capsys, no_heavy_loading, index):
    run = _fake_run(work)
    np.savez(work / "ref.npz", mu=np.zeros(4), sigma=np.eye(4))
    args, words = _path_cases(str(run))[index]
    assert_user_error(args, work, monkeypatch, capsys, words)


@pytest.mark.parametrize("content, words", [
    (b"PK\x03\x04 truncated zip", ["not a readable .npz", "BadZipFile"]),
    (b"\x93NUMPY garbage", ["not a readable .npz"]),
    (b"", ["not a readable .npz"]),
    (b"just text\n", ["not a readable .npz"]),
    ("npy", ["not an .npz"]),
    ("no_sigma", ["'mu' and 'sigma'"]),
    ("nan", ["NaN"]),
])
def test_corrupt_reference_statistics(work, monkeypatch, capsys, no_heavy_loading, content, words):
    run = _fake_run(work)
    ref = work / "ref.npz"
    if content == "npy":
        with open(ref, "wb") as fh:
            np.save(fh, np.zeros(4))
    elif content == "no_sigma":
        np.savez(ref, mu=np.zeros(4))
    elif content == "nan":
        np.savez(ref, mu=np.full(4, np.nan), sigma=np.eye(4))
    else:
        ref.write_bytes(content)
    assert_user_error(["eval", "fid", "--ref", "ref.npz", "--ckpt", run], work, monkeypatch, capsys,
                      ["ref.npz", *words])


@pytest.mark.parametrize("content", [b"not a pickle at all", b"PK\x03\x04 truncated", b"", b"\x80\x04\x95garbage"])
@pytest.mark.parametrize("command", ["fid", "fid-ref"])
def test_corrupt_inception_weights(work, monkeypatch, capsys, content, command):
    run = _fake_run(work)
    np.savez(work / "ref.npz", mu=np.zeros(4), sigma=np.eye(4))
    (work / "weights.pth").write_bytes(content)
    args = (["eval", "fid", "--ref", "ref.npz", "--ckpt", run] if command == "fid"
            else ["eval", "fid-ref", "shapes", "--out", "stats.npz", "--n", "4"])
    assert_user_error([*args, "--inception-weights", "weights.pth", "--device", "cpu"], work, monkeypatch, capsys,
                      ["--inception-weights", "weights.pth", "not the torch-fidelity Inception-v3 weights"])


GUIDED = ["method.guidance.w=1.0", "method.guidance.kappa=0.5"]  # as the recipe has it: active


@pytest.mark.parametrize("args", [
    ["sample", "a red cube", "--cfg", "2"],
    ["eval", "fid", "--ref", "ref.npz", "--cfg", "2"],
    ["eval", "geneval", "--suite", "shapes", "--cfg", "1.5"],
])
def test_cfg_on_trained_in_guidance_refused(work, monkeypatch, capsys, no_heavy_loading, args):
    run = _fake_run(work, "quickstart_meanflow", GUIDED)
    np.savez(work / "ref.npz", mu=np.zeros(4), sigma=np.eye(4))
    assert_user_error([*args, "--ckpt", run], work, monkeypatch, capsys,
                      ["--cfg", "guidance trained into the network", "--force-cfg"])


def test_cfg_on_trained_in_guidance_forced(work, monkeypatch, capsys):
    run = _fake_run(work, "quickstart_meanflow", GUIDED)
    # --force-cfg passes the check; this fake run then fails for its missing checkpoint, not for the cfg
    line = assert_user_error(["sample", "a red cube", "--cfg", "2", "--force-cfg", "--ckpt", run, "--device", "cpu"],
                             work, monkeypatch, capsys, ["no checkpoint"])
    assert "--force-cfg" not in line and "twice" not in line
    # without guidance in the target (w = 1, kappa = 0), --cfg is fine
    plain = _fake_run(work, "tiny")
    assert_user_error(["sample", "a red cube", "--cfg", "2", "--ckpt", plain, "--device", "cpu"],
                      work, monkeypatch, capsys, ["no checkpoint"])


def test_recipe_cfg_scale_on_trained_in_guidance_refused(work, monkeypatch, capsys):
    assert_user_error(["train", "quickstart_meanflow", "--dry-run", "--set", "sample.cfg_scale=2"], work,
                      monkeypatch, capsys, ["sample.cfg_scale", "twice"])


@pytest.mark.parametrize("args, words", [
    (["sample", "--bogus"], ["selfe sample", "--bogus"]),
    (["sample", "--steps", "0"], ["--steps"]),
    (["sample", "--steps", "100000000000"], ["--steps"]),
    (["sample", "--seed", "100000000000000000000000"], ["--seed"]),
    (["sample", "--cfg", "lots"], ["--cfg"]),
    (["train"], ["selfe train", "recipe"]),
    (["eval", "fid"], ["--ref"]),
    (["eval", "geneval", "--seed", "-1"], ["--seed"]),
    (["no-such-command"], ["no-such-command"]),
])
def test_usage_errors_are_one_line(work, monkeypatch, capsys, args, words):
    assert_user_error(args, work, monkeypatch, capsys, words)


def test_help_and_recipe_errors_import_no_heavy_library(tmp_path):
    """`selfe --help` and a misspelt recipe key are answered without torch, diffusers or transformers."""
    (tmp_path / "bad.yaml").write_text("model: {name: unet}\ntrain: {lrr: 1}\n")
    (tmp_path / "bad_meanflow.yaml").write_text("model: {name: unet}\nmethod: {name: meanflow, jvp_mode: fast}\n")
    heavy = ["torch", "diffusers", "transformers", "open_clip", "torchvision", "matplotlib", "tensorboard", "scipy"]
    script = (
        "import sys\n"
        "from selfe_cli.cli import commands\n"
        "from selfe_cli.cli.app import run_app\n"
        "try:\n"
        "    run_app(sys.argv[1:])\n"
        "except SystemExit as e:\n"
        "    print('exit', e.code, file=sys.stderr)\n"
        f"print('HEAVY:' + ' '.join(m for m in {heavy!r} if m in sys.modules))\n"
    )
    for args in (["--help"], ["train", "--help"], ["eval", "fid", "--help"], ["train", "bad.yaml", "--dry-run"],
                 ["train", "bad.yaml", "--dry-run", "--set", "sample.steps=0"],
                 ["train", "bad_meanflow.yaml", "--dry-run"]):
        proc = subprocess.run([sys.executable, "-c", script, *args], cwd=tmp_path, capture_output=True, text=True,
                              timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert "Traceback" not in proc.stderr, proc.stderr
        loaded = [line for line in proc.stdout.splitlines() if line.startswith("HEAVY:")]
        assert loaded == ["HEAVY:"], (args, loaded)
    assert "method.jvp_mode" in proc.stderr


def test_dry_run_names_the_jvp_route_and_refuses_an_impossible_one(work, monkeypatch, capsys):
    """MeanFlow's --dry-run says which forward-mode route runs; single_pass under torch.compile is refused."""
    code, out, err = run_inprocess(["train", "quickstart_meanflow", "--dry-run", "--device", "cpu"], work,
                                   monkeypatch, capsys)
    route = next(line for line in out.splitlines() if line.startswith("# jvp:"))
    assert code in (0, None) and route.startswith("# jvp: single_pass (one pass") and "dropout" not in route, out
    code, out, err = run_inprocess(["train", "cifar10_meanflow", "--dry-run", "--device", "cpu"], work,
                                   monkeypatch, capsys)  # the CIFAR-10 U-Net has dropout 0.2
    assert "# jvp: single_pass (" in out and "dropout mask drawn once" in out, out
    code, out, err = run_inprocess(["train", "quickstart_meanflow", "--dry-run", "--device", "cpu",
                                    "--set", "train.compile=true"], work, monkeypatch, capsys)
    assert "# jvp: two_pass (torch.compile" in out, out
    assert_user_error(["train", "quickstart_meanflow", "--dry-run", "--set", "train.compile=true",
                       "--set", "method.jvp_mode=single_pass"], work, monkeypatch, capsys, ["method.jvp_mode"])
