from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn


def randomize_(model: nn.Module, std: float = 0.05, seed: int = 0) -> nn.Module:
    """Add noise to every parameter: zero-initialised layers (adaLN-Zero, output convs) become active, so
    tests see a generic function of all inputs instead of the zero map."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * std)
    return model


@pytest.fixture
def small_nets() -> Iterator[None]:
    """Seeded, single-threaded: the nets in these tests are tiny, and on a busy 2-core machine intra-op
    threads only fight each other (10x slower forwards measured). Restores the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
