"""The training loop on a tiny problem: non-finite steps, accumulation, learning."""

import json

import pytest
import torch

from selfe_cli.methods import build_method
from selfe_cli.methods.base import LossOutput, Method
from selfe_cli.models.conditioning import Conditioner
from selfe_cli.training.distributed import DistInfo
from selfe_cli.training.loop import TrainingDiverged, training_loop

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x, t, r, cond=None):
        return self.lin(x.flatten(1)).view_as(x)

    def save_pretrained(self, path):
        from pathlib import Path

        Path(path).mkdir(parents=True, exist_ok=True)


class Data(torch.utils.data.Dataset):
    def __len__(self):
        return 32

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {"image": torch.randn(1, 2, 2, generator=g)}


def collate(items):
    return {"image": torch.stack([it["image"] for it in items])}


class NaNAt(Method):
    """Flow matching, except that the loss is NaN at the given steps."""

    def __init__(self, bad_steps):
        self.inner = build_method("flow_matching")
        self.bad_steps = set(bad_steps)

    def loss(self, net, x0, cond, *, null_cond, step, total_steps, ema_net=None):
        out = self.inner.loss(net, x0, cond, null_cond=null_cond, step=step, total_steps=total_steps)
        if step in self.bad_steps:
            return LossOutput(out.loss * float("nan"), out.logs)
        return out


def run(tmp_path, method, **kw):
    torch.manual_seed(0)
    net = Tiny()
    args = dict(run_dir=tmp_path, net=net, method=method, dataset=Data(), collate=collate, conditioner=Conditioner(),
                dist=CPU, total_steps=10, batch_size=8, lr=1e-2, log_every_steps=1, checkpoint_every_steps=5,
                sample_every_steps=0, progress=False)
    args.update(kw)
    return net, training_loop(**args)


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    net, result = run(tmp_path, NaNAt({3, 4, 7}))
    assert result["nonfinite_total"] == 3
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["nonfinite_total"] for m in metrics][-1] == 3
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_too_many_nonfinite_in_a_row_stops(tmp_path):
    with pytest.raises(TrainingDiverged, match="3 non-finite"):
        run(tmp_path, NaNAt({2, 3, 4, 5}), max_nonfinite_in_a_row=3)
    # the checkpoint written before the failure is intact
    assert (tmp_path / "checkpoints").exists() is False or all(
        (p / "state.json").is_file() for p in (tmp_path / "checkpoints").glob("step-*"))


class Deterministic(Method):
    """A loss without randomness: accumulation must then equal one big batch exactly."""

    def loss(self, net, x0, cond, *, null_cond, step, total_steps, ema_net=None):
        t = torch.full((x0.shape[0],), 0.5)
        return LossOutput(((net(x0, t, t) - x0.flip(-1)) ** 2).mean())


def test_accumulation_equals_full_batch(tmp_path):
    a, _ = run(tmp_path / "a", Deterministic(), grad_accum_rounds=1)
    b, _ = run(tmp_path / "b", Deterministic(), grad_accum_rounds=2)
    c, _ = run(tmp_path / "c", Deterministic(), grad_accum_rounds=4)
    torch.testing.assert_close(b.lin.weight, a.lin.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c.lin.weight, a.lin.weight, rtol=1e-5, atol=1e-6)
    torch.manual_seed(0)
    init = Tiny()
    assert not torch.allclose(init.lin.weight, a.lin.weight)  # it did train


def test_batch_not_divisible_is_a_user_error(tmp_path):
    from selfe_cli.errors import UserError

    with pytest.raises(UserError, match="train.batch_size"):
        run(tmp_path, build_method("flow_matching"), batch_size=9, grad_accum_rounds=2)


def test_damaged_newest_checkpoint_is_set_aside_and_resume_is_exact(tmp_path, capsys):
    from selfe_cli.errors import UserError

    ref, _ = run(tmp_path / "ref", build_method("flow_matching"), checkpoint_every_steps=3, keep_checkpoints=2)
    run_dir = tmp_path / "run"
    run(run_dir, build_method("flow_matching"), total_steps=9, checkpoint_every_steps=3, keep_checkpoints=2)
    ckpts = run_dir / "checkpoints"
    model = ckpts / "step-0000009" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:100])  # cut short
    capsys.readouterr()
    net, result = run(run_dir, build_method("flow_matching"), checkpoint_every_steps=3, keep_checkpoints=2)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "step-0000009" in err[0] and "model.safetensors" in err[0] and "step-0000006" in err[0]
    assert result["resumed_from"] == 6
    assert (ckpts / "step-0000009.damaged" / "model.safetensors").is_file()  # kept, not deleted
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000009", "step-0000009.damaged", "step-0000010"]
    assert torch.equal(net.lin.weight, ref.lin.weight) and torch.equal(net.lin.bias, ref.lin.bias)
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))
    # nothing intact: one error, nothing moved, nothing trained
    for c in ckpts.glob("step-*[0-9]"):
        (c / "state.json").write_text("{")
    with pytest.raises(UserError, match="no intact checkpoint to resume from .*step-0000010: state.json"):
        run(run_dir, build_method("flow_matching"), total_steps=12, checkpoint_every_steps=3, keep_checkpoints=2)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000009", "step-0000009.damaged", "step-0000010"]
