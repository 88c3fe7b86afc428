"""A detector for the flat-coloured shapes world (the `--suite shapes` GenEval): CPU, no downloads.

Pipeline per image:
1. colour segmentation: every pixel goes to the nearest of the 10 GenEval palette colours or the
   background (estimated from the image border, where shapes never are), if it lies within
   ``max_color_dist`` of it (RGB Euclidean); farther pixels are left unassigned (noise, blends);
2. connected components (4-connectivity) per palette colour; components smaller than
   ``min_area_frac * H * W`` pixels are dropped (specks of noise);
3. shape class by geometry: the component's mask is compared (IoU) with the ideal square, circle
   and triangle rasterised into the component's own box by the dataset's renderer; the class is
   the best template and the score is that IoU, scaled down for elongated boxes (the world's objects
   all have square boxes: ``min(1, aspect / 0.75)``, so mild distortions cost nothing while a thin
   bar, which fits a "square" template perfectly, is no square). A clean object scores exactly 1.0, so
   GenEval's counting threshold (score > 0.9) works; blurry, broken or odd-shaped blobs score
   lower and drop out at 0.3 / 0.9 like low-confidence Mask2Former detections.
The detection's ``color`` is the segmentation colour (the shapes world needs no CLIP).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import numpy as np
from scipy import ndimage

from selfe_cli.evaluation.geneval import Detection


def _palette() -> dict[str, tuple[int, int, int]]:
    from selfe_cli.data.shapes import COLORS

    return dict(COLORS)


def _shapes() -> tuple[str, ...]:
    from selfe_cli.data.shapes import SHAPES

    return tuple(SHAPES)


@lru_cache(maxsize=4096)
def shape_template(shape: str, width: int, height: int) -> np.ndarray:
    """The renderer's mask of ``shape`` filling a ``width x height`` box: bool (height, width)."""
    from selfe_cli.data.shapes import Scene, ShapeObject, render

    side = max(width, height)
    img = render(Scene([ShapeObject(shape, "white", (0, 0, width, height))], side, (0, 0, 0)))
    return np.asarray(img)[:height, :width, 0] > 127


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


class ShapesDetector:
    """``detector(image, metadata) -> {shape: [{"box", "score", "color"}]}`` for shapes images."""

    def __init__(self, max_color_dist: float = 64.0, min_area_frac: float = 0.015, min_area: int = 4,
                 min_free_aspect: float = 0.75):
        self.max_color_dist = max_color_dist
        self.min_free_aspect = min_free_aspect
        self.min_area_frac = min_area_frac
        self.min_area = min_area
        palette = _palette()
        self.color_names = list(palette)
        self.palette = np.array([palette[c] for c in self.color_names], dtype=np.float32)  # (10, 3)

    @staticmethod
    def background(rgb: np.ndarray) -> np.ndarray:
        """Median colour of the 1-pixel border (the dataset keeps a gap between shapes and border)."""
        border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]]).astype(np.float32)  # (B, 3)
        return np.median(border, axis=0)

    def segment(self, rgb: np.ndarray) -> np.ndarray:
        """Label map (H, W): palette index 0..9, 10 = background, -1 = unassigned."""
        colours = np.concatenate([self.palette, self.background(rgb)[None]], axis=0)  # (11, 3)
        px = rgb.astype(np.float32)  # (H, W, 3)
        dist = np.linalg.norm(px[:, :, None, :] - colours[None, None], axis=-1)  # (H, W, 11)
        labels = dist.argmin(-1)
        labels[dist.min(-1) > self.max_color_dist] = -1
        return labels

    def detect(self, image: Any) -> dict[str, list[Detection]]:
        rgb = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.uint8)
        h, w = rgb.shape[:2]
        labels = self.segment(rgb)
        min_area = max(self.min_area, int(round(self.min_area_frac * h * w)))
        found: dict[str, list[Detection]] = {}
        for ci, colour in enumerate(self.color_names):
            comps, n = ndimage.label(labels == ci)  # 4-connectivity
            if n == 0:
                continue
            for k, sl in enumerate(ndimage.find_objects(comps), start=1):
                mask = comps[sl] == k  # (bh, bw) inside the component's box
                if mask.sum() < min_area:
                    continue
                ys, xs = sl
                bw, bh = xs.stop - xs.start, ys.stop - ys.start
                ious = {s: mask_iou(mask, shape_template(s, bw, bh)) for s in _shapes()}
                shape = max(ious, key=ious.__getitem__)
                aspect = min(bw, bh) / max(bw, bh)
                found.setdefault(shape, []).append({
                    "box": [float(xs.start), float(ys.start), float(xs.stop), float(ys.stop)],
                    "score": ious[shape] * min(1.0, aspect / self.min_free_aspect),
                    "color": colour,
                })
        return found

    def __call__(self, image: Any, metadata: Mapping[str, Any] | None = None) -> dict[str, list[Detection]]:
        return self.detect(image)
