"""`selfe eval fid | fid-ref | geneval`: FID-50K, reference statistics, GenEval (docs/methods.md §6), step sweeps."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from selfe_cli.cli.app import app, table_console
from selfe_cli.errors import UserError
from selfe_cli.recipes.schema import MAX_SEED

eval_app = typer.Typer(help="Evaluate trained models: FID-50K, GenEval (real or shapes suite), step sweeps.",
                       no_args_is_help=True)
app.add_typer(eval_app, name="eval")

console = table_console()
err_console = Console(stderr=True)

StepsOpt = Annotated[str, typer.Option(help="Comma-separated step counts, e.g. 1,2,4,50: one row per count.")]
CkptOpt = Annotated[list[str] | None, typer.Option(
    "--ckpt", help="Run directory (repeatable to compare models). Default: the most recent run under ./runs.")]
DeviceOpt = Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N (default: cuda when available).")]
ForceCfgOpt = Annotated[bool, typer.Option(
    "--force-cfg", help="Apply --cfg even to runs whose guidance is trained into the network (MeanFlow "
                        "method.guidance), which guides twice.")]


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=err_console, transient=True)


def _run_dirs(ckpts: list[str] | None) -> list[Path]:
    from selfe_cli.sampling.generate import resolve_run_dir

    return [resolve_run_dir(c) for c in ckpts] if ckpts else [resolve_run_dir(None)]


def _model_names(runs: list[Path]) -> list[str]:
    names = [r.name for r in runs]
    if len(set(names)) < len(names):  # same basename in different places: use the full path
        names = [str(r) for r in runs]
    return names


def _load_generator(run: Path, weights: str, device: str | None):
    from selfe_cli.sampling.generate import Generator

    return Generator.from_run(run, weights=weights, device=device)


def _default_out(runs: list[Path], suite: str) -> Path:
    return runs[0] / "eval" / suite


def _check_cfg(runs: list[Path], cfg: float | None, force_cfg: bool) -> None:
    from selfe_cli.cli.checks import check_sampling_cfg

    for run in runs:
        check_sampling_cfg(run, cfg, force_cfg)


# ---------------------------------------------------------------------------------------------
# FID
# ---------------------------------------------------------------------------------------------
@eval_app.command("fid")
def fid_cmd(
    ref: Annotated[Path, typer.Option(help="Reference statistics .npz with 'mu' and 'sigma' (from `selfe eval fid-ref`, EDM, clean-fid or TTUR).")],
    ckpt: CkptOpt = None,
    n: Annotated[int, typer.Option(min=2, help="Number of generated images (FID-50K: 50000).")] = 50_000,
    steps: StepsOpt = "1",
    batch_size: Annotated[int, typer.Option(min=1, help="Images per generation / feature batch.")] = 250,
    cfg: Annotated[float | None, typer.Option(min=0.0, help="Classifier-free guidance scale. Default: the recipe's.")] = None,
    seed_offset: Annotated[int, typer.Option(min=0, max=MAX_SEED, help="Image i uses noise seed seed_offset + i.")] = 0,
    save_png: Annotated[Path | None, typer.Option(help="Also save every generated image as PNG under this folder.")] = None,
    save_npz: Annotated[Path | None, typer.Option(help="Also save the generated statistics (mu, sigma) to this .npz.")] = None,
    inception_weights: Annotated[Path | None, typer.Option(help="Local copy of torch-fidelity's weights-inception-2015-12-05-6726825d.pth (offline use).")] = None,
    out: Annotated[Path | None, typer.Option(help="Folder for sweep.json/csv/png. Default: <run>/eval/fid/.")] = None,
    weights: Annotated[str, typer.Option(help="'ema' (default), 'model', or an EMA decay.")] = "ema",
    device: DeviceOpt = None,
    force_cfg: ForceCfgOpt = False,
) -> None:
    """FID of generated images against reference statistics, at one or several step counts."""
    from selfe_cli.cli.checks import check_device, existing_file, output_dir, output_file
    from selfe_cli.evaluation.sweep import SweepRow, parse_steps, sweep_table, write_sweep

    # what the user typed, before anything heavy: steps, paths, runs, the reference, the device
    step_list = parse_steps(steps)
    existing_file(ref, "--ref", "reference statistics .npz with 'mu' and 'sigma'")
    existing_file(inception_weights, "--inception-weights", "torch-fidelity's weights-inception-2015-12-05-6726825d.pth")
    output_dir(save_png, "--save-png")
    output_file(save_npz, "--save-npz", "an .npz file path")
    output_dir(out, "--out")
    runs = _run_dirs(ckpt)
    names = _model_names(runs)
    if out is None:
        output_dir(_default_out(runs, "fid"), "--out")
    _check_cfg(runs, cfg, force_cfg)
    from selfe_cli.evaluation.fid import (
        fid_against,
        generated_stats,
        init_distributed_from_env,
        load_stats,
        rank_world,
        save_stats,
    )

    ref_mu, ref_sigma = load_stats(ref)
    device = check_device(device)
    import torch

    from selfe_cli.evaluation.features import inception_features

    distributed = init_distributed_from_env()
    rank, world = rank_world()
    if distributed and torch.cuda.is_available():
        device = device or f"cuda:{torch.cuda.current_device()}"
    features = inception_features(inception_weights, device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if ref_mu.shape[0] != features.dim:
        raise UserError(f"{ref}: statistics of dimension {ref_mu.shape[0]}, the feature network gives {features.dim}")
    rows: list[SweepRow] = []
    multi = len(runs) > 1 or len(step_list) > 1
    for run, name in zip(runs, names, strict=True):
        gen = _load_generator(run, weights, device)
        for k in step_list:
            png_dir = None
            if save_png is not None:
                png_dir = save_png / name / f"steps-{k}" if multi else save_png
            with _progress() as prog:
                task = prog.add_task(f"{name} {k} steps", total=len(range(rank, n, world)))
                stats = generated_stats(gen, features, n=n, steps=k, batch_size=batch_size, cfg_scale=cfg,
                                        seed_offset=seed_offset, save_png=png_dir,
                                        progress=lambda m, t=task: prog.advance(t, m))
            value = fid_against(stats, ref_mu, ref_sigma)
            rows.append(SweepRow(name, k, {"fid": value}))
            if save_npz is not None and rank == 0:
                mu, sigma = stats.mean_cov()
                path = save_npz.with_name(f"{save_npz.stem}-{name.replace('/', '_')}-steps{k}{save_npz.suffix or '.npz'}") if multi else save_npz
                save_stats(path, mu, sigma)
    if rank != 0:
        return
    out_dir = out or _default_out(runs, "fid")
    files = write_sweep(rows, out_dir, metric="fid", title=f"FID-{n // 1000}K" if n % 1000 == 0 else f"FID ({n})",
                        extra={"n": n, "ref": str(ref), "cfg": cfg, "seed_offset": seed_offset})
    console.print(sweep_table(rows, title=f"FID, {n} images vs {ref.name}"))
    console.print(f"wrote {files['json']}, {files['csv']}, {files['png']}")


def _data_config_for(dataset: str, root: Path | None, resolution: int | None, download: bool = False):
    from selfe_cli.data.config import DataConfig

    path = Path(dataset)
    try:
        if dataset == "cifar10":
            cfg = DataConfig(name="cifar10", root=str(root or Path("data") / "cifar10"), download=download)
        elif dataset == "shapes":
            cfg = DataConfig(name="shapes", resolution=resolution)
        elif path.is_dir():
            if resolution is None:
                raise UserError(f"{dataset}: an image folder needs --resolution (images are resized and centre-cropped)")
            cfg = DataConfig(name="image_folder", root=str(path), resolution=resolution, captions="none")
        else:
            from selfe_cli.recipes.loader import load_recipe

            cfg = load_recipe(dataset, check_network=False).data
            if root is not None:
                cfg = dataclasses.replace(cfg, root=str(root))
            if resolution is not None:
                cfg = dataclasses.replace(cfg, resolution=resolution)
    except ValueError as err:
        raise UserError(f"{dataset}: {err}") from None
    return dataclasses.replace(cfg, hflip=False)  # reference statistics of the un-augmented images


@eval_app.command("fid-ref")
def fid_ref_cmd(
    dataset: Annotated[str, typer.Argument(help="cifar10 (default protocol: all 50,000 training images), shapes, a recipe name/path, or an image folder.")] = "cifar10",
    out: Annotated[Path, typer.Option(help="Output .npz (mu, sigma).")] = Path("cifar10-train-stats.npz"),
    n: Annotated[int | None, typer.Option(min=2, help="Use the first N images (default 50000, capped by the dataset size).")] = None,
    root: Annotated[Path | None, typer.Option(help="Data folder (cifar10: holds cifar-10-python.tar.gz; recipes: overrides data.root).")] = None,
    resolution: Annotated[int | None, typer.Option(min=8, help="Image side for image folders (resize + centre crop).")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 250,
    download: Annotated[bool, typer.Option(help="cifar10: download the official archive (MD5-checked) into --root if missing.")] = False,
    inception_weights: Annotated[Path | None, typer.Option(help="Local copy of torch-fidelity's weights-inception-2015-12-05-6726825d.pth.")] = None,
    device: DeviceOpt = None,
) -> None:
    """Reference FID statistics (Inception pool3 mean and covariance) of a dataset."""
    from selfe_cli.cli.checks import check_device, existing_file, output_file

    output_file(out, "--out", "an .npz file path")
    existing_file(inception_weights, "--inception-weights", "torch-fidelity's weights-inception-2015-12-05-6726825d.pth")
    cfg = _data_config_for(dataset, root, resolution, download)
    if cfg.name == "latents":
        raise UserError(f"{dataset}: latent datasets have no pixels; compute FID statistics from the image data")
    device = check_device(device)
    import torch

    from selfe_cli.data import build_dataset
    from selfe_cli.evaluation.features import inception_features
    from selfe_cli.evaluation.fid import dataset_stats, init_distributed_from_env, rank_world, save_stats
    init_distributed_from_env()
    data = build_dataset(cfg, split="train")
    count = min(n or 50_000, len(data)) if n is None else n
    features = inception_features(inception_weights, device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with _progress() as prog:
        task = prog.add_task(f"features of {dataset}", total=count)
        stats = dataset_stats(data, features, n=count, batch_size=batch_size,
                              progress=lambda m: prog.advance(task, m))
    if rank_world()[0] == 0:
        mu, sigma = stats.mean_cov()
        save_stats(out, mu, sigma, n=stats.count)
        console.print(f"wrote {out}: statistics of {stats.count} images of {dataset} (dimension {mu.shape[0]})")


# ---------------------------------------------------------------------------------------------
# GenEval
# ---------------------------------------------------------------------------------------------
def _build_detector(suite: str, detector_path: Path | None, clip_path: Path | None, device: str | None):
    if suite == "shapes":
        from selfe_cli.evaluation.shapes_detector import ShapesDetector

        return ShapesDetector()
    import torch

    from selfe_cli.evaluation.detectors import ClipColorClassifier, GenEvalDetector, Mask2FormerDetector

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return GenEvalDetector(Mask2FormerDetector.load(detector_path, dev), ClipColorClassifier.load(clip_path, dev))


def _prompts(suite: str, seed: int, per_tag: int | None) -> list[dict[str, Any]]:
    if suite == "shapes":
        from selfe_cli.data.shapes import shapes_prompts

        return shapes_prompts(seed=seed, per_tag=per_tag)
    from selfe_cli.evaluation.geneval import load_geneval_prompts

    return load_geneval_prompts()


def generate_layout(gen: Any, prompts: list[dict[str, Any]], root: Path, *, steps: int, n_per_prompt: int,
                    seed: int, cfg_scale: float | None, batch_size: int, progress=None) -> None:
    """Images of every prompt in the official layout; image k of prompt i uses seed ``seed + i * n + k``."""
    from selfe_cli.evaluation.geneval import write_prompt_folder

    jobs = [(i, k) for i in range(len(prompts)) for k in range(n_per_prompt)]
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        images = gen.generate([prompts[i]["prompt"] for i, _ in chunk],
                              [seed + i * n_per_prompt + k for i, k in chunk], steps=steps, cfg_scale=cfg_scale)
        for (i, k), img in zip(chunk, images.cpu().numpy(), strict=True):
            write_prompt_folder(root, i, prompts[i], [img], start=k)
        if progress:
            progress(len(chunk))


def _score(root: Path, detector: Any, label: str) -> tuple[dict[str, Any], Path]:
    from selfe_cli.evaluation.geneval import evaluate_folder, read_layout, summarize, write_results

    total = len(read_layout(root))
    with _progress() as prog:
        task = prog.add_task(f"scoring {label}", total=total)
        records = evaluate_folder(root, detector, progress=lambda m: prog.advance(task, m))
    results = write_results(root / "results.jsonl", records)
    summary = summarize(records)
    (root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary, results


def _step_folders(images: Path) -> list[tuple[int | None, Path]]:
    """An official-layout folder, or a folder of ``steps-<k>`` official-layout folders."""
    if not images.is_dir():
        raise UserError(f"--images {images}: folder not found")
    steps = sorted((int(p.name.split("-", 1)[1]), p) for p in images.iterdir()
                   if p.is_dir() and p.name.startswith("steps-") and p.name.split("-", 1)[1].isdigit())
    return list(steps) if steps else [(None, images)]


@eval_app.command("geneval")
def geneval_cmd(
    ckpt: CkptOpt = None,
    steps: StepsOpt = "1,2,4,50",
    suite: Annotated[str, typer.Option(help="geneval (553 prompts, Mask2Former + CLIP) or shapes (shapes prompts, CPU detector, no downloads).")] = "geneval",
    images: Annotated[Path | None, typer.Option(help="Score an existing folder in the official layout <NNNNN>/metadata.jsonl + samples/<kkkk>.png (or its steps-<k> subfolders) instead of generating.")] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder. Default: <run>/eval/<suite>/ (with --images: that folder).")] = None,
    n_per_prompt: Annotated[int, typer.Option(min=1, help="Images per prompt (GenEval: 4).")] = 4,
    cfg: Annotated[float | None, typer.Option(min=0.0, help="Classifier-free guidance scale. Default: the recipe's.")] = None,
    seed: Annotated[int, typer.Option(min=0, max=MAX_SEED, help="Image k of prompt i uses noise seed seed + i * n_per_prompt + k; also the shapes prompt-set seed.")] = 0,
    per_tag: Annotated[int | None, typer.Option(min=1, help="shapes suite: prompts per tag (default: GenEval's counts).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per generation batch.")] = 64,
    detector_path: Annotated[Path | None, typer.Option(help="Local save_pretrained copy of facebook/mask2former-swin-small-coco-instance.")] = None,
    clip_path: Annotated[Path | None, typer.Option(help="Local copy of the OpenAI ViT-L-14 CLIP weights for open_clip.")] = None,
    weights: Annotated[str, typer.Option(help="'ema' (default), 'model', or an EMA decay.")] = "ema",
    device: DeviceOpt = None,
    force_cfg: ForceCfgOpt = False,
) -> None:
    """GenEval scores (six tags + overall) per step count; writes images, results.jsonl and a sweep."""
    from selfe_cli.cli.checks import check_device, existing_dir, existing_file, existing_path, output_dir
    from selfe_cli.evaluation.sweep import SweepRow, parse_steps, sweep_table, write_sweep

    # what the user typed, before the detector is loaded (or downloaded) and before any generation
    if suite not in ("geneval", "shapes"):
        raise UserError(f"--suite: expected geneval or shapes, got {suite!r}")
    existing_dir(images, "--images", "a folder in the official layout <NNNNN>/metadata.jsonl + samples/, or "
                                     "its steps-<k> subfolders")
    if suite == "geneval":
        existing_path(detector_path, "--detector-path", "a save_pretrained copy of the Mask2Former detector")
        existing_file(clip_path, "--clip-path", "the OpenAI ViT-L-14 CLIP weights")
    output_dir(out, "--out")
    step_list = parse_steps(steps) if images is None else []
    runs = _run_dirs(ckpt) if images is None else []
    if runs:
        if out is None:
            output_dir(_default_out(runs, suite), "--out")
        _check_cfg(runs, cfg, force_cfg)
    device = check_device(device)
    detector = _build_detector(suite, detector_path, clip_path, device)  # fail fast, before generating
    rows: list[SweepRow] = []
    if images is not None:
        out_dir = out or images
        for k, folder in _step_folders(images):
            summary, _ = _score(folder, detector, folder.name)
            rows.append(SweepRow(images.name, k, {"overall": summary["overall"], **summary["tags"]}))
    else:
        names = _model_names(runs)
        out_dir = out or _default_out(runs, suite)
        prompts = _prompts(suite, seed, per_tag)
        for run, name in zip(runs, names, strict=True):
            gen = _load_generator(run, weights, device)
            if gen.cond_kind != "text":
                raise UserError(f"--ckpt {run}: GenEval needs a text-to-image model, this one is "
                                f"{'unconditional' if gen.cond_kind == 'none' else 'class-conditional'}")
            base = out_dir / name if len(runs) > 1 else out_dir
            for k in step_list:
                folder = base / f"steps-{k}"
                with _progress() as prog:
                    task = prog.add_task(f"{name} {k} steps", total=len(prompts) * n_per_prompt)
                    generate_layout(gen, prompts, folder, steps=k, n_per_prompt=n_per_prompt, seed=seed,
                                    cfg_scale=cfg, batch_size=batch_size, progress=lambda m, t=task: prog.advance(t, m))
                summary, _ = _score(folder, detector, f"{name} {k} steps")
                rows.append(SweepRow(name, k, {"overall": summary["overall"], **summary["tags"]}))
    files = write_sweep(rows, out_dir, metric="overall", title=f"GenEval ({suite})", extra={"suite": suite})
    console.print(sweep_table(rows, title=f"GenEval ({suite} suite)"))
    console.print(f"wrote {files['json']}, {files['csv']}, {files['png']}")
