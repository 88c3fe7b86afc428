"""The training loop: one function, every knob a keyword argument with its unit in the name.

Resuming: running the same command again finds the latest complete checkpoint in the run
directory and continues from it. Data order and noise are pure functions of (seed, step,
micro-batch), so a resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from selfe_cli.errors import UserError
from selfe_cli.methods.base import Method
from selfe_cli.models.conditioning import Conditioner, cond_to
from selfe_cli.training import checkpoint as ckpt_io
from selfe_cli.training import fsdp
from selfe_cli.training.data_order import MicroBatchSampler, micro_seed
from selfe_cli.training.distributed import DistInfo, all_reduce_flag, all_reduce_mean, barrier, broadcast_int
from selfe_cli.training.ema import EMA
from selfe_cli.training.optim import build_optimizer, lr_at


class TrainingDiverged(UserError):
    """Too many non-finite losses in a row."""


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop metric lines written after the checkpoint we resume from (they will be written again)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    ckpt_io.atomic_write_text(path, "".join(f"{line}\n" for line in keep))


def resume_checkpoint(ckpt_root: Path, dist: DistInfo) -> Path | None:
    """The newest intact checkpoint to resume from (None: start at step 0), chosen on rank 0.

    Damaged newer checkpoints (a file missing, cut short or not matching its checksum) are renamed to
    ``step-XXXXXXX.damaged`` with one warning line each, so that neither this run nor pruning reads or
    deletes them. When checkpoints exist but none is intact, nothing is moved and the run stops: starting
    over silently from step 0 would throw away a long run that a user may still be able to repair.
    """
    code, message = -1, ""
    if dist.is_main:
        found, damaged = ckpt_io.newest_intact(ckpt_root)
        if found is None and damaged:
            code = -2
            listed = "; ".join(f"{p.name}: {why}" for p, why in damaged[:3])
            more = f"; and {len(damaged) - 3} more" if len(damaged) > 3 else ""
            message = (f"{ckpt_root}: no intact checkpoint to resume from ({listed}{more}); nothing was changed. "
                       f"Restore a checkpoint, or move {ckpt_root} away to train again from step 0")
        else:
            code = ckpt_io.checkpoint_step(found) if found is not None else -1
            for path, why in damaged:  # all newer than `found`, which is not None here
                try:
                    aside = ckpt_io.set_aside(path)
                except OSError as err:
                    code, message = -2, (f"{path}: damaged ({why}) and could not be renamed aside ({err.strerror}); "
                                         f"move it away yourself and run again")
                    break
                print(f"warning: checkpoint {path} is damaged ({why}); renamed it to {aside.name}, resuming from "
                      f"{found.name}", file=sys.stderr, flush=True)
    code = broadcast_int(code, dist.device)
    if code == -2:
        raise UserError(message or f"{ckpt_root}: cannot resume (see rank 0's message)")
    return None if code < 0 else ckpt_root / f"step-{code:07d}"


def training_loop(
    *,
    run_dir: Path,                      # checkpoints/, metrics.jsonl, tb/, samples/, final/
    net: nn.Module,                     # the two-time network, freshly initialised (weights are loaded on resume)
    method: Method,                     # training objective (flow matching, MeanFlow, Self-E)
    dataset: Dataset,                   # items: {"image", "label"?, "caption"?}
    collate: Callable[[list], dict],    # items -> batch
    conditioner: Conditioner,           # batch -> condition; the null condition
    dist: DistInfo,                     # rank, world size, device
    seed: int = 0,                      # seed of data order and noise
    total_steps: int = 1000,            # optimiser steps in the whole run
    batch_size: int = 64,               # global batch: all ranks and accumulation rounds
    grad_accum_rounds: int = 1,         # micro-batches per step on each rank
    optimizer: str = "adam",            # "adam" | "adamw"
    lr: float = 1e-4,                   # peak learning rate
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,                  # Adam epsilon
    weight_decay: float = 0.0,
    warmup_steps: int = 0,              # linear warm-up length in optimiser steps
    lr_schedule: str = "constant",      # "constant" | "linear" | "cosine" after warm-up
    final_lr: float = 0.0,              # learning rate reached at total_steps (linear/cosine)
    grad_clip: float | None = 1.0,      # max global gradient norm (None: off)
    ema_decays: tuple[float, ...] = (0.999,),  # one EMA per decay, per optimiser step
    precision: str = "fp32",            # "bf16": autocast on CUDA
    compile: bool = False,              # torch.compile the training forward
    parallel: str = "ddp",              # "ddp": a replica per rank; "fsdp": sharded over ranks (FSDP2)
    activation_checkpointing: bool = False,  # recompute block activations in backward (memory for time)
    num_workers: int = 0,               # data-loader workers per rank
    log_every_steps: int = 50,          # metrics interval
    checkpoint_every_steps: int = 500,  # checkpoint interval
    keep_checkpoints: int = 2,          # checkpoints kept on disk
    sample_every_steps: int = 1000,     # sample-grid interval (0: only at the end)
    max_nonfinite_in_a_row: int = 20,   # consecutive skipped steps before giving up
    sample_fn: Callable[[nn.Module, int], None] | None = None,  # (ema_net, step) -> writes a grid
    progress: bool = True,              # Rich progress bar on rank 0
    run_state: dict[str, Any] | None = None,  # extra JSON stored in each checkpoint (e.g. recipe hash)
) -> dict[str, Any]:
    device = dist.device
    world = dist.world_size
    micro = batch_size // (world * grad_accum_rounds)
    if micro * world * grad_accum_rounds != batch_size:
        raise UserError(f"train.batch_size: {batch_size} is not divisible by world size {world} x "
                        f"train.grad_accum_rounds {grad_accum_rounds}")
    run_dir = Path(run_dir)
    ckpt_root = run_dir / "checkpoints"

    if parallel not in ("ddp", "fsdp"):
        raise UserError(f"train.parallel: expected 'ddp' or 'fsdp', got {parallel!r}")
    sharded = parallel == "fsdp" and dist.enabled
    if parallel == "fsdp" and not dist.enabled and progress:
        print("note: train.parallel=fsdp shards over torchrun processes; a single process trains unsharded")
    if activation_checkpointing:
        try:
            net.enable_gradient_checkpointing()  # diffusers ModelMixin: refuses models without support
        except ValueError:
            raise UserError(f"train.activation_checkpointing: {type(net).__name__} does not support it "
                            f"(the mmdit models do); set it to false") from None

    net = net.to(device)
    ema = EMA(net, list(ema_decays))

    # ---- resume: full weights go into the unsharded networks, before sharding -------------------
    start_step, nonfinite_total, state = 0, 0, None
    latest = resume_checkpoint(ckpt_root, dist)
    if latest is not None:
        state = ckpt_io.read_checkpoint_state(latest)
        net.load_state_dict(ckpt_io.load_weights(latest / "model.safetensors"), strict=True)
        found = ckpt_io.ema_files(latest)
        missing = [d for d in ema.decays if d not in found]
        if missing:
            raise UserError(f"{latest}: no EMA weights for decay {missing[0]:g} (found: "
                            f"{', '.join(f'{d:g}' for d in found) or 'none'}); keep train.ema_decays as they were")
        ema.load_state_dicts({d: ckpt_io.load_weights(found[d]) for d in ema.decays})
        start_step = int(state["step"])
        nonfinite_total = int(state.get("nonfinite_total", 0))
    if dist.is_main:  # also from step 0: lines of a run killed before its first checkpoint are redone
        _truncate_metrics(run_dir / "metrics.jsonl", start_step)

    train_net: nn.Module = net
    if sharded:
        fsdp.shard_model(net, device, world)
        for ema_net in ema.models.values():  # same shards as the online network: a local EMA update
            fsdp.shard_model(ema_net, device, world, inference_only=True)
    elif dist.enabled:
        train_net = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)
    # built after sharding: fully_shard replaces the parameters with sharded ones
    opt = build_optimizer([p for p in net.parameters() if p.requires_grad], kind=optimizer, lr=lr, betas=betas,
                          eps=eps, weight_decay=weight_decay, device=device)
    if latest is not None:
        opt_sd = ckpt_io.optimizer_from_tensors(ckpt_io.load_weights(latest / "optimizer.safetensors"),
                                                state["optimizer"])
        if sharded:
            fsdp.load_optimizer_state_dict(net, opt, opt_sd)
        else:
            opt.load_state_dict(opt_sd)  # moves the state to the parameters' device
    if compile:
        train_net = torch.compile(train_net)

    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if precision == "bf16" and device.type == "cuda"
                else contextlib.nullcontext())
    if precision == "bf16" and device.type != "cuda" and dist.is_main:
        print("note: train.precision=bf16 applies on CUDA only; training in fp32 on CPU")

    sampler = MicroBatchSampler(len(dataset), seed=seed, batch_size=batch_size, rounds=grad_accum_rounds,
                                rank=dist.rank, world=world, start_step=start_step, total_steps=total_steps)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
                        pin_memory=device.type == "cuda", persistent_workers=False)
    batches = iter(loader)

    writer = None
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(run_dir / "tb"), purge_step=start_step)
        except ImportError:  # tensorboard is a dependency, but a broken install must not stop training
            writer = None
    metrics_file = open(run_dir / "metrics.jsonl", "a") if dist.is_main else None

    def main_copy(model: nn.Module) -> nn.Module | None:
        """The network to sample from / export on rank 0 (a collective under FSDP); None elsewhere."""
        if sharded:
            return fsdp.unsharded_copy(model, device, dist.is_main)
        return model if dist.is_main else None

    def save(step: int) -> None:
        if sharded:  # collectives: every rank takes part, rank 0 gets the full tensors
            model_sd = fsdp.full_state_dict(net)
            ema_sds = {d: fsdp.full_state_dict(m) for d, m in ema.models.items()}
            opt_sd = fsdp.full_optimizer_state_dict(net, opt)
        elif dist.is_main:
            model_sd, ema_sds, opt_sd = net.state_dict(), ema.state_dicts(), opt.state_dict()
        if dist.is_main:
            ckpt_io.write_checkpoint(
                ckpt_root, step, model=model_sd, emas=ema_sds, optimizer=opt_sd,
                state={"step": step, "seed": seed, "nonfinite_total": nonfinite_total,
                       "data_position": step * batch_size, "world_size": world,
                       "rng": {"derived_from": "(seed, step, micro-batch)"}, **(run_state or {})},
                keep=keep_checkpoints)
        barrier()

    progress_bar = None
    if progress and dist.is_main:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        progress_bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                transient=False)
        task = progress_bar.add_task("train", total=total_steps, completed=start_step, info="")
        progress_bar.start()

    nonfinite_run = 0
    log_acc: dict[str, list[torch.Tensor]] = {}
    t_last, step_last = time.perf_counter(), start_step
    step = start_step
    try:
        for step in range(start_step, total_steps):
            net.train()
            for group in opt.param_groups:
                group["lr"] = lr_at(step, lr=lr, total_steps=total_steps, warmup_steps=warmup_steps,
                                    schedule=lr_schedule, final_lr=final_lr)
            skip = False
            for rnd in range(grad_accum_rounds):
                batch = next(batches)
                x0 = batch["image"].to(device, non_blocking=True)
                cond = cond_to(conditioner.from_batch(batch), device)
                null_cond = cond_to(conditioner.null(x0.shape[0]), device)
                extra = {}
                if getattr(method, "needs_fake_cond", False):  # Self-E's late "fake score" stage
                    from selfe_cli.methods.selfe import fake_captions

                    extra["fake_cond"] = cond_to(conditioner.encode(
                        fake_captions(batch["caption"], method.cfg.fake_suffix)), device)
                torch.manual_seed(micro_seed(seed, step, rnd * world + dist.rank))
                last_round = rnd == grad_accum_rounds - 1
                if sharded:  # reduce-scatter the gradients once, after the last micro-batch
                    net.set_requires_gradient_sync(last_round)
                    sync = contextlib.nullcontext()
                else:
                    sync = contextlib.nullcontext() if (last_round or not dist.enabled) else train_net.no_sync()
                with sync:
                    with autocast:
                        out = method.loss(train_net, x0, cond, null_cond=null_cond, step=step,
                                          total_steps=total_steps, ema_net=ema.primary, **extra)
                    bad = all_reduce_flag(not bool(torch.isfinite(out.loss.detach()).item()), device)
                    if bad:
                        skip = True
                        continue
                    if not skip:
                        (out.loss / grad_accum_rounds).backward()
                for key, value in out.logs.items():
                    log_acc.setdefault(key, []).append(value.detach().float())
                log_acc.setdefault("loss", []).append(out.loss.detach().float())
            grad_norm = None
            if not skip and grad_clip is not None:
                grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
                if hasattr(grad_norm, "full_tensor"):  # FSDP: a replicated DTensor
                    grad_norm = grad_norm.full_tensor()
                if not torch.isfinite(grad_norm):
                    skip = True
            if skip:
                opt.zero_grad(set_to_none=True)
                nonfinite_run += 1
                nonfinite_total += 1
                if nonfinite_run >= max_nonfinite_in_a_row:
                    raise TrainingDiverged(
                        f"step {step}: {nonfinite_run} non-finite losses or gradients in a row; stopped "
                        f"(latest checkpoint kept in {ckpt_root}); lower train.lr or raise "
                        f"train.max_nonfinite_in_a_row")
            else:
                opt.step()
                opt.zero_grad(set_to_none=True)
                ema.update(net)
                nonfinite_run = 0
                if grad_norm is not None:
                    log_acc.setdefault("grad_norm", []).append(grad_norm.detach().float())

            done = step + 1
            if done % log_every_steps == 0 or done == total_steps:
                logs = {k: torch.stack(v).mean() for k, v in log_acc.items()}
                logs = all_reduce_mean(logs, device)
                log_acc.clear()
                now = time.perf_counter()
                its = (done - step_last) / max(now - t_last, 1e-9)
                t_last, step_last = now, done
                record = {"step": done, "lr": opt.param_groups[0]["lr"], "it_per_s": its,
                          "img_per_s": its * batch_size, "nonfinite_total": nonfinite_total, **logs}
                if dist.is_main:
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                    if writer is not None:
                        for key, value in record.items():
                            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                                writer.add_scalar(f"train/{key}", value, done)
                    if progress_bar is not None:
                        info = f"loss {logs.get('loss', float('nan')):.4f}  {its:.2f} it/s"
                        progress_bar.update(task, info=info)
                        if not progress_bar.console.is_terminal:  # logs (SLURM, nohup): a plain line instead
                            eta = (total_steps - done) / max(its, 1e-9)
                            progress_bar.console.print(f"step {done}/{total_steps}  {info}  "
                                                       f"eta {int(eta // 60)}:{int(eta % 60):02d}")
            if progress_bar is not None:
                progress_bar.update(task, completed=done)
            if done % checkpoint_every_steps == 0 and done != total_steps:
                save(done)
            if sample_fn is not None and sample_every_steps > 0 and done % sample_every_steps == 0 \
                    and done != total_steps:
                sampling_net = main_copy(ema.primary)
                if sampling_net is not None:
                    sample_fn(sampling_net, done)
                del sampling_net
        final_step = max(total_steps, start_step)
        if start_step < total_steps:
            save(total_steps)
        final_net = main_copy(ema.primary)
        if final_net is not None:
            if sample_fn is not None and start_step < total_steps:
                sample_fn(final_net, total_steps)
            export_final(final_net, run_dir / "final")
        barrier()
    finally:
        if progress_bar is not None:
            progress_bar.stop()
        if metrics_file is not None:
            metrics_file.close()
        if writer is not None:
            writer.close()
    return {"step": final_step, "resumed_from": start_step, "nonfinite_total": nonfinite_total}


def export_final(model: nn.Module, out: Path) -> None:
    """``save_pretrained`` of the EMA network, written next to ``out`` and renamed into place."""
    import shutil

    tmp = out.with_name(f".tmp-{out.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    if getattr(model, "has_v_head", False):  # iMF's auxiliary v-head trains u only: the export is the u network
        import copy

        model = copy.deepcopy(model)
        model.drop_v_head()
    model.save_pretrained(str(tmp))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
