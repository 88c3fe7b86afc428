"""Datasets: ``shapes`` (built-in, rendered), CIFAR-10, image folders and pre-encoded latent shards.

Every dataset yields dict items (``"image"`` (C, H, W) in [-1, 1] or a scaled latent, optional ``"label"``,
``"caption"``, ``"meta"``) and has an ``info`` attribute (``DatasetInfo``). ``build_dataset(cfg, split)``
builds one from the recipe's ``data:`` section; ``collate`` batches items.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selfe_cli.data.config import DataConfig
from selfe_cli.data.info import DatasetInfo
from selfe_cli.errors import UserError

if TYPE_CHECKING:  # torch is imported where a dataset is built, not when a recipe is validated
    import torch

SPLITS = ("train", "test")


def _root(cfg: DataConfig) -> Path:
    if not cfg.root:
        raise UserError(f"data.root: required for data.name: {cfg.name}")
    return Path(cfg.root).expanduser()


def _require_dir(cfg: DataConfig, expected: str) -> Path:
    root = _root(cfg)
    if not root.exists():
        raise UserError(f"data.root: {root} does not exist (expected {expected})")
    return root


def build_dataset(cfg: DataConfig, split: str = "train") -> torch.utils.data.Dataset:
    """The dataset a ``data:`` section describes. ``split`` is "train" or "test".

    Splits: cifar10 has its official test batch; shapes renders a disjoint seed stream for "test";
    image folders and latent shards have one split (the folder), used for both.
    """
    if split not in SPLITS:
        raise UserError(f"split: expected one of {', '.join(SPLITS)}, got {split!r}")
    if cfg.name == "shapes":
        from selfe_cli.data.shapes import ShapesDataset

        return ShapesDataset(size=cfg.size, resolution=cfg.effective_resolution or 32, seed=cfg.seed,
                             min_objects=cfg.min_objects, max_objects=cfg.max_objects, background=cfg.background,
                             tags=cfg.tags, color_prob=cfg.color_prob, split=split)
    if cfg.name == "cifar10":
        from selfe_cli.data.cifar10 import CIFAR10

        return CIFAR10(_root(cfg), split=split, hflip=cfg.hflip and split == "train", download=cfg.download)
    if cfg.name == "image_folder":
        from selfe_cli.data.folders import ImageFolder

        root = _require_dir(cfg, "an image folder: class subfolders, metadata.jsonl, or images with .txt captions")
        assert cfg.resolution is not None
        return ImageFolder(root, cfg.resolution, hflip=cfg.hflip and split == "train", captions=cfg.captions,
                           max_bad_fraction=cfg.max_bad_fraction)
    if cfg.name == "latents":
        from selfe_cli.data.latents import LatentShardsDataset

        root = _require_dir(cfg, "a latent folder with index.json written by `selfe encode-latents`")
        return LatentShardsDataset(root, sample_posterior=cfg.sample_posterior)
    raise UserError(f"data.name: unknown dataset {cfg.name!r}")


def dataset_info(cfg: DataConfig) -> DatasetInfo:
    """``DatasetInfo`` for a ``data:`` section without loading the data where it can be avoided."""
    if cfg.name == "shapes":
        return DatasetInfo(channels=3, resolution=cfg.effective_resolution or 32, num_classes=None,
                           class_names=None, has_captions=True, is_latent=False)
    if cfg.name == "cifar10":
        from selfe_cli.data.cifar10 import INFO

        return INFO
    if cfg.name == "image_folder":
        from selfe_cli.data.folders import folder_info

        root = _require_dir(cfg, "an image folder: class subfolders, metadata.jsonl, or images with .txt captions")
        assert cfg.resolution is not None
        return folder_info(root, cfg.resolution, cfg.captions)
    if cfg.name == "latents":
        from selfe_cli.data.latents import latent_info, read_index

        return latent_info(read_index(_require_dir(cfg, "a latent folder with index.json")))
    raise UserError(f"data.name: unknown dataset {cfg.name!r}")


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch dict items: ``image`` stacked (N, C, H, W), ``label`` LongTensor (N,), ``caption`` and ``meta``
    as lists. A key is kept only when every item has it."""
    import torch

    if not items:
        raise ValueError("collate needs at least one item")
    batch: dict[str, Any] = {"image": torch.stack([it["image"] for it in items])}
    keys = set.intersection(*(set(it) for it in items))
    if "label" in keys:
        batch["label"] = torch.as_tensor([int(it["label"]) for it in items], dtype=torch.long)
    for key in ("caption", "meta"):
        if key in keys:
            batch[key] = [it[key] for it in items]
    return batch


__all__ = ["DataConfig", "DatasetInfo", "build_dataset", "collate", "dataset_info"]
