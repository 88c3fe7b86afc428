"""The shapes detector, the official layout, the `selfe eval geneval` command, and the sweep writers."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from selfe_cli.data.shapes import ShapesDataset, render, scene_for_prompt, shapes_prompts
from selfe_cli.evaluation.geneval import read_layout, read_results, score_detections, write_prompt_folder
from selfe_cli.evaluation.shapes_detector import ShapesDetector
from selfe_cli.evaluation.sweep import SweepRow, parse_steps, write_sweep


def _matches(det, scene, threshold=0.9):
    found = det(render(scene))
    got = sorted((s, d["color"], tuple(int(v) for v in d["box"])) for s, ds in found.items() for d in ds
                 if d["score"] > threshold)
    truth = sorted((o.shape, o.color, tuple(o.box)) for o in scene.objects)
    return got == truth


@pytest.mark.parametrize("resolution, n", [(32, 300), (16, 150), (64, 100)])
def test_detector_finds_rendered_ground_truth(resolution, n):
    det = ShapesDetector()
    ds = ShapesDataset(size=n, resolution=resolution, seed=7)
    hits = sum(_matches(det, ds.example(i)[0]) for i in range(n))
    assert hits / n >= 0.99


def test_detector_scores_and_noise_tolerance():
    det = ShapesDetector()
    ds = ShapesDataset(size=60, resolution=32, seed=3)
    rng = np.random.default_rng(0)
    hits = 0
    for i in range(len(ds)):
        scene, _, meta = ds.example(i)
        clean = np.asarray(render(scene)).astype(np.float32)
        noisy = np.clip(clean + rng.normal(0, 12, clean.shape), 0, 255).astype(np.uint8)  # generated-image noise
        found = det(Image.fromarray(noisy))
        ok, _ = score_detections(meta, found, (32, 32))
        hits += ok
    assert hits / len(ds) >= 0.95
    # a clean object scores 1.0 (above the counting threshold), a blob that is no shape scores low
    img = np.full((32, 32, 3), 128, np.uint8)
    img[4:12, 4:12] = (220, 30, 30)
    img[20:22, 4:28] = (30, 70, 230)  # a 2 x 24 bar: no square/circle/triangle fits well
    found = det(Image.fromarray(img))
    assert found["square"][0]["score"] == 1.0 and found["square"][0]["color"] == "red"
    bar = [d for ds in found.values() for d in ds if d["color"] == "blue"]
    assert bar and bar[0]["score"] < 0.9


def test_ground_truth_renders_pass_the_rule_engine():
    det = ShapesDetector()
    rng = np.random.default_rng(0)
    prompts = shapes_prompts(seed=0, per_tag=15)
    ok = [score_detections(p, det(render(scene_for_prompt(p, rng))), (32, 32))[0] for p in prompts]
    assert np.mean(ok) >= 0.99


def test_official_layout_round_trip(tmp_path):
    meta = {"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "red"}], "prompt": "a red circle"}
    imgs = [np.full((8, 8, 3), v, np.uint8) for v in (10, 20, 30)]
    paths = write_prompt_folder(tmp_path, 7, meta, imgs)
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == [
        "00007/samples/0000.png", "00007/samples/0001.png", "00007/samples/0002.png"]
    assert json.loads((tmp_path / "00007" / "metadata.jsonl").read_text()) == meta
    (tmp_path / "00007" / "samples" / "notes.txt").write_text("ignored")
    (tmp_path / "grids").mkdir()  # non-numeric folders are ignored, as in the official scorer
    pairs = read_layout(tmp_path)
    assert [p.name for p, _ in pairs] == ["0000.png", "0001.png", "0002.png"] and pairs[0][1] == meta
    assert np.asarray(Image.open(pairs[2][0]))[0, 0, 0] == 30


def _ground_truth_folder(root, prompts, n=2, res=32):
    rng = np.random.default_rng(1)
    for i, p in enumerate(prompts):
        write_prompt_folder(root, i, p, [render(scene_for_prompt(p, rng, res)) for _ in range(n)])


def _runner():
    from selfe_cli.cli import eval_cmd  # noqa: F401  (registers `selfe eval`)
    from selfe_cli.cli.app import app

    return CliRunner(), app


def test_cli_scores_ground_truth_folder(tmp_path):
    prompts = shapes_prompts(seed=0, per_tag=6)
    _ground_truth_folder(tmp_path / "imgs", prompts)
    runner, app = _runner()
    res = runner.invoke(app, ["eval", "geneval", "--suite", "shapes", "--images", str(tmp_path / "imgs"),
                              "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    records = read_results(tmp_path / "imgs" / "results.jsonl")
    assert len(records) == 2 * len(prompts)
    assert set(records[0]) >= {"filename", "tag", "prompt", "correct", "reason", "metadata", "details"}
    assert json.loads(records[0]["metadata"]) == prompts[0]
    summary = json.loads((tmp_path / "imgs" / "summary.json").read_text())
    assert summary["overall"] >= 0.99 and len(summary["tags"]) == 6
    sweep = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert sweep["rows"][0]["overall"] == pytest.approx(summary["overall"])


def test_cli_scores_wrong_images_low(tmp_path):
    prompts = shapes_prompts(seed=0, per_tag=4)
    rng = np.random.default_rng(0)
    for i, p in enumerate(prompts):  # every image shows the scene of another prompt
        other = prompts[(i + 5) % len(prompts)]
        write_prompt_folder(tmp_path, i, p, [render(scene_for_prompt(other, rng))])
    runner, app = _runner()
    res = runner.invoke(app, ["eval", "geneval", "--suite", "shapes", "--images", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "summary.json").read_text())["overall"] < 0.5


class ShapesOracle:
    """A stand-in Generator: renders the ground truth of each prompt (by caption)."""

    name, resolution, cond_kind = "oracle", 32, "text"

    def __init__(self, prompts):
        self.by_caption = {p["prompt"]: p for p in prompts}
        self.seen = []

    def generate(self, conds, seeds, *, steps, cfg_scale=None):
        self.seen.append((steps, list(seeds)))
        out = [np.asarray(render(scene_for_prompt(self.by_caption[c], np.random.default_rng(s)))) for c, s in
               zip(conds, seeds, strict=True)]
        return torch.from_numpy(np.stack(out))


def test_cli_generates_layout_per_step_and_sweep(tmp_path, monkeypatch):
    from selfe_cli.cli import eval_cmd

    prompts = shapes_prompts(seed=3, per_tag=2)
    oracle = ShapesOracle(prompts)
    monkeypatch.setattr(eval_cmd, "_run_dirs", lambda ckpts: [tmp_path / "runs" / "toy"])
    monkeypatch.setattr(eval_cmd, "_load_generator", lambda run, weights, device: oracle)
    runner, app = _runner()
    out = tmp_path / "out"
    res = runner.invoke(app, ["eval", "geneval", "--suite", "shapes", "--seed", "3", "--per-tag", "2",
                              "--steps", "1,4", "--n-per-prompt", "3", "--batch-size", "5", "--out", str(out)])
    assert res.exit_code == 0, res.output
    for k in (1, 4):
        pairs = read_layout(out / f"steps-{k}")
        assert len(pairs) == 3 * len(prompts)
        assert json.loads((out / f"steps-{k}" / "summary.json").read_text())["overall"] == 1.0
    # image k of prompt i used seed 3 + 3 i + k
    assert sorted(s for steps, seeds in oracle.seen if steps == 1 for s in seeds) == [3 + j for j in range(3 * len(prompts))]
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert [(r["steps"], r["overall"]) for r in rows] == [(1, 1.0), (4, 1.0)]
    assert (out / "sweep.png").stat().st_size > 1000


def test_cli_rejects_bad_input(tmp_path):
    from selfe_cli.errors import UserError

    runner, app = _runner()
    res = runner.invoke(app, ["eval", "geneval", "--suite", "shapes", "--images", str(tmp_path / "missing")])
    assert isinstance(res.exception, UserError) and "--images" in str(res.exception)
    res = runner.invoke(app, ["eval", "geneval", "--suite", "nope", "--images", str(tmp_path)])
    assert isinstance(res.exception, UserError) and "--suite" in str(res.exception)
    with pytest.raises(UserError, match="--steps"):
        parse_steps("1,x")
    assert parse_steps("1, 2,4,2") == [1, 2, 4]


def test_sweep_writers(tmp_path):
    rows = [SweepRow("a", 1, {"fid": 30.5, "extra": 1.0}), SweepRow("a", 4, {"fid": 10.25}),
            SweepRow("b", 1, {"fid": 40.0}), SweepRow("b", 4, {"fid": 12.125})]
    files = write_sweep(rows, tmp_path / "sw", metric="fid", title="FID")
    data = json.loads(files["json"].read_text())
    assert data["metric"] == "fid" and data["rows"][1] == {"model": "a", "steps": 4, "fid": 10.25}
    with open(files["csv"]) as fh:
        table = list(csv.reader(fh))
    assert table[0] == ["model", "steps", "fid", "extra"]
    assert table[4] == ["b", "4", "12.125", ""]
    assert float(table[1][2]) == 30.5
    png = Image.open(files["png"])
    assert png.format == "PNG" and png.size[0] > 300
