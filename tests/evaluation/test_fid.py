"""FID: Frechet distance vs scipy, statistics merging, .npz files, the pipeline with a tiny network."""

from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
import scipy.linalg
import torch

from selfe_cli.errors import UserError
from selfe_cli.evaluation import fid as F
from selfe_cli.evaluation.features import InceptionV3Features, inception_features, inception_weights_path


def scipy_fd(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = covmean.real
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def random_cov(rng, d, n):
    x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) / np.sqrt(d)
    return np.cov(x, rowvar=False), x.mean(0)


@pytest.mark.parametrize("d", [
    64, 256,
    # the FID dimension; scipy's sqrtm alone takes 13 s on 2 idle cores (minutes on a busy machine)
    pytest.param(2048, marks=pytest.mark.slow),
])
def test_frechet_matches_scipy_sqrtm(d):
    rng = np.random.default_rng(d)
    s1, mu1 = random_cov(rng, d, 2 * d)
    s2, mu2 = random_cov(rng, d, 2 * d)
    ours = F.frechet_distance(mu1, s1, mu2, s2)
    ref = scipy_fd(mu1, s1, mu2, s2)
    assert ours == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize("d", [1, 3, 17])
def test_frechet_closed_form_diagonal(d):
    rng = np.random.default_rng(d)
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert F.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_frechet_identical_is_zero_and_rank_deficient_ok():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((10, 64))  # 10 samples in 64-d: singular covariance
    s, mu = np.cov(x, rowvar=False), x.mean(0)
    # the ~54 zero eigenvalues come out as +-1e-16 round-off, whose square roots add up to ~1e-6
    assert abs(F.frechet_distance(mu, s, mu, s)) < 1e-4 * np.trace(s)


def test_running_stats_merge_equals_one_pass_and_np_cov():
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.standard_normal((300, 8)) * 3 + 5)
    one = F.RunningStats(8)
    one.update(x)
    parts = [F.RunningStats(8) for _ in range(3)]
    for p, chunk in zip(parts, (x[:7], x[7:200], x[200:]), strict=True):
        p.update(chunk)
    merged = parts[0].merge(parts[1]).merge(parts[2])
    mu1, s1 = one.mean_cov()
    mu2, s2 = merged.mean_cov()
    assert merged.count == 300
    np.testing.assert_allclose(mu1, mu2, rtol=1e-12)
    np.testing.assert_allclose(s1, s2, rtol=1e-10)
    np.testing.assert_allclose(s1, np.cov(x.numpy(), rowvar=False), rtol=1e-10)
    assert one.sum.dtype == torch.float64


def test_npz_round_trip_and_errors(tmp_path):
    rng = np.random.default_rng(3)
    mu, sigma = rng.standard_normal(5), np.eye(5) * 2
    path = F.save_stats(tmp_path / "ref.npz", mu, sigma)
    mu2, sigma2 = F.load_stats(path)
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(sigma, sigma2)
    with np.load(path) as data:  # readable by other tools: plain arrays named mu and sigma
        assert set(data.files) == {"mu", "sigma"}
    np.savez(tmp_path / "bad.npz", m=mu)
    with pytest.raises(UserError, match="'mu' and 'sigma'"):
        F.load_stats(tmp_path / "bad.npz")
    with pytest.raises(UserError, match="not found"):
        F.load_stats(tmp_path / "missing.npz")


def test_quantize_rounds_like_png():
    x = torch.tensor([0.0, 0.5 / 255, 0.51 / 255, 1.0, 1.7, -0.2, 254.6 / 255])
    assert F.quantize_images(x).tolist() == [0, 0, 1, 255, 255, 0, 255]


# --- the pipeline with a tiny pluggable network ---------------------------------------------------
class TinyFeatures:
    """A fixed random conv net: uint8 (N, H, W, 3) -> (N, 16)."""

    dim = 16

    def __init__(self):
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2), torch.nn.Tanh(), torch.nn.Conv2d(8, 16, 3, 2),
                                       torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())

    @torch.no_grad()
    def __call__(self, images):
        return self.net(images.permute(0, 3, 1, 2).float() / 127.5 - 1).double()


class FakeGenerator:
    """Image i is a deterministic function of its seed; ``shift`` brightens everything."""

    name, resolution, cond_kind = "fake", 16, "none"

    def __init__(self, shift=0):
        self.shift = shift
        self.calls = []

    def generate(self, conds, seeds, *, steps, cfg_scale=None):
        self.calls.append(len(seeds))
        imgs = [torch.randint(0, 200, (16, 16, 3), generator=torch.Generator().manual_seed(s), dtype=torch.uint8)
                for s in seeds]
        return (torch.stack(imgs).int() + self.shift).clamp(0, 255).to(torch.uint8)


def test_pipeline_identical_sets_zero_shifted_larger(tmp_path):
    feats = TinyFeatures()
    gen = FakeGenerator()
    stats = F.generated_stats(gen, feats, n=200, steps=1, batch_size=64)
    assert gen.calls == [64, 64, 64, 8]  # batches, never all at once
    ref = F.generated_stats(FakeGenerator(), feats, n=200, steps=1, batch_size=50)
    mu, sigma = ref.mean_cov()
    assert abs(F.fid_against(stats, mu, sigma)) < 1e-6
    other = F.fid_against(F.generated_stats(FakeGenerator(), feats, n=200, steps=1, batch_size=64, seed_offset=1000),
                          mu, sigma)
    shifted = F.fid_against(F.generated_stats(FakeGenerator(shift=60), feats, n=200, steps=1, batch_size=64), mu, sigma)
    assert shifted > 10 * other > 0


