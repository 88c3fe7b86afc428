"""The benchmark suite: its distance to the true 2-D distributions (closed forms), its data, and one run of
``python -m benchmarks`` end to end (the ``smoke`` suite: every code path in seconds)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from benchmarks.quality2d import class_sliced_w2, sliced_w2, unit_directions, wasserstein2_1d_sq

from selfe_cli.data.toy2d import (
    BOARD_HALF,
    GMM_RADIUS,
    Toy2DDataset,
    checkerboard_density_support,
    gmm_means,
    sample_toy2d,
)

ROOT = Path(__file__).resolve().parents[2]


def test_w2_1d_matches_the_sorted_coupling_by_hand():
    a = torch.tensor([[0.0, 3.0, 1.0]], dtype=torch.float64)
    b = torch.tensor([[2.0, 1.0, 5.0]], dtype=torch.float64)
    # sorted: (0, 1, 3) vs (1, 2, 5): squared gaps 1, 1, 4
    torch.testing.assert_close(wasserstein2_1d_sq(a, b), torch.tensor([2.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="equal sample sizes"):
        wasserstein2_1d_sq(a, b[:, :2])


def test_directions_are_unit_and_seeded():
    d = unit_directions(100, 3, seed=1)
    torch.testing.assert_close(d.norm(dim=1), torch.ones(100, dtype=torch.float64))
    assert torch.equal(d, unit_directions(100, 3, seed=1)) and not torch.equal(d, unit_directions(100, 3, seed=2))


def test_sliced_w2_of_a_translation_is_norm_over_sqrt_dim():
    x = torch.randn(4000, 2, generator=torch.Generator().manual_seed(0))
    m = torch.tensor([3.0, -4.0])
    # E_theta (theta . m)^2 = |m|^2 / D exactly; Monte Carlo over 4000 directions
    assert sliced_w2(x, x + m, projections=4000) == pytest.approx(5.0 / math.sqrt(2), rel=0.03)
    assert sliced_w2(x, x, projections=100) == 0.0


def test_sliced_w2_between_isotropic_gaussians_is_the_scale_gap():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 2, generator=g)
    y = 3.0 * torch.randn(20000, 2, generator=g)
    assert sliced_w2(x, y, projections=200) == pytest.approx(2.0, rel=0.03)


def test_class_sliced_w2_averages_the_classes():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 2, generator=g)
    labels = torch.arange(2000) % 2
    y = x + labels[:, None] * torch.tensor([2.0, 0.0])  # class 1 moved by 2 along x: SW2 = 2 / sqrt(2)
    assert class_sliced_w2(x, y, labels, projections=4000) == pytest.approx(math.sqrt(2) / 2, rel=0.05)


def test_toy_distributions_are_exact():
    g = torch.Generator().manual_seed(0)
    x, labels = sample_toy2d("checkerboard", 5000, g)
    assert checkerboard_density_support(x, labels).all()
    assert x.abs().max() <= BOARD_HALF and set(labels.tolist()) == {0, 1}
    x, labels = sample_toy2d("gmm", 5000, g)
    nearest = torch.cdist(x, gmm_means()).argmin(dim=1)
    assert ((nearest % 2) == labels).float().mean() > 0.999  # std 0.2 at radius 2: modes barely overlap
    assert x.norm(dim=1).mean() == pytest.approx(GMM_RADIUS, rel=0.05)
    ds = Toy2DDataset("gmm", size=10, seed=3)
    assert ds[0]["image"].shape == (2, 1, 1) and ds.info.num_classes == 2
    with pytest.raises(ValueError, match="unknown 2-D distribution"):
        sample_toy2d("spiral", 10, g)


@pytest.mark.slow
def test_the_suite_runs_end_to_end_and_writes_its_records(tmp_path):
    out = tmp_path / "smoke.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--suite", "smoke", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = json.loads(out.read_text())
    assert record["suite"] == "smoke" and record["command"].endswith("-m benchmarks --suite smoke --out " + str(out))
    assert {"cpu", "torch", "cpu_cores"} <= set(record["machine"]) and record["versions"]["torch"] == torch.__version__
    toy = record["parts"]["quality2d"]["results"]["gmm"]
    assert set(toy["methods"]) == {"flow_matching", "meanflow", "selfe", "alphaflow", "imf", "tim", "sct", "ect", "shortcut", "imm"}
    assert all(math.isfinite(v) for m in toy["methods"].values() for v in m["sw2_class"].values())
    shapes = record["parts"]["shapes"]["results"]
    assert set(shapes) == {"flow_matching", "meanflow", "selfe", "shortcut", "imm"}  # the smoke suite's subset
    assert all(0.0 <= shapes[m]["steps"][k]["overall"] <= 1.0 for m in shapes for k in ("1", "2"))
    sp = record["parts"]["speed"]
    ratios = {r["method"]: r["ratio"] for r in sp["train_steps"]}
    assert ratios["flow_matching"] == 1.0 and set(ratios) == {"flow_matching", "meanflow", "meanflow:jvp_mode=two_pass",
                                                              "selfe", "imf"}
    flops = {r["method"]: r["flops_per_step"] for r in sp["train_steps"]}
    # the JVP and Self-E's extra passes cost FLOPs that flow matching does not spend
    assert 0 < flops["flow_matching"] < min(flops["meanflow"], flops["selfe"], flops["imf"])
    params = {r["method"]: r["params"] for r in sp["train_steps"]}
    assert params["imf"] > params["flow_matching"] == params["meanflow"]  # iMF's guidance inputs (NETWORK_OPTIONS)
    assert sp["frechet"]["relative_difference"] < 1e-6 and sp["inception"]["images_per_second"] > 0
    md = out.with_suffix(".md").read_text()
    assert "training step vs flow matching" in md and "shapes GenEval overall" in md and "Command: `" in md


def test_2d_schedules_follow_the_budget_length():
    from benchmarks.quality2d import Toy2DBudget, method_overrides

    assert method_overrides("sct", Toy2DBudget(total_steps=800)) == {"tangent_warmup_steps": 80}
    assert method_overrides("ect", Toy2DBudget(total_steps=800)) == {"stage_steps": 133}
    assert method_overrides("ect", Toy2DBudget(total_steps=3000)) == {"stage_steps": 500}
    assert method_overrides("selfe", Toy2DBudget()) == {"time_shift": False}
    b = Toy2DBudget(method_overrides={"sct": {"tangent_warmup_steps": 7}})
    assert method_overrides("sct", b) == {"tangent_warmup_steps": 7}  # an explicit value wins


def test_gpu_check_runs_its_code_paths_on_the_cpu(tmp_path):
    """The prepared GPU script (benchmarks/gpu_check.py) in --dry-run: CPU, tiny networks, every part once."""
    from benchmarks import gpu_check

    record = gpu_check.main(["--dry-run", "--no-tests", "--out", str(tmp_path)])
    rows = record["train_steps"]
    assert {r["model"] for r in rows} == set(gpu_check.DRY_MODELS)
    assert all("error" not in r for r in rows), [r.get("error") for r in rows]
    assert {r["method"] for r in rows} == set(gpu_check.METHODS)
    assert all(r["ratio"] > 0 and r["flops_per_step"] > 0 for r in rows)
    assert len(record["sampling"]) == 2 and record["inception"]["images_per_second"] > 0
    saved = json.loads((tmp_path / "gpu-check.json").read_text())
    assert saved["dry_run"] is True and len(saved["train_steps"]) == len(rows)
    assert "| DiT-tiny/2 | meanflow |" in (tmp_path / "gpu-check.md").read_text()


def test_cpu_step_peak_memory_is_measured_in_a_fresh_process():
    from benchmarks import speed

    kwargs = {"sample_size": 8, "in_channels": 3, "model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1,
              "attn_resolutions": [4], "condition": "class", "num_classes": 10}
    small = speed.cpu_step_peak_memory("unet", kwargs, "flow_matching", batch_size=2)
    big = speed.cpu_step_peak_memory("unet", {**kwargs, "sample_size": 64}, "flow_matching", batch_size=16)
    assert 0 <= small < big  # 512x the pixels: the step's activations must show


def test_jvp_history_loads_a_revision_engine_beside_the_current_one(tmp_path):
    """benchmarks.jvp_history: an earlier revision's engine (here HEAD's) runs interleaved with the current one."""
    from benchmarks import jvp_history

    record = jvp_history.main(["--rev", "HEAD", "--models", "DiT-tiny/2", "--rounds", "1", "--batch-size", "4",
                               "--specs", "flow_matching,old:meanflow,meanflow", "--out", str(tmp_path / "h.json")])
    assert [r["spec"] for r in record["rows"]] == ["flow_matching", "old:meanflow", "meanflow"]
    assert record["rows"][0]["ratio"] == 1.0 and all(r["median_s"] > 0 for r in record["rows"])
    assert json.loads((tmp_path / "h.json").read_text())["rev"] == "HEAD"
