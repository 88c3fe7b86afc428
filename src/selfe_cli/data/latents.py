"""Pre-encoded VAE latents: encode an image dataset once, train on the shards.

Layout of an output folder::

    index.json                   VAE name/config, scaling, shift, count, shapes, shard list, complete flag
    shard-00000.safetensors      "latents" (n, C, h, w) scaled posterior mean, "std" (n, C, h, w) scaled
                                 posterior std, "labels" int64 (n,) when the data have labels
    shard-00000.json             {"captions": [...]} when the data have captions

Stored latents are already in the network's space: ``(mean - shift_factor) * scaling_factor`` and
``std * scaling_factor``, so ``latents + std * eps`` is a scaled posterior sample (the usual per-epoch
re-sampling of the posterior, as in LDM/DiT training) and ``decode_latents`` undoes the scaling.
Encoding is resumable: finished shards are kept, every file is written to a temp name then renamed.
"""

from __future__ import annotations

import bisect
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from selfe_cli.data.info import DatasetInfo
from selfe_cli.errors import UserError

INDEX = "index.json"
FORMAT = "selfe-latents"
VERSION = 1
# Short names and hub ids of the usual latent-diffusion VAEs: (repository, subfolder).
KNOWN_VAES: dict[str, tuple[str, str | None]] = {
    "sd-vae-ft-ema": ("stabilityai/sd-vae-ft-ema", None),
    "sd-vae-ft-mse": ("stabilityai/sd-vae-ft-mse", None),
    "sdxl-vae": ("stabilityai/sdxl-vae", None),
    "flux": ("black-forest-labs/FLUX.1-dev", "vae"),
    "flux-schnell": ("black-forest-labs/FLUX.1-schnell", "vae"),
    "black-forest-labs/FLUX.1-dev": ("black-forest-labs/FLUX.1-dev", "vae"),
    "black-forest-labs/FLUX.1-schnell": ("black-forest-labs/FLUX.1-schnell", "vae"),
}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _dtype_name(dtype: torch.dtype) -> str:
    for name, dt in DTYPES.items():
        if dt == dtype:
            return name
    raise ValueError(f"unsupported latent dtype {dtype}; expected one of {', '.join(DTYPES)}")


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _atomic_write_json(path: Path, obj: Any) -> None:
    _atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())


def _atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# VAE loading and scaling


def load_vae(name_or_path: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             local_files_only: bool | None = None) -> Any:
    """A diffusers ``AutoencoderKL`` from a short name, a hub id, a local folder or a single file.

    Short names: ``sd-vae-ft-ema``, ``sd-vae-ft-mse``, ``sdxl-vae``, ``flux`` (FLUX.1-dev ``vae``
    subfolder), ``flux-schnell``. A local folder may hold ``config.json`` + weights, or a ``vae/``
    subfolder (a full pipeline folder). A ``.safetensors``/``.ckpt`` file is read with ``from_single_file``.
    """
    from diffusers import AutoencoderKL

    path = Path(name_or_path).expanduser()
    kwargs: dict[str, Any] = {"torch_dtype": dtype}
    try:
        if path.is_file():
            vae = AutoencoderKL.from_single_file(str(path), **kwargs)
        elif path.is_dir():
            if (path / "config.json").is_file():
                vae = AutoencoderKL.from_pretrained(str(path), **kwargs)
            elif (path / "vae" / "config.json").is_file():
                vae = AutoencoderKL.from_pretrained(str(path), subfolder="vae", **kwargs)
            else:
                raise UserError(f"VAE folder {path} has no config.json (nor vae/config.json); expected a diffusers "
                                f"AutoencoderKL folder")
        else:
            if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
                raise UserError(f"VAE path {path} does not exist; give a local AutoencoderKL folder or a hub "
                                f"name ({', '.join(k for k in KNOWN_VAES if '/' not in k)})")
            repo, subfolder = KNOWN_VAES.get(name_or_path, (name_or_path, None))
            if local_files_only is not None:
                kwargs["local_files_only"] = local_files_only
            vae = AutoencoderKL.from_pretrained(repo, subfolder=subfolder, **kwargs)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - hub/network/format errors all mean "cannot load this VAE"
        what = str(path) if path.exists() else name_or_path
        if name_or_path in KNOWN_VAES:
            repo, subfolder = KNOWN_VAES[name_or_path]
            what = f"{name_or_path}: {repo}" + (f", subfolder {subfolder}" if subfolder else "")
        raise UserError(f"could not load the VAE {what!r} ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                        f"offline, the weights must be in the Hugging Face cache, or give a local path to an "
                        f"AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors)") from None
    return vae.to(device).eval().requires_grad_(False)


def vae_scaling(vae: Any) -> tuple[float, float]:
    """``(scaling_factor, shift_factor)`` of a VAE config (shift 0 when the config has none)."""
    scale = float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    return scale, shift


