"""MeanFlow under DistributedDataParallel: the gradients are really all-reduced (2 gloo processes).

Each rank computes the loss on its half of a fixed global batch through a DDP-wrapped network; after
``backward`` its gradients must equal the gradient of the single-process loss on the whole batch
(the loss is a batch mean, and DDP averages over ranks). The rank-local gradient differs from it, so
a JVP path that skipped the all-reduce (``torch.func.jvp`` on ``ddp.module``, pytorch #102197)
would fail here.
"""

from __future__ import annotations

import copy

import torch
from ddp_check import WORLD, assert_all_reduced, grads, run_on_two_ranks
from torch.nn.parallel import DistributedDataParallel as DDP

from selfe_cli.methods.meanflow import MeanFlow, meanflow_config
from selfe_cli.models.registry import build_model

N = 8  # global batch
NUM_CLASSES = 3

MODES = {  # name -> (method config, DDP kwargs)
    "single_pass": ({"weight_p": 1.0, "jvp_mode": "single_pass"}, {}),
    "single_pass+guidance": ({"weight_p": 0.75, "guidance": {"w": 0.2, "kappa": 0.5, "t_max": 0.8}}, {}),
    "two_pass": ({"jvp_mode": "two_pass"}, {}),
    "auto+find_unused_parameters": ({}, {"find_unused_parameters": True}),  # auto picks two_pass
}


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    net = build_model("dit", sample_size=4, in_channels=2, patch_size=2, hidden_size=16, depth=1, num_heads=2,
                      time_freq_dim=8, condition="class", num_classes=NUM_CLASSES)
    with torch.no_grad():  # away from the adaLN-zero init, so every parameter has a gradient
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net.double()


def _global_batch():
    g = torch.Generator().manual_seed(123)
    x0 = torch.randn(N, 2, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(N, 2, 4, 4, generator=g, dtype=torch.float64)
    t = torch.rand(N, generator=g, dtype=torch.float64) * 0.9 + 0.05
    r = t * torch.rand(N, generator=g, dtype=torch.float64)
    r[1::3] = t[1::3]  # some r = t rows on both ranks
    cond = torch.randint(0, NUM_CLASSES, (N,), generator=g)
    dropped = torch.tensor([False, True, False, False, False, False, True, False])
    null = torch.full((N,), NUM_CLASSES)
    return x0, eps, t, r, cond, null, dropped


def _rank_body(rank: int) -> None:
    base = _net()
    batch = _global_batch()
    half = slice(rank * N // WORLD, (rank + 1) * N // WORLD)
    local = [b[half] for b in batch]
    for name, (overrides, ddp_kwargs) in MODES.items():
        method = MeanFlow(meanflow_config(**overrides))
        ref = copy.deepcopy(base)
        method.loss_from(ref, *batch).loss.backward()  # single process, whole global batch
        alone = copy.deepcopy(base)
        method.loss_from(alone, *local).loss.backward()  # this rank's half, no synchronisation
        ddp = DDP(copy.deepcopy(base), **ddp_kwargs)
        method.loss_from(ddp, *local).loss.backward()
        assert_all_reduced(name, grads(ddp.module), grads(ref), grads(alone))


def test_ddp_gradients_equal_single_process_global_batch(tmp_path):
    run_on_two_ranks(_rank_body, tmp_path)
