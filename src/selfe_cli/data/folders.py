"""Image folders: class subfolders (``root/<class>/*.png``) or image-caption folders.

Captions come from a ``metadata.jsonl`` (or ``metadata.csv``) with ``file_name`` and ``text`` columns,
the Hugging Face ``imagefolder`` convention (paths relative to the metadata file's folder), or from
``.txt`` sidecar files next to the images (``cat.png`` + ``cat.txt``). The folder is scanned once at
construction; files that cannot be opened as images are skipped with one counted warning.
"""

from __future__ import annotations

import csv
import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from selfe_cli.data.info import DatasetInfo
from selfe_cli.errors import UserError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm"})
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
CAPTION_KEYS = ("text", "caption")
CAPTION_MODES = ("auto", "metadata", "sidecar", "none")


@dataclass(frozen=True)
class FolderEntry:
    path: Path
    label: int | None = None
    caption: str | None = None


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _walk_images(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if _is_image(path):
                yield path


def _metadata_files(root: Path) -> list[Path]:
    return sorted(p for name in METADATA_FILES for p in root.rglob(name) if p.is_file())


def _read_metadata(meta: Path) -> list[tuple[Path, str]]:
    """``(image path, caption)`` rows of one metadata file."""
    rows: list[dict[str, Any]] = []
    if meta.suffix == ".jsonl":
        with open(meta, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise UserError(f"{meta}:{lineno}: not valid JSON ({err.msg})") from None
    else:
        with open(meta, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    out = []
    for i, row in enumerate(rows, 1):
        if "file_name" not in row:
            raise UserError(f"{meta}: row {i} has no 'file_name' (expected keys file_name and text)")
        key = next((k for k in CAPTION_KEYS if k in row), None)
        if key is None:
            raise UserError(f"{meta}: row {i} has no caption column (expected one of {', '.join(CAPTION_KEYS)})")
        out.append((meta.parent / str(row["file_name"]), str(row[key])))
    return out


def _class_dirs(root: Path) -> list[Path]:
    """Immediate subfolders holding at least one image (searched recursively), sorted by name."""
    dirs = sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name)
    return [d for d in dirs if next(_walk_images(d), None) is not None]


def _check_root(root: Path) -> None:
    if not root.is_dir():
        raise UserError(f"data.root: {root} is not a folder (expected an image folder: class subfolders, "
                        f"metadata.jsonl with file_name/text, or images with .txt captions)")


def resolve_mode(root: Path, captions: str) -> str:
    """"metadata", "sidecar" or "labels" (class subfolders, or unlabelled) for a folder."""
    if captions not in CAPTION_MODES:
        raise UserError(f"data.captions: expected one of {', '.join(CAPTION_MODES)}, got {captions!r}")
    if captions == "none":
        return "labels"
    if captions == "metadata":
        if not _metadata_files(root):
            raise UserError(f"data.captions: 'metadata' but {root} has no metadata.jsonl or metadata.csv")
        return "metadata"
    if captions == "sidecar":
        return "sidecar"
    if _metadata_files(root):
        return "metadata"
    if any(p.with_suffix(".txt").is_file() for p in _walk_images(root)):
        return "sidecar"
    return "labels"


def scan_folder(root: Path, captions: str = "auto") -> tuple[list[FolderEntry], tuple[str, ...] | None, int]:
    """List a folder's examples: ``(entries, class names or None, number of files skipped)``.

    Cheap checks only: every image's header is opened once (no decoding), so non-images and files
    with a broken header are skipped here; a file that breaks later is handled at load time.
    """
    _check_root(root)
    mode = resolve_mode(root, captions)
    class_names: tuple[str, ...] | None = None
    candidates: list[FolderEntry] = []
    missing = 0
    if mode == "metadata":
        for meta in _metadata_files(root):
            for path, text in _read_metadata(meta):
                candidates.append(FolderEntry(path, caption=text))
    elif mode == "sidecar":
        for path in _walk_images(root):
            txt = path.with_suffix(".txt")
            if txt.is_file():
                candidates.append(FolderEntry(path, caption=txt.read_text(encoding="utf-8").strip()))
            else:
                missing += 1
        if missing:
            warnings.warn(f"{missing} images in {root} have no .txt caption and were left out", stacklevel=2)
    else:
        dirs = _class_dirs(root)
        if dirs:
            class_names = tuple(d.name for d in dirs)
            for label, d in enumerate(dirs):
                candidates.extend(FolderEntry(p, label=label) for p in _walk_images(d))
        else:
            candidates = [FolderEntry(p) for p in _walk_images(root)]
    entries, unreadable = [], 0
    for entry in candidates:
        if _readable(entry.path):
            entries.append(entry)
        else:
            unreadable += 1
    if unreadable:
        warnings.warn(f"skipped {unreadable} unreadable images in {root}", stacklevel=2)
    if not entries:
        raise UserError(f"data.root: no readable images in {root} (expected class subfolders, metadata.jsonl "
                        f"with file_name/text, or images with .txt captions; extensions "
                        f"{', '.join(sorted(IMAGE_EXTENSIONS))})")
    return entries, class_names, unreadable


def _readable(path: Path) -> bool:
    try:
        with Image.open(path) as img:
            return img.size[0] > 0 and img.size[1] > 0
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return False


def load_rgb(path: Path) -> Image.Image:
    """Open as RGB; transparent images are composited over white (not the black ``convert`` gives)."""
    with Image.open(path) as img:
        img.load()
        if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(canvas, rgba).convert("RGB")
        return img.convert("RGB")


def center_crop(img: Image.Image, resolution: int) -> Image.Image:
    """Resize the shorter side to ``resolution`` and crop the centre square.

    Large downscales first halve with a box filter, then finish with bicubic (the ADM/DiT recipe, which
    avoids aliasing from a single big bicubic step).
    """
    while min(img.size) >= 2 * resolution:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.Resampling.BOX)
    scale = resolution / min(img.size)
    img = img.resize(tuple(max(resolution, round(s * scale)) for s in img.size), resample=Image.Resampling.BICUBIC)
    left = (img.size[0] - resolution) // 2
    top = (img.size[1] - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())  # (H, W, 3)
    return arr.permute(2, 0, 1).float().div_(127.5).sub_(1.0)  # (3, H, W) in [-1, 1]


class ImageFolder(torch.utils.data.Dataset):
    """Images from a folder at ``resolution`` (shorter side resize + centre crop), RGB in [-1, 1].

    Items: ``{"image": (3, R, R), "label": int}`` for class subfolders (labels in sorted folder order),
    ``{"image", "caption": str}`` for caption folders, ``{"image"}`` for a flat folder without captions.
    """

    max_fallbacks = 16

    def __init__(self, root: str | os.PathLike[str], resolution: int, hflip: bool = False,
                 captions: str = "auto"):
        self.root = Path(root).expanduser()
        self.resolution, self.hflip = resolution, hflip
        self.entries, self.class_names, self.skipped = scan_folder(self.root, captions)
        has_captions = self.entries[0].caption is not None
        self.info = DatasetInfo(channels=3, resolution=resolution,
                                num_classes=len(self.class_names) if self.class_names else None,
                                class_names=self.class_names, has_captions=has_captions, is_latent=False)
        self._warned: set[Path] = set()

    def __len__(self) -> int:
        return len(self.entries)

    def _load(self, entry: FolderEntry) -> torch.Tensor:
        img = pil_to_tensor(center_crop(load_rgb(entry.path), self.resolution))
        if self.hflip and torch.rand(()) < 0.5:
            img = img.flip(-1)
        return img

    def __getitem__(self, index: int) -> dict[str, Any]:
        for k in range(self.max_fallbacks):
            entry = self.entries[(index + k) % len(self.entries)]
            try:
                image = self._load(entry)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
                # A file whose header was fine but whose data is not: use the next one, warn once.
                if entry.path not in self._warned:
                    self._warned.add(entry.path)
                    warnings.warn(f"could not decode {entry.path} ({err}); using the next image", stacklevel=2)
                continue
            item: dict[str, Any] = {"image": image}
            if entry.label is not None:
                item["label"] = entry.label
            if entry.caption is not None:
                item["caption"] = entry.caption
            return item
        raise UserError(f"data.root: {self.max_fallbacks} images in a row from index {index} in {self.root} "
                        f"could not be decoded")


def folder_info(root: str | os.PathLike[str], resolution: int, captions: str = "auto") -> DatasetInfo:
    """``DatasetInfo`` of a folder without opening its images."""
    path = Path(root).expanduser()
    _check_root(path)
    mode = resolve_mode(path, captions)
    names = None
    if mode == "labels":
        names = tuple(d.name for d in _class_dirs(path)) or None
    return DatasetInfo(channels=3, resolution=resolution, num_classes=len(names) if names else None,
                       class_names=names, has_captions=mode != "labels", is_latent=False)
