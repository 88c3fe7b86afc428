"""Frozen text encoders (the Self-E / FLUX setup): T5 encoder tokens + pooled CLIP text, with a disk cache.

``FrozenTextConditioner.encode(prompts) -> {"context": (N, L, D_t5), "mask": (N, L) bool, "pooled": (N, P)}``:
  context  last hidden state of a T5 encoder (``google/t5-v1_1-xxl``: D = 4096), padded to ``t5_max_length``
           tokens (a fixed length, so conditional and null batches concatenate for CFG / Self-E);
  mask     the T5 attention mask (True = real token, including the closing ``</s>``);
  pooled   CLIP text model ``pooler_output`` (``openai/clip-vit-large-patch14``: P = 768; 77 tokens).
Without a T5 encoder (``t5=None``) the context is CLIP's last hidden state instead.

Encoders load lazily (first cache miss), in eval mode with ``requires_grad=False``, so a run whose captions
are all cached never loads T5-XXL. Cache: one safetensors file per caption under
``<cache_dir>/<hash[:2]>/<hash>.safetensors``, the hash over the encoder names, lengths, dtype and caption
(a different encoder never reads another's entries); only the valid tokens are stored.

Offline: a hub name that is not in the local Hugging Face cache is a one-line ``UserError`` naming the
model and the recipe key to point at a local directory. transformers 5.x may return a broken 2-token
CLIP tokenizer offline instead of raising (docs/methods.md §5, text encoders): tokenizers are checked against the model's vocabulary.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selfe_cli.errors import UserError
from selfe_cli.models.conditioning import Cond, Conditioner
from selfe_cli.models.registry import register_text_conditioner

DEFAULT_T5 = "google/t5-v1_1-xxl"
DEFAULT_CLIP = "openai/clip-vit-large-patch14"
CACHE_ENV = "SELFE_TEXT_CACHE"


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "selfe" / "text-embeddings"))


def check_tokenizer(tokenizer: Any, model_vocab: int, name: str, key: str) -> None:
    """Fail clearly when a tokenizer is much smaller than its model's vocabulary (the offline 2-token trap)."""
    size = len(tokenizer)
    if size < 0.9 * model_vocab:
        raise UserError(f"{key}: the tokenizer of {name!r} has {size} tokens but the model expects about "
                        f"{model_vocab} (a broken offline download?); point {key} at a complete local copy")


def _load_error(kind: str, name: str, key: str, err: Exception) -> UserError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return UserError(f"{key}: cannot load the {kind} {name!r} (offline and not in the Hugging Face cache?): "
                     f"{first[:160]}; set {key} to a local directory with the model and tokenizer")


