"""A two-time U-Net of the DDPM++ family (Song et al. 2021, score_sde ``ncsnpp`` with the DDPM++ CIFAR-10
config; the network MeanFlow trains on CIFAR-10, ~55M parameters).

Layout (DDPM++ / EDM "SongUNet" layout):
  encoder   conv_in, then per level: [down block (level > 0)], ``num_blocks`` residual blocks (+ self-attention
            at ``attn_resolutions``); every module output is kept as a skip;
  middle    residual block + attention, residual block;
  decoder   per level (coarse to fine): [up block], ``num_blocks + 1`` residual blocks on concat(h, skip),
            attention after the last one at ``attn_resolutions``;
  out       GroupNorm, SiLU, 3x3 conv.
Residual blocks: GN-SiLU-[resample]-conv3x3, + Linear(SiLU(emb)), GN-SiLU-dropout-conv3x3, 1x1 conv skip when
the shape changes, sum scaled by 1/sqrt(2) (``skip_rescale``). ``resample="biggan"`` (DDPM++ default) up/down
samples inside residual blocks (nearest up / 2x2 average down, the [1, 1] filter); ``"conv"`` uses plain
resampling layers (strided 3x3 conv down; nearest + 3x3 conv up).
Embedding: ``emb = MLP_t(sin(t)) + MLP_h(sin(t - r)) + cond``; blocks read ``SiLU(emb)``.
Text: the pooled text vector is added to ``emb`` and, at ``cross_attn_resolutions`` (default: the attention
resolutions), a cross-attention layer to the token context follows each self-attention position.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import register_to_config
from torch import nn

from selfe_cli.models.base import ConditionEmbedder, ConditionKind, TextEncoderKind, TwoTimeModel
from selfe_cli.models.conditioning import Cond
from selfe_cli.models.embeddings import TwoTimeEmbedder, as_time, key_padding_bias, sdpa, velocity_skip

SKIP_SCALE = 1 / math.sqrt(2)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 for half/bf16 inputs, result in the input dtype.

    Autocast would run it in float32 anyway; casting by hand also sidesteps a PyTorch forward-AD bug under
    CPU autocast (a bf16 -> fp32 autocast cast leaves a float32 tangent that the next conv's JVP rule
    rejects: "Input type (torch.FloatTensor) and weight type (CPUBFloat16Type) should be the same").
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float16, torch.bfloat16):
            weight = self.weight.float() if self.weight is not None else None
            bias = self.bias.float() if self.bias is not None else None
            return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)
        return super().forward(x)


def group_norm(channels: int) -> nn.GroupNorm:
    # 32 groups as in DDPM++, fewer for narrow nets (at least 4 channels per group)
    return GroupNorm32(num_groups=max(1, min(32, channels // 4)), num_channels=channels, eps=1e-6)


def _small_init_(layer: nn.Module, scale: float = 1e-5) -> nn.Module:
    """Near-zero init of the last layer of a residual branch (DDPM++ init_scale 0 / EDM init_weight 1e-5)."""
    nn.init.xavier_uniform_(layer.weight, gain=scale)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def _xavier_(layer: nn.Module) -> nn.Module:
    nn.init.xavier_uniform_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, *, dropout: float, up: bool = False, down: bool = False):
        super().__init__()
        self.up, self.down = up, down
        self.norm0 = group_norm(cin)
        self.conv0 = _xavier_(nn.Conv2d(cin, cout, 3, padding=1))
        self.affine = _xavier_(nn.Linear(emb_dim, cout))
        self.norm1 = group_norm(cout)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = _small_init_(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = _xavier_(nn.Conv2d(cin, cout, 1)) if (cin != cout or up or down) else None

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm0(x))  # (N, Cin, H, W)
        h = self.conv0(self._resample(h))  # (N, Cout, H', W')
        h = F.silu(self.norm1(h + self.affine(emb)[:, :, None, None]))
        h = self.conv1(self.dropout(h))
        x = self._resample(x)
        skip = self.skip(x) if self.skip is not None else x
        return (h + skip) * SKIP_SCALE


class SelfAttention2d(nn.Module):
    """DDPM++ attention block: GN, 1x1 q/k/v, SDPA over the H*W positions, 1x1 out, (x + h) / sqrt(2)."""

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"{channels} channels are not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.qkv = _xavier_(nn.Conv2d(channels, 3 * channels, 1))
        self.proj = _small_init_(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, hh, ww = x.shape
        heads = self.num_heads
        qkv = self.qkv(self.norm(x)).reshape(n, 3, heads, c // heads, hh * ww).permute(1, 0, 2, 4, 3)
        q, k, v = qkv.unbind(0)  # each (N, heads, HW, Dh)
        a = sdpa(q, k, v)  # (N, heads, HW, Dh)
        a = a.permute(0, 1, 3, 2).reshape(n, c, hh, ww)
        return (x + self.proj(a)) * SKIP_SCALE


class CrossAttention2d(nn.Module):
    """Cross-attention from feature-map positions to a token context (N, L, Cw) with a key mask (N, L)."""

    def __init__(self, channels: int, context_width: int, num_heads: int):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"{channels} channels are not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.q = _xavier_(nn.Conv2d(channels, channels, 1))
        self.kv = _xavier_(nn.Linear(context_width, 2 * channels))
        self.proj = _small_init_(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        n, c, hh, ww = x.shape
        heads, length = self.num_heads, context.shape[1]
        q = self.q(self.norm(x)).reshape(n, heads, c // heads, hh * ww).transpose(2, 3)  # (N, h, HW, Dh)
        kv = self.kv(context).reshape(n, length, 2, heads, c // heads).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)  # each (N, h, L, Dh)
        a = sdpa(q, k, v, key_padding_bias(mask))  # (N, h, HW, Dh)
        a = a.transpose(2, 3).reshape(n, c, hh, ww)
        return (x + self.proj(a)) * SKIP_SCALE


class Downsample(nn.Module):
    """Plain resampling (``resample="conv"``): strided 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = _xavier_(nn.Conv2d(channels, channels, 3, stride=2, padding=1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Plain resampling (``resample="conv"``): nearest 2x then 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = _xavier_(nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNetLayer(nn.Module):
    """One position of the U-Net: a residual (or resampling) block, optional self- and cross-attention."""

    def __init__(self, block: nn.Module, attn: nn.Module | None = None, xattn: nn.Module | None = None):
        super().__init__()
        self.block, self.attn, self.xattn = block, attn, xattn

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None,
                mask: torch.Tensor | None) -> torch.Tensor:
        x = self.block(x, emb)
        if self.attn is not None:
            x = self.attn(x)
        if self.xattn is not None and context is not None:
            x = self.xattn(x, context, mask)
        return x


class UNet(TwoTimeModel):
    """Two-time DDPM++ U-Net. See the module docstring for the layout."""

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        in_channels: int = 3,
        out_channels: int | None = None,
        model_channels: int = 32,
        channel_mult: tuple[int, ...] = (1, 2, 2),
        num_blocks: int = 2,
        attn_resolutions: tuple[int, ...] = (8,),
        num_heads: int = 1,
        dropout: float = 0.0,
        resample: str = "biggan",
        emb_mult: int = 4,
        time_freq_dim: int = 128,
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
        cross_attn_resolutions: tuple[int, ...] | None = None,
        skip_sigma_data: float = 0.0,
        guidance_embed: bool = False,
        logvar_channels: int = 0,
    ):
        super().__init__()
        if resample not in ("biggan", "conv"):
            raise ValueError(f"resample must be 'biggan' or 'conv', got {resample!r}")
        if sample_size % (2 ** (len(channel_mult) - 1)):
            raise ValueError(f"sample_size {sample_size} is not divisible by 2^{len(channel_mult) - 1} "
                             f"(channel_mult has {len(channel_mult)} levels)")
        if skip_sigma_data < 0:
            raise ValueError(f"skip_sigma_data must be >= 0 (0: off), got {skip_sigma_data}")
        self.cond_kind, self.in_channels, self.sample_size = condition, in_channels, sample_size
        self.skip_sigma_data = skip_sigma_data
        self.text_encoder_kind = text_encoder if condition == "text" else None
        self.num_levels = len(channel_mult)
        out_channels = out_channels or in_channels
        emb_dim = model_channels * emb_mult
        attn_res = set(attn_resolutions)
        use_xattn = condition == "text" and cross_attention
        xattn_res = set(cross_attn_resolutions if cross_attn_resolutions is not None else attn_resolutions)

        self.time_embed = TwoTimeEmbedder(emb_dim, time_freq_dim, time_scale=time_scale)
        self.cond_embedder = ConditionEmbedder(
            condition, emb_dim, num_classes=num_classes, text_encoder=text_encoder, text_width=text_width,
            text_layers=text_layers, text_heads=text_heads, text_context_length=text_context_length,
            context_dim=context_dim, pooled_dim=pooled_dim,
            context_width=emb_dim, use_context=use_xattn, guidance_embed=guidance_embed,
            freq_dim=time_freq_dim)

        def layer(block: nn.Module, c: int, res: int, attn: bool) -> UNetLayer:
            return UNetLayer(block,
                             SelfAttention2d(c, num_heads) if attn and res in attn_res else None,
                             CrossAttention2d(c, emb_dim, num_heads) if attn and use_xattn and res in xattn_res
                             else None)

        def resampler(c: int, up: bool) -> nn.Module:
            if resample == "biggan":
                return ResBlock(c, c, emb_dim, dropout=dropout, up=up, down=not up)
            return Upsample(c) if up else Downsample(c)

        self.conv_in = _xavier_(nn.Conv2d(in_channels, model_channels, 3, padding=1))
        self.enc = nn.ModuleList()
        skips = [model_channels]
        c = model_channels
        for level, mult in enumerate(channel_mult):
            res = sample_size >> level
            if level > 0:
                self.enc.append(UNetLayer(resampler(c, up=False)))
                skips.append(c)
            for _ in range(num_blocks):
                cout = model_channels * mult
                self.enc.append(layer(ResBlock(c, cout, emb_dim, dropout=dropout), cout, res, attn=True))
                c = cout
                skips.append(c)
        low_res = sample_size >> (len(channel_mult) - 1)
        self.mid = nn.ModuleList([
            # the middle attention is always there (DDPM++), cross-attention follows the configuration
            UNetLayer(ResBlock(c, c, emb_dim, dropout=dropout), SelfAttention2d(c, num_heads),
                      CrossAttention2d(c, emb_dim, num_heads) if use_xattn and low_res in xattn_res else None),
            UNetLayer(ResBlock(c, c, emb_dim, dropout=dropout)),
        ])
        self.dec = nn.ModuleList()
        self.dec_takes_skip: list[bool] = []
        for level in reversed(range(len(channel_mult))):
            res = sample_size >> level
            if level < len(channel_mult) - 1:
                self.dec.append(UNetLayer(resampler(c, up=True)))
                self.dec_takes_skip.append(False)
            for idx in range(num_blocks + 1):
                cin = c + skips.pop()
                cout = model_channels * channel_mult[level]
                self.dec.append(layer(ResBlock(cin, cout, emb_dim, dropout=dropout), cout, res,
                                      attn=idx == num_blocks))
                self.dec_takes_skip.append(True)
                c = cout
        assert not skips
        self.norm_out = group_norm(c)
        self.conv_out = _small_init_(nn.Conv2d(c, out_channels, 3, padding=1))
        self._build_logvar_head(logvar_channels)  # sCT's learned log-variance (none at 0)

    def forward(self, x: torch.Tensor, t: torch.Tensor, r: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        n, _, hh, ww = x.shape
        factor = 2 ** (self.num_levels - 1)
        if hh % factor or ww % factor:
            raise ValueError(f"input size {hh}x{ww} is not divisible by {factor}")
        t, r = as_time(t, n, x.device), as_time(r, n, x.device)
        emb = self.time_embed(t, r)  # (N, E)
        cond_emb, context, mask = self.cond_embedder(cond, n, x.device)
        if cond_emb is not None:
            emb = emb + cond_emb
        emb = F.silu(emb)  # every block reads SiLU(emb) (score_sde: Dense_0(act(temb)))

        # channels-last activations: oneDNN / cuDNN convolutions run 1.4-2x faster in that layout (measured
        # on 2 CPU cores for 32 channels at 32 px, forward + backward); values are the same either way.
        h = self.conv_in(x.contiguous(memory_format=torch.channels_last))  # (N, C0, H, W)
        skips = [h]
        for layer in self.enc:
            h = layer(h, emb, context, mask)
            skips.append(h)
        for layer in self.mid:
            h = layer(h, emb, context, mask)
        for layer, takes_skip in zip(self.dec, self.dec_takes_skip, strict=True):
            if takes_skip:
                h = torch.cat([h, skips.pop()], dim=1)  # (N, C + Cskip, H', W')
            h = layer(h, emb, context, mask)
        out = self.conv_out(F.silu(self.norm_out(h)))  # (N, Cout, H, W)
        if self.skip_sigma_data > 0:  # V = c_skip(t) x_t + F (off by default: DDPM++ has no input skip)
            out = out + velocity_skip(t, self.skip_sigma_data).view(n, 1, 1, 1) * x
        return self._finish(out.to(x.dtype).contiguous(), t)
