"""Self-E under DistributedDataParallel (2 gloo processes): gradients are all-reduced, one grad forward.

Rank r runs the loss through a DDP-wrapped network on its half of the batch with seed r. Every rank also
computes, without DDP, the gradients g_0 and g_1 of both halves (same seeds, same EMA): after
``backward`` the DDP gradient must equal (g_0 + g_1) / 2, and differ from the rank's own g_r. With the
fake-score stage on, the method must fuse its two grad-carrying passes into one forward (DDP allows one
per backward) and the reference (unfused, single process) must agree with it. The stop-gradient passes
select different numbers of samples on each rank; running them on the unwrapped module keeps them free of
collectives (a hang would time the test out).
"""

from __future__ import annotations

import copy

import torch
from ddp_check import WORLD, grads, run_on_two_ranks
from torch.nn.parallel import DistributedDataParallel as DDP

from selfe_cli.methods.selfe import SelfE, SelfEConfig
from selfe_cli.models.registry import build_model

N = 6  # per rank
NUM_CLASSES = 3
MODES = {
    "plain": dict(p_same=0.3, cond_drop=0.2),
    "fake_score": dict(p_same=0.3, cond_drop=0.2, fake_score=True, fake_score_start=0),
}


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    net = build_model("dit", sample_size=4, in_channels=2, patch_size=2, hidden_size=16, depth=1, num_heads=2,
                      time_freq_dim=8, condition="class", num_classes=NUM_CLASSES)
    with torch.no_grad():  # away from the adaLN-zero init, so every parameter has a gradient
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net.double()


def _batch(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    x0 = torch.randn(N, 2, 4, 4, generator=g, dtype=torch.float64)
    cond = torch.randint(0, NUM_CLASSES, (N,), generator=g)
    return x0, cond, torch.full((N,), NUM_CLASSES), torch.full((N,), (rank + 1) % NUM_CLASSES)


def _grad(method: SelfE, net: torch.nn.Module, ema: torch.nn.Module, rank: int) -> list[torch.Tensor]:
    x0, cond, null, fake = _batch(rank)
    torch.manual_seed(rank)
    out = method.loss(net, x0, cond, null_cond=null, step=50, total_steps=100, ema_net=ema, fake_cond=fake)
    out.loss.backward()
    return grads(net.module if isinstance(net, DDP) else net)


def _rank_body(rank: int) -> None:
    base = _net()
    ema = copy.deepcopy(base)
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(0.9)
    for name, overrides in MODES.items():
        method = SelfE(SelfEConfig(**overrides))
        refs = [_grad(method, copy.deepcopy(base), ema, r) for r in range(WORLD)]
        ddp = DDP(copy.deepcopy(base))
        calls: list[bool] = []

        def count(module, args, out, calls=calls):
            calls.append(torch.is_grad_enabled())

        hook = ddp.module.register_forward_hook(count)
        got = _grad(method, ddp, ema, rank)
        hook.remove()
        assert sum(calls) == 1, f"{name}: {sum(calls)} forwards with grad under DDP"
        for g, a, b in zip(got, refs[0], refs[1], strict=True):
            torch.testing.assert_close(g, (a + b) / 2, atol=1e-10, rtol=1e-8, msg=lambda m, n=name: f"{n}: {m}")
        assert any(not torch.allclose(g, own) for g, own in zip(got, refs[rank], strict=True)), name


def test_ddp_gradients_are_averaged_over_ranks(tmp_path):
    run_on_two_ranks(_rank_body, tmp_path)
