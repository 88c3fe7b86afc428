"""A FLUX-style MMDiT two-time network (the Self-E paper's architecture, docs/methods.md §5).

Layout:
  image tokens  patchify p x p -> Linear -> (N, Li, D); text tokens: the condition embedder's context MLP
                (frozen T5 features or the built-in tiny encoder) -> (N, Lt, D);
  vector        ``vec = emb(t) + emb'(t - s) + MLP(pooled text)``; every block reads SiLU(vec) (adaLN);
  blocks        ``depth_double`` double-stream blocks (separate weights for image and text tokens, one joint
                attention over [text ; image]) then ``depth_single`` single-stream blocks (one weight set over
                the concatenated sequence, attention and MLP in parallel: FLUX's "parallel" layer);
  attention     SDPA, per-head QK RMSNorm, 3-axis RoPE on (index, row, column) positions (FLUX ids: text
                tokens at 0, image tokens at (0, row, col)); keys of padded text tokens are masked;
  out           adaLN final layer -> Linear -> unpatchify.

adaLN modulations and the final linear are zero-initialised (adaLN-Zero, DiT): every block starts as the
identity and the network outputs 0, which keeps tiny CPU runs stable.

Sharding (FSDP2 / activation checkpointing): ``self.blocks`` is one ``ModuleList`` of
``DoubleStreamBlock`` and ``SingleStreamBlock`` modules with the same call signature
``block(img, txt, vec, rot, attn_mask) -> (img, txt)``: wrap each of those two classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers.configuration_utils import register_to_config
from torch import nn

from selfe_cli.models import text_frozen  # noqa: F401  (registers the conditioner of text_encoder='external')
from selfe_cli.models.base import ConditionEmbedder, ConditionKind, TextEncoderKind, TwoTimeModel
from selfe_cli.models.conditioning import Cond
from selfe_cli.models.embeddings import Mlp, RMSNorm, TwoTimeEmbedder, as_time, key_padding_bias, sdpa
from selfe_cli.models.registry import register_model

# ---------------------------------------------------------------------------------------------- RoPE


def default_rope_axes(head_dim: int) -> tuple[int, int, int]:
    """FLUX's split of the head dim over (index, row, col): 1/8 then two equal halves, all even.

    head_dim 128 -> (16, 56, 56) (FLUX / Self-E 2B); 64 -> (8, 28, 28); 32 -> (4, 14, 14)."""
    first = max(2, (head_dim // 8) // 2 * 2)
    rest = head_dim - first
    half = rest // 2 // 2 * 2
    return first, rest - half, half


def rope_angles(ids: torch.Tensor, axes_dim: Sequence[int], theta: float = 10000.0) -> torch.Tensor:
    """Positions (L, A) -> unit complex rotations (L, sum(axes_dim) / 2): per axis ``pos * theta^(-2k / d)``."""
    parts = []
    for axis, d in enumerate(axes_dim):
        omega = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=ids.device) / d)  # (d/2,)
        parts.append(ids[:, axis:axis + 1].double() * omega[None])  # (L, d/2)
    ang = torch.cat(parts, dim=-1)  # float64 angles: positions up to thousands keep their phase
    return torch.polar(torch.ones_like(ang), ang).to(torch.complex64)


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive channel pairs of x (N, H, L, Dh) by ``rot`` (L, Dh/2), one complex multiply in fp32."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # (N, H, L, Dh/2)
    return torch.view_as_real(xc * rot).flatten(-2).to(x.dtype)


def position_ids(txt_len: int, h: int, w: int, device: torch.device) -> torch.Tensor:
    """(Lt + h w, 3) ids: text tokens all zero, image tokens (0, row, col) in row-major order."""
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    img = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1)  # (h w, 3)
    return torch.cat([torch.zeros(txt_len, 3, dtype=img.dtype, device=device), img]).float()


# -------------------------------------------------------------------------------------------- blocks


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


def _zero(layer: nn.Linear) -> nn.Linear:
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class _Stream(nn.Module):
    """The per-stream weights of a double-stream block (image or text)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qk_norm: bool, dropout: float = 0.0):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.mod = nn.Sequential(nn.SiLU(), _zero(nn.Linear(dim, 6 * dim)))
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout)

    def qkv_heads(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, length, _ = x.shape
        qkv = self.qkv(modulate(self.norm1(x), shift, scale))
        q, k, v = qkv.reshape(n, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return self.q_norm(q), self.k_norm(k), v  # each (N, H, L, Dh)


class DoubleStreamBlock(nn.Module):
    """Separate image/text weights, one joint attention over [text ; image] tokens (MMDiT / FLUX)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = True,
                 dropout: float = 0.0):
        super().__init__()
        self.img = _Stream(dim, num_heads, mlp_ratio, qk_norm, dropout)
        self.txt = _Stream(dim, num_heads, mlp_ratio, qk_norm, dropout)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, rot: torch.Tensor,
                attn_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        n, li, dim = img.shape
        lt = txt.shape[1]
        mi = self.img.mod(vec).chunk(6, dim=1)  # shift1, scale1, gate1, shift2, scale2, gate2: (N, D) each
        mt = self.txt.mod(vec).chunk(6, dim=1)
        qi, ki, vi = self.img.qkv_heads(img, mi[0], mi[1])  # (N, H, Li, Dh)
        qt, kt, vt = self.txt.qkv_heads(txt, mt[0], mt[1])  # (N, H, Lt, Dh)
        q = apply_rope(torch.cat([qt, qi], dim=2), rot)  # (N, H, Lt + Li, Dh)
        k = apply_rope(torch.cat([kt, ki], dim=2), rot)
        v = torch.cat([vt, vi], dim=2)
        att = sdpa(q, k, v, attn_mask).transpose(1, 2).reshape(n, lt + li, dim)  # (N, Lt + Li, D)
        att_t, att_i = att[:, :lt], att[:, lt:]
        img = img + mi[2][:, None] * self.img.proj(att_i)
        img = img + mi[5][:, None] * self.img.mlp(modulate(self.img.norm2(img), mi[3], mi[4]))
        txt = txt + mt[2][:, None] * self.txt.proj(att_t)
        txt = txt + mt[5][:, None] * self.txt.mlp(modulate(self.txt.norm2(txt), mt[3], mt[4]))
        return img, txt


class SingleStreamBlock(nn.Module):
    """One weight set over [text ; image]: ``x + gate * W2 [attn(qkv) ; GELU(mlp)]`` with ``[qkv ; mlp] = W1 x``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = True,
                 dropout: float = 0.0):
        super().__init__()
        self.num_heads, self.head_dim, self.dim = num_heads, dim // num_heads, dim
        self.hidden = int(dim * mlp_ratio)
        self.mod = nn.Sequential(nn.SiLU(), _zero(nn.Linear(dim, 3 * dim)))
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear1 = nn.Linear(dim, 3 * dim + self.hidden)
        self.linear2 = nn.Linear(dim + self.hidden, dim)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.act = nn.GELU(approximate="tanh")
        self.drop = nn.Dropout(dropout)  # on the MLP branch's hidden activations, as in the double blocks

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, rot: torch.Tensor,
                attn_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        lt = txt.shape[1]
        x = torch.cat([txt, img], dim=1)  # (N, L, D)
        n, length, dim = x.shape
        shift, scale, gate = self.mod(vec).chunk(3, dim=1)
        qkv, mlp = self.linear1(modulate(self.norm(x), shift, scale)).split([3 * dim, self.hidden], dim=-1)
        q, k, v = qkv.reshape(n, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = apply_rope(self.q_norm(q), rot), apply_rope(self.k_norm(k), rot)
        att = sdpa(q, k, v, attn_mask).transpose(1, 2).reshape(n, length, dim)  # (N, L, D)
        x = x + gate[:, None] * self.linear2(torch.cat([att, self.drop(self.act(mlp))], dim=-1))
        return x[:, lt:], x[:, :lt]


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mod = nn.Sequential(nn.SiLU(), _zero(nn.Linear(dim, 2 * dim)))
        self.linear = _zero(nn.Linear(dim, patch_size * patch_size * out_channels))

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.mod(vec).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))  # (N, Li, p*p*C)


