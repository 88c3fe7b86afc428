"""Wiring: a recipe -> dataset, network, conditioner, method -> the training loop; run dir -> Generator."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml

from selfe_cli.errors import UserError
from selfe_cli.recipes.loader import MEASURED, SKIP_SIGMA_DATA_KEY, dump_recipe, load_resolved, recipe_to_dict
from selfe_cli.recipes.schema import ModelSpec, Recipe

# Keys that may change between the first run and a resumed one (they do not change the result).
RESUMABLE_CHANGES = {
    ("train", "total_steps"), ("train", "log_every_steps"), ("train", "checkpoint_every_steps"),
    ("train", "keep_checkpoints"), ("train", "sample_every_steps"), ("data", "num_workers"),
    ("train", "max_nonfinite_in_a_row"), ("train", "compile"), ("run", "name"), ("run", "dir"),
    ("train", "parallel"), ("train", "activation_checkpointing"),  # checkpoints are the same full tensors
    ("data", "max_bad_fraction"),  # bad files are skipped whatever the limit: it only decides when to stop
    ("train", "init_from"), ("train", "init_weights"),  # they start a new run only; a resume never re-reads them
}

# Methods whose network measures its input skip from the data (``model.skip_sigma_data: data``) when the recipe
# leaves the key out; every other method (flow_matching) keeps the network's default (0: off). Only networks with
# the option (the U-Nets) are concerned; the others are left as they are. The one place this default is decided.
MEASURED_SKIP_METHODS: tuple[str, ...] = (
    "meanflow", "selfe", "alphaflow", "imf", "sct", "ect", "shortcut", "imm", "tim",
)


def model_kwargs(recipe: Recipe, info: Any) -> dict[str, Any]:
    """The recipe's model kwargs, completed from the dataset where the recipe leaves them out."""
    from selfe_cli.models.registry import model_schema

    schema = model_schema(recipe.model.name)
    kwargs = dict(recipe.model.kwargs)
    if kwargs.get(SKIP_SIGMA_DATA_KEY) == MEASURED:  # not measured yet (checks on the meta device, --dry-run):
        kwargs[SKIP_SIGMA_DATA_KEY] = 1.0  # any value > 0 builds the same tensors; build_network needs the number
    if info is None:  # data not available (e.g. --dry-run before encoding latents): the recipe's values only
        return kwargs
    derived = {"in_channels": info.channels, "sample_size": info.resolution}
    if "condition" in schema and "condition" not in kwargs:
        derived["condition"] = "text" if info.has_captions else ("class" if info.num_classes else "none")
    if info.num_classes:
        derived["num_classes"] = info.num_classes
    for key, value in derived.items():
        if key in schema and key not in kwargs:
            kwargs[key] = value
    return kwargs


def build_network(recipe: Recipe, info: Any) -> torch.nn.Module:
    from selfe_cli.models.registry import build_model

    if recipe.model.kwargs.get(SKIP_SIGMA_DATA_KEY) == MEASURED:
        raise RuntimeError("model.skip_sigma_data: data is measured by resolve_skip_sigma_data before the network "
                           "is built")
    torch.manual_seed(recipe.run.seed)  # identical initialisation on every rank
    return build_model(recipe.model.name, **model_kwargs(recipe, info))


def skip_sigma_data_setting(recipe: Recipe) -> float | str | None:
    """What ``model.skip_sigma_data`` asks for: the recipe's own value, else ``"data"`` for a method in
    ``MEASURED_SKIP_METHODS``; None where the network has no such option or keeps its default (0: off)."""
    from selfe_cli.models.registry import model_schema

    if SKIP_SIGMA_DATA_KEY not in model_schema(recipe.model.name):
        return None
    if SKIP_SIGMA_DATA_KEY in recipe.model.kwargs:
        return recipe.model.kwargs[SKIP_SIGMA_DATA_KEY]
    return MEASURED if recipe.method.name in MEASURED_SKIP_METHODS else None


def _saved_recipe(run_dir: Path) -> dict[str, Any] | None:
    """The raw recipe a started run recorded (``run_dir/recipe.yaml``), or None for a new run."""
    saved_path = run_dir / "recipe.yaml"
    if not saved_path.is_file():
        return None
    saved = yaml.safe_load(saved_path.read_text())
    return saved if isinstance(saved, dict) else {}


