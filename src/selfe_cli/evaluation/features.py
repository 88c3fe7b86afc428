"""Feature networks for FID: the Inception-v3 "2015-12-05" pool3 features, pluggable for tests.

The reference network is torch-fidelity's ``FeatureExtractorInceptionV3`` (the TF-Inception port
that torchmetrics wraps, and the network behind published FID numbers). Its own ``forward``
resizes to 299x299 with ``interpolate_bilinear_2d_like_tensorflow1x`` (TF1 bilinear,
``align_corners=False``, no antialiasing), as TF-compatible FID needs (docs/methods.md §6.1); torchmetrics' wrapper
would instead default to ``antialias=True`` in torchmetrics >= 1.8, so we call torch-fidelity
directly and never go through torchmetrics' resize.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, runtime_checkable
from unittest import mock

import torch

from selfe_cli.errors import UserError

# torch-fidelity's converted TF weights; the file name carries the first 8 hex digits of its sha256.
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_HASH_PREFIX = "6726825d"
INCEPTION_DIM = 2048


@runtime_checkable
class FeatureExtractor(Protocol):
    """uint8 RGB images ``(N, H, W, 3)`` -> float features ``(N, D)``."""

    dim: int

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


class InceptionV3Features:
    """Inception-v3 pool3 (2048-d) features of uint8 RGB images, TF1-compatible resize to 299."""

    dim = INCEPTION_DIM

    def __init__(self, network: torch.nn.Module, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.network = network.to(self.device).eval()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 images (N, H, W, 3), got {images.dtype} {tuple(images.shape)}")
        x = images.permute(0, 3, 1, 2).contiguous().to(self.device)  # (N, 3, H, W) uint8
        (feats,) = self.network(x)  # (N, 2048) float32
        return feats.double().cpu()


def _hub_cache_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(INCEPTION_URL)


def inception_weights_path(weights: str | os.PathLike | None) -> Path:
    """A local file with the Inception weights: the given path, the torch hub cache, or a download.

    The download is checked against the sha256 prefix in the file name. Offline without a
    cached copy this raises a one-line UserError naming ``--inception-weights``.
    """
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise UserError(f"--inception-weights {path}: file not found (expected {os.path.basename(INCEPTION_URL)})")
        return path
    cached = _hub_cache_path()
    if cached.is_file():
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(INCEPTION_URL, str(cached), hash_prefix=INCEPTION_HASH_PREFIX, progress=False)
    except Exception as err:  # URLError, timeouts, hash mismatch: all mean "no usable weights"
        raise UserError(
            f"cannot download the Inception-v3 FID weights ({type(err).__name__}: {err}); download "
            f"{INCEPTION_URL} on a machine with internet and pass --inception-weights PATH"
        ) from None
    return cached


class _RandomInitInception:
    """Marker state dict: build the architecture without loading weights (benchmarks, tests)."""


def build_inception(weights: str | os.PathLike | None = None, *, random_init: bool = False) -> torch.nn.Module:
    """torch-fidelity's ``FeatureExtractorInceptionV3`` returning the 2048-d pool3 features.

    ``random_init=True`` keeps the randomly initialised layers (same architecture and cost; for
    throughput benchmarks and tests only: its features mean nothing).
    """
    from torch_fidelity import feature_extractor_inceptionv3 as tfi

    if not random_init:
        path = inception_weights_path(weights)
        try:
            return tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                   feature_extractor_weights_path=str(path))
        except Exception as err:  # noqa: BLE001 - a damaged or foreign file: UnpicklingError, EOFError, KeyError...
            lines = str(err).strip().splitlines()
            detail = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
            raise UserError(f"--inception-weights {path}: not the torch-fidelity Inception-v3 weights "
                            f"{os.path.basename(INCEPTION_URL)} ({detail})") from None

    class _Unloaded(tfi.FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, *args, **kwargs):  # type: ignore[override]
            if isinstance(state_dict, _RandomInitInception):
                return None
            return super().load_state_dict(state_dict, *args, **kwargs)

    with mock.patch.object(tfi, "load_state_dict_from_url", lambda *a, **k: _RandomInitInception()):
        return _Unloaded("inception-v3-compat", ["2048"])


def inception_features(weights: str | os.PathLike | None = None, device: torch.device | str = "cpu",
                       *, random_init: bool = False) -> InceptionV3Features:
    return InceptionV3Features(build_inception(weights, random_init=random_init), device)
