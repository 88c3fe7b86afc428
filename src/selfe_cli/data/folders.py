"""Image folders: class subfolders (``root/<class>/*.png``) or image-caption folders.

Captions come from a ``metadata.jsonl`` (or ``metadata.csv``) with ``file_name`` and ``text`` columns,
the Hugging Face ``imagefolder`` convention (paths relative to the metadata file's folder), or from
``.txt`` sidecar files next to the images (``cat.png`` + ``cat.txt``). The folder is scanned once at
construction; files that cannot be opened as images are skipped with one warning that counts them and
names the first few. A file whose header is fine but whose pixels cannot be decoded is replaced, when it
is drawn, by the next image (a pure function of the index, so the data order stays deterministic). More
bad files than ``max_bad_fraction`` of the folder is an error: a folder that broken is a mistake to fix.
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
NAMED_BAD_FILES = 5  # bad files named in a warning or error; the rest are counted


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


def scan_folder(root: Path, captions: str = "auto", max_bad_fraction: float = 1.0
                ) -> tuple[list[FolderEntry], tuple[str, ...] | None, list[tuple[Path, str]]]:
    """List a folder's examples: ``(entries, class names or None, [(skipped file, why), ...])``.

    Cheap checks only: every image's header is opened once (no decoding), so non-images and files
    with a broken header are skipped here; a file that breaks later is handled at load time. More
    skipped files than ``max_bad_fraction`` of the images found is a ``UserError``.
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
    entries: list[FolderEntry] = []
    bad: list[tuple[Path, str]] = []
    for entry in candidates:
        problem = image_problem(entry.path)
        if problem is None:
            entries.append(entry)
        else:
            bad.append((entry.path, problem))
    check_bad_share(root, len(bad), len(candidates), max_bad_fraction, bad)
    if bad:
        warnings.warn(f"skipped {len(bad)} of {len(candidates)} images in {root} that cannot be read: "
                      f"{name_bad_files(root, bad, len(bad))}", stacklevel=2)
    if not entries:
        raise UserError(f"data.root: no readable images in {root} (expected class subfolders, metadata.jsonl "
                        f"with file_name/text, or images with .txt captions; extensions "
                        f"{', '.join(sorted(IMAGE_EXTENSIONS))})")
    return entries, class_names, bad


def name_bad_files(root: Path, bad: list[tuple[Path, str]], count: int) -> str:
    """The first few bad files (relative to ``root``) with what is wrong, and how many more there are."""
    def rel(path: Path) -> str:
        try:
            return str(path.relative_to(root))
        except ValueError:
            return str(path)

    named = ", ".join(f"{rel(p)} ({why})" for p, why in bad[:NAMED_BAD_FILES])
    return named + (f" and {count - NAMED_BAD_FILES} more" if count > NAMED_BAD_FILES else "")


def check_bad_share(root: Path, n_bad: int, total: int, max_bad_fraction: float,
                    bad: list[tuple[Path, str]]) -> None:
    """A ``UserError`` when more than ``max_bad_fraction`` of the ``total`` images are bad."""
    if total and n_bad > max_bad_fraction * total:
        raise UserError(f"data.root: {n_bad} of {total} images in {root} cannot be read ({n_bad / total:.1%}, "
                        f"more than data.max_bad_fraction {max_bad_fraction:g} allows): "
                        f"{name_bad_files(root, bad, n_bad)}; repair or remove them, or raise data.max_bad_fraction")


def image_problem(path: Path) -> str | None:
    """Why a file cannot be used as an image, from its header alone (None: it opens)."""
    try:
        if path.stat().st_size == 0:
            return "empty file"
        with Image.open(path) as img:
            if img.size[0] <= 0 or img.size[1] <= 0:
                return "zero-sized image"
    except FileNotFoundError:
        return "missing"
    except UnidentifiedImageError:
        return "not an image"
    except Image.DecompressionBombError:
        return "too many pixels"
    except (OSError, ValueError, SyntaxError) as err:
        return " ".join(str(err).split()) or type(err).__name__
    return None


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
    ``max_bad_fraction``: the share of the folder's images that may be unreadable (skipped at the scan) or
    undecodable (replaced by the next image when drawn) before it is a ``UserError``; 1.0 never stops.
    """

    max_fallbacks = 16

    def __init__(self, root: str | os.PathLike[str], resolution: int, hflip: bool = False,
                 captions: str = "auto", max_bad_fraction: float = 1.0):
        self.root = Path(root).expanduser()
        self.resolution, self.hflip = resolution, hflip
        self.max_bad_fraction = max_bad_fraction
        self.entries, self.class_names, self.bad_files = scan_folder(self.root, captions, max_bad_fraction)
        self.skipped = len(self.bad_files)
        has_captions = self.entries[0].caption is not None
        self.info = DatasetInfo(channels=3, resolution=resolution,
                                num_classes=len(self.class_names) if self.class_names else None,
                                class_names=self.class_names, has_captions=has_captions, is_latent=False)
        self._undecodable: dict[Path, str] = {}  # found while loading, in this process

    def __len__(self) -> int:
        return len(self.entries)

    def _load(self, entry: FolderEntry) -> torch.Tensor:
        img = pil_to_tensor(center_crop(load_rgb(entry.path), self.resolution))
        if self.hflip and torch.rand(()) < 0.5:
            img = img.flip(-1)
        return img

    def _undecodable_file(self, path: Path, err: Exception) -> None:
        """Count a file whose pixels cannot be decoded: named in the first few warnings, then counted;
        together with the files skipped by the scan, more than ``max_bad_fraction`` is an error."""
        if path in self._undecodable:
            return
        self._undecodable[path] = " ".join(str(err).split()) or type(err).__name__
        n = len(self._undecodable)
        total = len(self.entries) + self.skipped
        bad = self.bad_files + list(self._undecodable.items())
        check_bad_share(self.root, self.skipped + n, total, self.max_bad_fraction, bad)
        if n <= NAMED_BAD_FILES:
            warnings.warn(f"could not decode {path} ({self._undecodable[path]}); using the next image", stacklevel=3)
        elif n in (10, 100, 1000, 10_000, 100_000):
            warnings.warn(f"{n} images in {self.root} could not be decoded so far (each replaced by the next "
                          f"image); the latest: {path}", stacklevel=3)

    def __getitem__(self, index: int) -> dict[str, Any]:
        for k in range(self.max_fallbacks):
            entry = self.entries[(index + k) % len(self.entries)]
            try:
                image = self._load(entry)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
                # A file whose header was fine but whose data is not: use the next one (deterministic).
                self._undecodable_file(entry.path, err)
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
