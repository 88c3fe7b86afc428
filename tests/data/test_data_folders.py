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
    with pytest.warns(UserWarning, match=r"skipped 2 of 4 images in .* that cannot be read") as rec:
        ds = ImageFolder(tmp_path, resolution=8)
    assert len([w for w in rec if "cannot be read" in str(w.message)]) == 1
    assert str(tmp_path) in str(rec[0].message)
    assert "a/bad.png (not an image)" in str(rec[0].message) and "b/empty.jpg (empty file)" in str(rec[0].message)
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


def many(tmp_path, n_good, bad):
    """``n_good`` small distinct images in two classes, plus bad files given as {name: bytes}."""
    for i in range(n_good):
        solid(tmp_path / ("a" if i % 2 else "b") / f"{i:03d}.png", (i % 256, 7, 9), size=(4, 4))
    for name, data in bad.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)


def test_bad_files_below_the_share_are_skipped_named_and_order_is_unchanged(tmp_path):
    many(tmp_path, 198, {"a/broken.png": b"\x89PNG\r\n\x1a\n garbage", "b/empty.png": b""})
    cfg = DataConfig(name="image_folder", root=str(tmp_path), resolution=4)  # max_bad_fraction 0.01: 2 of 200 ok
    with pytest.warns(UserWarning, match=r"skipped 2 of 200 images .*a/broken.png .*b/empty.png \(empty file\)"):
        ds = build_dataset(cfg)
    assert len(ds) == 198 and ds.skipped == 2 and [p.name for p, _ in ds.bad_files] == ["broken.png", "empty.png"]
    # the readable images keep the order (and so the data order) of a folder without the bad files
    (tmp_path / "a" / "broken.png").unlink()
    (tmp_path / "b" / "empty.png").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clean = build_dataset(cfg)
    assert clean.entries == ds.entries


def test_bad_files_above_the_share_are_one_error_naming_them(tmp_path):
    bad = {f"a/bad{i}.png": b"not an image" for i in range(8)}
    many(tmp_path, 92, bad)
    cfg = DataConfig(name="image_folder", root=str(tmp_path), resolution=4, max_bad_fraction=0.05)
    with pytest.raises(UserError, match=r"8 of 100 images .* cannot be read \(8\.0%, more than "
                                        r"data\.max_bad_fraction 0\.05 allows\): a/bad0\.png \(not an image\), "
                                        r".*a/bad4\.png \(not an image\) and 3 more; .*") as err:
        build_dataset(cfg)
    assert "\n" not in str(err.value)
    with pytest.warns(UserWarning, match="skipped 8 of 100"):
        assert len(build_dataset(DataConfig(name="image_folder", root=str(tmp_path), resolution=4,
                                            max_bad_fraction=0.08))) == 92


def test_undecodable_files_count_towards_the_share_when_drawn(tmp_path):
    for i in range(4):  # sorted: 0a 0b 1a 1b ...; the b files have a fine header and cut-short pixel data
        Image.fromarray(np.full((64, 64, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}a.png")
        noise = np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(noise).save(tmp_path / f"{i}b.png")
        raw = (tmp_path / f"{i}b.png").read_bytes()
        (tmp_path / f"{i}b.png").write_bytes(raw[: len(raw) // 2])
    ds = ImageFolder(tmp_path, resolution=8, max_bad_fraction=0.25)  # 2 of 8 may be bad
    assert len(ds) == 8 and ds.skipped == 0  # the header scan cannot see these
    with pytest.warns(UserWarning, match="could not decode .*0b.png"):
        assert np.all(as_uint8(ds[1]["image"]) == 40)  # replaced by the next image, 1a
    with pytest.warns(UserWarning, match="could not decode .*1b.png"):
        ds[3]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.all(as_uint8(ds[3]["image"]) == 80)  # the same file again: same image, no new warning
    with pytest.raises(UserError, match=r"3 of 8 images .* cannot be read .*0b\.png .*2b\.png"):
        ds[5]


def test_user_error_from_a_loader_worker_keeps_its_one_line(tmp_path):
    class Bad(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            raise UserError("data.root: 3 of 8 images in /x cannot be read")

    loader = torch.utils.data.DataLoader(Bad(), batch_size=1, num_workers=1)
    with pytest.raises(UserError) as err:
        next(iter(loader))
    assert str(err.value) == "data.root: 3 of 8 images in /x cannot be read"