def _recorded_skip_sigma_data(run_dir: Path) -> tuple[bool, Any]:
    """``(started, value)``: whether ``run_dir`` holds the recipe of a run already started, and the
    ``model.skip_sigma_data`` it records (None where it has none: a run started before the key existed)."""
    saved = _saved_recipe(run_dir)
    if saved is None:
        return False, None
    model = saved.get("model")
    return True, model.get(SKIP_SIGMA_DATA_KEY) if isinstance(model, dict) else None


def _describe_data(data: Any) -> str:
    return f"{data.name} {data.root}" if getattr(data, "root", None) else str(data.name)


def resolve_skip_sigma_data(recipe: Recipe, dataset: Any, run_dir: Path, dist: Any) -> tuple[Recipe, str | None]:
    """The recipe with ``model.skip_sigma_data: data`` (set, or the method's default) replaced by a number, and the
    line to log (None if nothing was resolved).

    A new run measures the training data's standard deviation (``selfe_cli.data.stats.data_std``: a fixed, seeded
    sample of at most 1024 items), rounded to 4 significant digits: that number builds the network and is what
    the run directory's ``recipe.yaml`` (and so ``final/config.json``) records. A started run (its ``recipe.yaml``
    exists) is never measured again: the recorded value is used, so a resume is bit-exact; a run started before
    the key existed records none and keeps the network's default (0). Rank 0 decides and broadcasts the value,
    so every rank of a torchrun builds the same network.
    """
    from selfe_cli.training.distributed import broadcast_float

    if skip_sigma_data_setting(recipe) != MEASURED:
        return recipe, None
    value, note = math.nan, None  # NaN: leave the recipe as it is
    if dist.is_main:
        started, recorded = _recorded_skip_sigma_data(run_dir)
        if not started:
            from selfe_cli.data.stats import data_std

            try:
                std, n = data_std(dataset)
            except UserError as err:
                raise UserError(f"{recipe.source}: {err}") from None
            value = float(f"{std:.4g}")
            kind = "latents" if getattr(dataset.info, "is_latent", False) else "images"
            note = f"skip_sigma_data = {value:.4g}, measured over {n} {kind} of {_describe_data(recipe.data)}"
        elif isinstance(recorded, (int, float)) and not isinstance(recorded, bool):
            value = float(recorded)
            note = f"skip_sigma_data = {value:.6g}, as recorded in {run_dir / 'recipe.yaml'} (not measured again)"
    value = broadcast_float(value, dist.device)
    if math.isnan(value):  # a run started without the key: its recipe decides (absent: 0; `data`: refused below)
        return recipe, None
    kwargs = {**recipe.model.kwargs, SKIP_SIGMA_DATA_KEY: value}
    return dataclasses.replace(recipe, model=ModelSpec(recipe.model.name, kwargs)), note


