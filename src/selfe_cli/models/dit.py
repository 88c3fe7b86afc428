"""Two-time DiT (Peebles & Xie 2023) as MeanFlow uses it on ImageNet latents.

Patchify (conv p x p, stride p) + fixed 2-D sin-cos positions, ``depth`` blocks with adaLN-Zero conditioning
on ``c = MLP_t(sin t) + MLP_h(sin(t - r)) + cond``, final adaLN layer and linear un-patchify. adaLN
modulations and the final layer start at zero, so the network starts as the zero map (DiT).

Text conditioning (our choice, PixArt-alpha style): the pooled text vector (MLP) is added to ``c``, and with
``cross_attention=True`` every block gets a cross-attention sub-layer between self-attention and the MLP,
``x + CrossAttn(LN(x), context)``, K/V from the token context (projected once by an MLP to the model width,
padding masked); its output projection starts at zero so a block is still the identity at init.
Attention goes through SDPA (fast kernels by default; ``attention_backend("math")`` for forward AD).
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import register_to_config
from torch import nn

from selfe_cli.models.base import ConditionEmbedder, ConditionKind, TextEncoderKind, TwoTimeModel
from selfe_cli.models.conditioning import Cond
from selfe_cli.models.embeddings import Attention, CrossAttention, Mlp, TwoTimeEmbedder, as_time, sincos_2d


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]  # x (N, T, D), shift/scale (N, D)


class DiTBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, *, qk_norm: bool, cross: bool,
                 dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, qk_norm=qk_norm)
        if cross:
            self.norm_x = nn.LayerNorm(dim, eps=1e-6)
            self.cross_attn = CrossAttention(dim, dim, num_heads, qk_norm=qk_norm)
        else:
            self.cross_attn = None
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor | None,
                mask: torch.Tensor | None) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        if self.cross_attn is not None and context is not None:
            x = x + self.cross_attn(self.norm_x(x), context, mask)
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))  # (N, T, p*p*C)


class DiT(TwoTimeModel):
    """Two-time DiT; presets ``DiT-{S,B,M,L,XL}/{2,4,8}`` and ``DiT-tiny/{2,4}`` live in the registry."""

    _no_split_modules = ["DiTBlock"]  # the FSDP units under train.parallel: fsdp

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        in_channels: int = 4,
        out_channels: int | None = None,
        patch_size: int = 2,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        qk_norm: bool = False,
        time_freq_dim: int = 256,
        time_scale: float = 1000.0,
        condition: ConditionKind = "none",
        num_classes: int = 0,
        text_encoder: TextEncoderKind = "tiny",
        text_width: int = 256,
        text_layers: int = 4,
        text_heads: int = 4,
        text_context_length: int = 77,
        context_dim: int = 0,
        pooled_dim: int = 0,
        cross_attention: bool = True,
        dropout: float = 0.0,
        guidance_embed: bool = False,
        aux_v_head_blocks: int = 0,
        logvar_channels: int = 0,
    ):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if not 0 <= aux_v_head_blocks <= depth:
            raise ValueError(f"aux_v_head_blocks must be in [0, depth = {depth}], got {aux_v_head_blocks}")
        if sample_size % patch_size:
            raise ValueError(f"sample_size {sample_size} is not divisible by patch_size {patch_size}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.cond_kind, self.in_channels, self.sample_size = condition, in_channels, sample_size
        self.text_encoder_kind = text_encoder if condition == "text" else None
        self.patch_size = patch_size
        self.out_channels = out_channels or in_channels
        use_xattn = condition == "text" and cross_attention
        grid = sample_size // patch_size

        self.x_embedder = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        # fixed table, recomputed at construction: not saved (non-persistent)
        self.register_buffer("pos_embed", sincos_2d(hidden_size, grid)[None], persistent=False)  # (1, T, D)
        self.time_embed = TwoTimeEmbedder(hidden_size, time_freq_dim, time_scale=time_scale)
        self.cond_embedder = ConditionEmbedder(
            condition, hidden_size, num_classes=num_classes, text_encoder=text_encoder, text_width=text_width,
            text_layers=text_layers, text_heads=text_heads, text_context_length=text_context_length,
            context_dim=context_dim, pooled_dim=pooled_dim,
            context_width=hidden_size, use_context=use_xattn, guidance_embed=guidance_embed,
            freq_dim=time_freq_dim)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm=qk_norm, cross=use_xattn,
                                              dropout=dropout)
                                     for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        # iMF's auxiliary v-head: the last k blocks and the output layer again, on the shared trunk
        self.v_blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm=qk_norm, cross=use_xattn,
                                                dropout=dropout) for _ in range(aux_v_head_blocks)]) \
            if aux_v_head_blocks else None
        self.v_final_layer = FinalLayer(hidden_size, patch_size, self.out_channels) if aux_v_head_blocks else None
        self._init_weights()
        self._build_logvar_head(logvar_channels)  # sCT's learned log-variance (none at 0)

    def _init_weights(self) -> None:
        def basic(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        heads = [self.final_layer] + ([self.v_final_layer] if self.v_final_layer is not None else [])
        blocks = list(self.blocks) + (list(self.v_blocks) if self.v_blocks is not None else [])
        for m in blocks + heads:
            m.apply(basic)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        for emb in (self.time_embed.t_embedder, self.time_embed.h_embedder):
            nn.init.normal_(emb.mlp[0].weight, std=0.02)
            nn.init.normal_(emb.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity, the network as the zero map
        for block in blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
            if block.cross_attn is not None:
                nn.init.zeros_(block.cross_attn.proj.weight)
                nn.init.zeros_(block.cross_attn.proj.bias)
        for head in heads:
            nn.init.zeros_(head.adaLN_modulation[-1].weight)
            nn.init.zeros_(head.adaLN_modulation[-1].bias)
            nn.init.zeros_(head.linear.weight)
            nn.init.zeros_(head.linear.bias)

    def unpatchify(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        p, c = self.patch_size, self.out_channels
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(x.shape[0], c, h * p, w * p)  # (N, C, H, W)

    def forward(self, x: torch.Tensor, t: torch.Tensor, r: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        n, _, hh, ww = x.shape
        if hh != self.sample_size or ww != self.sample_size:
            raise ValueError(f"this DiT takes {self.sample_size}x{self.sample_size} inputs, got {hh}x{ww}")
        t, r = as_time(t, n, x.device), as_time(r, n, x.device)
        tokens = self.x_embedder(x).flatten(2).transpose(1, 2)  # (N, T, D)
        tokens = tokens + self.pos_embed.to(tokens.dtype)
        c = self.time_embed(t, r)  # (N, D)
        cond_emb, context, mask = self.cond_embedder(cond, n, x.device)
        if cond_emb is not None:
            c = c + cond_emb
        p = self.patch_size
        split = len(self.blocks) - (len(self.v_blocks) if self.has_v_head else 0)
        for block in self.blocks[:split]:
            tokens = block(tokens, c, context, mask)
        if self.wants_v():  # the v-head on the shared trunk
            v_tokens = tokens
            for block in self.v_blocks:
                v_tokens = block(v_tokens, c, context, mask)
            v = self.unpatchify(self.v_final_layer(v_tokens, c), hh // p, ww // p).to(x.dtype)
            if self._emit_v(v) is not None:
                return v
        for block in self.blocks[split:]:
            tokens = block(tokens, c, context, mask)
        out = self.final_layer(tokens, c)  # (N, T, p*p*C)
        return self._finish(self.unpatchify(out, hh // p, ww // p).to(x.dtype), t)
