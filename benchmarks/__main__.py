"""``python -m benchmarks``: quality per step count and speed for every method, one command.

    python -m benchmarks                          # the CPU suite (or the GPU suite where CUDA is available)
    python -m benchmarks --suite cpu --only speed
    python -m benchmarks --shapes-runs runs/quickstart runs/quickstart_meanflow runs/quickstart_selfe

Parts: ``quality2d`` (flow matching, MeanFlow, Self-E, alpha-Flow, iMF on 2-D distributions, sliced
Wasserstein-2 to the truth), ``shapes`` (the five quickstart recipes with one budget, scored by the shapes GenEval suite; or
already-trained runs with ``--shapes-runs``), ``speed`` (training-step ratios with FLOPs and MFU, sampling
images/s at 1 NFE, Inception feature throughput, Frechet-distance time). Prints Rich tables and writes
``benchmarks/results/<suite>-<device>-<UTC time>.json`` (machine, versions, command, every number) and a
Markdown copy of the tables next to it (what docs/benchmarks.md shows).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from benchmarks import quality2d, shapes_quality, speed
from benchmarks.common import command_line, machine_info, utc_now
from selfe_cli.cli.app import table_console

RESULTS = Path(__file__).resolve().parent / "results"
PARTS = ("quality2d", "shapes", "speed")
QUALITY_STEPS = (1, 2, 4, 8, 50)


@dataclass
class Suite:
    """What one suite measures. ``cpu``: 2 cores, about 15 minutes in all; ``gpu``: bigger models, bf16,
    torch.compile; ``smoke``: every code path in seconds (for tests; its numbers mean nothing)."""

    name: str
    toy: quality2d.Toy2DBudget
    shapes: shapes_quality.ShapesBudget
    train_models: dict[str, dict[str, Any]]
    train_batch: int
    train_rounds: int
    precision: str
    compile_variants: bool
    sample_models: dict[str, dict[str, Any]]
    sample_batch: int
    inception_batch: int
    train_methods: tuple[str, ...] = speed.TRAIN_METHODS
    # per speed network, the methods timed on it where not all (the CPU suite: the zoo on the U-Net only)
    model_methods: dict[str, tuple[str, ...]] = field(default_factory=dict)
    frechet_dim: int = 2048
    frechet_scipy: bool = True  # also time scipy.linalg.sqrtm (26 s at 2048-d on an AMD 2-core machine)


# The CPU suite's speed networks: the quickstart U-Net (class-conditional here, so every method runs on the
# same condition type) and a DiT with attention, both at CPU-sized batches.
_CPU_UNET = {"sample_size": 32, "in_channels": 3, "model_channels": 16, "channel_mult": [1, 2, 2], "num_blocks": 1,
             "attn_resolutions": [8], "condition": "class", "num_classes": 10}
_CPU_DIT = {"sample_size": 16, "in_channels": 3, "condition": "class", "num_classes": 10}
_GPU_MODELS = {
    "unet-ddpmpp-cifar10": {"sample_size": 32, "in_channels": 3, "dropout": 0.0, "condition": "class",
                            "num_classes": 10},
    "DiT-B/2": {"sample_size": 32, "in_channels": 4, "condition": "class", "num_classes": 1000},
    "DiT-XL/2": {"sample_size": 32, "in_channels": 4, "condition": "class", "num_classes": 1000},
}

SUITES = {
    # The CPU suite: ten methods within about 15 minutes on 2 cores of the slower machine kind (AMD EPYC without
    # AVX-512). Budgets shrunk for that (docs/benchmarks.md): 2-D on the checkerboard only with a 128-wide MLP
    # and 700 steps; shapes at 16 px, 200 steps of batch 16, 72 images per step count; the zoo's step
    # ratios on the U-Net (the DiT keeps the originals'); scipy's sqrtm comparison left to the GPU suite.
    "cpu": lambda: Suite(
        name="cpu",
        toy=quality2d.Toy2DBudget(total_steps=700, batch_size=256, width=128, eval_samples=4000, projections=300,
                                  steps=QUALITY_STEPS, datasets=("checkerboard",)),
        shapes=shapes_quality.ShapesBudget(total_steps=200, batch_size=16, resolution=16, per_tag=6, n_per_prompt=2,
                                           steps=QUALITY_STEPS),
        train_models={"unet": _CPU_UNET, "DiT-tiny/2": _CPU_DIT}, train_batch=32, train_rounds=5,
        model_methods={"DiT-tiny/2": speed.ORIGINAL_METHODS},
        precision="fp32", compile_variants=False,
        sample_models={"unet": _CPU_UNET, "DiT-tiny/2": _CPU_DIT}, sample_batch=64, inception_batch=16,
        frechet_scipy=False),
    "gpu": lambda: Suite(
        name="gpu",
        toy=quality2d.Toy2DBudget(total_steps=5000, batch_size=1024, eval_samples=50_000, steps=QUALITY_STEPS),
        shapes=shapes_quality.ShapesBudget(total_steps=2000, batch_size=64, per_tag=None, n_per_prompt=4,
                                           steps=QUALITY_STEPS, precision="bf16"),
        train_models=_GPU_MODELS, train_batch=128, train_rounds=10, precision="bf16", compile_variants=True,
        sample_models=_GPU_MODELS, sample_batch=256, inception_batch=250),
    # every code path in seconds, numbers meaningless: for the tests
    "smoke": lambda: Suite(
        name="smoke",
        toy=quality2d.Toy2DBudget(total_steps=20, batch_size=64, dataset_size=1000, width=32, depth=1,
                                  eval_samples=500, projections=50, steps=(1, 2), datasets=("gmm",)),
        # shapes: the methods with their own sampling paths (Shortcut's power-of-two grid, IMM's start time) and
        # the three originals; every method's CLI training and sampling is covered by tests/e2e (suite time)
        shapes=shapes_quality.ShapesBudget(total_steps=4, batch_size=8, resolution=16, per_tag=1, steps=(1, 2),
                                           methods=("flow_matching", "meanflow", "selfe", "shortcut", "imm")),
        train_models={"unet": {**_CPU_UNET, "sample_size": 16, "model_channels": 8, "channel_mult": [1, 2],
                               "attn_resolutions": [8]}},
        train_batch=4, train_rounds=1, precision="fp32", compile_variants=False,
        train_methods=speed.ORIGINAL_METHODS + ("imf",),  # iMF: a method with network options (NETWORK_OPTIONS)
        sample_models={"DiT-tiny/2": {**_CPU_DIT, "sample_size": 8}}, sample_batch=4, inception_batch=2,
        frechet_dim=64),
}


# ----------------------------------------------------------------------------------------------- tables


@dataclass
class Section:
    title: str
    headers: list[str]
    rows: list[list[str]]

    def rich(self) -> Table:
        table = Table(title=self.title)
        for i, h in enumerate(self.headers):
            table.add_column(h, justify="left" if i == 0 or h in ("method", "model", "data", "measure") else "right")
        for row in self.rows:
            table.add_row(*row)
        return table

    def markdown(self) -> str:
        lines = [f"**{self.title}**", "", "| " + " | ".join(self.headers) + " |",
                 "|" + "|".join("---" for _ in self.headers) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(lines) + "\n"


def _num(x: Any, fmt: str = ".3f") -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float) and not math.isfinite(x):
        return "inf"
    return format(x, fmt)


def quality2d_sections(rec: dict[str, Any]) -> list[Section]:
    b = rec["budget"]
    steps = [str(k) for k in b["steps"]]
    out = []
    for kind, res in rec["results"].items():
        rows = [[name, *(_num(m["sw2_class"][k]) for k in b["steps"]), f"{m['train_seconds']:.0f}"]
                for name, m in res["methods"].items()]
        rows.append(["truth vs truth (floor)", *([_num(res["floor"]["sw2_class"])] * len(steps)), ""])
        out.append(Section(f"2-D {kind}: class-mean sliced W2 to the true distribution (lower is better; "
                           f"{b['total_steps']} steps x batch {b['batch_size']}, MLP {rec['params'] / 1e3:.0f}k params)",
                           ["method", *(f"{k} steps" for k in steps), "train s"], rows))
    return out


def shapes_sections(rec: dict[str, Any]) -> list[Section]:
    b = rec["budget"]
    where = (f"{b['total_steps']} steps x batch {b['batch_size']}, one U-Net" if rec.get("trained_here")
             else "trained runs: " + ", ".join(Path(r["run_dir"]).name for r in rec["results"].values()))
    prompts = rec["prompts"] * b["n_per_prompt"]
    rows = []
    for name, res in rec["results"].items():
        train_s = rec.get("train_seconds", {}).get(name)
        rows.append([name, *(_num(res["steps"][k]["overall"]) for k in b["steps"]),
                     f"{train_s:.0f}" if train_s is not None else ""])
    return [Section(f"shapes GenEval overall per step count (higher is better; {where}; {prompts} images each)",
                    ["method", *(f"{k} steps" for k in b["steps"]), "train s"], rows)]


def speed_sections(rec: dict[str, Any]) -> list[Section]:
    out = []
    rows = []
    for r in rec["train_steps"]:
        if "error" in r:
            rows.append([r["model"], "", r["method"], "error", "", "", "", "", r["error"][:60]])
            continue
        mem = "n/a"
        if r["peak_mem_bytes"]:
            mem = f"{r['peak_mem_bytes'] / 2**20:.0f} MiB ({r['peak_mem_ratio']:.2f}x)"
        rows.append([r["model"], f"{r['params'] / 1e6:.2f}M", r["method"] + (" (compiled)" if r["compile"] else ""),
                     f"{r['median_s'] * 1e3:.1f}", f"{r['ratio']:.2f}x", f"{r['flops_per_step'] / 1e9:.3g}",
                     f"{r['achieved_tflops']:.3g}", _num(r["mfu"], ".1%"), mem])
    first = rec["train_steps"][0] if rec["train_steps"] else {}
    out.append(Section(f"training step vs flow matching (batch {first.get('batch_size')}, {first.get('precision')})",
                       ["model", "params", "method", "ms/step", "ratio", "GFLOP/step", "TFLOP/s", "MFU",
                        "step peak mem"],
                       rows))
    out.append(Section("sampling at 1 NFE (one step, no CFG)", ["model", "params", "batch", "images/s"],
                       [[s["model"], f"{s['params'] / 1e6:.2f}M", str(s["batch_size"]), f"{s['images_per_second']:.0f}"]
                        for s in rec["sampling"]]))
    inc, fr = rec["inception"], rec["frechet"]
    rows = [[f"Inception-v3 pool3 features on {inc['device']} (images/s, batch {inc['batch_size']})",
             f"{inc['images_per_second']:.1f}"],
            ["  -> 50k images (s)", f"{inc['seconds_per_50k']:.0f}"],
            [f"Frechet distance {fr['dim']}-d, eigen route (s)", f"{fr['eigh_seconds']:.2f}"]]
    if "scipy_sqrtm_seconds" in fr:
        rows += [[f"Frechet distance {fr['dim']}-d, scipy.linalg.sqrtm (s)", f"{fr['scipy_sqrtm_seconds']:.2f}"],
                 ["  speed-up; relative difference of the values", f"{fr['speedup']:.1f}x; {fr['relative_difference']:.1e}"]]
    out.append(Section("FID pieces", ["measure", "value"], rows))
    return out


# ----------------------------------------------------------------------------------------------- parts


def run_speed(s: Suite, device: torch.device, log) -> dict[str, Any]:
    rec: dict[str, Any] = {"train_steps": [], "sampling": []}
    for model, kwargs in s.train_models.items():
        variants = [False, True] if s.compile_variants else [False]
        for compiled in variants:
            log(f"speed: training steps of {model}{' (torch.compile)' if compiled else ''}")
            # compiled: flow matching and MeanFlow's default route only (compilation takes minutes per network)
            methods = [m for m in s.model_methods.get(model, s.train_methods)
                       if not compiled or m in ("flow_matching", "meanflow")]
            try:
                rec["train_steps"] += speed.train_step_ratios(
                    model, kwargs, methods, batch_size=s.train_batch, rounds=s.train_rounds, warmup=2,
                    device=device, precision=s.precision, compile=compiled)
            except Exception as err:  # noqa: BLE001 - one failing configuration must not lose the others
                rec["train_steps"].append({"model": model, "method": "all", "compile": compiled,
                                           "error": f"{type(err).__name__}: {err}"})
    for model, kwargs in s.sample_models.items():
        log(f"speed: sampling {model}")
        rec["sampling"].append(speed.sampling_throughput(model, kwargs, batch_size=s.sample_batch, device=device,
                                                         precision=s.precision))
    log("speed: Inception features")
    rec["inception"] = speed.inception_throughput(batch_size=s.inception_batch, batches=3, device=device)
    log("speed: Frechet distance (eigen route" + (" and scipy sqrtm)" if s.frechet_scipy else ")"))
    rec["frechet"] = speed.frechet_timing(dim=s.frechet_dim, with_scipy=s.frechet_scipy)
    return rec


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {"torch": torch.__version__}  # with its build tag (+cpu, +cu130): the distribution metadata lacks it
    for pkg in ("selfe", "numpy", "scipy", "diffusers", "transformers", "open_clip_torch", "torchmetrics",
                "torch-fidelity"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    ap.add_argument("--suite", choices=sorted(SUITES), default=None, help="default: gpu where CUDA is available, else cpu")
    ap.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts ({', '.join(PARTS)})")
    ap.add_argument("--shapes-runs", nargs="+", type=Path, default=None,
                    help="score these trained run directories instead of training the shapes budget")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: the suite's)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/<suite>-<device>-<time>.json)")
    args = ap.parse_args(argv)

    suite_name = args.suite or ("gpu" if torch.cuda.is_available() else "cpu")
    s = SUITES[suite_name]()
    device = torch.device(args.device or ("cuda" if suite_name == "gpu" else "cpu"))
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        ap.error(f"--only: unknown part {unknown[0]!r}; expected some of {', '.join(PARTS)}")
    console = table_console()

    def log(msg: str) -> None:
        console.log(msg)

    started, t0 = utc_now(), time.perf_counter()
    record: dict[str, Any] = {"suite": suite_name, "device": str(device), "command": command_line(),
                              "started": started, "machine": machine_info(), "versions": versions(), "parts": {}}
    sections: list[Section] = []
    if "quality2d" in parts:
        rec = quality2d.run(s.toy, device, log=log)
        record["parts"]["quality2d"] = rec
        sections += quality2d_sections(rec)
    if "shapes" in parts:
        rec = shapes_quality.run(s.shapes, device, runs=args.shapes_runs, log=log)
        record["parts"]["shapes"] = rec
        sections += shapes_sections(rec)
    if "speed" in parts:
        rec = run_speed(s, device, log)
        record["parts"]["speed"] = rec
        sections += speed_sections(rec)
    record["seconds"] = time.perf_counter() - t0
    record["finished"] = utc_now()

    for sec in sections:
        console.print(sec.rich())
    stamp = started.replace(":", "").replace("-", "").replace("+0000", "")[:15]
    out = args.out or RESULTS / f"{suite_name}-{device.type}-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    m = record["machine"]
    header = (f"Suite `{suite_name}` on {m['gpu'] or m['cpu']} ({m['cpu_cores']} cores, torch {m['torch']}), "
              f"{record['started']}, {record['seconds'] / 60:.1f} min. Command: `{record['command']}`\n\n")
    out.with_suffix(".md").write_text(header + "\n".join(sec.markdown() for sec in sections))
    console.print(f"wrote {out} and {out.with_suffix('.md')} ({record['seconds'] / 60:.1f} min)")
    return record


if __name__ == "__main__":
    main(sys.argv[1:])
