"""Shared helpers of the benchmark suite: methods by name, machine description, timing."""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import torch

from selfe_cli.config import from_dict
from selfe_cli.methods import METHODS, Method, build_method

# The network options a method needs of the shared network in every benchmark part: iMF feeds omega and the
# guidance interval to the network (new parameters; unguided at sampling here: omega = 1, the network's
# default; without a v-head iMF runs its headless form, docs/methods.md); sCT's learned log-variance l(t) is a
# head of the network (its weighting "auto" then takes the paper's weight).
NETWORK_OPTIONS: dict[str, dict[str, Any]] = {"imf": {"guidance_embed": True}, "sct": {"logvar_channels": 128}}


def get_method(name: str, overrides: dict[str, Any] | None = None) -> Method:
    """A method from its recipe name and ``method:`` overrides, validated like a recipe section."""
    if name not in METHODS:
        raise SystemExit(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return build_method(name, from_dict(METHODS[name].config_class, dict(overrides or {}), f"method[{name}]"))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on (and with what)."""
    cuda = torch.cuda.is_available()
    return {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "cuda": torch.version.cuda if cuda else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_start": load_average(),
    }


def command_line() -> str:
    return " ".join([os.path.basename(sys.executable), "-m", "benchmarks", *sys.argv[1:]])


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_median(fn: Callable[[], Any], *, repeats: int, warmup: int, device: torch.device) -> tuple[float, list[float]]:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2], times
