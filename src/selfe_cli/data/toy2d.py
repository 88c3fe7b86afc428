"""Class-conditional 2-D distributions with exact samplers (for benchmarks against the true distribution).

Points are returned as ``(N, 2)`` float tensors with ``(N,)`` long labels; ``Toy2DDataset`` wraps a fixed draw
as dataset items ``{"image": (2, 1, 1), "label": int}`` so the training loop and the methods see 1x1
two-channel "images" (the (N, C, H, W) layout of docs/methods.md §1).

Distributions (both with 2 classes, each class multi-modal, so a one-step regression to the conditional
mean is visibly wrong):

* ``checkerboard``: the 4x4 board on [-2, 2]^2; the label is the cell colour ((row + column) mod 2) and a
  point is uniform on the 8 cells of its colour.
* ``gmm``: 8 isotropic Gaussians (std 0.2) centred on the circle of radius 2, angles k * 45 degrees; the label
  is k mod 2 (alternate components), so each class is a 4-mode mixture.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset

from selfe_cli.data.info import DatasetInfo

TOY2D = ("checkerboard", "gmm")
NUM_CLASSES = 2
BOARD = 4          # cells per side of the checkerboard
BOARD_HALF = 2.0   # the board covers [-BOARD_HALF, BOARD_HALF]^2
GMM_MODES = 8
GMM_RADIUS = 2.0
GMM_STD = 0.2


def checkerboard_cells(colour: int) -> torch.Tensor:
    """(8, 2) integer (column, row) indices of the cells of ``colour`` ((row + column) mod 2)."""
    idx = torch.arange(BOARD)
    col, row = torch.meshgrid(idx, idx, indexing="xy")
    keep = (row + col) % 2 == colour
    return torch.stack([col[keep], row[keep]], dim=1)


def gmm_means() -> torch.Tensor:
    """(8, 2) component means on the circle of radius ``GMM_RADIUS``."""
    angles = torch.arange(GMM_MODES, dtype=torch.float64) * (2 * math.pi / GMM_MODES)
    return (GMM_RADIUS * torch.stack([angles.cos(), angles.sin()], dim=1)).float()


def sample_toy2d(kind: str, n: int, generator: torch.Generator,
                 labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact samples ``(x (N, 2), labels (N,))``; labels uniform over the 2 classes unless given."""
    if kind not in TOY2D:
        raise ValueError(f"unknown 2-D distribution {kind!r}; expected one of {', '.join(TOY2D)}")
    if labels is None:
        labels = torch.randint(0, NUM_CLASSES, (n,), generator=generator)
    labels = labels.long()
    n = labels.shape[0]
    if kind == "checkerboard":
        cell = torch.randint(0, BOARD * BOARD // 2, (n,), generator=generator)
        cells = torch.stack([checkerboard_cells(0), checkerboard_cells(1)])  # (2, 8, 2)
        corner = cells[labels, cell].float()  # (N, 2) cell indices
        size = 2 * BOARD_HALF / BOARD
        x = -BOARD_HALF + size * (corner + torch.rand(n, 2, generator=generator))
    else:
        k = 2 * torch.randint(0, GMM_MODES // 2, (n,), generator=generator) + labels  # component with k % 2 = label
        x = gmm_means()[k] + GMM_STD * torch.randn(n, 2, generator=generator)
    return x, labels


def checkerboard_density_support(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """True where ``x`` (N, 2) lies on a cell of its label's colour (for tests and diagnostics)."""
    size = 2 * BOARD_HALF / BOARD
    cell = torch.floor((x + BOARD_HALF) / size).long()
    inside = ((cell >= 0) & (cell < BOARD)).all(dim=1)
    return inside & ((cell.sum(dim=1) % 2) == labels)


class Toy2DDataset(Dataset):
    """A fixed draw of ``size`` points; item ``i``: ``{"image": (2, 1, 1), "label": int}``."""

    def __init__(self, kind: str, size: int = 100_000, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.kind = kind
        self.points, self.labels = sample_toy2d(kind, size, g)
        self.info = DatasetInfo(channels=2, resolution=1, num_classes=NUM_CLASSES,
                                class_names=("colour-0", "colour-1") if kind == "checkerboard" else ("even", "odd"))

    def __len__(self) -> int:
        return self.points.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"image": self.points[i].view(2, 1, 1), "label": int(self.labels[i])}


__all__ = ["TOY2D", "Toy2DDataset", "checkerboard_cells", "checkerboard_density_support", "gmm_means",
           "sample_toy2d"]
