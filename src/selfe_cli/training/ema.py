"""Exponential moving averages of the weights: copies that start equal and stay in eval mode."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """One averaged copy of ``model`` per decay: ``ema = decay * ema + (1 - decay) * param``."""

    def __init__(self, model: nn.Module, decays: list[float]):
        self.decays = [float(d) for d in decays]
        self.models: dict[float, nn.Module] = {}
        for decay in self.decays:
            ema = copy.deepcopy(model).eval().requires_grad_(False)
            self.models[decay] = ema

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        for decay, ema in self.models.items():
            for name, p_ema in ema.named_parameters():
                p_ema.lerp_(params[name].detach().to(p_ema.dtype), 1.0 - decay)
            for name, b_ema in ema.named_buffers():
                b_ema.copy_(buffers[name])

    @property
    def primary(self) -> nn.Module:
        """The EMA of the first decay: the one used for sample grids, `selfe sample` and evals."""
        return self.models[self.decays[0]]

    def state_dicts(self) -> dict[float, dict[str, torch.Tensor]]:
        return {d: m.state_dict() for d, m in self.models.items()}

    def load_state_dicts(self, states: dict[float, dict[str, torch.Tensor]]) -> None:
        for decay, ema in self.models.items():
            ema.load_state_dict(states[decay], strict=True)
