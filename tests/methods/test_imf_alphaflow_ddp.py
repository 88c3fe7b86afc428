"""iMF, alpha-Flow and sCT under DistributedDataParallel (2 gloo processes): the gradients are all-reduced.

As tests/methods/test_meanflow_ddp.py: each rank computes the loss on its half of a fixed global batch through
a DDP-wrapped network; after ``backward`` its gradients must equal the single-process gradient of the whole
batch, which the rank-local gradient does not. iMF runs on a DiT with the auxiliary v-head (the v-head output
comes from the same DDP forward as u); alpha-Flow in its discrete branch and in its JVP branch; sCT with the learned
log-variance weight (l(t) from the network's head, read off the same DDP forward through ``logvar_sink``).
"""

from __future__ import annotations

import copy

import torch
from ddp_check import WORLD, assert_all_reduced, grads, run_on_two_ranks
from torch.nn.parallel import DistributedDataParallel as DDP

from selfe_cli.methods.alphaflow import AlphaFlow, alphaflow_config
from selfe_cli.methods.imf import IMF, imf_config
from selfe_cli.methods.sct import SCT, sct_config
from selfe_cli.models.registry import build_model

N = 8
NUM_CLASSES = 3

CASES = {  # name -> (method, method config, DDP kwargs)
    "imf single_pass": ("imf", {"jvp_mode": "single_pass"}, {}),
    "imf two_pass": ("imf", {"jvp_mode": "two_pass"}, {}),
    "imf auto+find_unused_parameters": ("imf", {}, {"find_unused_parameters": True}),
    "alphaflow discrete": ("alphaflow", {"alpha": 0.4, "clamp_utgt": 1.5,
                                         "guidance": {"w": 0.2, "kappa": 0.5, "t_max": 0.8}}, {}),
    "alphaflow jvp": ("alphaflow", {"alpha": 0.0, "jvp_mode": "single_pass"}, {}),
    "alphaflow jvp two_pass": ("alphaflow", {"alpha": 0.0, "jvp_mode": "two_pass",
                                             "guidance": {"w": 1.0, "kappa": 0.5}}, {}),
    "sct logvar single_pass": ("sct", {"weighting": "logvar", "jvp_mode": "single_pass"}, {}),
    "sct logvar two_pass": ("sct", {"weighting": "logvar", "jvp_mode": "two_pass"}, {}),
    "sct logvar auto+find_unused_parameters": ("sct", {"weighting": "logvar"}, {"find_unused_parameters": True}),
}


def _net(method: str) -> torch.nn.Module:
    torch.manual_seed(0)
    extra = {"imf": {"guidance_embed": True, "aux_v_head_blocks": 1}, "sct": {"logvar_channels": 8}}.get(method, {})
    net = build_model("dit", sample_size=4, in_channels=2, patch_size=2, hidden_size=16, depth=2, num_heads=2,
                      time_freq_dim=8, condition="class", num_classes=NUM_CLASSES, **extra)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net.double()


def _global_batch():
    g = torch.Generator().manual_seed(123)
    x0 = torch.randn(N, 2, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(N, 2, 4, 4, generator=g, dtype=torch.float64)
    t = torch.rand(N, generator=g, dtype=torch.float64) * 0.9 + 0.05
    r = t * torch.rand(N, generator=g, dtype=torch.float64)
    r[1::3] = t[1::3]
    omega = 1 + 7 * torch.rand(N, generator=g, dtype=torch.float64)
    t_min = 0.5 * torch.rand(N, generator=g, dtype=torch.float64)
    t_max = 0.5 + 0.5 * torch.rand(N, generator=g, dtype=torch.float64)
    cond = torch.randint(0, NUM_CLASSES, (N,), generator=g)
    null = torch.full((N,), NUM_CLASSES)
    dropped = torch.tensor([False, True, False, False, False, False, True, False])
    r_sct = torch.where(torch.arange(N) < 6, torch.zeros_like(t), t)  # sCT: r = 0 rows first, then flow matching
    return x0, eps, t, r, omega, t_min, t_max, cond, null, dropped, r_sct


def _loss(method, cfg, net, batch):
    x0, eps, t, r, omega, t_min, t_max, cond, null, dropped, r_sct = batch
    if method == "sct":
        return SCT(sct_config(**cfg)).loss_from(net, x0, eps, t, r_sct, cond, null, dropped).loss
    if method == "imf":
        return IMF(imf_config(**cfg)).loss_from(net, x0, eps, t, r, omega, t_min, t_max, cond, null, dropped).loss
    return AlphaFlow(alphaflow_config(**cfg)).loss_from(net, x0, eps, t, r, cfg["alpha"], cond, null, dropped).loss


def _rank_body(rank: int) -> None:
    batch = _global_batch()
    half = slice(rank * N // WORLD, (rank + 1) * N // WORLD)
    local = [b[half] for b in batch]
    for name, (method, cfg, ddp_kwargs) in CASES.items():
        base = _net(method)
        ref = copy.deepcopy(base)
        _loss(method, cfg, ref, batch).backward()
        alone = copy.deepcopy(base)
        _loss(method, cfg, alone, local).backward()
        ddp = DDP(copy.deepcopy(base), **ddp_kwargs)
        _loss(method, cfg, ddp, local).backward()
        assert_all_reduced(name, grads(ddp.module), grads(ref), grads(alone))


def test_ddp_gradients_equal_single_process_global_batch(tmp_path):
    run_on_two_ranks(_rank_body, tmp_path)
