"""Deterministic, resumable data order that does not depend on how the batch is split.

The global stream of sample indices is the concatenation of per-epoch permutations seeded by
(seed, epoch). Step ``s`` consumes ``batch_size`` consecutive indices, cut into ``world * rounds``
micro-batches; micro-batch ``j = round * world + rank`` goes to ``rank`` in accumulation ``round``.
So one process with 2 accumulation rounds sees exactly the samples (and, with ``micro_seed``, the
noise) that 2 processes see with 1 round: runs with the same global batch give the same result.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def micro_seed(seed: int, step: int, micro: int) -> int:
    """Seed of torch's RNG for one micro-batch of one step (SplitMix-style mixing, 63 bits)."""
    z = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + micro * 0x94D049BB133111EB + 1) & (2**64 - 1)
    z ^= z >> 31
    z = (z * 0xD6E8FEB86659FD93) & (2**64 - 1)
    z ^= z >> 32
    return z & (2**63 - 1)


class GlobalOrder:
    def __init__(self, dataset_len: int, seed: int):
        if dataset_len <= 0:
            raise ValueError("the dataset is empty")
        self.n = dataset_len
        self.seed = seed
        self._epoch = -1
        self._perm: torch.Tensor | None = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.n, generator=g)
            self._epoch = epoch
        return self._perm

    def indices(self, start: int, count: int) -> list[int]:
        """Global indices ``start .. start + count - 1`` of the stream."""
        out: list[int] = []
        pos = start
        while len(out) < count:
            epoch, offset = divmod(pos, self.n)
            take = min(count - len(out), self.n - offset)
            out.extend(self._permutation(epoch)[offset:offset + take].tolist())
            pos += take
        return out


class MicroBatchSampler:
    """Batch sampler for a DataLoader: this rank's micro-batches for steps ``start_step..total_steps-1``."""

    def __init__(self, dataset_len: int, *, seed: int, batch_size: int, rounds: int, rank: int, world: int,
                 start_step: int, total_steps: int):
        self.order = GlobalOrder(dataset_len, seed)
        self.batch_size, self.rounds, self.rank, self.world = batch_size, rounds, rank, world
        self.micro = batch_size // (rounds * world)
        self.start_step, self.total_steps = start_step, total_steps

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.total_steps):
            for rnd in range(self.rounds):
                j = rnd * self.world + self.rank
                yield self.order.indices(step * self.batch_size + j * self.micro, self.micro)

    def __len__(self) -> int:
        return (self.total_steps - self.start_step) * self.rounds
