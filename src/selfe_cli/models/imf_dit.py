"""iMF's own DiT (improved MeanFlow, official ``models/imfDiT.py``): in-context conditioning, no adaLN.

The sequence is ``[class tokens ; omega tokens ; t_min tokens ; t_max tokens ; time tokens ; patches]``: each
group of prefix tokens is a learned table plus the embedding of its scalar (class label; ``1 - 1/omega``; the
guidance interval's ends; the interval length ``h = t - r``: like the official network, ``t`` itself is not
embedded unless ``embed_t``). Blocks are pre-RMSNorm attention (no biases, QK RMS-norm per head, 1-D RoPE over
the whole sequence) and a SwiGLU MLP, each added through a per-channel gate that starts at zero, so every block
starts as the identity; the output layer (RMSNorm + linear) starts at zero. The last ``aux_v_head_blocks`` blocks
and the output layer exist twice on the shared trunk: the u-head and iMF's auxiliary v-head (``TwoTimeModel``'s
v-head protocol; dropped for sampling and export). Presets ``iMF-{B,M,L,XL}/2`` (ZOO.md §1): B 12 x 768, M 24 x
768, L 32 x 1024, XL 48 x 1024, 8 v-head blocks, on 32 x 32 x 4 SD-VAE latents of 1000 classes.

Guidance scalars come in the condition (``conditioning.with_guidance``); a call without them is unguided
(omega = 1 on [0, 1]). Attention goes through SDPA, so the JVP engine's attention rule applies.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import register_to_config
from torch import nn

from selfe_cli.models.base import ConditionKind, TwoTimeModel
from selfe_cli.models.conditioning import Cond, split_guidance
from selfe_cli.models.embeddings import RMSNorm, TimestepEmbedder, as_time, no_guidance, sdpa
from selfe_cli.models.registry import register_model


def _linear(cin: int, cout: int, std_scale: float, bias: bool = False) -> nn.Linear:
    layer = nn.Linear(cin, cout, bias=bias)
    nn.init.normal_(layer.weight, std=std_scale / math.sqrt(cin))  # the official "kaiming" normal, scaled
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


def rope_tables(head_dim: int, length: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``(L, head_dim / 2)`` of 1-D RoPE at positions 0..L-1 (adjacent channel pairs rotate)."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.arange(length, dtype=torch.float32, device=device)[:, None] * freqs[None]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs ``(x0, x1)`` of ``x (N, H, L, Dh)`` by the position angles."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (N, H, L, Dh/2, 2)
    x0, x1 = pairs.unbind(-1)
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


class RoPEAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, init_scale: float):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (_linear(dim, dim, init_scale) for _ in range(4))
        self.q_norm, self.k_norm = RMSNorm(self.head_dim), RMSNorm(self.head_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(n, length, self.num_heads, self.head_dim).transpose(1, 2)  # (N, H, L, Dh)

        q = apply_rope(self.q_norm(heads(self.q_proj(x))), cos, sin)
        k = apply_rope(self.k_norm(heads(self.k_proj(x))), cos, sin)
        out = sdpa(q, k, heads(self.v_proj(x)))
        return self.out_proj(out.transpose(1, 2).reshape(n, length, dim))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, init_scale: float):
        super().__init__()
        self.w1, self.w3 = _linear(dim, hidden, init_scale), _linear(dim, hidden, init_scale)
        self.w2 = _linear(hidden, dim, init_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class IMFBlock(nn.Module):
    """``x + g_a * Attn(RMSNorm x)``, then ``x + g_m * SwiGLU(RMSNorm x)``; the gates start at zero."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, init_scale: float):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)
        self.attn = RoPEAttention(dim, num_heads, init_scale)
        self.mlp = SwiGLU(dim, int(dim * mlp_ratio), init_scale)
        self.attn_scale = nn.Parameter(torch.zeros(dim))
        self.mlp_scale = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin) * self.attn_scale
        return x + self.mlp(self.norm2(x)) * self.mlp_scale


class IMFFinalLayer(nn.Module):
    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.linear = nn.Linear(dim, out_dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x))


