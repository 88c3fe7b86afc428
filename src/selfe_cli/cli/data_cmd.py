"""`selfe encode-latents`: encode an image folder into VAE latent shards (data.name: latents)."""

from __future__ import annotations

from pathlib import Path

import typer

from selfe_cli.cli.app import app
from selfe_cli.errors import UserError

_DTYPES = ("float16", "bfloat16", "float32")


def _pick_device(device: str) -> str:
    from selfe_cli.cli.checks import check_device

    checked = check_device(device, allowed=("cpu", "cuda", "cuda:N"), auto="auto")
    if checked is None:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return checked


@app.command("encode-latents")
def encode_latents(
    source_dir: Path = typer.Argument(..., help="image folder: class subfolders, metadata.jsonl (file_name, text) "
                                                "or images with .txt captions"),
    out_dir: Path = typer.Argument(..., help="output folder for index.json and the safetensors shards"),
    vae: str = typer.Option("sd-vae-ft-ema", "--vae", help="VAE: sd-vae-ft-ema, sd-vae-ft-mse, sdxl-vae, flux, a hub "
                                                         "id, or a local AutoencoderKL folder"),
    resolution: int = typer.Option(256, "--resolution", min=8, help="images are resized (shorter side) and "
                                                                     "centre-cropped to this size"),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="images per VAE forward"),
    shard_size: int = typer.Option(10_000, "--shard-size", min=1, help="images per shard file"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1, ..."),
    vae_dtype: str = typer.Option("float32", "--vae-dtype", help="dtype the VAE runs in: float32, bfloat16, float16"),
    storage_dtype: str = typer.Option("float16", "--storage-dtype", help="dtype of the stored latents"),
    captions: str = typer.Option("auto", "--captions", help="auto, metadata, sidecar or none (class labels)"),
    num_workers: int = typer.Option(2, "--num-workers", min=0, help="DataLoader workers decoding images"),
    max_bad_fraction: float = typer.Option(0.01, "--max-bad-fraction", min=0.0, max=1.0,
                                           help="share of unreadable images skipped (counted and named) "
                                                "before it is an error, as data.max_bad_fraction"),
) -> None:
    """Encode SOURCE_DIR once with a VAE into OUT_DIR (resumable); train on it with data.name: latents."""
    from selfe_cli.cli.checks import output_dir

    for flag, value in (("--vae-dtype", vae_dtype), ("--storage-dtype", storage_dtype)):
        if value not in _DTYPES:
            raise UserError(f"{flag}: expected one of {', '.join(_DTYPES)}, got {value!r}")
    if not source_dir.is_dir():
        raise UserError(f"SOURCE_DIR: {source_dir} is not a folder (expected an image folder)")
    output_dir(out_dir, "OUT_DIR")
    dev = _pick_device(device)
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from selfe_cli.data.folders import ImageFolder
    from selfe_cli.data.latents import DTYPES, encode_to_latents, load_vae

    dataset = ImageFolder(source_dir, resolution, hflip=False, captions=captions, max_bad_fraction=max_bad_fraction)
    model = load_vae(vae, device=dev, dtype=DTYPES[vae_dtype])
    console = Console(stderr=True)
    info = dataset.info
    what = "captions" if info.has_captions else (f"{info.num_classes} classes" if info.num_classes else "no labels")
    console.print(f"encoding {len(dataset)} images ({what}) from {source_dir} with {vae} on {dev}")
    columns = (TextColumn("[bold]encode"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("encode", total=len(dataset))
        index = encode_to_latents(dataset, model, out_dir, batch_size=batch_size, shard_size=shard_size,
                                  dtype=DTYPES[storage_dtype], vae_name=vae, num_workers=num_workers,
                                  progress=lambda n: progress.advance(task, n))
    c, h, w = index["latent_shape"]
    console.print(f"wrote {index['count']} latents ({c}x{h}x{w}) in {index['num_shards']} shards to {out_dir}; "
                  f"train with data: {{name: latents, root: {out_dir}}}")
