"""The built-in trainable text encoder and its Conditioner.

``TinyTextEncoder`` is a small CLIP-style transformer trained jointly with the image network, on the
real CLIP BPE vocabulary that open_clip ships (works offline: vocab 49408, context 77, start-of-text
49406, end-of-text 49407, padding 0). Attention is causal, as in CLIP: a token sees only what precedes
it, so the end-of-text token summarises the prompt (it is the pooled vector) and the padding after it
never influences valid tokens. The key mask marks the tokens up to and including end-of-text.

The null condition is the empty prompt ``""`` -> ``[SOT, EOT, 0, ...]``: a well-defined input, so CFG and
Self-E's unconditional branches work without a special case.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from selfe_cli.models.conditioning import Cond, Conditioner
from selfe_cli.models.embeddings import Attention, Mlp

VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77
SOT_TOKEN = 49406
EOT_TOKEN = 49407


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> Any:
    """open_clip's CLIP BPE tokenizer (bundled vocabulary, no download); built once per process."""
    import open_clip

    tok = open_clip.get_tokenizer("ViT-B-32")
    if getattr(tok, "vocab_size", VOCAB_SIZE) != VOCAB_SIZE:  # guard against a broken/partial vocab
        raise RuntimeError(f"open_clip tokenizer has vocab size {tok.vocab_size}, expected {VOCAB_SIZE}")
    return tok


def tokenize(texts: Sequence[str], context_length: int = CONTEXT_LENGTH) -> torch.Tensor:
    """Prompts -> token ids (N, context_length) int64; long prompts are cut and end with EOT."""
    if isinstance(texts, str):
        texts = [texts]
    tok = get_tokenizer()
    return tok(list(texts), context_length=context_length)


def null_input_ids(n: int, context_length: int = CONTEXT_LENGTH,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Token ids of the empty prompt, (n, context_length): ``[SOT, EOT, 0, ...]`` (no tokenizer needed)."""
    ids = torch.zeros(n, context_length, dtype=torch.long, device=device)
    ids[:, 0] = SOT_TOKEN
    ids[:, 1] = EOT_TOKEN
    return ids


def eot_positions(input_ids: torch.Tensor) -> torch.Tensor:
    """Index of the first end-of-text token per row (N,); the last position when a row has none."""
    is_eot = input_ids == EOT_TOKEN
    last = torch.full_like(input_ids[:, 0], input_ids.shape[1] - 1)
    first = is_eot.int().argmax(dim=1)
    return torch.where(is_eot.any(dim=1), first, last)


class TextBlock(nn.Module):
    """Pre-LN transformer layer: x + attn(LN(x)); x + mlp(LN(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = Mlp(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), is_causal=True)
        return x + self.mlp(self.norm2(x))


class TinyTextEncoder(nn.Module):
    """Token + position embedding, ``layers`` causal pre-LN blocks, final LN.

    ``forward(input_ids (N, L)) -> (context (N, L', W), mask (N, L') bool, pooled (N, W))``; pooled is the
    final hidden state at the end-of-text token; ``L' <= L`` is the length of the batch's longest prompt.
    """

    def __init__(self, width: int = 256, layers: int = 4, heads: int = 4, *,
                 vocab_size: int = VOCAB_SIZE, context_length: int = CONTEXT_LENGTH, mlp_ratio: float = 4.0):
        super().__init__()
        self.width, self.context_length = width, context_length
        self.trim = True  # drop the padding after the batch's longest prompt (exact; see forward)
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Parameter(torch.empty(context_length, width))
        self.blocks = nn.ModuleList([TextBlock(width, heads, mlp_ratio) for _ in range(layers)])
        self.final_norm = nn.LayerNorm(width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.01)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, length = input_ids.shape
        if length > self.context_length:
            raise ValueError(f"input_ids have length {length}, the text encoder's context is {self.context_length}")
        eot = eot_positions(input_ids)  # (N,)
        if self.trim:
            # Exact: attention is causal, so the tokens past the batch's last end-of-text never influence the
            # valid ones, and every consumer masks them anyway. Short prompts (shapes: <= 12 of 77 tokens)
            # then cost what they are, not the full context.
            length = int(eot.max()) + 1
            input_ids = input_ids[:, :length]
        x = self.token_embedding(input_ids) + self.position_embedding[:length]  # (N, L, W)
        for block in self.blocks:
            x = block(x)
        x = self.final_norm(x)  # (N, L, W)
        mask = torch.arange(length, device=input_ids.device)[None] <= eot[:, None]  # (N, L)
        pooled = x[torch.arange(n, device=x.device), eot]  # (N, W)
        return x, mask, pooled


class TextConditioner(Conditioner):
    """Captions -> ``{"input_ids": (N, L)}`` for models with the built-in ``TinyTextEncoder``."""

    kind = "text"

    def __init__(self, context_length: int = CONTEXT_LENGTH):
        self.context_length = context_length

    def from_batch(self, batch: dict[str, Any]) -> Cond:
        if "caption" not in batch:
            raise KeyError("a text-conditional model needs a dataset with captions (batch has no 'caption')")
        return {"input_ids": tokenize(batch["caption"], self.context_length)}

    def encode(self, raw: Sequence[Any] | None, n: int | None = None) -> Cond:
        """Prompt strings -> condition; ``raw=None`` gives ``n`` empty (null) prompts."""
        if raw is None:
            return self.null(n or 0)
        return {"input_ids": tokenize([str(p) for p in raw], self.context_length)}

    def null(self, n: int, device: torch.device | str = "cpu") -> Cond:
        return {"input_ids": null_input_ids(n, self.context_length, device)}
