"""What a dataset provides, known without iterating it: ``DatasetInfo``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetInfo:
    """Shape and conditioning facts of a dataset (every dataset has one as ``.info``).

    ``resolution`` and ``channels`` describe what the network sees: pixels, or latents for latent shards
    (then ``image_resolution`` is the pixel resolution the latents decode to).
    """

    channels: int
    resolution: int
    num_classes: int | None = None
    class_names: tuple[str, ...] | None = None
    has_captions: bool = False
    is_latent: bool = False
    vae: str | None = None
    image_resolution: int | None = None

    @property
    def cond_kind(self) -> str:
        """The model condition this data supports best: "text", "class" or "none"."""
        if self.has_captions:
            return "text"
        return "class" if self.num_classes else "none"
