"""A small two-time MLP for low-dimensional data (2-D toy distributions in the benchmarks).

The input keeps the image convention ``(N, C, H, W)``: a 2-D point is a ``(N, 2, 1, 1)`` "image", so the
methods, the sampler and the training loop run on it unchanged. Layout:

  x (N, C*H*W) -> Linear -> (N, D); ``c = emb(t) + emb'(t - r) + emb(cond)`` (the shared two-time and
  condition embedders); ``depth`` pre-norm residual blocks ``h + W2 SiLU(W1 (LN(h) + c))``; LN -> Linear out.

The output layer starts at zero (the network starts as the zero map, like the DiT's adaLN-Zero), which keeps
the first steps of the JVP-based losses small.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import register_to_config
from torch import nn

from selfe_cli.models.base import ConditionEmbedder, ConditionKind, TwoTimeModel
from selfe_cli.models.conditioning import Cond
from selfe_cli.models.embeddings import TwoTimeEmbedder, as_time
from selfe_cli.models.registry import register_model


class ResidualBlock(nn.Module):
    def __init__(self, width: int, mlp_ratio: float):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(nn.functional.silu(self.fc1(self.norm(h) + c)))  # (N, D)


class MLP(TwoTimeModel):
    """Two-time MLP ``net(x, t, r, cond)`` on inputs of ``in_channels x sample_size x sample_size`` values."""

    @register_to_config
    def __init__(
        self,
        sample_size: int = 1,
        in_channels: int = 2,
        width: int = 256,
        depth: int = 4,
        mlp_ratio: float = 2.0,
        time_freq_dim: int = 128,
        time_scale: float = 1000.0,
        condition: ConditionKind = "none",
        num_classes: int = 0,
        guidance_embed: bool = False,
        logvar_channels: int = 0,
    ):
        super().__init__()
        if condition == "text":
            raise ValueError("the MLP takes condition 'none' or 'class' (no text encoder)")
        if width < 1 or depth < 1:
            raise ValueError(f"width and depth must be >= 1, got {width} and {depth}")
        self.cond_kind, self.in_channels, self.sample_size = condition, in_channels, sample_size
        dim = in_channels * sample_size * sample_size
        self.inp = nn.Linear(dim, width)
        self.time_embed = TwoTimeEmbedder(width, time_freq_dim, time_scale=time_scale)
        self.cond_embedder = ConditionEmbedder(condition, width, num_classes=num_classes,
                                               guidance_embed=guidance_embed, freq_dim=time_freq_dim)
        self.blocks = nn.ModuleList([ResidualBlock(width, mlp_ratio) for _ in range(depth)])
        self.norm_out = nn.LayerNorm(width)
        self.out = nn.Linear(width, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self._build_logvar_head(logvar_channels)  # sCT's learned log-variance (none at 0)

    def forward(self, x: torch.Tensor, t: torch.Tensor, r: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        n = x.shape[0]
        if x.shape[1:] != (self.in_channels, self.sample_size, self.sample_size):
            raise ValueError(f"this MLP takes ({self.in_channels}, {self.sample_size}, {self.sample_size}) inputs, "
                             f"got {tuple(x.shape[1:])}")
        t, r = as_time(t, n, x.device), as_time(r, n, x.device)
        h = self.inp(x.flatten(1).to(self.inp.weight.dtype))  # (N, D)
        c = self.time_embed(t, r)  # (N, D)
        cond_emb, _, _ = self.cond_embedder(cond, n, x.device)
        if cond_emb is not None:
            c = c + cond_emb
        for block in self.blocks:
            h = block(h, c)  # (N, D)
        return self._finish(self.out(self.norm_out(h)).view_as(x).to(x.dtype), t)  # (N, C, H, W)


register_model("mlp", MLP)  # every kwarg configurable; defaults: 2-D points as (2, 1, 1)
