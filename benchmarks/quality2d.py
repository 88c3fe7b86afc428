"""Quality per step count on 2-D distributions with an exact distance to the truth.

Every method is trained with the same budget (network, steps, batch, optimiser, learning rate, EMA, seed)
through the project's own ``training_loop`` on a fixed draw from a class-conditional 2-D distribution
(``selfe_cli.data.toy2d``), then sampled with the project's any-step sampler (EMA weights, each method's own
sampler rule, no guidance) at several step counts. The distance is the sliced Wasserstein-2 distance between
generated and fresh true samples with the same labels; the floor is the same distance between two
independent true draws of the same size (what a perfect model would score).
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import NETWORK_OPTIONS, get_method
from selfe_cli.data import collate
from selfe_cli.data.toy2d import NUM_CLASSES, Toy2DDataset, sample_toy2d
from selfe_cli.models.conditioning import ClassConditioner
from selfe_cli.models.registry import build_model, count_parameters, load_model
from selfe_cli.sampling.sampler import sample
from selfe_cli.training.distributed import DistInfo
from selfe_cli.training.loop import training_loop

# ----------------------------------------------------------------------------------------------
# Sliced Wasserstein-2 (pure math)


def unit_directions(n: int, dim: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``n`` directions uniform on the unit sphere S^{dim-1} (normalised Gaussians), fixed by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(n, dim, generator=g, dtype=dtype)
    return d / d.norm(dim=1, keepdim=True)


def wasserstein2_1d_sq(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared W2 between the empirical measures of equal-size 1-D samples, along the last dim.

    In 1-D the optimal coupling is monotone: match the sorted samples, ``W2^2 = mean((a_(i) - b_(i))^2)``."""
    if a.shape != b.shape:
        raise ValueError(f"equal sample sizes needed, got {tuple(a.shape)} and {tuple(b.shape)}")
    return (a.sort(dim=-1).values - b.sort(dim=-1).values).pow(2).mean(dim=-1)