def load_clip_text(name: str = DEFAULT_CLIP, *, key: str = "model.clip_encoder",
                   dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """``CLIPTextModel`` and its tokenizer from a hub name or a local directory (frozen, eval mode)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    try:
        tokenizer = CLIPTokenizer.from_pretrained(name)
        model = CLIPTextModel.from_pretrained(name, dtype=dtype)
    except (OSError, ValueError) as err:
        raise _load_error("CLIP text encoder", name, key, err) from None
    check_tokenizer(tokenizer, model.config.vocab_size, name, key)
    return model.eval().requires_grad_(False), tokenizer


def load_t5_encoder(name: str = DEFAULT_T5, *, key: str = "model.t5_encoder",
                    dtype: torch.dtype = torch.bfloat16) -> tuple[nn.Module, Any]:
    """``T5EncoderModel`` and its tokenizer from a hub name or a local directory (frozen, eval mode)."""
    from transformers import AutoTokenizer, T5EncoderModel

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = T5EncoderModel.from_pretrained(name, dtype=dtype)
    except (OSError, ValueError) as err:
        raise _load_error("T5 encoder", name, key, err) from None
    check_tokenizer(tokenizer, model.config.vocab_size, name, key)
    return model.eval().requires_grad_(False), tokenizer


def clip_tokenizer_offline() -> Any:
    """A ``transformers.CLIPTokenizer`` built from the BPE vocabulary open_clip ships (no download).

    All OpenAI CLIP text models (B/32 ... L/14) share this 49408-token vocabulary."""
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    del open_clip
    merges_text = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = merges_text[1:49152 - 256 - 2 + 1]
    byte_chars = list(bytes_to_unicode().values())
    vocab_list = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    return CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges])


class TextEmbeddingCache:
    """Per-caption safetensors files keyed by a hash of the encoder identity and the caption."""

    def __init__(self, directory: str | Path, identity: str):
        self.dir, self.identity = Path(directory), identity

    def key(self, caption: str) -> str:
        return hashlib.sha256(f"{self.identity}\0{caption}".encode()).hexdigest()

    def path(self, caption: str) -> Path:
        k = self.key(caption)
        return self.dir / k[:2] / f"{k}.safetensors"

    def get(self, caption: str) -> dict[str, torch.Tensor] | None:
        from safetensors.torch import load_file

        p = self.path(caption)
        if not p.is_file():
            return None
        try:
            return load_file(str(p))
        except Exception:  # noqa: BLE001 - a torn/corrupt entry is a miss; it is rewritten
            return None

    def put(self, caption: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        p = self.path(caption)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(f".tmp{os.getpid()}")
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, p)  # atomic: concurrent ranks never read half a file


class FrozenTextConditioner(Conditioner):
    """Captions -> frozen T5 tokens + pooled CLIP (see the module docstring)."""

    kind = "text"

    def __init__(self, *, t5: str | None = DEFAULT_T5, clip: str | None = DEFAULT_CLIP, t5_max_length: int = 256,
                 clip_max_length: int = 77, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 cache_dir: str | Path | None = None, use_cache: bool = True,
                 t5_modules: tuple[nn.Module, Any] | None = None, clip_modules: tuple[nn.Module, Any] | None = None,
                 t5_key: str = "model.t5_encoder", clip_key: str = "model.clip_encoder"):
        if clip is None and clip_modules is None:
            raise UserError(f"{clip_key}: the pooled vector needs a CLIP text encoder")
        self.t5_name, self.clip_name = t5, clip
        self.t5_max_length, self.clip_max_length = t5_max_length, clip_max_length
        self.device, self.dtype = torch.device(device), dtype
        self.t5_key, self.clip_key = t5_key, clip_key
        self._t5 = t5_modules
        self._clip = clip_modules
        self.uses_t5 = t5 is not None or t5_modules is not None
        identity = f"t5={t5}:{t5_max_length}|clip={clip}:{clip_max_length}|{dtype}"
        self.cache = TextEmbeddingCache(cache_dir or default_cache_dir(), identity) if use_cache else None
        self._null: dict[str, torch.Tensor] | None = None

    def to(self, device: torch.device | str) -> FrozenTextConditioner:
        """Run the encoders (and return features) on ``device`` from now on."""
        self.device = torch.device(device)
        self._null = None
        return self

    # -- encoders (lazy)
    def _clip_modules(self) -> tuple[nn.Module, Any]:
        if self._clip is None:
            self._clip = load_clip_text(self.clip_name, key=self.clip_key)
        model, tok = self._clip
        return model.to(self.device), tok

    def _t5_modules(self) -> tuple[nn.Module, Any]:
        if self._t5 is None:
            self._t5 = load_t5_encoder(self.t5_name, key=self.t5_key)
        model, tok = self._t5
        return model.to(self.device), tok

    @torch.no_grad()
    def _encode_uncached(self, prompts: list[str]) -> list[dict[str, torch.Tensor]]:
        """Per prompt: ``context`` (valid tokens, D) and ``pooled`` (P,), float32 on CPU."""
        clip, clip_tok = self._clip_modules()
        c_in = clip_tok(prompts, padding="max_length", max_length=self.clip_max_length, truncation=True,
                        return_tensors="pt").to(self.device)
        c_out = clip(input_ids=c_in["input_ids"], attention_mask=c_in.get("attention_mask"))
        pooled = c_out.pooler_output.float().cpu()  # (N, P)
        if self.uses_t5:
            t5, t5_tok = self._t5_modules()
            t_in = t5_tok(prompts, padding="max_length", max_length=self.t5_max_length, truncation=True,
                          return_tensors="pt").to(self.device)
            hidden = t5(input_ids=t_in["input_ids"], attention_mask=t_in["attention_mask"]).last_hidden_state
            lengths = t_in["attention_mask"].sum(dim=1).tolist()
        else:
            hidden = c_out.last_hidden_state
            lengths = c_in["attention_mask"].sum(dim=1).tolist()
        hidden = hidden.float().cpu()  # (N, L, D)
        return [{"context": hidden[i, :int(n)].clone(), "pooled": pooled[i].clone()} for i, n in enumerate(lengths)]

    def _max_length(self) -> int:
        return self.t5_max_length if self.uses_t5 else self.clip_max_length

    def encode(self, raw: Sequence[Any] | None, n: int | None = None) -> Cond:
        """Prompts -> condition dict on ``self.device``; ``raw=None`` gives ``n`` empty (null) prompts."""
        prompts = [""] * (n or 0) if raw is None else [str(p) for p in raw]
        entries: list[dict[str, torch.Tensor] | None] = [None] * len(prompts)
        misses: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            hit = self.cache.get(p) if self.cache is not None else None
            if hit is not None:
                entries[i] = hit
            else:
                misses.setdefault(p, []).append(i)
        if misses:
            unique = list(misses)
            for p, e in zip(unique, self._encode_uncached(unique), strict=True):
                if self.cache is not None:
                    self.cache.put(p, e)
                for i in misses[p]:
                    entries[i] = e
        return self._stack(entries)  # type: ignore[arg-type]

    def _stack(self, entries: list[dict[str, torch.Tensor]]) -> Cond:
        length = self._max_length()
        if not entries:
            raise ValueError("encode() needs at least one prompt")
        dim = entries[0]["context"].shape[-1]
        context = torch.zeros(len(entries), length, dim)
        mask = torch.zeros(len(entries), length, dtype=torch.bool)
        for i, e in enumerate(entries):
            k = min(e["context"].shape[0], length)
            context[i, :k] = e["context"][:k]
            mask[i, :k] = True
        pooled = torch.stack([e["pooled"] for e in entries])
        return {"context": context.to(self.device, self.dtype), "mask": mask.to(self.device),
                "pooled": pooled.to(self.device, self.dtype)}

    def from_batch(self, batch: dict[str, Any]) -> Cond:
        if "caption" not in batch:
            raise UserError("data: frozen text encoders need a dataset with captions (the batch has no 'caption')")
        return self.encode(batch["caption"])

    def null(self, n: int, device: torch.device | str = "cpu") -> Cond:
        """The empty prompt's features, repeated (encoded once)."""
        if self._null is None:
            self._null = self.encode([""])
        return {k: v.expand(n, *v.shape[1:]).contiguous().to(device) for k, v in self._null.items()}


def _conditioner_for_model(model: Any, dataset_info: Any = None) -> Conditioner:
    """Registry hook: ``text_encoder="external"`` models read their encoder names from their config."""
    cfg = getattr(model, "config", None)

    def get(key: str, default: Any) -> Any:
        return getattr(cfg, key, default) if cfg is not None else default

    t5 = get("t5_encoder", DEFAULT_T5) or None
    device = next(model.parameters()).device if isinstance(model, nn.Module) else "cpu"
    return FrozenTextConditioner(t5=t5, clip=get("clip_encoder", DEFAULT_CLIP),
                                 t5_max_length=int(get("t5_max_length", 256)), device=device)


register_text_conditioner("external", _conditioner_for_model)
