"""CIFAR-10 from the official python archive (``cifar-10-python.tar.gz``), optionally downloaded.

``data.root`` may be the folder holding the archive or its extracted ``cifar-10-batches-py/`` folder,
the extracted folder itself, or the ``.tar.gz`` path. The archive is read in place (no extraction).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tarfile
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selfe_cli.data.info import DatasetInfo
from selfe_cli.errors import UserError

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE = "cifar-10-python.tar.gz"
FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCHES = ("test_batch",)
CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
INFO = DatasetInfo(channels=3, resolution=32, num_classes=10, class_names=CLASS_NAMES, has_captions=False,
                   is_latent=False, vae=None)


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def find_source(root: Path) -> Path | None:
    """The extracted folder or the archive under ``root`` (or ``root`` itself), or None."""
    candidates = [root / FOLDER, root, root / ARCHIVE]
    for path in candidates:
        if path.is_dir() and (path / TEST_BATCHES[0]).is_file():
            return path
        if path.is_file() and path.name.endswith((".tar.gz", ".tgz")):
            return path
    return None


def download_archive(root: Path, url: str | None = None, md5: str | None = None) -> Path:
    """Download the archive into ``root`` atomically (temp file, checksum, rename)."""
    url, md5 = url or URL, md5 or MD5
    root.mkdir(parents=True, exist_ok=True)
    target = root / ARCHIVE
    fd, tmp_name = tempfile.mkstemp(prefix=f".{ARCHIVE}.", suffix=".part", dir=root)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=60) as response:
                    while block := response.read(1 << 20):
                        out.write(block)
            except OSError as err:
                raise UserError(f"data.download: could not download CIFAR-10 from {url} ({err}); download "
                                f"{ARCHIVE} by hand and put it in {root}") from None
        got = md5sum(tmp)
        if got != md5:
            raise UserError(f"data.download: checksum mismatch for {url}: MD5 {got}, expected {md5}; "
                            f"the download is corrupt, try again")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def verify_archive(path: Path, md5: str = MD5) -> None:
    got = md5sum(path)
    if got != md5:
        raise UserError(f"data.root: {path} has MD5 {got}, expected {md5} for {ARCHIVE}; the file is corrupt "
                        f"or not the official archive")


def _unpickle(raw: bytes, name: str, where: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = pickle.loads(raw, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except Exception as err:  # noqa: BLE001 - any corruption is a user-fixable data problem
        raise UserError(f"data.root: {where}: {name} is not a CIFAR-10 python batch ({err})") from None
    if len(labels) != len(data):
        raise UserError(f"data.root: {where}: {name} has {len(data)} images but {len(labels)} labels")
    return data, labels


def load_arrays(source: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, 3, 32, 32) and int64 labels (N,) of a split, from a folder or the archive."""
    names = TRAIN_BATCHES if split == "train" else TEST_BATCHES
    parts = []
    if source.is_dir():
        for name in names:
            path = source / name
            if not path.is_file():
                raise UserError(f"data.root: {source} has no {name} (expected the CIFAR-10 python batches)")
            parts.append(_unpickle(path.read_bytes(), name, source))
    else:
        try:
            with tarfile.open(source, "r:gz") as tar:
                members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
                for name in names:
                    if name not in members:
                        raise UserError(f"data.root: {source} has no {name} (expected {ARCHIVE})")
                    handle = tar.extractfile(members[name])
                    assert handle is not None
                    parts.append(_unpickle(handle.read(), name, source))
        except (tarfile.TarError, OSError, EOFError) as err:
            raise UserError(f"data.root: {source} is not a readable {ARCHIVE} ({err})") from None
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


class CIFAR10(torch.utils.data.Dataset):
    """CIFAR-10 ``train`` (the 5 data batches, 50,000) or ``test`` (10,000); optional random h-flip.

    Items: ``{"image": (3, 32, 32) float in [-1, 1], "label": int}``. The whole split is held as uint8.
    """

    def __init__(self, root: str | os.PathLike[str], split: str = "train", hflip: bool = False,
                 download: bool = False, verify: bool = False):
        if split not in ("train", "test"):
            raise UserError(f"split: expected 'train' or 'test' for cifar10, got {split!r}")
        root = Path(root).expanduser()
        source = find_source(root)
        if source is None:
            if not download:
                raise UserError(f"data.root: CIFAR-10 not found at {root} (expected {ARCHIVE} or {FOLDER}/); "
                                f"set data.download: true to fetch it")
            base = root.parent if root.name.endswith((".tar.gz", ".tgz")) else root
            source = download_archive(base)
        elif verify and source.is_file():
            verify_archive(source)
        self.images, self.labels = load_arrays(source, split)
        self.hflip = hflip
        self.class_names = CLASS_NAMES
        self.info = INFO

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        img = torch.from_numpy(self.images[index]).float().div_(127.5).sub_(1.0)  # (3, 32, 32)
        if self.hflip and torch.rand(()) < 0.5:
            img = img.flip(-1)
        return {"image": img, "label": int(self.labels[index])}