def _diff(a: Any, b: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            out += _diff(a.get(key), b.get(key), path + (str(key),))
        return out
    return [] if a == b else [path]


def check_resume_compatible(run_dir: Path, recipe: Recipe) -> None:
    saved = _saved_recipe(run_dir)
    if saved is None:
        return
    saved_path = run_dir / "recipe.yaml"
    current = yaml.safe_load(dump_recipe(recipe))
    changed = [p for p in _diff(saved, current) if p[:2] not in RESUMABLE_CHANGES and p[:1] != ("sample",)]
    if changed:
        key = ".".join(changed[0])
        raise UserError(f"{recipe.source}: {key} differs from the recipe that started {run_dir} "
                        f"({saved_path}); resume with the same recipe or start a new run with "
                        f"--set run.dir=<new dir>")


def grid_conditions(recipe: Recipe, dataset: Any, conditioner: Any, n: int) -> list[Any] | None:
    if conditioner.kind == "none":
        return None
    if recipe.sample.grid_prompts:
        prompts = list(recipe.sample.grid_prompts)
        return [prompts[i % len(prompts)] for i in range(n)]
    if conditioner.kind == "class":
        return [i % conditioner.num_classes for i in range(n)]
    return [dataset[i]["caption"] for i in range(n)]


def train_recipe(recipe: Recipe, *, progress: bool = True, device: str | None = None) -> dict[str, Any]:
    """Train (or resume) the run a recipe describes; returns a summary."""
    from selfe_cli.data import build_dataset, collate
    from selfe_cli.methods import build_method
    from selfe_cli.models.registry import make_conditioner
    from selfe_cli.sampling.generate import Generator, save_grid
    from selfe_cli.training.distributed import barrier, cleanup, init_distributed
    from selfe_cli.training.init_from import apply_init_from, check_init_from
    from selfe_cli.training.loop import training_loop

    dist = init_distributed(device)
    try:
        run_dir = Path(recipe.run.dir)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                dataset = build_dataset(recipe.data, split="train")
        except UserError as err:  # name the recipe file as well as the key
            raise UserError(f"{recipe.source}: {err}") from None
        for w in caught:  # the dataset's own notes (e.g. skipped files) as one line each, on rank 0
            if issubclass(w.category, UserWarning) and "selfe_cli" in Path(w.filename).parts:
                if dist.is_main:
                    print(f"warning: {' '.join(str(w.message).split())}", file=sys.stderr, flush=True)
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        info = dataset.info
        recipe, skip_note = resolve_skip_sigma_data(recipe, dataset, run_dir, dist)
        if skip_note and dist.is_main:
            print(skip_note, flush=True)
        if dist.is_main:
            check_resume_compatible(run_dir, recipe)
            check_init_from(recipe, info, run_dir)  # a new run's train.init_from, before anything is written
            run_dir.mkdir(parents=True, exist_ok=True)
            from selfe_cli.training.checkpoint import atomic_write_text

            atomic_write_text(run_dir / "recipe.yaml", dump_recipe(recipe))
        barrier()
        net = build_network(recipe, info)
        init_note = apply_init_from(recipe, net, run_dir, dist.is_main)  # new runs only: resuming never re-applies it
        if init_note and dist.is_main and progress:
            print(f"note: {init_note}", flush=True)
        conditioner = make_conditioner(net, info)
        if hasattr(conditioner, "to"):  # frozen text encoders live on the training device
            conditioner.to(dist.device)
        method = build_method(recipe.method.name, recipe.method.config)
        if hasattr(method, "describe_jvp"):  # refuses an impossible jvp_mode before any step runs
            from selfe_cli.methods.jvp import has_active_dropout

            plan = method.describe_jvp(sharded=recipe.train.parallel == "fsdp" and dist.enabled,
                                       compiled=recipe.train.compile, device=str(dist.device),
                                       precision=recipe.train.precision, dropout=has_active_dropout(net.train()))
            if dist.is_main and progress:
                print(f"jvp: {plan}")
        vae = None
        if info.is_latent and info.vae:
            from selfe_cli.data.latents import load_vae

            vae = load_vae(info.vae).to(dist.device).eval()

        grid_n = recipe.sample.grid_size
        conds = grid_conditions(recipe, dataset, conditioner, grid_n)

        def sample_fn(ema_net: torch.nn.Module, step: int) -> Path:
            gen = Generator(ema_net, conditioner, sampler_defaults=method.sampler_defaults(),
                            sample_cfg=recipe.sample, in_channels=info.channels, resolution=info.resolution,
                            vae=vae, name=recipe.run.name, device=dist.device)
            seeds = [recipe.sample.seed * 100_000 + i for i in range(grid_n)]
            images = gen.generate(conds, seeds)
            path = save_grid(images, run_dir / "samples" / f"step-{step:07d}.png")
            if conds is not None and step == recipe.train.total_steps:
                (run_dir / "samples" / "prompts.txt").write_text("".join(f"{c}\n" for c in conds))
            return path

        recipe_hash = hashlib.sha256(json.dumps(recipe_to_dict(recipe), sort_keys=True).encode()).hexdigest()[:16]
        t = recipe.train
        return training_loop(
            run_dir=run_dir, net=net, method=method, dataset=dataset, collate=collate, conditioner=conditioner,
            dist=dist, seed=recipe.run.seed, total_steps=t.total_steps, batch_size=t.batch_size,
            grad_accum_rounds=t.grad_accum_rounds, optimizer=t.optimizer, lr=t.lr, betas=tuple(t.betas), eps=t.eps,
            weight_decay=t.weight_decay, warmup_steps=t.warmup_steps, lr_schedule=t.lr_schedule,
            final_lr=t.final_lr, grad_clip=t.grad_clip, ema_decays=tuple(t.ema_decays), precision=t.precision,
            compile=t.compile, parallel=t.parallel, activation_checkpointing=t.activation_checkpointing,
            num_workers=recipe.data.num_workers, log_every_steps=t.log_every_steps,
            checkpoint_every_steps=t.checkpoint_every_steps, keep_checkpoints=t.keep_checkpoints,
            sample_every_steps=t.sample_every_steps, max_nonfinite_in_a_row=t.max_nonfinite_in_a_row,
            sample_fn=sample_fn, progress=progress, run_state={"recipe_sha256": recipe_hash},
        )
    finally:
        cleanup()


def _weights_path(ckpt: Path, weights: str, first_decay: float) -> Path:
    """The file ``--weights`` names in a checkpoint: ``model``, ``ema`` (the recipe's first decay) or a decay."""
    from selfe_cli.training import checkpoint as ckpt_io

    found = ckpt_io.ema_files(ckpt)
    if weights == "model":
        return ckpt / "model.safetensors"
    if weights == "ema":
        if first_decay in found or not found:  # a missing file is reported by the verification
            return ckpt / f"ema-{first_decay:g}.safetensors"
        return next(iter(found.values()))
    try:
        return found[float(weights)]
    except (ValueError, KeyError):
        raise UserError(f"--weights {weights}: expected 'ema', 'model' or one of the EMA decays "
                        f"{', '.join(f'{d:g}' for d in found)}") from None


def build_for_sampling(run_dir: Path, *, weights: str = "ema", device: torch.device) -> Any:
    """A Generator from a run directory: its resolved recipe and the latest checkpoint's weights."""
    from selfe_cli.data import dataset_info
    from selfe_cli.methods import build_method
    from selfe_cli.models.registry import make_conditioner
    from selfe_cli.sampling.generate import Generator
    from selfe_cli.training import checkpoint as ckpt_io

    recipe = load_resolved(run_dir)
    info = dataset_info(recipe.data)
    net = build_network(recipe, info)
    ckpt_root = run_dir / "checkpoints"
    candidates = ckpt_io.list_checkpoints(ckpt_root)[::-1]
    if not candidates:
        raise UserError(f"{run_dir}: no checkpoint yet (train it with `selfe train {run_dir / 'recipe.yaml'}`)")
    problems = []
    for ckpt in candidates:  # newest first; only the weights file to load (and state.json) is verified
        path = _weights_path(ckpt, weights, recipe.train.ema_decays[0])
        problem = ckpt_io.verify_checkpoint(ckpt, files=[path.name])
        if problem is None:
            break
        problems.append((ckpt, problem))
    else:
        raise UserError(f"{ckpt_root}: no intact checkpoint to sample from "
                        f"({'; '.join(f'{p.name}: {why}' for p, why in problems[:3])})")
    for damaged, why in problems:
        print(f"warning: checkpoint {damaged} is damaged ({why}); sampling from {ckpt.name}", file=sys.stderr,
              flush=True)
    net.load_state_dict(ckpt_io.load_weights(path), strict=True)
    if hasattr(net, "drop_v_head"):  # sampling needs u only (iMF's auxiliary v-head is a training device)
        net.drop_v_head()
    net = net.to(device).eval().requires_grad_(False)
    conditioner = make_conditioner(net, info)
    if hasattr(conditioner, "to"):
        conditioner.to(device)
    method = build_method(recipe.method.name, recipe.method.config)
    vae = None
    if info.is_latent and info.vae:
        from selfe_cli.data.latents import load_vae

        vae = load_vae(info.vae).to(device).eval()
    return Generator(net, conditioner, sampler_defaults=method.sampler_defaults(), sample_cfg=recipe.sample,
                     in_channels=info.channels, resolution=info.resolution, vae=vae,
                     name=recipe.run.name or run_dir.name, device=device)