def sliced_w2(x: torch.Tensor, y: torch.Tensor, *, projections: int = 1000, seed: int = 0) -> float:
    """``SW2(x, y) = sqrt(E_theta W2^2(theta.x, theta.y))``, theta uniform on the sphere (Monte Carlo, fixed seed).

    x, y: (N, D) samples of equal size. For ``y = x + m``: ``SW2 = |m| / sqrt(D)`` (``E (theta.m)^2 = |m|^2/D``);
    for ``N(0, s1^2 I)`` vs ``N(0, s2^2 I)``: ``SW2 = |s1 - s2|``."""
    if x.dim() != 2 or x.shape != y.shape:
        raise ValueError(f"x and y must both be (N, D) of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    theta = unit_directions(projections, x.shape[1], seed)  # (L, D)
    px = theta @ x.double().T  # (L, N)
    py = theta @ y.double().T  # (L, N)
    return float(wasserstein2_1d_sq(px, py).mean().sqrt())


def class_sliced_w2(x: torch.Tensor, y: torch.Tensor, labels: torch.Tensor, *, projections: int = 1000,
                    seed: int = 0) -> float:
    """Mean over classes of SW2 between the class-c parts of x and y (rows with the same labels)."""
    vals = [sliced_w2(x[labels == c], y[labels == c], projections=projections, seed=seed)
            for c in labels.unique().tolist()]
    return float(sum(vals) / len(vals))


# ----------------------------------------------------------------------------------------------
# The benchmark


@dataclass
class Toy2DBudget:
    """The training budget every method gets (identical network, data, optimiser and seed)."""

    total_steps: int = 3000
    batch_size: int = 256
    lr: float = 1e-3
    warmup_steps: int = 100
    ema_decay: float = 0.995
    grad_clip: float = 1.0
    dataset_size: int = 100_000
    width: int = 256
    depth: int = 3
    # Time-embedding scale of the MLP (times in [0, 1] times this go into the sinusoids). 10, not the image
    # networks' 1000: on these 2-D data a smoother embedding helps every method, MeanFlow most (its JVP target
    # carries du/dt, large when u follows high-frequency time features). Measured on gmm, 50-step SW2: flow
    # matching 0.128 (scale 1000, 2,000 steps) vs 0.097 (scale 10, 1,500 steps); MeanFlow with plain MSE
    # (weight_p 0) 0.55 vs 0.12 (both 1,500 steps).
    time_scale: float = 10.0
    seed: int = 0
    eval_samples: int = 20_000
    projections: int = 1000
    steps: tuple[int, ...] = (1, 2, 4, 8, 50)
    datasets: tuple[str, ...] = ("checkerboard", "gmm")
    methods: tuple[str, ...] = ("flow_matching", "meanflow", "selfe", "alphaflow", "imf", "tim", "sct", "ect", "shortcut", "imm")
    # Self-E's resolution shift is defined for latent token counts; on 2-D points every method samples t from
    # the same logit-normal(0, 1) as flow matching
    method_overrides: dict[str, dict[str, Any]] = field(default_factory=lambda: {"selfe": {"time_shift": False}})
    # sCT's tangent warm-up and ECT's stages where their quickstarts place them, as shares of the run: the
    # warm-up over the first tenth, six ECT stages (set from total_steps in train_one unless overridden above)
    sct_warmup_fraction: float = 0.1
    ect_stages: int = 6
    # the network options a method needs (iMF's guidance inputs, sCT's log-variance head): common.NETWORK_OPTIONS
    model_overrides: dict[str, dict[str, Any]] = field(default_factory=lambda: copy.deepcopy(NETWORK_OPTIONS))


def method_overrides(method_name: str, b: Toy2DBudget) -> dict[str, Any]:
    """The budget's ``method:`` overrides, with sCT's warm-up and ECT's stage length scaled to ``total_steps``."""
    out = dict(b.method_overrides.get(method_name, {}))
    if method_name == "sct":
        out.setdefault("tangent_warmup_steps", round(b.sct_warmup_fraction * b.total_steps))
    if method_name == "ect":
        out.setdefault("stage_steps", max(1, b.total_steps // b.ect_stages))
    return out


def _model_kwargs(b: Toy2DBudget) -> dict[str, Any]:
    return {"sample_size": 1, "in_channels": 2, "width": b.width, "depth": b.depth, "time_scale": b.time_scale,
            "condition": "class", "num_classes": NUM_CLASSES}


def train_one(kind: str, method_name: str, b: Toy2DBudget, run_dir: Path, device: torch.device) -> tuple[Any, Any, float]:
    """Train ``method_name`` on ``kind`` with budget ``b``; returns (EMA network, method, seconds)."""
    method = get_method(method_name, method_overrides(method_name, b))
    dataset = Toy2DDataset(kind, b.dataset_size, seed=b.seed)
    torch.manual_seed(b.seed)  # the same initial weights for every method (iMF's guidance embedder comes last)
    net = build_model("mlp", **_model_kwargs(b), **b.model_overrides.get(method_name, {}))
    start = time.perf_counter()
    training_loop(run_dir=run_dir, net=net, method=method, dataset=dataset, collate=collate,
                  conditioner=ClassConditioner(NUM_CLASSES), dist=DistInfo(0, 1, 0, device), seed=b.seed,
                  total_steps=b.total_steps, batch_size=b.batch_size, lr=b.lr, warmup_steps=b.warmup_steps,
                  grad_clip=b.grad_clip, ema_decays=(b.ema_decay,), log_every_steps=max(1, b.total_steps // 20),
                  checkpoint_every_steps=b.total_steps, keep_checkpoints=1, sample_every_steps=0, progress=False)
    seconds = time.perf_counter() - start
    ema = load_model(run_dir / "final").to(device).eval()  # the EMA network the loop exported
    return ema, method, seconds


def sampler_kwargs(method: Any, net: Any) -> dict[str, Any]:
    """The method's own sampler rule (``r_mode``; Self-E also its training time shift; IMM its start time)."""
    return {k: v for k, v in method.sampler_defaults(net).items() if k in ("r_mode", "shift", "t_start")}


@torch.no_grad()
def evaluate(net: Any, method: Any, kind: str, b: Toy2DBudget, device: torch.device) -> dict[str, Any]:
    """SW2 (marginal and per-class mean) against fresh true samples at each step count."""
    g = torch.Generator().manual_seed(10_000 + b.seed)
    truth, labels = sample_toy2d(kind, b.eval_samples, g)
    noise = torch.randn(b.eval_samples, 2, 1, 1, generator=g)
    null = ClassConditioner(NUM_CLASSES).null(b.eval_samples, device)
    kw = sampler_kwargs(method, net)
    out: dict[str, Any] = {"sampler": kw, "sw2": {}, "sw2_class": {}, "seconds": {}}
    for k in b.steps:
        start = time.perf_counter()
        from benchmarks.shapes_quality import allowed_steps  # Shortcut: the nearest power of two (50 -> 64)

        x = sample(net, noise.to(device), labels.to(device), null, steps=allowed_steps(method.sampler_defaults(net), k),
                   cfg_scale=1.0, **kw)
        out["seconds"][k] = time.perf_counter() - start
        x = x.view(-1, 2).cpu()
        if not torch.isfinite(x).all():
            out["sw2"][k] = out["sw2_class"][k] = math.inf
            continue
        out["sw2"][k] = sliced_w2(x, truth, projections=b.projections, seed=b.seed)
        out["sw2_class"][k] = class_sliced_w2(x, truth, labels, projections=b.projections, seed=b.seed)
    return out


def floor(kind: str, b: Toy2DBudget) -> dict[str, float]:
    """SW2 between two independent true draws of ``eval_samples`` points with the same labels."""
    g = torch.Generator().manual_seed(10_000 + b.seed)
    truth, labels = sample_toy2d(kind, b.eval_samples, g)
    other, _ = sample_toy2d(kind, b.eval_samples, torch.Generator().manual_seed(20_000 + b.seed), labels=labels)
    return {"sw2": sliced_w2(other, truth, projections=b.projections, seed=b.seed),
            "sw2_class": class_sliced_w2(other, truth, labels, projections=b.projections, seed=b.seed)}


def run(b: Toy2DBudget, device: torch.device, *, runs_root: Path | None = None, log=print) -> dict[str, Any]:
    """Train and evaluate every method on every data set; returns the JSON-ready record."""
    record: dict[str, Any] = {"budget": asdict(b), "network": "mlp", "network_kwargs": _model_kwargs(b),
                              "params": count_parameters(build_model("mlp", **_model_kwargs(b))), "results": {}}
    with tempfile.TemporaryDirectory(prefix="selfe-bench-2d-") as tmp:
        root = runs_root or Path(tmp)
        for kind in b.datasets:
            res: dict[str, Any] = {"floor": floor(kind, b), "methods": {}}
            for name in b.methods:
                log(f"2-D {kind}: training {name} ({b.total_steps} steps, batch {b.batch_size})")
                net, method, seconds = train_one(kind, name, b, root / f"{kind}-{name}", device)
                ev = evaluate(net, method, kind, b, device)
                ev["train_seconds"] = seconds
                res["methods"][name] = ev
            record["results"][kind] = res
    return record
