"""Conditions as small pytrees, and the Conditioner objects that build them from data batches.

A condition is batched on dim 0 and is one of:
  - ``None``                     unconditional models;
  - ``LongTensor (N,)``          class labels, the null label is ``num_classes``;
  - ``dict[str, Tensor]``        text: ``{"input_ids": (N, L)}`` for a built-in trainable text encoder,
                                 or ``{"context": (N, L, D), "mask": (N, L), "pooled": (N, P)}``.

Any of them may carry guidance scalars for networks built with ``guidance_embed: true`` (iMF's guidance as a
condition): ``with_guidance(cond, g)`` adds ``g = (N, 3)`` float ``[omega, t_min, t_max]`` under the key
``"guidance"`` (a label tensor becomes ``{"label": labels, "guidance": g}``, ``None`` becomes
``{"guidance": g}``); ``split_guidance`` takes it apart again. The pytree helpers below treat it like any key.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

Cond = None | torch.Tensor | dict[str, torch.Tensor]


GUIDANCE_KEY = "guidance"
LABEL_KEY = "label"


def with_guidance(cond: Cond, guidance: torch.Tensor) -> dict[str, torch.Tensor]:
    """``cond`` plus guidance scalars ``(N, 3)`` = ``[omega, t_min, t_max]`` (see the module docstring)."""
    if guidance.dim() != 2 or guidance.shape[1] != 3:
        raise ValueError(f"guidance must be (N, 3) [omega, t_min, t_max], got {tuple(guidance.shape)}")
    if cond is None:
        return {GUIDANCE_KEY: guidance}
    if isinstance(cond, torch.Tensor):
        return {LABEL_KEY: cond, GUIDANCE_KEY: guidance}
    return {**cond, GUIDANCE_KEY: guidance}


def split_guidance(cond: Cond) -> tuple[Cond, torch.Tensor | None]:
    """``(condition without guidance, guidance (N, 3) or None)``; the inverse of ``with_guidance``."""
    if not isinstance(cond, dict) or GUIDANCE_KEY not in cond:
        return cond, None
    rest = {k: v for k, v in cond.items() if k != GUIDANCE_KEY}
    if not rest:
        return None, cond[GUIDANCE_KEY]
    if set(rest) == {LABEL_KEY}:
        return rest[LABEL_KEY], cond[GUIDANCE_KEY]
    return rest, cond[GUIDANCE_KEY]


def _where(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    m = mask.to(a.device).view(-1, *([1] * (a.dim() - 1)))
    return torch.where(m, a, b)


def cond_where(mask: torch.Tensor, a: Cond, b: Cond) -> Cond:
    """Per sample: ``a[i]`` where ``mask[i]`` else ``b[i]`` (used for condition dropout)."""
    if a is None:
        return None
    if isinstance(a, torch.Tensor):
        return _where(mask, a, b)
    return {k: _where(mask, a[k], b[k]) for k in a}


def cond_cat(a: Cond, b: Cond) -> Cond:
    """Concatenate two conditions along the batch (e.g. conditional and null for CFG)."""
    if a is None:
        return None
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b], dim=0)
    return {k: torch.cat([a[k], b[k]], dim=0) for k in a}


def cond_index(c: Cond, idx: Any) -> Cond:
    """Select samples (an index, slice, or boolean/long index tensor)."""
    if c is None:
        return None
    if isinstance(c, torch.Tensor):
        return c[idx]
    return {k: v[idx] for k, v in c.items()}


def cond_to(c: Cond, device: torch.device | str, float_dtype: torch.dtype | None = None) -> Cond:
    """Move to a device; floating tensors optionally cast to ``float_dtype``."""
    if c is None:
        return None

    def move(t: torch.Tensor) -> torch.Tensor:
        t = t.to(device, non_blocking=True)
        return t.to(float_dtype) if float_dtype is not None and t.is_floating_point() else t

    if isinstance(c, torch.Tensor):
        return move(c)
    return {k: move(v) if k != GUIDANCE_KEY else v.to(device, non_blocking=True) for k, v in c.items()}


def cond_batch_size(c: Cond) -> int | None:
    if c is None:
        return None
    if isinstance(c, torch.Tensor):
        return c.shape[0]
    return next(iter(c.values())).shape[0]


def cond_repeat(c: Cond, n: int) -> Cond:
    """Repeat a batch-1 condition n times."""
    if c is None:
        return None
    if isinstance(c, torch.Tensor):
        return c.expand(n, *c.shape[1:]).contiguous()
    return {k: v.expand(n, *v.shape[1:]).contiguous() for k, v in c.items()}


class Conditioner:
    """Turns data batches or user input into conditions; knows the null condition."""

    kind = "none"

    def from_batch(self, batch: dict[str, Any]) -> Cond:
        return None

    def encode(self, raw: Sequence[Any] | None, n: int | None = None) -> Cond:
        return None

    def null(self, n: int, device: torch.device | str = "cpu") -> Cond:
        return None


class ClassConditioner(Conditioner):
    kind = "class"

    def __init__(self, num_classes: int, class_names: Sequence[str] | None = None):
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names is not None else None

    def from_batch(self, batch: dict[str, Any]) -> Cond:
        return batch["label"].long()

    def encode(self, raw: Sequence[Any] | None, n: int | None = None) -> Cond:
        """Labels from ints or class names (``"cat"``); raises ValueError for unknown names."""
        labels = []
        for item in raw or []:
            if isinstance(item, str) and not item.lstrip("-").isdigit():
                if self.class_names is None or item not in self.class_names:
                    names = ", ".join(self.class_names or [])
                    raise ValueError(f"unknown class {item!r}; expected an index or one of: {names}")
                labels.append(self.class_names.index(item))
            else:
                label = int(item)
                if not 0 <= label < self.num_classes:
                    raise ValueError(f"class index {label} out of range [0, {self.num_classes})")
                labels.append(label)
        return torch.tensor(labels, dtype=torch.long)

    def null(self, n: int, device: torch.device | str = "cpu") -> Cond:
        return torch.full((n,), self.num_classes, dtype=torch.long, device=device)
