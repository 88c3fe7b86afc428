"""Building blocks shared by every two-time network: time embedders, attention, norms, position tables.

Everything here is written to be differentiable in *forward mode* (``torch.func.jvp``), because
MeanFlow differentiates the network w.r.t. its input and both times (MF identity (6); docs/methods.md
§3.2): no in-place ops on
activations, no ``nn.MultiheadAttention``, attention through ``F.scaled_dot_product_attention`` whose
MATH backend has a forward-AD rule (flash / memory-efficient / CPU-flash kernels do not). Wrap the JVP
in ``attention_backend("math")`` to force it.

Time embedding (choice documented in docs): ``sin/cos(time_scale * t * f_k)`` with DiT/DDPM frequencies
``f_k = max_period^(-k / half)``, ``k = 0..half-1``, and ``time_scale = 1000`` by default: times in
[0, 1] then cover the same phase range as DDPM's integer steps 0..1000, the highest frequency resolves
``t - r`` differences of ~1e-3 and the embedding is an entire (infinitely smooth) function of ``t``, so
``t - r -> 0`` is a regular point (embedding of 0 = [1, ..., 1, 0, ..., 0]).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

_BACKENDS: dict[str, list[SDPBackend]] = {
    "math": [SDPBackend.MATH],
    "flash": [SDPBackend.FLASH_ATTENTION],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION],
    "cudnn": [SDPBackend.CUDNN_ATTENTION],
}


@contextlib.contextmanager
def attention_backend(name: str = "math") -> Iterator[None]:
    """Force the SDPA kernel used by every attention layer inside the block.

    ``"math"`` is required around ``torch.func.jvp`` / ``forward_ad`` (the only backend with a forward-AD
    rule); ``"auto"`` leaves PyTorch's choice (fast kernels) in place.
    """
    if name == "auto":
        yield
        return
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; expected 'auto' or one of {sorted(_BACKENDS)}")
    with sdpa_kernel(_BACKENDS[name]):
        yield


def timestep_embedding(t: torch.Tensor, dim: int, *, time_scale: float = 1000.0,
                       max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of float times ``t`` (N,) -> (N, dim), computed in float32 (or float64).

    ``[cos(s t f_0..f_{h-1}), sin(s t f_0..f_{h-1})]`` with ``f_k = max_period^(-k/h)``, ``h = dim // 2``.
    """
    half = dim // 2
    work = torch.float64 if t.dtype == torch.float64 else torch.float32
    k = torch.arange(half, device=t.device, dtype=work)
    freqs = torch.exp(-math.log(max_period) * k / half)  # (h,)
    args = (t.to(work) * time_scale)[:, None] * freqs[None]  # (N, h)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2h)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Sinusoid -> Linear -> SiLU -> Linear (DiT's embedder; DDPM++'s map layers)."""

    def __init__(self, out_dim: int, freq_dim: int = 256, *, time_scale: float = 1000.0,
                 max_period: float = 10000.0):
        super().__init__()
        self.freq_dim, self.time_scale, self.max_period = freq_dim, time_scale, max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        feats = timestep_embedding(t, self.freq_dim, time_scale=self.time_scale, max_period=self.max_period)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))  # (N, out_dim)


