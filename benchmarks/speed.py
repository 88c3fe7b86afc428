"""Speed: training-step cost of each method relative to flow matching, sampling throughput at 1 NFE,
Inception feature throughput and Frechet-distance time.

Training steps: every method's full step (loss, backward, Adam step) on the same network, batch and data,
timed interleaved round by round so that drifts in machine load hit all methods alike; the table reports
the median step time and its ratio to the first method's (flow matching). FLOPs per step are counted once
with ``torch.utils.flop_counter`` (matmuls and convolutions, forward-mode tangents included), which gives
the achieved FLOP/s and, where the device's peak is known, the model FLOP utilisation (MFU). CPU: eager
fp32. GPU: bf16 autocast (the MeanFlow JVP stays in its ``jvp_dtype``), optionally ``torch.compile``.

Peak memory of a training step: on CUDA ``torch.cuda.max_memory_allocated`` around the warm-up steps; on
the CPU, where PyTorch keeps no allocator statistics, each (model, method) runs one step in a fresh process
and the growth of its resident set over the state before the step (``VmHWM`` after resetting it through
``/proc/self/clear_refs``) is the step's peak.

Reference (docs/benchmarks.md): the official PyTorch MeanFlow port costs 1.79-2.52x flow matching per step
on a 2-core CPU (eager fp32, batch 32, small U-Nets); the paper's JAX code 1.16x (B/4, TPU); with 25% of
the rows r != t the floor is about 1.08x.
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import numpy as np
import torch

from benchmarks.common import NETWORK_OPTIONS, get_method, sync, timed_median
from selfe_cli.models.conditioning import ClassConditioner
from selfe_cli.models.registry import build_model, count_parameters

# Dense bf16 peaks (TFLOP/s) for the MFU estimate, by a substring of the CUDA device name.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "4090": 165.0}

# method specs: "name" or "name:key=value+key=value" (values parsed as YAML); flow matching first (the ratios'
# base), then the three originals and MeanFlow's other JVP route, then the zoo. alpha-Flow's step costs what
# its curriculum's phase asks: alpha in (0, 1) one extra no-grad forward (the discrete branch), alpha = 0 the
# JVP (MeanFlow's engine); alpha = 1 is flow matching on the trajectory, not timed again.
ORIGINAL_METHODS = ("flow_matching", "meanflow", "meanflow:jvp_mode=two_pass", "selfe")
TRAIN_METHODS = ORIGINAL_METHODS + ("alphaflow:alpha=0.5", "alphaflow:alpha=0", "imf", "tim", "sct", "ect",
                                    "shortcut", "imm")


def parse_spec(text: str) -> tuple[str, dict[str, Any]]:
    """``"meanflow:jvp_mode=two_pass+weight_p=0.75"`` -> (``"meanflow"``, overrides)."""
    import yaml

    name, _, opts = text.partition(":")
    overrides: dict[str, Any] = {}
    for item in filter(None, opts.split("+")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"expected key=value in {item!r} (in {text!r})")
        overrides[key] = yaml.safe_load(value)
    return name, overrides


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def _conditions(net: torch.nn.Module, n: int, device: torch.device) -> tuple[Any, Any]:
    """A batch of conditions and the null ones for the network's condition kind."""
    if net.cond_kind == "none":
        return None, None
    if net.cond_kind == "class":
        classes = int(net.config.num_classes)
        g = torch.Generator().manual_seed(0)
        return (torch.randint(0, classes, (n,), generator=g).to(device),
                ClassConditioner(classes).null(n, device))
    from selfe_cli.models.conditioning import cond_to
    from selfe_cli.models.text import TextConditioner

    text = TextConditioner(int(net.config.text_context_length))
    prompts = [f"{k} red cubes to the left of a blue sphere" for k in ("two", "three", "four")]
    return (cond_to(text.encode([prompts[i % 3] for i in range(n)]), device), text.null(n, device))


def _autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16" and device.type == "cuda")


