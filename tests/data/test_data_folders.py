"""Image folders: class subfolders, caption metadata / sidecars, resize + crop, unreadable files."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from selfe_cli.data import DataConfig, build_dataset, dataset_info
from selfe_cli.data.folders import ImageFolder, center_crop
from selfe_cli.errors import UserError


def solid(path, rgb, size=(16, 16), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, rgb).save(path)


def as_uint8(t: torch.Tensor) -> np.ndarray:
    return ((t.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)


def test_class_subfolders_sorted_labels_exact_pixels(tmp_path):
    rng = np.random.default_rng(0)
    pixels = {}
    for cls, n in (("zebra", 2), ("ant", 3)):
        for i in range(n):
            arr = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            path = tmp_path / cls / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(path)
            pixels[(cls, i)] = arr
    ds = ImageFolder(tmp_path, resolution=16)
    assert ds.info.class_names == ("ant", "zebra") and ds.info.num_classes == 2 and not ds.info.has_captions
    assert len(ds) == 5
    items = [ds[i] for i in range(5)]
    assert [it["label"] for it in items] == [0, 0, 0, 1, 1]
    assert np.array_equal(as_uint8(items[0]["image"]), pixels[("ant", 0)])
    assert np.array_equal(as_uint8(items[4]["image"]), pixels[("zebra", 1)])
    assert dataset_info(DataConfig(name="image_folder", root=str(tmp_path), resolution=16)) == ds.info


def test_unreadable_images_skipped_with_one_counted_warning(tmp_path):
    solid(tmp_path / "a" / "good.png", (255, 0, 0))
    (tmp_path / "a" / "bad.png").write_bytes(b"this is not a png")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "empty.jpg").write_bytes(b"")
    solid(tmp_path / "b" / "ok.jpg", (0, 0, 255))
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable images in .*") as rec:
        ds = ImageFolder(tmp_path, resolution=8)
    assert len([w for w in rec if "unreadable" in str(w.message)]) == 1
    assert str(tmp_path) in str(rec[0].message)
    assert len(ds) == 2 and ds.skipped == 2
    assert [ds[i]["label"] for i in range(2)] == [0, 1]


def test_broken_image_data_falls_back_to_next(tmp_path):
    solid(tmp_path / "a.png", (0, 255, 0), size=(64, 64))
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "b.png")
    raw = (tmp_path / "b.png").read_bytes()
    (tmp_path / "b.png").write_bytes(raw[: len(raw) // 2])  # header fine, pixel data truncated
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = ImageFolder(tmp_path, resolution=8)  # header scan passes both
    assert len(ds) == 2
    with pytest.warns(UserWarning, match="could not decode"):
        item = ds[1]
    assert np.all(as_uint8(item["image"]) == (0, 255, 0))  # the next image (wraps to a.png)


def test_metadata_jsonl_captions(tmp_path):
    solid(tmp_path / "imgs" / "x.png", (10, 20, 30))
    solid(tmp_path / "imgs" / "y.png", (40, 50, 60))
    rows = [{"file_name": "imgs/x.png", "text": "a dark square"}, {"file_name": "imgs/y.png", "text": "another"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = build_dataset(DataConfig(name="image_folder", root=str(tmp_path), resolution=16))
    assert ds.info.has_captions and ds.info.num_classes is None
    assert [ds[i]["caption"] for i in range(2)] == ["a dark square", "another"]
    assert "label" not in ds[0] and np.all(as_uint8(ds[0]["image"]) == (10, 20, 30))


def test_sidecar_captions_and_mode_errors(tmp_path):
    solid(tmp_path / "p.png", (1, 2, 3))
    (tmp_path / "p.txt").write_text("a caption\n")
    solid(tmp_path / "q.png", (4, 5, 6))  # no sidecar
    with pytest.warns(UserWarning, match="no .txt caption"):
        ds = ImageFolder(tmp_path, resolution=16)
    assert len(ds) == 1 and ds[0]["caption"] == "a caption"
    with pytest.raises(UserError, match="metadata.jsonl"):
        ImageFolder(tmp_path, resolution=16, captions="metadata")
    unlabelled = ImageFolder(tmp_path, resolution=16, captions="none")
    assert len(unlabelled) == 2 and set(unlabelled[0]) == {"image"}


def test_resize_shorter_side_and_centre_crop(tmp_path):
    # 96 x 32: thirds red | green | blue -> resolution 16 keeps the green centre only
    arr = np.zeros((32, 96, 3), np.uint8)
    arr[:, :32, 0] = arr[:, 32:64, 1] = arr[:, 64:, 2] = 255
    Image.fromarray(arr).save(tmp_path / "wide.png")
    ds = ImageFolder(tmp_path, resolution=16)
    img = as_uint8(ds[0]["image"])
    assert img.shape == (16, 16, 3)
    assert np.all(img[:, 2:-2] == (0, 255, 0))  # interior untouched by the neighbours' colours
    assert center_crop(Image.new("RGB", (300, 200)), 64).size == (64, 64)
    assert center_crop(Image.new("RGB", (10, 30)), 64).size == (64, 64)  # upscaling too


def test_transparent_png_over_white(tmp_path):
    solid(tmp_path / "t.png", (255, 0, 0, 0), mode="RGBA")
    ds = ImageFolder(tmp_path, resolution=8)
    assert np.all(as_uint8(ds[0]["image"]) == 255)


def test_missing_root_and_empty_folder(tmp_path):
    with pytest.raises(UserError, match=r"data\.root.*does not exist"):
        build_dataset(DataConfig(name="image_folder", root=str(tmp_path / "nope"), resolution=16))
    with pytest.raises(UserError, match=r"data\.root: no readable images"):
        ImageFolder(tmp_path, resolution=16)