# ---------------------------------------------------------------------------------------------- model


class MMDiT(TwoTimeModel):
    """FLUX-style MMDiT two-time network; presets ``mmdit-tiny``, ``mmdit-0.5b``, ``mmdit-2b``."""

    _supports_gradient_checkpointing = True
    _no_split_modules = ["DoubleStreamBlock", "SingleStreamBlock"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        in_channels: int = 16,
        out_channels: int | None = None,
        patch_size: int = 2,
        hidden_size: int = 256,
        num_heads: int = 4,
        depth_double: int = 2,
        depth_single: int = 4,
        mlp_ratio: float = 4.0,
        qk_norm: bool = True,
        rope_axes: tuple[int, ...] | None = None,
        rope_theta: float = 10000.0,
        time_freq_dim: int = 256,
        time_scale: float = 1000.0,
        condition: ConditionKind = "text",
        num_classes: int = 0,
        text_encoder: TextEncoderKind = "tiny",
        text_width: int = 256,
        text_layers: int = 4,
        text_heads: int = 4,
        text_context_length: int = 77,
        context_dim: int = 0,
        pooled_dim: int = 0,
        trim_text: bool = True,
        t5_encoder: str = "google/t5-v1_1-xxl",
        clip_encoder: str = "openai/clip-vit-large-patch14",
        t5_max_length: int = 256,
        dropout: float = 0.0,
        guidance_embed: bool = False,
        aux_v_head_blocks: int = 0,
        logvar_channels: int = 0,
    ):
        super().__init__()
        if not 0 <= aux_v_head_blocks <= depth_single:
            raise ValueError(f"aux_v_head_blocks must be in [0, depth_single = {depth_single}] (the v-head duplicates "
                             f"single-stream blocks), got {aux_v_head_blocks}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if sample_size % patch_size:
            raise ValueError(f"sample_size {sample_size} is not divisible by patch_size {patch_size}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        head_dim = hidden_size // num_heads
        axes = tuple(rope_axes) if rope_axes is not None else default_rope_axes(head_dim)
        if len(axes) != 3 or sum(axes) != head_dim or any(a % 2 for a in axes):
            raise ValueError(f"rope_axes {list(axes)} must be 3 even numbers summing to the head dim {head_dim}")
        if depth_double + depth_single < 1:
            raise ValueError("the MMDiT needs at least one block (depth_double + depth_single >= 1)")
        self.cond_kind, self.in_channels, self.sample_size = condition, in_channels, sample_size
        self.text_encoder_kind = text_encoder if condition == "text" else None
        self.patch_size, self.rope_axes, self.rope_theta = patch_size, axes, rope_theta
        self.out_channels = out_channels or in_channels
        self.trim_text = trim_text
        self.gradient_checkpointing = False

        self.x_embedder = nn.Linear(patch_size * patch_size * in_channels, hidden_size)
        self.time_embed = TwoTimeEmbedder(hidden_size, time_freq_dim, time_scale=time_scale)
        # pooled text -> vec; token context -> width D (FLUX's txt_in, here a small MLP)
        self.cond_embedder = ConditionEmbedder(
            condition, hidden_size, num_classes=num_classes, text_encoder=text_encoder, text_width=text_width,
            text_layers=text_layers, text_heads=text_heads, text_context_length=text_context_length,
            context_dim=context_dim, pooled_dim=pooled_dim,
            context_width=hidden_size, use_context=True, guidance_embed=guidance_embed,
            freq_dim=time_freq_dim)
        self.blocks = nn.ModuleList(
            [DoubleStreamBlock(hidden_size, num_heads, mlp_ratio, qk_norm, dropout) for _ in range(depth_double)]
            + [SingleStreamBlock(hidden_size, num_heads, mlp_ratio, qk_norm, dropout) for _ in range(depth_single)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        # iMF's auxiliary v-head: the last k (single-stream) blocks and the output layer again, on the shared trunk
        self.v_blocks = nn.ModuleList([SingleStreamBlock(hidden_size, num_heads, mlp_ratio, qk_norm, dropout)
                                       for _ in range(aux_v_head_blocks)]) if aux_v_head_blocks else None
        self.v_final_layer = FinalLayer(hidden_size, patch_size, self.out_channels) if aux_v_head_blocks else None
        self._init_weights()
        self._build_logvar_head(logvar_channels)  # sCT's learned log-variance (none at 0)

    def _init_weights(self) -> None:
        heads = [self.blocks] + ([self.v_blocks] if self.v_blocks is not None else [])
        for module in [self.x_embedder, *(m for h in heads for m in h.modules())]:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for module in (m for h in heads for m in h.modules()):  # adaLN-Zero: modulations (and gates) start at 0
            if isinstance(module, (_Stream, SingleStreamBlock)):
                _zero(module.mod[1])

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, H/p * W/p, p*p*C), row-major tokens, channels last within a patch."""
        n, c, h, w = x.shape
        p = self.patch_size
        x = x.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(n, (h // p) * (w // p), p * p * c)

    def unpatchify(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        n = tokens.shape[0]
        p, c = self.patch_size, self.out_channels
        x = tokens.reshape(n, h // p, w // p, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(n, c, h, w)

    def forward(self, x: torch.Tensor, t: torch.Tensor, r: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        n, _, h, w = x.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"input size {h}x{w} is not divisible by patch_size {p}")
        t, r = as_time(t, n, x.device), as_time(r, n, x.device)
        vec = self.time_embed(t, r)  # (N, D)
        cond_emb, context, mask = self.cond_embedder(cond, n, x.device)
        if cond_emb is not None:
            vec = vec + cond_emb
        img = self.x_embedder(self.patchify(x).to(self.x_embedder.weight.dtype))  # (N, Li, D)
        if context is None:  # class / unconditional: image tokens only
            txt = img.new_zeros(n, 0, img.shape[-1])
            key_mask = None
        else:
            txt, key_mask = context.to(img.dtype), mask  # (N, Lt, D), (N, Lt)
            if self.trim_text and key_mask is not None:
                # Exact: keys past the longest prompt are masked for every sample, and those queries only
                # update padded text tokens, which never reach the image output.
                keep = int(key_mask.sum(dim=1).max().clamp(min=1))
                txt, key_mask = txt[:, :keep], key_mask[:, :keep]
        lt = txt.shape[1]
        rot = rope_angles(position_ids(lt, h // p, w // p, x.device), self.rope_axes, self.rope_theta)
        attn_mask = None
        if key_mask is not None and not bool(key_mask.all()):
            full = torch.cat([key_mask.bool(), key_mask.new_ones(n, img.shape[1], dtype=torch.bool)], dim=1)
            attn_mask = key_padding_bias(full)  # (N, 1, 1, Lt + Li)
        def run(blocks: Any, img: torch.Tensor, txt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            for block in blocks:
                if torch.is_grad_enabled() and self.gradient_checkpointing:
                    img, txt = self._gradient_checkpointing_func(block, img, txt, vec, rot, attn_mask)
                else:
                    img, txt = block(img, txt, vec, rot, attn_mask)
            return img, txt

        split = len(self.blocks) - (len(self.v_blocks) if self.has_v_head else 0)
        img, txt = run(self.blocks[:split], img, txt)
        if self.wants_v():  # the v-head on the shared trunk
            v_img, _ = run(self.v_blocks, img, txt)
            v = self.unpatchify(self.v_final_layer(v_img, vec), h, w).to(x.dtype)
            if self._emit_v(v) is not None:
                return v
        img, txt = run(self.blocks[split:], img, txt)
        out = self.final_layer(img, vec)  # (N, Li, p*p*C)
        return self._finish(self.unpatchify(out, h, w).to(x.dtype), t)


# Presets. Sizes as the paper: 2B = width 2048, 16 heads of 128, 8 double + 16 single, RoPE (16, 56, 56);
# 0.5B ablation model = width 1024, heads of 64 (16 heads), same depth. Paper-size models default to FLUX
# VAE latents of 256 px images (32 x 32 x 16) and frozen T5-XXL (4096) + CLIP-L pooled (768) features.
register_model("mmdit", MMDiT)
register_model("mmdit-tiny", MMDiT,
               fixed=dict(hidden_size=128, num_heads=4, depth_double=2, depth_single=2),
               defaults=dict(sample_size=32, in_channels=3, text_width=128, text_layers=2, text_heads=4))
_PAPER_TEXT = dict(text_encoder="external", context_dim=4096, pooled_dim=768, sample_size=32, in_channels=16)
register_model("mmdit-0.5b", MMDiT, fixed=dict(hidden_size=1024, num_heads=16, depth_double=8, depth_single=16),
               defaults=_PAPER_TEXT)
register_model("mmdit-2b", MMDiT,
               fixed=dict(hidden_size=2048, num_heads=16, depth_double=8, depth_single=16),
               defaults=dict(_PAPER_TEXT, rope_axes=(16, 56, 56)))
