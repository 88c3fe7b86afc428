"""The two-time network contract and the condition embedder every network shares.

``TwoTimeModel.forward(x, t, r, cond=None) -> Tensor`` shaped like ``x``; ``t``, ``r`` float (N,) in
[0, 1], ``r <= t``; the output is read as the average velocity over [r, t] (docs/methods.md §1). Subclasses are
``diffusers`` ``ModelMixin`` + ``ConfigMixin`` models (``@register_to_config`` on ``__init__``), so
``save_pretrained`` / ``from_pretrained`` round-trip through ``config.json`` + safetensors. Every
subclass is recorded in ``MODEL_CLASSES`` by class name, which is what ``load_model`` reads from
``config.json``'s ``_class_name``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from diffusers import ConfigMixin, ModelMixin
from torch import nn

from selfe_cli.models.conditioning import Cond, split_guidance
from selfe_cli.models.embeddings import GuidanceEmbedder, LogVarHead, attention_backend, no_guidance
from selfe_cli.models.text import TinyTextEncoder, null_input_ids

ConditionKind = Literal["none", "class", "text"]
TextEncoderKind = Literal["tiny", "external"]

MODEL_CLASSES: dict[str, type[TwoTimeModel]] = {}

__all__ = ["MODEL_CLASSES", "ConditionEmbedder", "TwoTimeModel", "attention_backend"]


class TwoTimeModel(ModelMixin, ConfigMixin):
    """Base class of every network ``net(x, t, r, cond)``.

    Attributes set by subclasses: ``cond_kind`` ("none" | "class" | "text"), ``in_channels``,
    ``sample_size``; ``text_encoder`` ("tiny" | "external") for text models.
    """

    cond_kind: str = "none"
    in_channels: int
    sample_size: int

    # The auxiliary v-head (iMF): networks built with ``aux_v_head_blocks = k > 0`` duplicate their last k blocks
    # and output layer on the shared trunk as ``v_blocks`` / ``v_final_layer``. ``output_head = "v"`` makes
    # the forward return the v-head's output instead of u; a list in ``v_sink`` collects the v-head output of
    # every forward that returns u, as ``(grad enabled, tensor)`` (methods.imf reads it: one trunk pass for both).
    output_head: str = "u"
    v_sink: list | None = None

    @property
    def has_v_head(self) -> bool:
        return getattr(self, "v_blocks", None) is not None and len(self.v_blocks) > 0

    def drop_v_head(self) -> None:
        """Remove the v-head (sampling and export need only u): what remains is the same network built with
        ``aux_v_head_blocks = 0``, with the same parameter names."""
        if not self.has_v_head:
            return
        del self.v_blocks
        del self.v_final_layer
        self.v_blocks, self.v_final_layer = None, None
        self.register_to_config(aux_v_head_blocks=0)

    def _emit_v(self, v: torch.Tensor) -> torch.Tensor | None:
        """Record (or, with ``output_head == "v"``, return) the v-head output of this forward."""
        if self.output_head == "v":
            return v
        if self.v_sink is not None:
            import torch.autograd.forward_ad as fwAD

            self.v_sink.append((torch.is_grad_enabled(), fwAD.unpack_dual(v).primal))
            if torch.is_grad_enabled():
                self._pending_v = v
        return None

    def _tie_v(self, out: torch.Tensor) -> torch.Tensor:
        """``out + 0 v`` after a recorded v-head output: the same values and gradients, but the v-head is in the
        graph of what the forward returns, so DDP with ``find_unused_parameters`` (which searches that graph)
        does not mark the v-head's parameters unused before the v-loss reaches them."""
        v = self.__dict__.pop("_pending_v", None)
        return out if v is None else out + 0 * v

    def wants_v(self) -> bool:
        return self.has_v_head and (self.output_head == "v" or self.v_sink is not None)

    # sCT's learned log-variance l(t) (``logvar_channels = C > 0``; embeddings.LogVarHead): every network builds it
    # with ``_build_logvar_head`` as ``logvar_head`` (parameters ``logvar_head.weight`` / ``.bias``; none at C = 0,
    # so networks and checkpoints without it are unchanged) and ends its forward with ``_finish``. Under grad,
    # ``_finish`` ties l(t) into the output as ``out + 0 l`` (as ``_tie_v``: the same values and gradients, but
    # DDP with ``find_unused_parameters`` finds the head in the graph, whichever method trains the network); a
    # list in ``logvar_sink`` collects ``(grad enabled, l)`` of every forward (methods.sct reads it, as methods.imf
    # reads ``v_sink``). Sampling runs without grad and without a sink: the head is not evaluated.
    logvar_sink: list | None = None

    def _build_logvar_head(self, channels: int) -> None:
        if channels < 0:
            raise ValueError(f"logvar_channels must be >= 0 (0: no log-variance head), got {channels}")
        self.logvar_head = LogVarHead(channels) if channels else None

    @property
    def has_logvar_head(self) -> bool:
        return getattr(self, "logvar_head", None) is not None

    def _finish(self, out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The forward's output: ``_tie_v``, then the log-variance of the times ``t`` (N,) recorded and tied in.
        ``l`` depends on ``t`` only and enters the output times zero: it adds nothing to a JVP's tangent (it reads
        ``t`` detached, so the row-tangent engine computes no tangent for it)."""
        out = self._tie_v(out)
        grad = torch.is_grad_enabled()
        if not self.has_logvar_head or (not grad and self.logvar_sink is None):
            return out
        logvar = self.logvar_head(t.detach())  # (N,)
        if self.logvar_sink is not None:
            import torch.autograd.forward_ad as fwAD

            self.logvar_sink.append((grad, fwAD.unpack_dual(logvar).primal))
        return out + (0 * logvar).to(out.dtype).view(-1, *([1] * (out.dim() - 1))) if grad else out

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        MODEL_CLASSES[cls.__name__] = cls

    def forward(self, x: torch.Tensor, t: torch.Tensor, r: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        raise NotImplementedError

    def null_condition(self, n: int, device: torch.device | str = "cpu") -> Cond:
        """The model's own null condition when it can make it (labels, built-in text encoder)."""
        return self.cond_embedder.null(n, device)