def test_generated_png_matches_features(tmp_path):
    feats = TinyFeatures()
    F.generated_stats(FakeGenerator(), feats, n=3, steps=1, batch_size=2, save_png=tmp_path)
    from PIL import Image

    saved = np.asarray(Image.open(tmp_path / "000002.png"))
    again = FakeGenerator().generate(None, [2], steps=1)[0].numpy()
    np.testing.assert_array_equal(saved, again)


def test_class_conditional_labels_balanced():
    class Gen(FakeGenerator):
        cond_kind, num_classes = "class", 10

    assert F.conditions_for(Gen(), [0, 9, 10, 23]) == [0, 9, 0, 3]
    text = FakeGenerator()
    text.cond_kind = "text"
    with pytest.raises(UserError):
        F.conditions_for(text, [0])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    stats = F.generated_stats(FakeGenerator(), TinyFeatures(), n=37, steps=1, batch_size=8)
    if rank == 0:
        torch.save({"count": stats.count, "sum": stats.sum, "outer": stats.outer}, out)
    dist.destroy_process_group()


def test_distributed_sums_equal_single_process(tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "r0.pt")
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    got = torch.load(out)
    single = F.generated_stats(FakeGenerator(), TinyFeatures(), n=37, steps=1, batch_size=8)
    assert got["count"] == 37
    torch.testing.assert_close(got["sum"], single.sum, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got["outer"], single.outer, rtol=1e-12, atol=1e-10)


# --- Inception wrapper ------------------------------------------------------------------------------
def test_inception_random_init_is_torch_fidelity_network():
    torch.manual_seed(0)
    feats = inception_features(random_init=True)
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    assert isinstance(feats.network, FeatureExtractorInceptionV3) and feats.dim == 2048
    assert not feats.network.training
    img = torch.randint(0, 256, (1, 24, 24, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = feats(img)
    assert out.shape == (1, 2048) and out.dtype == torch.float64 and torch.isfinite(out).all()


def test_inception_wrapper_feeds_uint8_nchw():
    seen = []

    class Net(torch.nn.Module):
        def forward(self, x):
            seen.append(x)
            return (x.float().mean((2, 3)),)

    img = torch.randint(0, 256, (2, 5, 7, 3), dtype=torch.uint8)
    out = InceptionV3Features(Net())(img)
    # torch-fidelity's forward wants uint8 (N, 3, H, W) and does the TF1 resize itself
    assert seen[0].dtype == torch.uint8 and seen[0].shape == (2, 3, 5, 7)
    torch.testing.assert_close(out, img.double().mean((1, 2)))
    with pytest.raises(ValueError):
        InceptionV3Features(Net())(img.float())


def test_inception_offline_without_weights_is_user_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def no_net(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_net)
    with pytest.raises(UserError, match="--inception-weights"):
        inception_weights_path(None)
    with pytest.raises(UserError, match="--inception-weights"):
        inception_weights_path(tmp_path / "nope.pth")


# --- the commands ------------------------------------------------------------------------------------
def test_fid_commands_end_to_end(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from selfe_cli.cli import eval_cmd
    from selfe_cli.cli.app import app
    from selfe_cli.data.shapes import ShapesDataset
    from selfe_cli.evaluation import features

    monkeypatch.setattr(features, "inception_features", lambda weights=None, device="cpu", **k: TinyFeatures())
    runner = CliRunner()
    ref = tmp_path / "shapes.npz"
    res = runner.invoke(app, ["eval", "fid-ref", "shapes", "--out", str(ref), "--n", "64", "--batch-size", "16"])
    assert res.exit_code == 0, res.output
    mu, sigma = F.load_stats(ref)
    assert mu.shape == (16,) and sigma.shape == (16, 16)

    class ShapesGen(FakeGenerator):
        """Renders the dataset's image with index = seed: at seed offset 0 the very reference images."""

        def generate(self, conds, seeds, *, steps, cfg_scale=None):
            ds = ShapesDataset(size=100_000, resolution=32, seed=0)
            return torch.stack([F.image_to_uint8(ds[s]["image"]) for s in seeds])

    monkeypatch.setattr(eval_cmd, "_run_dirs", lambda ckpts: [tmp_path / "runs" / "toy"])
    monkeypatch.setattr(eval_cmd, "_load_generator", lambda run, weights, device: ShapesGen())
    out = tmp_path / "eval"
    res = runner.invoke(app, ["eval", "fid", "--ref", str(ref), "--n", "64", "--steps", "1,2", "--batch-size", "16",
                              "--out", str(out), "--save-npz", str(tmp_path / "gen.npz")])
    assert res.exit_code == 0, res.output
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert [r["steps"] for r in rows] == [1, 2]
    assert all(abs(r["fid"]) < 1e-6 for r in rows)  # the same 64 images as the reference
    assert (tmp_path / "gen-toy-steps1.npz").is_file() and (out / "sweep.png").is_file()
    res = runner.invoke(app, ["eval", "fid", "--ref", str(tmp_path / "nope.npz")])
    assert isinstance(res.exception, UserError)