class TwoTimeEmbedder(nn.Module):
    """``emb(t) + emb'(t - r)``: two separate embedders, summed (MeanFlow Table 1c; Self-E e_t + e_s)."""

    def __init__(self, out_dim: int, freq_dim: int = 256, *, time_scale: float = 1000.0):
        super().__init__()
        self.t_embedder = TimestepEmbedder(out_dim, freq_dim, time_scale=time_scale)
        self.h_embedder = TimestepEmbedder(out_dim, freq_dim, time_scale=time_scale)

    def forward(self, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return self.t_embedder(t) + self.h_embedder(t - r)  # (N, out_dim)


class GuidanceEmbedder(nn.Module):
    """iMF's guidance condition ``[omega, t_min, t_max]`` (N, 3) -> a vector: three sinusoid MLPs, summed.

    omega enters as ``1 - 1/omega`` (in [0, 1) for omega >= 1, as the official imfDiT); t_min and t_max as they
    are. All three go into the sinusoids unscaled (``time_scale = 1``, the official embedding, whatever scale
    the network uses for its times): the features are then smooth in omega, so scales between or (mildly)
    beyond the trained ones interpolate. Networks add the result to their condition vector
    (``guidance_embed: true``)."""

    def __init__(self, out_dim: int, freq_dim: int = 256, *, time_scale: float = 1.0):
        super().__init__()
        self.omega_embedder = TimestepEmbedder(out_dim, freq_dim, time_scale=time_scale)
        self.t_min_embedder = TimestepEmbedder(out_dim, freq_dim, time_scale=time_scale)
        self.t_max_embedder = TimestepEmbedder(out_dim, freq_dim, time_scale=time_scale)

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        omega, t_min, t_max = g.unbind(1)
        return self.omega_embedder(1 - 1 / omega) + self.t_min_embedder(t_min) + self.t_max_embedder(t_max)


def no_guidance(n: int, device: torch.device | str) -> torch.Tensor:
    """The guidance condition of an unguided call: omega = 1 on the interval [0, 1], shape (N, 3)."""
    return torch.tensor([1.0, 0.0, 1.0], device=device).expand(n, 3)


class LogVarHead(nn.Module):
    """sCT's learned log-variance ``l(t)`` (Lu & Song 2024; EDM2's uncertainty weight, Karras et al. 2024): a scalar
    per sample, a function of the time only.

    ``c_noise = log(sigma) / 4`` with ``sigma = t / (1 - t)`` (EDM2's noise conditioning, on this package's linear
    path; ``t`` clamped to [1e-4, 1 - 1e-4]) -> ``sqrt(2) cos(2 pi (f c_noise + phi))`` with fixed random
    frequencies ``f ~ N(0, 1)`` and phases ``phi ~ U[0, 1)`` (EDM2's ``MPFourier``; drawn from a fixed seed, so
    they are rebuilt identically and not saved) -> a linear map to one value. The linear map starts at zero
    (``l = 0``) and takes no draw from the global random stream: building it changes no other weight.
    """

    def __init__(self, channels: int):
        super().__init__()
        if channels < 1:
            raise ValueError(f"a log-variance head needs channels >= 1, got {channels}")
        g = torch.Generator(device="cpu").manual_seed(0)
        self.register_buffer("freqs", torch.randn(channels, generator=g, device="cpu"), persistent=False)
        self.register_buffer("phases", torch.rand(channels, generator=g, device="cpu"), persistent=False)
        self.weight = nn.Parameter(torch.zeros(1, channels))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        work = torch.float64 if t.dtype == torch.float64 else torch.float32
        t = t.to(work).clamp(1e-4, 1 - 1e-4)
        c_noise = (torch.log(t) - torch.log1p(-t)) / 4  # log(sigma) / 4
        arg = c_noise[:, None] * self.freqs.to(work)[None] + self.phases.to(work)[None]  # (N, C)
        feats = math.sqrt(2) * torch.cos(2 * math.pi * arg)
        return F.linear(feats.to(self.weight.dtype), self.weight, self.bias)[:, 0]  # (N,)


def velocity_skip(t: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """``c_skip(t) = Cov(v, x_t) / Var(x_t) = (t - (1 - t) s^2) / ((1 - t)^2 s^2 + t^2)``, s = sigma_data.

    The best linear prediction of the velocity ``v = eps - x0`` from ``x_t = (1 - t) x0 + t eps`` for data of
    standard deviation s (EDM's c_skip, derived for this path): 1 at t = 1, -1 at t = 0. A network that
    outputs ``c_skip(t) x_t + F`` needs no identity mapping of the noise at t = 1, where a one-step sample
    ``x_t - V`` is then ``-F`` exactly: small, briefly trained networks otherwise leave residual noise.
    """
    t = t if t.dtype == torch.float64 else t.float()  # at least fp32 (bf16 t would round c_skip)
    s2 = sigma_data ** 2
    return (t - (1 - t) * s2) / ((1 - t) ** 2 * s2 + t ** 2)


def as_time(t: torch.Tensor | float, n: int, device: torch.device) -> torch.Tensor:
    """Times as a float vector (N,): scalars and 0-d tensors are broadcast to the batch."""
    if not isinstance(t, torch.Tensor):
        t = torch.tensor(float(t), device=device)
    if not t.is_floating_point():
        t = t.float()
    if t.dim() == 0:
        return t.expand(n)
    if t.shape != (n,):
        raise ValueError(f"times must have shape ({n},) or be scalars, got {tuple(t.shape)}")
    return t


class RMSNorm(nn.Module):
    """RMS normalisation over the last dim with a learned gain (used for QK-norm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float() if dtype in (torch.float16, torch.bfloat16) else x
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.to(dtype) * self.weight.to(dtype)


def key_padding_bias(mask: torch.Tensor | None) -> torch.Tensor | None:
    """Boolean key mask (N, L) -> SDPA boolean attn_mask (N, 1, 1, L), True = attend.

    A row with no valid key would give NaN (softmax over nothing): its first key is then allowed.
    """
    if mask is None:
        return None
    mask = mask.bool()
    empty = ~mask.any(dim=-1, keepdim=True)  # (N, 1)
    first = torch.zeros_like(mask)
    first[:, 0] = True  # built fresh, not an activation: in-place is safe here
    mask = mask | (empty & first)
    return mask[:, None, None, :]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
         is_causal: bool = False) -> torch.Tensor:
    """Scaled dot-product attention on (N, H, L, Dh); q/k/v brought to one dtype (autocast mixes)."""
    dtype = q.dtype
    return F.scaled_dot_product_attention(q, k.to(dtype), v.to(dtype), attn_mask=attn_mask, is_causal=is_causal)


class Attention(nn.Module):
    """Multi-head self-attention on tokens (N, L, D) via SDPA, optional QK RMS-norm."""

    def __init__(self, dim: int, num_heads: int, *, qk_norm: bool = False, bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        n, length, dim = x.shape
        qkv = self.qkv(x).reshape(n, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (N, H, L, Dh)
        q, k = self.q_norm(q), self.k_norm(k)
        out = sdpa(q, k, v, attn_mask, is_causal)  # (N, H, L, Dh)
        return self.proj(out.transpose(1, 2).reshape(n, length, dim))  # (N, L, D)


class CrossAttention(nn.Module):
    """Queries from tokens (N, L, D), keys/values from a context (N, S, Dc) with a key mask (N, S)."""

    def __init__(self, dim: int, context_dim: int, num_heads: int, *, qk_norm: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim, 2 * dim)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        n, length, dim = x.shape
        s = context.shape[1]
        q = self.q(x).reshape(n, length, self.num_heads, self.head_dim).transpose(1, 2)  # (N, H, L, Dh)
        kv = self.kv(context).reshape(n, s, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)  # each (N, H, S, Dh)
        q, k = self.q_norm(q), self.k_norm(k)
        out = sdpa(q, k, v, key_padding_bias(mask))  # (N, H, L, Dh)
        return self.proj(out.transpose(1, 2).reshape(n, length, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """1-D sin-cos table (M,) -> (M, dim), MAE/DiT convention [sin | cos], max period 10000."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = pos.double()[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position table (grid_size**2, dim): half the channels per axis (DiT)."""
    if dim % 4:
        raise ValueError(f"width {dim} must be divisible by 4 for the 2-D sin-cos position embedding")
    coords = torch.arange(grid_size, dtype=torch.float64)
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")  # row-major tokens: y outer, x inner
    emb_h = sincos_1d(dim // 2, gx.reshape(-1))  # DiT puts the column (w) coordinate first
    emb_w = sincos_1d(dim // 2, gy.reshape(-1))
    return torch.cat([emb_h, emb_w], dim=1).float()
