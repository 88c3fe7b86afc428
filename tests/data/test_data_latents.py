"""Latent shards: encode with a tiny AutoencoderKL, read back, resume, decode, load errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from selfe_cli.data import DataConfig, build_dataset, collate, dataset_info
from selfe_cli.data import latents as L
from selfe_cli.data.shapes import ShapesDataset
from selfe_cli.errors import UserError

diffusers = pytest.importorskip("diffusers")


def tiny_vae(shift: float | None = 0.1, scale: float = 0.5):
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=scale, shift_factor=shift).eval()


class Labelled(torch.utils.data.Dataset):
    def __init__(self, n=7):
        g = torch.Generator().manual_seed(1)
        self.x = torch.rand(n, 3, 16, 16, generator=g) * 2 - 1
        self.y = torch.arange(n) % 3

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i], "label": int(self.y[i])}


@pytest.fixture(scope="module")
def vae():
    return tiny_vae()


def test_round_trip_labels_scaling_and_posterior(vae, tmp_path):
    data = Labelled(7)
    index = L.encode_to_latents(data, vae, tmp_path, batch_size=3, shard_size=3, dtype=torch.float32,
                                vae_name="tiny")
    assert index["complete"] and index["num_shards"] == 3 and index["count"] == 7
    assert sorted(p.name for p in tmp_path.glob("shard-*")) == [f"shard-0000{k}.safetensors" for k in range(3)]
    with torch.no_grad():
        dist = vae.encode(data.x).latent_dist
    want_mean = (dist.mean - 0.1) * 0.5  # (z - shift) * scale
    want_std = dist.std * 0.5
    ds = L.LatentShardsDataset(tmp_path, sample_posterior=False)
    assert len(ds) == 7 and ds.info.is_latent and ds.info.channels == 4 and ds.info.resolution == 8
    assert ds.info.vae == "tiny" and ds.info.image_resolution == 16
    for i in range(7):
        item = ds[i]
        torch.testing.assert_close(item["image"], want_mean[i], rtol=1e-5, atol=1e-5)
        assert item["label"] == i % 3
    sampled = L.LatentShardsDataset(tmp_path, sample_posterior=True)
    torch.manual_seed(5)
    got = sampled[4]["image"]
    torch.manual_seed(5)
    eps = torch.randn(want_mean[4].shape)  # (C, h, w) in contiguous order, as the dataset draws it
    torch.testing.assert_close(got, want_mean[4] + want_std[4] * eps, rtol=1e-5, atol=1e-5)
    assert not torch.equal(sampled[4]["image"], got)  # a fresh draw each access
    batch = collate([ds[i] for i in range(4)])
    assert batch["image"].shape == (4, 4, 8, 8) and batch["label"].tolist() == [0, 1, 2, 0]
    # decode_latents undoes scaling and shift: equal to decoding the raw posterior mean
    with torch.no_grad():
        raw = vae.decode(dist.mean[:2]).sample.clamp(-1, 1)
    torch.testing.assert_close(L.decode_latents(vae, want_mean[:2]), raw, rtol=1e-4, atol=1e-5)


def test_captions_fp16_and_build_dataset(vae, tmp_path):
    data = ShapesDataset(size=5, resolution=16, seed=2)
    L.encode_to_latents(data, vae, tmp_path, batch_size=2, shard_size=4)  # default float16 storage
    cfg = DataConfig(name="latents", root=str(tmp_path), sample_posterior=False)
    ds = build_dataset(cfg)
    assert [ds[i]["caption"] for i in range(5)] == [data[i]["caption"] for i in range(5)]
    assert "label" not in ds[0] and ds.info.has_captions and ds.info.num_classes is None
    assert dataset_info(cfg) == ds.info
    with torch.no_grad():
        want = (vae.encode(data[3]["image"][None]).latent_dist.mean[0] - 0.1) * 0.5
    torch.testing.assert_close(ds[3]["image"], want, rtol=1e-3, atol=1e-4)  # float16 storage
    assert ds[3]["image"].dtype == torch.float32 and torch.equal(ds[3]["image"], ds[3]["image"].half().float())
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=1, collate_fn=collate)
    batch = next(iter(loader))  # survives pickling to a worker
    assert batch["image"].shape == (5, 4, 8, 8) and len(batch["caption"]) == 5


def test_resume_skips_complete_shards_and_refuses_other_plans(vae, tmp_path):
    data = Labelled(7)
    L.encode_to_latents(data, vae, tmp_path, batch_size=4, shard_size=3, dtype=torch.float32)
    first = (tmp_path / "shard-00000.safetensors").stat().st_mtime_ns
    (tmp_path / "shard-00001.safetensors").unlink()
    index = json.loads((tmp_path / "index.json").read_text())
    index["complete"] = False
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="did not finish"):
        L.LatentShardsDataset(tmp_path)
    done = []
    L.encode_to_latents(data, vae, tmp_path, batch_size=4, shard_size=3, dtype=torch.float32, progress=done.append)
    assert sum(done) == 7
    assert (tmp_path / "shard-00000.safetensors").stat().st_mtime_ns == first  # not rewritten
    ds = L.LatentShardsDataset(tmp_path, sample_posterior=False)
    assert [ds[i]["label"] for i in range(7)] == [i % 3 for i in range(7)]
    assert not list(tmp_path.glob(".*tmp"))
    with pytest.raises(UserError, match="shard_size"):
        L.encode_to_latents(data, vae, tmp_path, batch_size=4, shard_size=2, dtype=torch.float32)


def test_load_vae_local_folder_and_errors(vae, tmp_path):
    vae.save_pretrained(tmp_path / "myvae")
    loaded = L.load_vae(str(tmp_path / "myvae"))
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(L.encode_images(loaded, x)[0], L.encode_images(vae, x)[0])
    vae.save_pretrained(tmp_path / "pipeline" / "vae")
    assert L.vae_scaling(L.load_vae(str(tmp_path / "pipeline"))) == (0.5, 0.1)
    with pytest.raises(UserError, match="does not exist"):
        L.load_vae(str(tmp_path / "missing" / "vae"))
    with pytest.raises(UserError) as err:
        L.load_vae("stabilityai/sd-vae-ft-ema", local_files_only=True)
    msg = str(err.value)
    assert "sd-vae-ft-ema" in msg and "local path" in msg and "\n" not in msg


def test_missing_latent_folder(tmp_path):
    with pytest.raises(UserError, match=r"data\.root.*index\.json"):
        build_dataset(DataConfig(name="latents", root=str(tmp_path)))


def test_folder_to_latents_cli(vae, tmp_path):
    import typer
    from typer.testing import CliRunner

    from selfe_cli.cli import data_cmd

    # A private app with the command and a second one, so Typer dispatches by name as on `selfe`.
    app = typer.Typer()
    app.command("encode-latents")(data_cmd.encode_latents)
    app.command("noop")(lambda: None)

    for cls in ("cats", "dogs"):
        (tmp_path / "src" / cls).mkdir(parents=True)
        for i in range(2):
            arr = np.full((24, 20, 3), 60 * i + (100 if cls == "dogs" else 0), np.uint8)
            Image.fromarray(arr).save(tmp_path / "src" / cls / f"{i}.png")
    vae.save_pretrained(tmp_path / "vae")
    result = CliRunner().invoke(app, ["encode-latents", str(tmp_path / "src"), str(tmp_path / "out"), "--vae",
                                      str(tmp_path / "vae"), "--resolution", "16", "--device", "cpu",
                                      "--num-workers", "0", "--shard-size", "3"])
    assert result.exit_code == 0, (result.output, result.exception)
    ds = L.LatentShardsDataset(tmp_path / "out")
    assert len(ds) == 4 and ds.info.class_names == ("cats", "dogs") and ds.info.num_classes == 2
    assert [ds[i]["label"] for i in range(4)] == [0, 0, 1, 1]
    bad = CliRunner().invoke(app, ["encode-latents", str(tmp_path / "nope"), str(tmp_path / "o2"), "--vae",
                                   str(tmp_path / "vae")])
    assert isinstance(bad.exception, UserError) and "SOURCE_DIR" in str(bad.exception)
