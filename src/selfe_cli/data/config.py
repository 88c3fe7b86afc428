"""The recipe's ``data:`` section."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from selfe_cli.config import spec
from selfe_cli.data.shapes_spec import DEFAULT_BACKGROUND, MAX_RESOLUTION, MIN_RESOLUTION, TAGS, allowed_tags

DatasetName = Literal["shapes", "cifar10", "image_folder", "latents"]
MAX_IMAGE_SIDE = 16_384  # pixels per side: a larger image does not fit in any accelerator's memory
MAX_SIZE = 10**9  # shapes images
MAX_WORKERS = 1024
Tag = Literal["single_object", "two_object", "counting", "colors", "position", "color_attr"]


@dataclass
class DataConfig:
    name: DatasetName = field(default="shapes", metadata=spec(
        help="dataset: shapes (built-in, rendered), cifar10, image_folder (class subfolders or captions), "
             "latents (shards from `selfe encode-latents`)"))
    root: str | None = field(default=None, metadata=spec(
        help="data folder (cifar10: folder with cifar-10-python.tar.gz or cifar-10-batches-py/; image_folder: "
             "the image folder; latents: the encode-latents output); unused for shapes"))
    resolution: int | None = field(default=None, metadata=spec(
        help="image side in pixels (shapes 16-64, default 32; cifar10 32; image_folder required: resize + "
             "centre crop); latents take theirs from index.json", ge=8, le=MAX_IMAGE_SIDE))
    download: bool = field(default=False, metadata=spec(
        help="cifar10: download the official archive (MD5-checked) into root when it is missing"))
    hflip: bool = field(default=False, metadata=spec(
        help="random horizontal flips (cifar10, image_folder); not allowed for shapes (it would falsify "
             "'left of' captions)"))
    size: int = field(default=100_000, metadata=spec(help="shapes: number of images (length of the dataset)", ge=1,
                                                     le=MAX_SIZE))
    seed: int = field(default=0, metadata=spec(help="shapes: item i is rendered from the seed (seed, i)", ge=0))
    min_objects: int = field(default=1, metadata=spec(help="shapes: fewest objects per image", ge=1, le=4))
    max_objects: int = field(default=4, metadata=spec(help="shapes: most objects per image", ge=1, le=4))
    background: tuple[int, int, int] = field(default=DEFAULT_BACKGROUND, metadata=spec(
        help="shapes: background RGB, 0-255 each (keep it far from the ten object colours)"))
    tags: list[Tag] = field(default_factory=lambda: list(TAGS), metadata=spec(
        help="shapes: caption kinds to draw from (GenEval tags)"))
    color_prob: float = field(default=0.5, metadata=spec(
        help="shapes: chance that a caption whose colours are optional names them", ge=0.0, le=1.0))
    captions: Literal["auto", "metadata", "sidecar", "none"] = field(default="auto", metadata=spec(
        help="image_folder captions: metadata.jsonl/csv (file_name, text), .txt sidecars, none (class "
             "subfolder labels), or auto (metadata, else sidecars, else subfolders)"))
    max_bad_fraction: float = field(default=0.01, metadata=spec(
        help="image_folder: the largest share of images that may be unreadable (skipped, counted and named in "
             "a warning); more stops the run with an error naming them", ge=0.0, le=1.0))
    sample_posterior: bool = field(default=True, metadata=spec(
        help="latents: draw mean + std * eps each time (else the posterior mean)"))
    num_workers: int = field(default=2, metadata=spec(help="DataLoader worker processes", ge=0, le=MAX_WORKERS))

    def __post_init__(self) -> None:
        if self.name != "shapes" and not self.root:
            raise ValueError(f"root is required for name: {self.name} (the folder holding the data)")
        if self.min_objects > self.max_objects:
            raise ValueError(f"min_objects ({self.min_objects}) must be <= max_objects ({self.max_objects})")
        if self.name == "shapes":
            if self.resolution is not None and not MIN_RESOLUTION <= self.resolution <= MAX_RESOLUTION:
                raise ValueError(f"resolution for shapes must be in [{MIN_RESOLUTION}, {MAX_RESOLUTION}], "
                                 f"got {self.resolution}")
            if self.hflip:
                raise ValueError("hflip is not allowed for shapes: flipping would falsify 'left of'/'right of' "
                                 "captions")
            if not self.tags:
                raise ValueError("tags must name at least one caption tag")
            allowed_tags(self.min_objects, self.max_objects, self.tags)
        if self.name == "cifar10" and self.resolution not in (None, 32):
            raise ValueError(f"resolution for cifar10 must be 32 (its native size), got {self.resolution}")
        if self.name == "image_folder" and self.resolution is None:
            raise ValueError("resolution is required for image_folder (images are resized and centre-cropped)")
        if self.name == "latents" and self.hflip:
            raise ValueError("hflip is not supported for latents (flip the images before encoding)")
        if any(not 0 <= c <= 255 for c in self.background):
            raise ValueError(f"background must be three values in 0-255, got {list(self.background)}")
        self.background = tuple(int(c) for c in self.background)  # type: ignore[assignment]

    @property
    def effective_resolution(self) -> int | None:
        """The pixel resolution of the data (None for latents: it is in their index)."""
        if self.resolution is not None:
            return self.resolution
        return {"shapes": 32, "cifar10": 32}.get(self.name)
