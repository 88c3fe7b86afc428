"""Checkpoints, data order, learning-rate schedule, EMA."""

import pytest
import torch

from selfe_cli.training import checkpoint as ckpt_io
from selfe_cli.training.data_order import GlobalOrder, MicroBatchSampler, micro_seed
from selfe_cli.training.ema import EMA
from selfe_cli.training.optim import lr_at


def test_global_order_is_a_permutation_per_epoch():
    order = GlobalOrder(10, seed=3)
    first, second = order.indices(0, 10), order.indices(10, 10)
    assert sorted(first) == list(range(10)) and sorted(second) == list(range(10))
    assert first != second
    assert order.indices(7, 6) == first[7:] + second[:3]


def test_micro_batches_do_not_depend_on_split():
    """1 process x 2 rounds sees the same micro-batches as 2 processes x 1 round."""
    single = list(MicroBatchSampler(50, seed=0, batch_size=8, rounds=2, rank=0, world=1, start_step=0, total_steps=3))
    r0 = list(MicroBatchSampler(50, seed=0, batch_size=8, rounds=1, rank=0, world=2, start_step=0, total_steps=3))
    r1 = list(MicroBatchSampler(50, seed=0, batch_size=8, rounds=1, rank=1, world=2, start_step=0, total_steps=3))
    assert single[0::2] == r0 and single[1::2] == r1
    resumed = list(MicroBatchSampler(50, seed=0, batch_size=8, rounds=2, rank=0, world=1, start_step=1, total_steps=3))
    assert resumed == single[2:]


def test_micro_seed_distinct():
    seeds = {micro_seed(s, t, j) for s in range(3) for t in range(50) for j in range(4)}
    assert len(seeds) == 3 * 50 * 4


@pytest.mark.parametrize("step, expected", [(0, 0.1), (4, 0.5), (9, 1.0), (10, 1.0), (100, 1.0)])
def test_warmup_constant(step, expected):
    assert lr_at(step, lr=1.0, total_steps=200, warmup_steps=10, schedule="constant", final_lr=0) == pytest.approx(expected)


@pytest.mark.parametrize("schedule, step, expected", [
    ("linear", 10, 1.0), ("linear", 60, 0.55), ("linear", 110, 0.1),
    ("cosine", 10, 1.0), ("cosine", 60, 0.55), ("cosine", 110, 0.1),
])
def test_decay(schedule, step, expected):
    got = lr_at(step, lr=1.0, total_steps=110, warmup_steps=10, schedule=schedule, final_lr=0.1)
    assert got == pytest.approx(expected)


def test_ema_starts_as_copy_and_averages():
    net = torch.nn.Linear(2, 2)
    ema = EMA(net, [0.9, 0.5])
    for m in ema.models.values():
        assert not m.training and all(not p.requires_grad for p in m.parameters())
        assert torch.equal(m.weight, net.weight)
    before = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)
    assert torch.allclose(ema.models[0.9].weight, before + 0.1)
    assert torch.allclose(ema.models[0.5].weight, before + 0.5)
    assert ema.primary is ema.models[0.9]


def test_checkpoint_round_trip_and_pruning(tmp_path):
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30):
        ckpt_io.write_checkpoint(root, step, model=net.state_dict(), emas={0.99: net.state_dict()},
                                 optimizer=opt.state_dict(), state={"step": step}, keep=2)
    assert [p.name for p in ckpt_io.list_checkpoints(root)] == ["step-0000020", "step-0000030"]
    # a half-written checkpoint is ignored
    (root / ".tmp-step-0000040").mkdir()
    (root / "step-0000050").mkdir()  # no state.json: incomplete
    latest = ckpt_io.latest_checkpoint(root)
    assert latest.name == "step-0000030"
    net2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.Adam(net2.parameters(), lr=0.1)
    net2.load_state_dict(ckpt_io.load_weights(latest / "model.safetensors"))
    state = ckpt_io.read_checkpoint_state(latest)
    opt2.load_state_dict(ckpt_io.optimizer_from_tensors(ckpt_io.load_weights(latest / "optimizer.safetensors"),
                                                        state["optimizer"]))
    for k, v in opt.state_dict()["state"][0].items():
        assert torch.equal(torch.as_tensor(v), torch.as_tensor(opt2.state_dict()["state"][0][k]))
    assert ckpt_io.ema_files(latest) == {0.99: latest / "ema-0.99.safetensors"}
