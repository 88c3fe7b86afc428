"""FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters, gradients and optimiser state sharded over ranks.

For networks too large to replicate on every GPU (the 2B MMDiT: 2.2B fp32 parameters plus Adam's two
moments are ~35 GB per replica under DDP). Each block class the model names in ``_no_split_modules``
(the diffusers convention) becomes one FSDP unit, all-gathered just before its forward and freed after
it; the root unit holds the rest (embeddings, final layer). EMA copies are sharded the same way, so the
EMA update stays a local element-wise op on matching shards.

Checkpoints hold full, unsharded tensors in the same files and layout as DDP runs (integer optimiser
parameter indices in ``named_parameters`` order), so a run can be resumed with the other
``train.parallel`` mode or on a different number of GPUs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def shard_model(net: nn.Module, device: torch.device, world_size: int, *, inference_only: bool = False) -> nn.Module:
    """``fully_shard`` each ``_no_split_modules`` block of ``net``, then ``net`` itself (in place).

    ``inference_only`` (EMA copies): the root unit also frees its gathered parameters after forward.
    FSDP keeps the root's unsharded after forward because backward needs them next, but an EMA copy has
    no backward, and its update must see the sharded parameters.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    block_names = set(getattr(net, "_no_split_modules", None) or ())
    for module in list(net.modules()):
        if module is not net and type(module).__name__ in block_names:
            fully_shard(module, mesh=mesh)
    fully_shard(net, mesh=mesh, reshard_after_forward=True if inference_only else None)
    return net


def _options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # full tensors on CPU, on rank 0 only (the other ranks get empty dicts): rank 0 writes the checkpoint
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded ``state_dict`` on rank 0 (a collective: every rank must call it)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=_options())


def trainable_names(net: nn.Module) -> list[str]:
    """Parameter names in the order the optimiser was given them (``build_optimizer``'s order)."""
    return [name for name, p in net.named_parameters() if p.requires_grad]


def full_optimizer_state_dict(net: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The unsharded optimiser state on rank 0, keyed like a plain ``optimizer.state_dict()``.

    ``get_optimizer_state_dict`` keys state by parameter name; checkpoints use the integer indices of
    an unsharded optimiser so DDP and FSDP runs write the same files.
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    sd = get_optimizer_state_dict(net, optimizer, options=_options())
    if not sd:  # ranks other than 0
        return {}
    index = {name: i for i, name in enumerate(trainable_names(net))}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in sd["param_groups"]]
    return {"state": {index[n]: s for n, s in sd["state"].items()}, "param_groups": groups}


def load_optimizer_state_dict(net: nn.Module, optimizer: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
    """Load a full, integer-keyed optimiser state (read on every rank) into the sharded optimiser."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = trainable_names(net)
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]
    by_name = {"state": {names[int(i)]: s for i, s in sd["state"].items()}, "param_groups": groups}
    set_optimizer_state_dict(net, optimizer, optim_state_dict=by_name,
                             options=StateDictOptions(full_state_dict=True))


def unsharded_copy(module: nn.Module, device: torch.device, is_main: bool) -> nn.Module | None:
    """A plain (unsharded) copy of a sharded model on rank 0, for sample grids and ``save_pretrained``.

    A collective: every rank calls it; the other ranks get ``None``. Built on ``device`` from the model's
    config (diffusers ``ConfigMixin``) and loaded strictly, so it is exactly the sharded model's weights.
    """
    sd = full_state_dict(module)
    if not is_main:
        return None
    with torch.device(device):
        copy = type(module).from_config(module.config)
    copy.load_state_dict(sd, strict=True)
    return copy.eval().requires_grad_(False)