class IMFDiT(TwoTimeModel):
    """improved MeanFlow's DiT; presets ``iMF-{B,M,L,XL}/2`` in the registry."""

    _no_split_modules = ["IMFBlock"]
    guidance_inputs = True  # omega and the guidance interval are built-in inputs (method imf)

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        in_channels: int = 4,
        out_channels: int | None = None,
        patch_size: int = 2,
        hidden_size: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 8 / 3,
        aux_v_head_blocks: int = 8,
        condition: ConditionKind = "class",
        num_classes: int = 1000,
        num_class_tokens: int = 8,
        num_cfg_tokens: int = 4,
        num_interval_tokens: int = 2,
        num_time_tokens: int = 4,
        embed_t: bool = False,
        time_freq_dim: int = 256,
        time_scale: float = 1.0,
        rope_theta: float = 10000.0,
        weight_init_constant: float = 0.32,
        token_init_constant: float = 1.0,
        logvar_channels: int = 0,
    ):
        super().__init__()
        if condition not in ("class", "none"):
            raise ValueError(f"condition must be 'class' or 'none' for the iMF DiT, got {condition!r}")
        if condition == "class" and num_classes < 1:
            raise ValueError(f"a class-conditional model needs num_classes >= 1, got {num_classes}")
        if sample_size % patch_size:
            raise ValueError(f"sample_size {sample_size} is not divisible by patch_size {patch_size}")
        if hidden_size % num_heads or (hidden_size // num_heads) % 2:
            raise ValueError(f"hidden_size {hidden_size} must split into num_heads {num_heads} heads of even size")
        if not 0 <= aux_v_head_blocks <= depth:
            raise ValueError(f"aux_v_head_blocks must be in [0, depth = {depth}], got {aux_v_head_blocks}")
        self.cond_kind, self.in_channels, self.sample_size = condition, in_channels, sample_size
        self.text_encoder_kind = None
        self.patch_size, self.num_classes = patch_size, num_classes
        self.out_channels = out_channels or in_channels
        d = hidden_size

        self.x_embedder = nn.Conv2d(in_channels, d, patch_size, stride=patch_size)
        nn.init.xavier_uniform_(self.x_embedder.weight.view(d, -1))
        nn.init.zeros_(self.x_embedder.bias)

        def embedder() -> TimestepEmbedder:
            emb = TimestepEmbedder(d, time_freq_dim, time_scale=time_scale)
            for layer in (emb.mlp[0], emb.mlp[2]):
                nn.init.normal_(layer.weight, std=1.0 / math.sqrt(layer.in_features))
                nn.init.zeros_(layer.bias)
            return emb

        self.h_embedder = embedder()
        self.t_embedder = embedder() if embed_t else None
        self.omega_embedder, self.t_min_embedder, self.t_max_embedder = embedder(), embedder(), embedder()
        token_std = token_init_constant / math.sqrt(d)
        if condition == "class":
            self.y_embedder = nn.Embedding(num_classes + 1, d)  # row num_classes = the null label
            nn.init.normal_(self.y_embedder.weight, std=1.0 / math.sqrt(d))
            self.class_tokens = nn.Parameter(torch.randn(num_class_tokens, d) * token_std)
        self.omega_tokens = nn.Parameter(torch.randn(num_cfg_tokens, d) * token_std)
        self.t_min_tokens = nn.Parameter(torch.randn(num_interval_tokens, d) * token_std)
        self.t_max_tokens = nn.Parameter(torch.randn(num_interval_tokens, d) * token_std)
        self.time_tokens = nn.Parameter(torch.randn(num_time_tokens, d) * token_std)
        self.prefix_tokens = (num_class_tokens if condition == "class" else 0) + num_cfg_tokens + \
            2 * num_interval_tokens + num_time_tokens
        self.head_dim, self.rope_theta = d // num_heads, rope_theta

        self.blocks = nn.ModuleList([IMFBlock(d, num_heads, mlp_ratio, weight_init_constant) for _ in range(depth)])
        self.final_layer = IMFFinalLayer(d, patch_size * patch_size * self.out_channels)
        self.v_blocks = nn.ModuleList([IMFBlock(d, num_heads, mlp_ratio, weight_init_constant)
                                       for _ in range(aux_v_head_blocks)]) if aux_v_head_blocks else None
        self.v_final_layer = IMFFinalLayer(d, patch_size * patch_size * self.out_channels) \
            if aux_v_head_blocks else None
        self._build_logvar_head(logvar_channels)  # sCT's learned log-variance (none at 0)

    def null_condition(self, n: int, device: torch.device | str = "cpu") -> Cond:
        if self.cond_kind == "none":
            return None
        return torch.full((n,), self.num_classes, dtype=torch.long, device=device)

    def unpatchify(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        p, c = self.patch_size, self.out_channels
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(x.shape[0], c, h * p, w * p)

    def _sequence(self, x: torch.Tensor, t: torch.Tensor, r: torch.Tensor, cond: Cond) -> torch.Tensor:
        n = x.shape[0]
        labels, g = split_guidance(cond)
        if g is None:
            g = no_guidance(n, x.device)
        g = g.to(x.device, torch.float64 if g.dtype == torch.float64 else torch.float32)
        patches = self.x_embedder(x).flatten(2).transpose(1, 2)  # (N, T, D)
        dtype = patches.dtype
        time = self.h_embedder(t - r)
        if self.t_embedder is not None:
            time = time + self.t_embedder(t)
        omega, t_min, t_max = g.unbind(1)
        groups = []
        if self.cond_kind == "class":
            if labels is None:
                labels = self.null_condition(n, x.device)
            if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
                raise ValueError("the iMF DiT takes a LongTensor (N,) of labels (with optional guidance)")
            groups.append(self.class_tokens + self.y_embedder(labels.long())[:, None])
        elif labels is not None:
            raise ValueError("this model is unconditional (condition='none') but got a condition")
        groups += [self.omega_tokens + self.omega_embedder(1 - 1 / omega)[:, None],
                   self.t_min_tokens + self.t_min_embedder(t_min)[:, None],
                   self.t_max_tokens + self.t_max_embedder(t_max)[:, None],
                   self.time_tokens + time[:, None]]
        return torch.cat([grp.to(dtype) for grp in groups] + [patches], dim=1)  # (N, P + T, D)

    def forward(self, x: torch.Tensor, t: torch.Tensor, r: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        n, _, hh, ww = x.shape
        if hh != self.sample_size or ww != self.sample_size:
            raise ValueError(f"this iMF DiT takes {self.sample_size}x{self.sample_size} inputs, got {hh}x{ww}")
        t, r = as_time(t, n, x.device), as_time(r, n, x.device)
        seq = self._sequence(x, t, r, cond)
        cos, sin = rope_tables(self.head_dim, seq.shape[1], self.rope_theta, x.device)
        p, k = self.patch_size, self.prefix_tokens
        split = len(self.blocks) - (len(self.v_blocks) if self.has_v_head else 0)
        for block in self.blocks[:split]:
            seq = block(seq, cos, sin)
        if self.wants_v():  # the v-head on the shared trunk
            v_seq = seq
            for block in self.v_blocks:
                v_seq = block(v_seq, cos, sin)
            v = self.unpatchify(self.v_final_layer(v_seq[:, k:]), hh // p, ww // p).to(x.dtype)
            if self._emit_v(v) is not None:
                return v
        for block in self.blocks[split:]:
            seq = block(seq, cos, sin)
        return self._finish(self.unpatchify(self.final_layer(seq[:, k:]), hh // p, ww // p).to(x.dtype), t)


# Paper sizes (depth x width, heads of 64; official imfDiT configs): 8 v-head blocks on the shared trunk.
register_model("imf-dit", IMFDiT)
for _name, (_depth, _width, _heads) in {"B": (12, 768, 12), "M": (24, 768, 12), "L": (32, 1024, 16),
                                        "XL": (48, 1024, 16)}.items():
    register_model(f"iMF-{_name}/2", IMFDiT, fixed=dict(depth=_depth, hidden_size=_width, num_heads=_heads,
                                                          patch_size=2))
