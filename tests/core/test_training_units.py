"""Checkpoints, data order, learning-rate schedule, EMA."""

import json

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


def _write_three(root):
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    for step in (10, 20, 30):
        ckpt_io.write_checkpoint(root, step, model=net.state_dict(), emas={0.99: net.state_dict()},
                                 optimizer=opt.state_dict(), state={"step": step}, keep=3)
    return ckpt_io.list_checkpoints(root)


def test_manifest_catches_truncation_flipped_bytes_and_bad_json(tmp_path):
    root = tmp_path / "checkpoints"
    c10, c20, c30 = _write_three(root)
    assert all(ckpt_io.verify_checkpoint(c) is None for c in (c10, c20, c30))
    manifest = json.loads((c30 / "manifest.json").read_text())["files"]
    assert set(manifest) == {"model.safetensors", "ema-0.99.safetensors", "optimizer.safetensors", "state.json"}
    # cut short: the size no longer matches
    raw = (c30 / "model.safetensors").read_bytes()
    (c30 / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    assert "model.safetensors has" in ckpt_io.verify_checkpoint(c30)
    # one byte of tensor data changed (these tiny files are mostly header): only the checksum sees it
    raw = bytearray((c20 / "optimizer.safetensors").read_bytes())
    raw[-5] ^= 0xFF
    (c20 / "optimizer.safetensors").write_bytes(bytes(raw))
    assert ckpt_io.safetensors_problem(c20 / "optimizer.safetensors") is None
    assert "optimizer.safetensors does not match its sha256" in ckpt_io.verify_checkpoint(c20)
    found, damaged = ckpt_io.newest_intact(root)
    assert found == c10 and [p for p, _ in damaged] == [c30, c20]
    assert ckpt_io.latest_checkpoint(root) == c10
    # only the files asked for (and state.json) are read
    assert ckpt_io.verify_checkpoint(c30, files=["ema-0.99.safetensors"]) is None
    (c10 / "state.json").write_text('{"step": 10, "optim')
    assert "state.json is not readable JSON" in ckpt_io.verify_checkpoint(c10)
    (c10 / "manifest.json").unlink()  # state.json said there is one: its loss is damage, not an old format
    (c10 / "state.json").write_text(json.dumps({"step": 10, "checksums": "manifest.json"}))
    assert ckpt_io.verify_checkpoint(c10) == "manifest.json is missing"
    assert ckpt_io.newest_intact(root)[0] is None


def test_checkpoints_without_manifest_still_load_and_headers_are_checked(tmp_path):
    root = tmp_path / "checkpoints"
    ckpts = _write_three(root)
    for c in ckpts:  # the format written before checksums
        (c / "manifest.json").unlink()
        state = json.loads((c / "state.json").read_text())
        del state["checksums"]
        (c / "state.json").write_text(json.dumps(state))
    assert all(ckpt_io.verify_checkpoint(c) is None for c in ckpts)
    raw = (ckpts[2] / "ema-0.99.safetensors").read_bytes()
    (ckpts[2] / "ema-0.99.safetensors").write_bytes(raw[:-3])
    assert "ema-0.99.safetensors has" in ckpt_io.verify_checkpoint(ckpts[2])
    (ckpts[1] / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    assert "unreadable safetensors header" in ckpt_io.verify_checkpoint(ckpts[1])
    (ckpts[0] / "optimizer.safetensors").unlink()
    assert ckpt_io.verify_checkpoint(ckpts[0]) == "optimizer.safetensors is missing"


def test_pruning_only_removes_older_checkpoints_and_set_aside_keeps_data(tmp_path):
    root = tmp_path / "checkpoints"
    c10, c20, c30 = _write_three(root)
    aside = ckpt_io.set_aside(c30)
    assert aside.name == "step-0000030.damaged" and (aside / "model.safetensors").is_file()
    (root / "step-0000030").mkdir()
    assert ckpt_io.set_aside(root / "step-0000030").name == "step-0000030.damaged-2"
    (root / "step-0000090").mkdir()  # a damaged (empty) newer directory does not count against keep
    net = torch.nn.Linear(3, 2)
    ckpt_io.write_checkpoint(root, 40, model=net.state_dict(), emas={}, optimizer={"state": {}, "param_groups": []},
                             state={"step": 40}, keep=2)
    assert [p.name for p in ckpt_io.list_checkpoints(root)] == ["step-0000020", "step-0000040", "step-0000090"]
    assert aside.is_dir() and not list(root.glob(".deleting-*")) and not list(root.glob(".tmp-*"))