class ConditionEmbedder(nn.Module):
    """Condition -> (vector added to the time embedding, token context, context mask).

    - ``"class"``: ``LongTensor (N,)``, a table with ``num_classes + 1`` rows (the last is the learned
      null label). ``cond=None`` means the null label.
    - ``"text"`` with ``text_encoder="tiny"``: ``{"input_ids": (N, L)}`` through an owned, jointly trained
      ``TinyTextEncoder``; ``cond=None`` means the empty prompt.
    - ``"text"`` with ``text_encoder="external"``: ``{"context": (N, L, context_dim), "mask": (N, L),
      "pooled": (N, pooled_dim)}`` from frozen encoders; the null is the encoders' empty prompt, which
      only the caller can compute, so ``cond`` is required.

    ``guidance_embed=True`` (iMF): the condition may carry guidance scalars (``conditioning.with_guidance``),
    embedded by a ``GuidanceEmbedder`` and added to the vector; a condition without them counts as unguided
    (omega = 1 on [0, 1]). Without it, the module has no guidance parameters (checkpoints of earlier runs load
    unchanged) and a guidance condition is refused.

    The pooled text vector goes through an MLP into ``emb_dim``; the token context is projected by an MLP
    to ``context_width`` (once, shared by every cross-attention layer: cheaper than a 4096-wide K/V per
    layer for T5 features).
    """

    def __init__(self, condition: str, emb_dim: int, *, num_classes: int = 0, text_encoder: str = "tiny",
                 text_width: int = 256, text_layers: int = 4, text_heads: int = 4, text_context_length: int = 77,
                 context_dim: int = 0, pooled_dim: int = 0, context_width: int = 0, use_context: bool = True,
                 guidance_embed: bool = False, freq_dim: int = 256):
        super().__init__()
        self.guidance = GuidanceEmbedder(emb_dim, freq_dim) if guidance_embed else None
        if condition not in ("none", "class", "text"):
            raise ValueError(f"condition must be 'none', 'class' or 'text', got {condition!r}")
        self.condition, self.text_encoder_kind = condition, text_encoder
        self.num_classes = num_classes
        self.use_context = use_context and condition == "text"
        if condition == "class":
            if num_classes < 1:
                raise ValueError(f"a class-conditional model needs num_classes >= 1, got {num_classes}")
            self.label_embedding = nn.Embedding(num_classes + 1, emb_dim)  # row num_classes = null label
            nn.init.normal_(self.label_embedding.weight, std=0.02)
        elif condition == "text":
            if text_encoder == "tiny":
                if text_width < 1 or text_heads < 1 or text_width % text_heads:
                    raise ValueError(f"text_width {text_width} must be a positive multiple of text_heads {text_heads}")
                self.text_encoder = TinyTextEncoder(text_width, text_layers, text_heads,
                                                    context_length=text_context_length)
                context_dim = pooled_dim = text_width
            elif text_encoder == "external":
                if context_dim < 1 or pooled_dim < 1:
                    raise ValueError("text_encoder='external' needs context_dim >= 1 and pooled_dim >= 1")
            else:
                raise ValueError(f"text_encoder must be 'tiny' or 'external', got {text_encoder!r}")
            self.pooled_proj = nn.Sequential(nn.Linear(pooled_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
            if self.use_context:
                self.context_proj = nn.Sequential(nn.LayerNorm(context_dim), nn.Linear(context_dim, context_width),
                                                  nn.GELU(approximate="tanh"),
                                                  nn.Linear(context_width, context_width))

    def null(self, n: int, device: torch.device | str = "cpu") -> Cond:
        if self.condition == "none":
            return None
        if self.condition == "class":
            return torch.full((n,), self.num_classes, dtype=torch.long, device=device)
        if self.text_encoder_kind == "tiny":
            return {"input_ids": null_input_ids(n, self.text_encoder.context_length, device=device)}
        raise ValueError("a model with text_encoder='external' needs its null condition (the frozen encoders' "
                         "features of the empty prompt) from the caller")

    def forward(self, cond: Cond, n: int, device: torch.device
                ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        cond, guidance = split_guidance(cond)
        if self.guidance is None:
            if guidance is not None:
                raise ValueError("this network takes no guidance condition (build it with guidance_embed: true)")
            return self._embed(cond, n, device)
        g = guidance if guidance is not None else no_guidance(n, device)
        g_emb = self.guidance(g.to(device=device, dtype=torch.float64 if g.dtype == torch.float64 else torch.float32))
        emb, context, mask = self._embed(cond, n, device)
        return (g_emb if emb is None else emb + g_emb.to(emb.dtype)), context, mask

    def _embed(self, cond: Cond, n: int, device: torch.device
               ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        if self.condition == "none":
            if cond is not None:
                raise ValueError("this model is unconditional (condition='none') but got a condition")
            return None, None, None
        if cond is None:
            cond = self.null(n, device)
        if self.condition == "class":
            if not isinstance(cond, torch.Tensor) or cond.dim() != 1:
                raise ValueError("a class-conditional model takes a LongTensor (N,) of labels")
            return self.label_embedding(cond.long()), None, None  # (N, E)
        if not isinstance(cond, dict):
            raise ValueError("a text-conditional model takes a dict condition")
        if self.text_encoder_kind == "tiny":
            if "input_ids" not in cond:
                raise ValueError("text_encoder='tiny' takes {'input_ids': LongTensor (N, L)}")
            context, mask, pooled = self.text_encoder(cond["input_ids"])
        else:
            missing = {"context", "mask", "pooled"} - set(cond)
            if missing:
                raise ValueError(f"text_encoder='external' takes context, mask and pooled; missing {sorted(missing)}")
            context, mask, pooled = cond["context"], cond["mask"].bool(), cond["pooled"]
        weight_dtype = self.pooled_proj[0].weight.dtype
        emb = self.pooled_proj(pooled.to(weight_dtype))  # (N, E)
        if not self.use_context:
            return emb, None, None
        return emb, self.context_proj(context.to(weight_dtype)), mask  # (N, E), (N, L, Cw), (N, L)