@torch.no_grad()
def encode_images(vae: Any, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, H, W) in [-1, 1] -> scaled posterior ``(mean, std)``, each (N, C, h, w) float32."""
    scale, shift = vae_scaling(vae)
    param = next(vae.parameters())
    dist = vae.encode(images.to(param.device, param.dtype)).latent_dist
    mean = (dist.mean.float() - shift) * scale
    std = dist.std.float() * scale
    return mean, std


@torch.no_grad()
def decode_latents(vae: Any, latents: torch.Tensor, scaling_factor: float | None = None,
                   shift_factor: float | None = None) -> torch.Tensor:
    """Scaled latents (N, C, h, w) -> images (N, 3, H, W) float32 in [-1, 1]; undoes scaling and shift."""
    scale, shift = vae_scaling(vae)
    scale = scale if scaling_factor is None else scaling_factor
    shift = shift if shift_factor is None else shift_factor
    param = next(vae.parameters())
    z = latents.to(param.device, torch.float32) / scale + shift
    return vae.decode(z.to(param.dtype)).sample.float().clamp(-1.0, 1.0)


# ----------------------------------------------------------------------------------------------
# Encoding


def _shard_name(k: int) -> str:
    return f"shard-{k:05d}"


def _shard_complete(out: Path, k: int, count: int, captions: bool) -> bool:
    path = out / f"{_shard_name(k)}.safetensors"
    if not path.is_file() or (captions and not (out / f"{_shard_name(k)}.json").is_file()):
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.get_slice("latents").get_shape()[0] == count
    except Exception:  # noqa: BLE001 - a truncated/corrupt shard is simply redone
        return False


def _plan_keys(index: dict[str, Any]) -> dict[str, Any]:
    keys = ("count", "shard_size", "vae", "scaling_factor", "shift_factor", "dtype", "image_resolution",
            "latent_shape", "has_labels", "has_captions")
    return {k: index.get(k) for k in keys}


def encode_to_latents(dataset: Any, vae: Any, out_dir: str | os.PathLike[str], *, batch_size: int = 64,
                      shard_size: int = 10_000, device: str | torch.device | None = None,
                      dtype: torch.dtype = torch.float16, vae_name: str | None = None, num_workers: int = 0,
                      progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Encode every item of ``dataset`` with ``vae`` into safetensors shards under ``out_dir``.

    ``dtype`` is the storage dtype of ``latents``/``std``. ``progress(n)`` is called after each batch with
    the number of images done in it (skipped shards count as done). Returns the final index dict.
    Re-running on the same folder resumes: complete shards are skipped; a different plan (VAE, count,
    shard size, dtype) is refused.
    """
    from selfe_cli.data import collate  # the package's collate: images stacked, captions kept

    if batch_size < 1 or shard_size < 1:
        raise UserError(f"batch size and shard size must be >= 1, got {batch_size} and {shard_size}")
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    n = len(dataset)
    if n == 0:
        raise UserError("nothing to encode: the dataset is empty")
    if device is not None:
        vae = vae.to(device)
    first = dataset[0]
    image_resolution = int(first["image"].shape[-1])
    mean0, _ = encode_images(vae, first["image"][None])
    info = getattr(dataset, "info", None)
    scale, shift = vae_scaling(vae)
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    index: dict[str, Any] = {
        "format": FORMAT, "version": VERSION,
        "vae": vae_name or str(getattr(vae.config, "_name_or_path", "") or "AutoencoderKL"),
        "vae_config": json.loads(json.dumps(config, default=str)),
        "scaling_factor": scale, "shift_factor": shift, "dtype": _dtype_name(dtype),
        "count": n, "shard_size": shard_size, "num_shards": (n + shard_size - 1) // shard_size,
        "image_resolution": image_resolution, "latent_shape": list(mean0.shape[1:]),
        "has_labels": "label" in first, "has_captions": "caption" in first,
        "num_classes": getattr(info, "num_classes", None),
        "class_names": list(info.class_names) if getattr(info, "class_names", None) else None,
        "complete": False,
    }
    index_path = out / INDEX
    if index_path.is_file():
        old = json.loads(index_path.read_text())
        if _plan_keys(old) != _plan_keys(index):
            diff = [k for k, v in _plan_keys(index).items() if _plan_keys(old).get(k) != v]
            raise UserError(f"{index_path} was written for different settings ({', '.join(diff)} differ); "
                            f"use a new output folder or delete this one")
    shards = []
    for k in range(index["num_shards"]):
        start, stop = k * shard_size, min(n, (k + 1) * shard_size)
        entry = {"file": f"{_shard_name(k)}.safetensors", "start": start, "count": stop - start}
        if index["has_captions"]:
            entry["captions"] = f"{_shard_name(k)}.json"
        shards.append(entry)
    index["shards"] = shards
    _atomic_write_json(index_path, index)

    for k, entry in enumerate(shards):
        start, count = entry["start"], entry["count"]
        if _shard_complete(out, k, count, index["has_captions"]):
            if progress:
                progress(count)
            continue
        subset = torch.utils.data.Subset(dataset, range(start, start + count))
        loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False,
                                             num_workers=num_workers, collate_fn=collate)
        means, stds, labels, captions = [], [], [], []
        for batch in loader:
            mean, std = encode_images(vae, batch["image"])  # (B, C, h, w) each
            means.append(mean.to("cpu", dtype))
            stds.append(std.to("cpu", dtype))
            if index["has_labels"]:
                labels.append(batch["label"])
            if index["has_captions"]:
                captions.extend(batch["caption"])
            if progress:
                progress(len(batch["image"]))
        tensors = {"latents": torch.cat(means), "std": torch.cat(stds)}
        if index["has_labels"]:
            tensors["labels"] = torch.cat(labels).long()
        if index["has_captions"]:  # the sidecar first: the .safetensors file marks the shard complete
            _atomic_write_json(out / entry["captions"], {"captions": captions})
        _atomic_save_tensors(out / entry["file"], tensors, {"format": FORMAT, "count": str(count)})
    index["complete"] = True
    _atomic_write_json(index_path, index)
    return index


