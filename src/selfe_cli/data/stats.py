"""Statistics of a dataset measured once, before training: the standard deviation of what the network sees."""

from __future__ import annotations

import math
from typing import Any

from selfe_cli.errors import UserError

# model.skip_sigma_data: data reads this many items (all of them if the dataset is smaller), chosen by this seed.
STD_SAMPLE_SIZE = 1024
STD_SAMPLE_SEED = 0


def sample_indices(n: int, max_items: int = STD_SAMPLE_SIZE, seed: int = STD_SAMPLE_SEED) -> list[int]:
    """The fixed, seeded sample of a dataset of ``n`` items: all of them if ``n <= max_items``, else
    ``max_items`` distinct indices (a seeded permutation's first ``max_items``), in increasing order."""
    import torch

    if n <= max_items:
        return list(range(n))
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=generator)[:max_items].tolist())


def data_std(dataset: Any, max_items: int = STD_SAMPLE_SIZE, seed: int = STD_SAMPLE_SEED) -> tuple[float, int]:
    """``(std, items read)``: the standard deviation over all elements of the items' ``"image"`` tensors (pixels
    in [-1, 1], or scaled latents: the network's input space) of the fixed sample ``sample_indices``.

    Equal to ``torch.stack(images).double().std()`` (Bessel-corrected), accumulated item by item in float64
    (Chan's parallel update), so memory stays one item. Deterministic: the same items every time, and torch's
    global random state (random flips, posterior samples of latents) is seeded inside and restored after, so
    training's randomness is untouched. Cost: reading ``max_items`` items once, as the data loader would.
    """
    import torch

    n = len(dataset)
    if n == 0:
        raise UserError("data: the dataset is empty; nothing to measure model.skip_sigma_data from")
    indices = sample_indices(n, max_items, seed)
    count, mean, m2 = 0, 0.0, 0.0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for index in indices:
            x = dataset[index]["image"].detach().to(torch.float64).flatten()
            k = x.numel()
            mu = float(x.mean())
            sq = float(((x - mu) ** 2).sum())
            total = count + k
            delta = mu - mean
            mean += delta * k / total
            m2 += sq + delta * delta * count * k / total
            count = total
    if count < 2:
        raise UserError("data: too few values to measure model.skip_sigma_data from")
    return math.sqrt(m2 / (count - 1)), len(indices)
