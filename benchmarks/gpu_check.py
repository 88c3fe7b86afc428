"""The GPU check: one prepared command for a lent CUDA machine, under 8 minutes, one JSON record.

    python -m benchmarks.gpu_check --out DIR          # on a CUDA machine
    python -m benchmarks.gpu_check --dry-run --out DIR  # the same code paths on the CPU, tiny sizes (a test)

It runs, in this order, and writes ``DIR/gpu-check.json`` (and ``.md``) after every part, so a run cut short
still leaves what it measured:
  1. the ``gpu``-marked tests (``pytest -m gpu``: CUDA bf16 JVPs, the Triton attention JVP against the MATH
     kernel in fp32 and bf16), where pytest is installed;
  2. training-step time of flow matching, MeanFlow (default route and ``two_pass``) and Self-E on
     ``unet-ddpmpp-cifar10``, DiT-B/2 and DiT-XL/2 in bf16, eager, then ``torch.compile``d (flow matching and
     MeanFlow), each with FLOPs, MFU against the device's dense bf16 peak and the step's peak memory
     (``torch.cuda.max_memory_allocated``); compiled variants are skipped, and recorded as skipped, once the
     time budget is spent;
  3. sampling images/s at 1 NFE and Inception-v3 feature images/s.
Weights are randomly initialised (the speed of a network does not depend on its values; no downloads).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import speed
from benchmarks.common import machine_info, utc_now

ROOT = Path(__file__).resolve().parent.parent

MODELS = {  # the GPU suite's networks (benchmarks/__main__.py), at their paper resolutions
    "unet-ddpmpp-cifar10": {"sample_size": 32, "in_channels": 3, "dropout": 0.0, "condition": "class", "num_classes": 10},
    "DiT-B/2": {"sample_size": 32, "in_channels": 4, "condition": "class", "num_classes": 1000},
    "DiT-XL/2": {"sample_size": 32, "in_channels": 4, "condition": "class", "num_classes": 1000},
}
DRY_MODELS = {  # --dry-run: the same families, tiny
    "unet": {"sample_size": 16, "in_channels": 3, "model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1,
             "attn_resolutions": [8], "condition": "class", "num_classes": 10},
    "DiT-tiny/2": {"sample_size": 8, "in_channels": 3, "condition": "class", "num_classes": 10},
}
# bf16 training: MeanFlow's default (float32 JVP -> two_pass), two_pass asked for, and the one-pass route with a
# bf16 JVP
METHODS = [*speed.TRAIN_METHODS, "meanflow:jvp_dtype=bfloat16"]
COMPILED_METHODS = ["flow_matching", "meanflow", "meanflow:jvp_dtype=bfloat16"]


def _write(out: Path, record: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu-check.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    lines = [f"GPU check on {record['machine'].get('gpu') or record['machine'].get('cpu')}, {record['started']}, "
             f"{(time.perf_counter() - record['_t0']) / 60:.1f} min so far", "",
             "| model | method | compiled | ms/step | ratio | MFU | step peak mem |", "|---|---|---|---|---|---|---|"]
    for r in record["train_steps"]:
        if "error" in r or "skipped" in r:
            lines.append(f"| {r['model']} | {r['method']} | {r['compile']} | {r.get('error') or r.get('skipped')} | | | |")
            continue
        mem = f"{r['peak_mem_bytes'] / 2**30:.2f} GiB ({r['peak_mem_ratio']:.2f}x)" if r["peak_mem_bytes"] else "n/a"
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        lines.append(f"| {r['model']} | {r['method']} | {r['compile']} | {r['median_s'] * 1e3:.1f} | "
                     f"{r['ratio']:.3f}x | {mfu} | {mem} |")
    for s in record["sampling"]:
        lines.append(f"\n1-NFE sampling {s['model']}: {s['images_per_second']:.0f} images/s (batch {s['batch_size']})")
    if record.get("inception"):
        lines.append(f"\nInception-v3: {record['inception']['images_per_second']:.0f} images/s")
    (out / "gpu-check.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu-check")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny networks, no compile: checks the code paths")
    ap.add_argument("--budget-min", type=float, default=7.0, help="stop starting compiled variants after this")
    ap.add_argument("--no-tests", action="store_true", help="skip the gpu-marked tests")
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("benchmarks.gpu_check: no CUDA device (use --dry-run to check the code paths on the CPU)")
    device = torch.device("cpu" if args.dry_run else "cuda")
    models = DRY_MODELS if args.dry_run else MODELS
    precision = "fp32" if args.dry_run else "bf16"
    batch, rounds, sample_batch = (4, 1, 4) if args.dry_run else (128, 8, 256)
    t0 = time.perf_counter()
    record: dict[str, Any] = {"_t0": t0, "started": utc_now(), "machine": machine_info(), "dry_run": args.dry_run,
                              "torch": torch.__version__, "tests": None, "train_steps": [], "sampling": [],
                              "inception": None, "attention_jvp": None}
    try:
        import jvp_flash_attention  # noqa: F401

        record["attention_jvp"] = "jvp_flash_attention installed"
    except ImportError:
        record["attention_jvp"] = "jvp_flash_attention not installed: explicit softmax JVP"

    if not args.no_tests:
        try:
            import pytest  # noqa: F401

            proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                                   str(ROOT / "tests")], cwd=ROOT, capture_output=True, text=True, timeout=240)
            record["tests"] = {"returncode": proc.returncode, "tail": proc.stdout[-3000:] + proc.stderr[-1000:]}
        except ImportError:
            record["tests"] = {"returncode": None, "tail": "pytest is not installed here"}
        except subprocess.TimeoutExpired:
            record["tests"] = {"returncode": None, "tail": "gpu tests timed out after 240 s"}
        _write(args.out, record)

    for compiled in ([False] if args.dry_run else [False, True]):
        for model, kwargs in models.items():
            methods = COMPILED_METHODS if compiled else METHODS
            if compiled and time.perf_counter() - t0 > args.budget_min * 60:
                record["train_steps"].append({"model": model, "method": "all", "compile": True,
                                              "skipped": "time budget spent"})
                continue
            try:
                record["train_steps"] += speed.train_step_ratios(
                    model, kwargs, methods, batch_size=batch, rounds=rounds, warmup=2, device=device,
                    precision=precision, compile=compiled, memory=not args.dry_run)
            except Exception as err:  # noqa: BLE001 - one failing configuration must not lose the others
                record["train_steps"].append({"model": model, "method": "all", "compile": compiled,
                                              "error": f"{type(err).__name__}: {err}"[:500]})
            if device.type == "cuda":
                torch.cuda.empty_cache()
            _write(args.out, record)
    for model, kwargs in models.items():
        record["sampling"].append(speed.sampling_throughput(model, kwargs, batch_size=sample_batch, device=device,
                                                            precision=precision, repeats=2 if args.dry_run else 5))
    _write(args.out, record)
    record["inception"] = speed.inception_throughput(batch_size=2 if args.dry_run else 250,
                                                     batches=1 if args.dry_run else 3, device=device)
    record["seconds"] = time.perf_counter() - t0
    _write(args.out, record)
    print((args.out / "gpu-check.md").read_text())
    return record


if __name__ == "__main__":
    main(sys.argv[1:])