# ----------------------------------------------------------------------------------------------
# Reading


def read_index(root: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(root).expanduser()
    index_path = path / INDEX
    if not index_path.is_file():
        raise UserError(f"data.root: {path} has no {INDEX} (expected a latent folder written by "
                        f"`selfe encode-latents`)")
    try:
        index = json.loads(index_path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{index_path}: not valid JSON ({err.msg})") from None
    if index.get("format") != FORMAT:
        raise UserError(f"{index_path}: not a selfe latent index (format {index.get('format')!r})")
    if not index.get("complete"):
        raise UserError(f"{index_path}: encoding did not finish; run `selfe encode-latents` again with the same "
                        f"arguments to complete it")
    return index


def latent_info(index: dict[str, Any]) -> DatasetInfo:
    c, h, _ = index["latent_shape"]
    names = tuple(index["class_names"]) if index.get("class_names") else None
    return DatasetInfo(channels=int(c), resolution=int(h),
                       num_classes=index.get("num_classes") if index.get("has_labels") else None,
                       class_names=names, has_captions=bool(index.get("has_captions")), is_latent=True,
                       vae=index.get("vae"), image_resolution=index.get("image_resolution"))


class LatentShardsDataset(torch.utils.data.Dataset):
    """Items ``{"image": latent (C, h, w) float32, "label"?: int, "caption"?: str}`` from latent shards.

    With ``sample_posterior`` each access draws ``latents + std * eps`` (torch's global RNG), else the
    posterior mean. Shards are opened lazily and memory-mapped by safetensors; file handles are not
    pickled, so the dataset is safe to send to DataLoader workers.
    """

    def __init__(self, root: str | os.PathLike[str], sample_posterior: bool = True):
        self.root = Path(root).expanduser()
        self.index = read_index(self.root)
        self.sample_posterior = sample_posterior
        self.shards = self.index["shards"]
        for entry in self.shards:
            if not (self.root / entry["file"]).is_file():
                raise UserError(f"data.root: {self.root / entry['file']} is missing (listed in {INDEX})")
        self.starts = [s["start"] for s in self.shards]
        self.scaling_factor = float(self.index["scaling_factor"])
        self.shift_factor = float(self.index["shift_factor"])
        self.info = latent_info(self.index)
        self._handles: dict[int, Any] = {}
        self._captions: dict[int, list[str]] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def __len__(self) -> int:
        return int(self.index["count"])

    def _handle(self, k: int) -> Any:
        if k not in self._handles:
            self._handles[k] = safe_open(str(self.root / self.shards[k]["file"]), framework="pt")
        return self._handles[k]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        k = bisect.bisect_right(self.starts, index) - 1
        j = index - self.starts[k]
        f = self._handle(k)
        latent = f.get_slice("latents")[j : j + 1][0].float()  # (C, h, w)
        if self.sample_posterior:
            latent = latent + f.get_slice("std")[j : j + 1][0].float() * torch.randn_like(latent)
        item: dict[str, Any] = {"image": latent}
        if self.index.get("has_labels"):
            item["label"] = int(f.get_slice("labels")[j : j + 1][0])
        if self.index.get("has_captions"):
            if k not in self._captions:
                data = json.loads((self.root / self.shards[k]["captions"]).read_text())
                self._captions[k] = data["captions"]
            item["caption"] = self._captions[k][j]
        return item
