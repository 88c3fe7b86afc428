"""The data: section (DataConfig via config.from_dict), build_dataset and collate."""

from __future__ import annotations

import pytest
import torch

from selfe_cli.config import ConfigError, from_dict, to_dict
from selfe_cli.data import DataConfig, build_dataset, collate, dataset_info
from selfe_cli.data.shapes import ShapesDataset
from selfe_cli.errors import UserError


def test_defaults_round_trip_and_help_on_every_field():
    import dataclasses

    cfg = from_dict(DataConfig, {})
    assert cfg.name == "shapes" and cfg.effective_resolution == 32 and cfg.background == (128, 128, 128)
    assert from_dict(DataConfig, to_dict(cfg)) == cfg
    for f in dataclasses.fields(DataConfig):
        assert f.metadata.get("help"), f.name


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError, match=r"data\.resolutoin: unknown key; did you mean 'resolution'\?"):
        from_dict(DataConfig, {"resolutoin": 32}, "data")


@pytest.mark.parametrize("data, pattern", [
    ({"size": "many"}, r"data\.size: expected an integer, got 'many'"),
    ({"name": "cifar"}, r"data\.name: expected one of .*did you mean 'cifar10'"),
    ({"hflip": "yes"}, r"data\.hflip: expected true or false"),
    ({"max_objects": 5}, r"data\.max_objects: expected a value <= 4"),
    ({"background": [1, 2]}, r"data\.background: expected a list of 3 values"),
    ({"tags": ["counting", "colours"]}, r"data\.tags\[1\]: expected one of .*did you mean 'colors'"),
])
def test_bad_values(data, pattern):
    with pytest.raises(ConfigError, match=pattern):
        from_dict(DataConfig, data, "data")


@pytest.mark.parametrize("data, pattern", [
    ({"name": "cifar10"}, "root is required"),
    ({"min_objects": 3, "max_objects": 2}, "min_objects"),
    ({"resolution": 128}, r"resolution for shapes must be in \[16, 64\]"),
    ({"hflip": True}, "hflip is not allowed for shapes"),
    ({"name": "cifar10", "root": "x", "resolution": 64}, "must be 32"),
    ({"name": "image_folder", "root": "x"}, "resolution is required"),
    ({"background": [0, 0, 300]}, "0-255"),
    ({"min_objects": 3, "tags": ["position"]}, "no caption tag"),
])
def test_cross_field_rules(data, pattern):
    with pytest.raises(ConfigError, match=pattern) as err:
        from_dict(DataConfig, data, "data")
    assert str(err.value).startswith("data: ")


def test_build_shapes_and_collate():
    cfg = from_dict(DataConfig, {"size": 6, "resolution": 16, "seed": 3, "background": [90, 90, 90],
                                 "tags": "counting", "min_objects": 2})
    ds = build_dataset(cfg)
    assert isinstance(ds, ShapesDataset) and len(ds) == 6 and ds.info == dataset_info(cfg)
    corner = ((ds[0]["image"][:, 0, 0] + 1) * 127.5).round()  # objects keep a gap from the border
    assert corner.tolist() == [90, 90, 90]
    batch = collate([ds[i] for i in range(6)])
    assert batch["image"].shape == (6, 3, 16, 16) and set(batch) == {"image", "caption", "meta"}
    assert all(m["geneval"]["tag"] == "counting" for m in batch["meta"])
    assert batch["caption"] == [ds[i]["caption"] for i in range(6)]
    test = build_dataset(cfg, split="test")
    assert not torch.equal(test[0]["image"], ds[0]["image"])
    with pytest.raises(UserError, match="split"):
        build_dataset(cfg, split="validation")


def test_collate_labels_and_mixed_keys():
    items = [{"image": torch.zeros(1, 2, 2), "label": 3, "caption": "x"}, {"image": torch.ones(1, 2, 2), "label": 1}]
    batch = collate(items)
    assert batch["label"].dtype == torch.long and batch["label"].tolist() == [3, 1]
    assert "caption" not in batch and batch["image"].shape == (2, 1, 2, 2)
