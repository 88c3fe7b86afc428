"""FID benchmarks: Frechet distance (eigen route vs scipy.linalg.sqrtm) and Inception throughput.

    python benchmarks/fid_bench.py [--dim 2048] [--batch 32] [--batches 3] [--skip-scipy]

Inception weights are randomly initialised (same architecture, same cost as the real ones, no
download). Prints a Rich table and writes benchmarks/results/fid_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from selfe_cli.evaluation.features import inception_features
from selfe_cli.evaluation.fid import frechet_distance


def scipy_frechet(mu1, s1, mu2, s2) -> float:
    import scipy.linalg

    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def random_stats(rng: np.random.Generator, dim: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    x = rng.standard_normal((n, dim)) @ rng.standard_normal((dim, dim)) / np.sqrt(dim)
    return x.mean(0), np.cov(x, rowvar=False)


def timed(fn, *args, repeats: int = 1) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(*args)
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=32, help="images per Inception batch")
    ap.add_argument("--batches", type=int, default=3, help="timed Inception batches (after one warm-up)")
    ap.add_argument("--image-size", type=int, default=32, help="input side (resized to 299 inside)")
    ap.add_argument("--skip-scipy", action="store_true", help="skip the (slow) scipy sqrtm reference")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fid_bench.json")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    mu1, s1 = random_stats(rng, args.dim, 2 * args.dim)
    mu2, s2 = random_stats(rng, args.dim, 2 * args.dim)
    t_eig, fd_eig = timed(frechet_distance, mu1, s1, mu2, s2, repeats=2)
    result: dict[str, object] = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "frechet": {"dim": args.dim, "eigh_seconds": t_eig, "value_eigh": fd_eig},
    }
    if not args.skip_scipy:
        t_sp, fd_sp = timed(scipy_frechet, mu1, s1, mu2, s2)
        result["frechet"].update(scipy_sqrtm_seconds=t_sp, value_scipy=fd_sp,  # type: ignore[union-attr]
                                 relative_difference=abs(fd_eig - fd_sp) / abs(fd_sp))

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    feats = inception_features(device=device, random_init=True)
    images = torch.randint(0, 256, (args.batch, args.image_size, args.image_size, 3), dtype=torch.uint8)
    feats(images)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.batches):
        feats(images)
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    result["inception"] = {"device": device, "batch": args.batch, "image_size": args.image_size,
                           "images_per_second": args.batch * args.batches / elapsed,
                           "seconds_per_50k": 50_000 * elapsed / (args.batch * args.batches)}

    table = Table(title="FID benchmarks")
    table.add_column("measure")
    table.add_column("value", justify="right")
    fr = result["frechet"]
    table.add_row(f"Frechet distance {args.dim}-d, eigh route (s)", f"{fr['eigh_seconds']:.2f}")  # type: ignore[index]
    if "scipy_sqrtm_seconds" in fr:  # type: ignore[operator]
        table.add_row(f"Frechet distance {args.dim}-d, scipy sqrtm (s)", f"{fr['scipy_sqrtm_seconds']:.2f}")  # type: ignore[index]
        table.add_row("relative difference of the two values", f"{fr['relative_difference']:.1e}")  # type: ignore[index]
    inc = result["inception"]
    table.add_row(f"Inception-v3 features on {device} (images/s)", f"{inc['images_per_second']:.1f}")  # type: ignore[index]
    table.add_row("  -> time for 50k images (s)", f"{inc['seconds_per_50k']:.0f}")  # type: ignore[index]
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
