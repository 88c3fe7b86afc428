"""Training-step cost of each method relative to flow matching, on the same network and batch.

For every model, every method's full training step (loss, backward, Adam step) is timed, interleaved
round by round so that machine load drifts hit all methods alike; the table reports the median step
time, its ratio to flow matching's, and the peak CUDA memory (GPU only). CPU: eager fp32. GPU: bf16
autocast (the JVP itself stays in the method's ``jvp_dtype``).

    .venv/bin/python benchmarks/train_step_ratio.py                       # CPU defaults
    .venv/bin/python benchmarks/train_step_ratio.py --methods flow_matching,meanflow,selfe \\
        --model unet --model DiT-tiny/2 --batch-size 32 --rounds 10
    # method options: name:key=value+key=value, e.g. meanflow:memory_saving=true+jvp_only_r_neq_t=true

Reference (SPEC §2): the official PyTorch MeanFlow port costs 1.79-1.86x flow matching per step on a
2-core CPU (eager fp32, batch 32, 0.56M-2.2M-parameter U-Nets), peak memory 1.9-2.1x; the paper's
JAX code 1.16x (B/4 on TPU).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from rich.table import Table

from selfe_cli.config import from_dict
from selfe_cli.methods import METHODS, Method, MethodEntry
from selfe_cli.methods.meanflow import MeanFlow, MeanFlowConfig
from selfe_cli.models.conditioning import ClassConditioner
from selfe_cli.models.registry import build_model, count_parameters

METHODS = {**METHODS}
METHODS.setdefault("meanflow", MethodEntry(MeanFlow, MeanFlowConfig))  # until methods/__init__ registers it

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_METHODS = ("flow_matching,meanflow,meanflow:memory_saving=true,"
                   "meanflow:memory_saving=true+jvp_only_r_neq_t=true")
# CPU-sized defaults: a ~2M-parameter DDPM++ U-Net (the SPEC reference's size class) and a tiny DiT.
CPU_MODELS = {
    "unet": {"sample_size": 32, "in_channels": 3, "model_channels": 32, "channel_mult": [1, 2, 2],
             "num_blocks": 2, "attn_resolutions": [8]},
    "DiT-tiny/2": {"sample_size": 16, "in_channels": 3, "condition": "class", "num_classes": 10},
}
GPU_MODELS = {
    "unet-ddpmpp-cifar10": {"sample_size": 32, "in_channels": 3, "dropout": 0.0},
    "DiT-B/2": {"sample_size": 32, "in_channels": 4, "condition": "class", "num_classes": 1000},
}


def parse_method(text: str) -> tuple[str, str, dict[str, Any]]:
    """``"meanflow:memory_saving=true+weight_p=0.75"`` -> (label, name, overrides)."""
    name, _, opts = text.partition(":")
    overrides: dict[str, Any] = {}
    for item in filter(None, opts.split("+")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--methods: expected key=value in {item!r} (method {name})")
        overrides[key] = yaml.safe_load(value)
    if name not in METHODS:
        raise SystemExit(f"--methods: unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return text, name, overrides


def build_method(name: str, overrides: dict[str, Any]) -> Method:
    entry = METHODS[name]
    config = from_dict(entry.config_class, overrides, f"method[{name}]")
    return entry.cls(config)


def parse_model(text: str, defaults: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """``"DiT-tiny/2"`` or ``"unet:model_channels=64+dropout=0.1"``."""
    name, _, opts = text.partition(":")
    kwargs = dict(defaults.get(name, {}))
    for item in filter(None, opts.split("+")):
        key, _, value = item.partition("=")
        kwargs[key] = yaml.safe_load(value)
    return name, kwargs


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_model(model_name: str, kwargs: dict[str, Any], methods: list[tuple[str, str, dict[str, Any]]], *,
              batch_size: int, rounds: int, warmup: int, device: torch.device, seed: int) -> list[dict[str, Any]]:
    torch.manual_seed(seed)
    base = build_model(model_name, **kwargs).to(device)
    size, channels = base.sample_size, base.in_channels
    cond = null = None
    if base.cond_kind == "class":
        classes = int(base.config.num_classes)
        cond = torch.randint(0, classes, (batch_size,), device=device)
        null = ClassConditioner(classes).null(batch_size, device)
    elif base.cond_kind != "none":
        raise SystemExit(f"{model_name}: only unconditional and class-conditional models are benchmarked")
    x0 = torch.randn(batch_size, channels, size, size, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    setups = []
    for label, name, overrides in methods:
        net = copy.deepcopy(base).train()
        setups.append({"label": label, "method": build_method(name, overrides), "net": net,
                       "ema": copy.deepcopy(base).eval().requires_grad_(False),
                       "opt": torch.optim.Adam(net.parameters(), lr=1e-5), "times": [], "peak": None})

    def step(s: dict[str, Any], i: int) -> float:
        torch.manual_seed(seed + i)  # the same t, r, noise draws for every method in a round
        sync(device)
        start = time.perf_counter()
        with autocast:
            out = s["method"].loss(s["net"], x0, cond, null_cond=null, step=i, total_steps=rounds + warmup,
                                   ema_net=s["ema"])
        out.loss.backward()
        s["opt"].step()
        s["opt"].zero_grad(set_to_none=True)
        sync(device)
        return time.perf_counter() - start

    for s in setups:  # warm-up (allocator, kernels) and peak memory, one method at a time
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        for i in range(warmup):
            step(s, i)
        if device.type == "cuda":
            s["peak"] = torch.cuda.max_memory_allocated(device)
    for i in range(rounds):  # interleaved timing
        for s in setups:
            s["times"].append(step(s, warmup + i))

    rows = []
    base_time = statistics.median(setups[0]["times"])
    base_peak = setups[0]["peak"]
    for s in setups:
        med = statistics.median(s["times"])
        rows.append({
            "model": model_name, "model_kwargs": kwargs, "params": count_parameters(base),
            "method": s["label"], "median_s": med, "ratio": med / base_time,
            "min_s": min(s["times"]), "times_s": s["times"],
            "peak_mem_bytes": s["peak"], "peak_mem_ratio": (s["peak"] / base_peak) if base_peak else None,
        })
        del s["net"], s["opt"], s["ema"]
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help="comma-separated; the first is the baseline; options: name:key=value+key=value "
                             f"(methods: {', '.join(sorted(METHODS))})")
    parser.add_argument("--model", action="append", default=None,
                        help="registry name, optionally name:key=value+...; repeatable "
                             f"(default CPU: {', '.join(CPU_MODELS)}; GPU: {', '.join(GPU_MODELS)})")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 32 on CPU, 128 on GPU")
    parser.add_argument("--rounds", type=int, default=8, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per method")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/train_step_ratio-<device>-<time>.json)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    defaults = GPU_MODELS if device.type == "cuda" else CPU_MODELS
    models = [parse_model(m, defaults) for m in (args.model or list(defaults))]
    methods = [parse_method(m) for m in args.methods.split(",") if m]
    batch_size = args.batch_size or (128 if device.type == "cuda" else 32)

    rows: list[dict[str, Any]] = []
    for name, kwargs in models:
        rows += run_model(name, kwargs, methods, batch_size=batch_size, rounds=args.rounds, warmup=args.warmup,
                          device=device, seed=args.seed)

    precision = "bf16 autocast" if device.type == "cuda" else "fp32 eager"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    table = Table(title=f"Training step vs {methods[0][0]} ({where}, {precision}, batch {batch_size})")
    for col in ("model", "params", "method", "median s/step", "ratio", "peak mem", "mem ratio"):
        table.add_column(col, justify="left" if col in ("model", "method") else "right")
    for row in rows:
        mem = f"{row['peak_mem_bytes'] / 2**30:.2f} GiB" if row["peak_mem_bytes"] else "n/a"
        mem_ratio = f"{row['peak_mem_ratio']:.2f}x" if row["peak_mem_ratio"] else "n/a"
        table.add_row(row["model"], f"{row['params'] / 1e6:.2f}M", row["method"], f"{row['median_s']:.4f}",
                      f"{row['ratio']:.2f}x", mem, mem_ratio)
    Console().print(table)

    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else RESULTS / f"train_step_ratio-{device.type}-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"device": where, "precision": precision, "batch_size": batch_size, "rounds": args.rounds,
              "warmup": args.warmup, "torch": torch.__version__, "python": platform.python_version(),
              "argv": sys.argv[1:], "rows": rows}
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
