"""CIFAR-10 reader against a tiny archive in the official format."""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile

import numpy as np
import pytest
import torch

from selfe_cli.data import DataConfig, build_dataset, dataset_info
from selfe_cli.data import cifar10 as c10
from selfe_cli.errors import UserError


def make_batches(per_batch: int = 3, seed: int = 0) -> dict[str, dict]:
    rng = np.random.default_rng(seed)
    out = {}
    for name in (*c10.TRAIN_BATCHES, *c10.TEST_BATCHES):
        out[name] = {b"batch_label": name.encode(), b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                     b"labels": [int(v) for v in rng.integers(0, 10, per_batch)],
                     b"filenames": [f"{name}_{i}.png".encode() for i in range(per_batch)]}
    return out


def write_archive(path, batches) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, batch in batches.items():
            raw = pickle.dumps(batch, protocol=2)
            info = tarfile.TarInfo(f"{c10.FOLDER}/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))


def expected(batches, split):
    names = c10.TRAIN_BATCHES if split == "train" else c10.TEST_BATCHES
    data = np.concatenate([batches[n][b"data"] for n in names]).reshape(-1, 3, 32, 32)
    labels = [label for n in names for label in batches[n][b"labels"]]
    return data, labels


@pytest.fixture
def archive(tmp_path):
    batches = make_batches()
    root = tmp_path / "cifar"
    root.mkdir()
    write_archive(root / c10.ARCHIVE, batches)
    return root, batches


@pytest.mark.parametrize("split", ["train", "test"])
def test_reads_archive_exact_pixels_and_labels(archive, split):
    root, batches = archive
    ds = c10.CIFAR10(root, split=split)
    data, labels = expected(batches, split)
    assert len(ds) == len(labels) == (15 if split == "train" else 3)
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
        assert torch.equal(item["image"], torch.from_numpy(data[i]).float() / 127.5 - 1)
        assert item["label"] == labels[i]
    assert ds.info.num_classes == 10 and ds.info.class_names[0] == "airplane"


def test_reads_extracted_folder_and_tar_path(archive, tmp_path):
    root, batches = archive
    with tarfile.open(root / c10.ARCHIVE) as tar:
        tar.extractall(tmp_path / "extracted", filter="data")
    a = c10.CIFAR10(tmp_path / "extracted", split="test")  # folder holding cifar-10-batches-py/
    b = c10.CIFAR10(tmp_path / "extracted" / c10.FOLDER, split="test")  # the batches folder itself
    c = c10.CIFAR10(root / c10.ARCHIVE, split="test")  # the archive path
    for i in range(3):
        assert torch.equal(a[i]["image"], b[i]["image"]) and torch.equal(a[i]["image"], c[i]["image"])


def test_hflip_flips_or_keeps(archive):
    root, _ = archive
    plain, flipped = c10.CIFAR10(root), c10.CIFAR10(root, hflip=True)
    torch.manual_seed(0)
    seen = set()
    for _ in range(20):
        x, y = plain[0]["image"], flipped[0]["image"]
        if torch.equal(x, y):
            seen.add("same")
        else:
            assert torch.equal(x.flip(-1), y)
            seen.add("flipped")
    assert seen == {"same", "flipped"}


def test_missing_data_error_names_key_path_and_download(tmp_path):
    missing = tmp_path / "nothing"
    with pytest.raises(UserError) as err:
        build_dataset(DataConfig(name="cifar10", root=str(missing)))
    msg = str(err.value)
    assert "data.root" in msg and str(missing) in msg and "download: true" in msg and "\n" not in msg


def test_download_checks_md5_and_is_atomic(archive, tmp_path, monkeypatch):
    src, _ = archive
    blob = (src / c10.ARCHIVE).read_bytes()
    url = (src / c10.ARCHIVE).as_uri()
    # wrong checksum: one-line error, no archive and no temp file left behind
    dest = tmp_path / "dl_bad"
    monkeypatch.setattr(c10, "URL", url)
    with pytest.raises(UserError, match="checksum mismatch") as err:
        build_dataset(DataConfig(name="cifar10", root=str(dest), download=True))
    assert "\n" not in str(err.value)
    assert list(dest.iterdir()) == []
    # right checksum: downloaded, renamed into place, readable
    monkeypatch.setattr(c10, "MD5", hashlib.md5(blob).hexdigest())
    dest = tmp_path / "dl_ok"
    ds = build_dataset(DataConfig(name="cifar10", root=str(dest), download=True), split="test")
    assert len(ds) == 3 and [p.name for p in dest.iterdir()] == [c10.ARCHIVE]
    assert (dest / c10.ARCHIVE).read_bytes() == blob


def test_verify_and_corrupt_archive(archive, tmp_path):
    root, _ = archive
    with pytest.raises(UserError, match="MD5"):
        c10.CIFAR10(root, verify=True)  # the fake archive is not the official one
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / c10.ARCHIVE).write_bytes(b"not a tarball")
    with pytest.raises(UserError, match="not a readable"):
        c10.CIFAR10(bad)


def test_dataset_info_needs_no_data():
    info = dataset_info(DataConfig(name="cifar10", root="/does/not/exist"))
    assert (info.channels, info.resolution, info.num_classes, info.has_captions) == (3, 32, 10, False)