def count_step_flops(method: Any, net: torch.nn.Module, ema: torch.nn.Module, x0: torch.Tensor, cond: Any,
                     null: Any, *, device: torch.device, precision: str) -> int:
    """FLOPs of one training step (forward, JVP, backward), as ``torch.utils.flop_counter`` counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)  # one block: entering the mode again resets its counts
    torch.manual_seed(0)
    with counter:
        with _autocast(device, precision):
            out = method.loss(net, x0, cond, null_cond=null, step=1, total_steps=2, ema_net=ema)
        out.loss.backward()
    net.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _cpu_peak_worker(model: str, kwargs: dict[str, Any], spec: str, batch_size: int, seed: int, queue: Any) -> None:
    """In a fresh process: build everything, reset the high-water mark, run one training step, report."""
    try:
        name, overrides = parse_spec(spec)
        torch.manual_seed(seed)
        net = build_model(model, **kwargs, **NETWORK_OPTIONS.get(name, {})).train()
        x0 = torch.randn(batch_size, net.in_channels, net.sample_size, net.sample_size,
                         generator=torch.Generator().manual_seed(seed))
        cond, null = _conditions(net, batch_size, torch.device("cpu"))
        method = get_method(name, overrides)
        ema = copy.deepcopy(net).eval().requires_grad_(False)
        opt = torch.optim.Adam(net.parameters(), lr=1e-5, fused=True)
        with open("/proc/self/clear_refs", "w") as fh:  # VmHWM := VmRSS
            fh.write("5")
        before = _rss_kib("VmRSS")
        torch.manual_seed(seed)
        out = method.loss(net, x0, cond, null_cond=null, step=1, total_steps=2, ema_net=ema)
        out.loss.backward()
        opt.step()
        peak = _rss_kib("VmHWM")
        queue.put({"ok": True, "step_peak_bytes": (peak - before) * 1024, "rss_before_bytes": before * 1024})
    except Exception as err:  # noqa: BLE001 - reported to the parent
        queue.put({"ok": False, "error": f"{type(err).__name__}: {err}"})


def cpu_step_peak_memory(model: str, kwargs: dict[str, Any], spec: str, *, batch_size: int, seed: int = 0) -> int | None:
    """Peak resident-memory growth of one CPU training step, measured in a fresh process (bytes; None off Linux)."""
    import multiprocessing as mp
    import os

    if not os.path.exists("/proc/self/clear_refs"):
        return None
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_cpu_peak_worker, args=(model, kwargs, spec, batch_size, seed, queue))
    proc.start()
    result = queue.get(timeout=1800)
    proc.join()
    if not result["ok"]:
        raise RuntimeError(f"peak-memory process for {model} / {spec}: {result['error']}")
    return int(result["step_peak_bytes"])


def train_step_ratios(model: str, kwargs: dict[str, Any], methods: list[str], *, batch_size: int, rounds: int,
                      warmup: int, device: torch.device, precision: str = "fp32", compile: bool = False,
                      seed: int = 0, memory: bool = True) -> list[dict[str, Any]]:
    """One row per method: median step time, ratio to the first method, FLOPs, achieved TFLOP/s, MFU.

    Every method trains a copy of the same initial network, plus the options it needs of it (iMF's guidance
    inputs, sCT's log-variance head: ``common.NETWORK_OPTIONS``), which add a few small layers."""
    torch.manual_seed(seed)
    base = build_model(model, **kwargs).to(device)
    x0 = torch.randn(batch_size, base.in_channels, base.sample_size, base.sample_size,
                     generator=torch.Generator().manual_seed(seed)).to(device)
    cond, null = _conditions(base, batch_size, device)
    peak = peak_tflops(device)
    setups = []
    for spec in methods:
        name, overrides = parse_spec(spec)
        if NETWORK_OPTIONS.get(name):
            torch.manual_seed(seed)
            net = build_model(model, **kwargs, **NETWORK_OPTIONS[name]).to(device).train()
        else:
            net = copy.deepcopy(base).train()
        ema = copy.deepcopy(net).eval().requires_grad_(False)
        method = get_method(name, overrides)
        flops = count_step_flops(method, net, ema, x0, cond, null, device=device, precision=precision)
        setups.append({"spec": spec, "method": method, "net": net, "ema": ema,
                       "train_net": torch.compile(net) if compile else net,
                       "opt": torch.optim.Adam(net.parameters(), lr=1e-5, fused=device.type in ("cuda", "cpu")),
                       "flops": flops, "times": [], "peak_mem": None})

    def step(s: dict[str, Any], i: int) -> float:
        torch.manual_seed(seed + i)  # the same t, r, noise draws for every method in a round
        sync(device)
        start = time.perf_counter()
        with _autocast(device, precision):
            out = s["method"].loss(s["train_net"], x0, cond, null_cond=null, step=i, total_steps=rounds + warmup,
                                   ema_net=s["ema"])
        out.loss.backward()
        s["opt"].step()
        s["opt"].zero_grad(set_to_none=True)
        sync(device)
        return time.perf_counter() - start

    for s in setups:  # warm-up (allocator, kernels, compilation) and peak memory, one method at a time
        if device.type == "cuda":  # the step's own peak: growth over what is allocated before it
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        for i in range(warmup):
            step(s, i)
        if device.type == "cuda":
            s["peak_mem"] = torch.cuda.max_memory_allocated(device) - before
    for i in range(rounds):  # interleaved timing
        for s in setups:
            s["times"].append(step(s, warmup + i))
    if device.type == "cpu" and memory:
        for s in setups:  # after the timing, one fresh process each: no allocator state carried over
            s["peak_mem"] = cpu_step_peak_memory(model, kwargs, s["spec"], batch_size=batch_size, seed=seed)

    rows = []
    base_time, base_mem = statistics.median(setups[0]["times"]), setups[0]["peak_mem"]
    for s in setups:
        med = statistics.median(s["times"])
        achieved = s["flops"] / med / 1e12
        rows.append({"model": model, "model_kwargs": kwargs, "params": count_parameters(s["net"]), "method": s["spec"],
                     "batch_size": batch_size, "precision": precision, "compile": compile,
                     "median_s": med, "ratio": med / base_time, "times_s": s["times"],
                     "flops_per_step": s["flops"], "achieved_tflops": achieved,
                     "mfu": achieved / peak if peak else None,
                     "peak_mem_bytes": s["peak_mem"], "peak_mem_ratio": s["peak_mem"] / base_mem if base_mem else None})
    return rows


@torch.no_grad()
def sampling_throughput(model: str, kwargs: dict[str, Any], *, batch_size: int, device: torch.device,
                        precision: str = "fp32", repeats: int = 5) -> dict[str, Any]:
    """Images per second of the any-step sampler at 1 NFE (one step, no CFG), network time included."""
    from selfe_cli.sampling.sampler import sample

    torch.manual_seed(0)
    net = build_model(model, **kwargs).to(device).eval()
    noise = torch.randn(batch_size, net.in_channels, net.sample_size, net.sample_size, device=device)
    cond, null = _conditions(net, batch_size, device)

    def run() -> None:
        with _autocast(device, precision):
            sample(net, noise, cond, null, steps=1, r_mode="next")

    med, _ = timed_median(run, repeats=repeats, warmup=1, device=device)
    return {"model": model, "params": count_parameters(net), "batch_size": batch_size, "precision": precision,
            "seconds_per_batch": med, "images_per_second": batch_size / med}


def inception_throughput(*, batch_size: int, batches: int, device: torch.device, image_size: int = 32) -> dict[str, Any]:
    """Inception-v3 pool3 features (TF-compatible resize to 299 inside) per second, random weights.

    Randomly initialised weights have the real network's architecture and cost, without a download."""
    from selfe_cli.evaluation.features import inception_features

    torch.manual_seed(0)
    feats = inception_features(device=device, random_init=True)
    images = torch.randint(0, 256, (batch_size, image_size, image_size, 3), dtype=torch.uint8)
    med, _ = timed_median(lambda: feats(images), repeats=batches, warmup=1, device=device)
    return {"device": str(device), "batch_size": batch_size, "image_size": image_size,
            "images_per_second": batch_size / med, "seconds_per_50k": 50_000 * med / batch_size}


def _random_stats(rng: np.random.Generator, dim: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    x = rng.standard_normal((n, dim)) @ rng.standard_normal((dim, dim)) / np.sqrt(dim)
    return x.mean(0), np.cov(x, rowvar=False)


def scipy_frechet(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """The reference formula with ``scipy.linalg.sqrtm`` (what the TTUR / pytorch-fid code computes)."""
    import scipy.linalg

    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def frechet_timing(*, dim: int = 2048, with_scipy: bool = True) -> dict[str, Any]:
    """Seconds for one Frechet distance of ``dim``-d statistics: the project's eigen route vs scipy's sqrtm."""
    from selfe_cli.evaluation.fid import frechet_distance

    rng = np.random.default_rng(0)
    mu1, s1 = _random_stats(rng, dim, 2 * dim)
    mu2, s2 = _random_stats(rng, dim, 2 * dim)
    cpu = torch.device("cpu")
    out: dict[str, Any] = {"dim": dim}
    value: list[float] = []
    out["eigh_seconds"], _ = timed_median(lambda: value.append(frechet_distance(mu1, s1, mu2, s2)),
                                          repeats=3, warmup=0, device=cpu)
    out["value_eigh"] = value[-1]
    if with_scipy:
        ref: list[float] = []
        out["scipy_sqrtm_seconds"], _ = timed_median(lambda: ref.append(scipy_frechet(mu1, s1, mu2, s2)),
                                                     repeats=1, warmup=0, device=cpu)
        out["value_scipy"] = ref[-1]
        out["relative_difference"] = abs(value[-1] - ref[-1]) / abs(ref[-1])
        out["speedup"] = out["scipy_sqrtm_seconds"] / out["eigh_seconds"]
    return out


__all__ = ["ORIGINAL_METHODS", "TRAIN_METHODS", "cpu_step_peak_memory", "frechet_timing", "inception_throughput", "parse_spec", "peak_tflops",
           "sampling_throughput", "scipy_frechet", "train_step_ratios"]
