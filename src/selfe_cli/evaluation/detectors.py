"""GenEval's detector and colour classifier: Mask2Former Swin-S (COCO instances) + CLIP ViT-L/14.

Official GenEval runs the mmdet 2.x checkpoint ``mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco``;
the closest checkpoint in transformers is ``facebook/mask2former-swin-small-coco-instance``. We
rebuild mmdet's test path around it (docs/methods.md §6.3): the config's test pipeline (resize keeping
the aspect ratio to the largest scale fitting 1333 x 800, with cv2's uint8 bilinear, no antialiasing;
pad bottom/right with 128 to a multiple of 32; normalise), top-100 (query, class) pairs, binary mask =
mask logit > 0 at the original resolution, score = class probability x mean mask probability inside
the binary mask, box = the binary mask's extent (x1, y1 exclusive). Colour: open_clip ViT-L-14
("openai") zero-shot among GenEval's 10 colours, on the object pasted onto grey #999 and cropped to its box.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from selfe_cli.errors import UserError
from selfe_cli.evaluation.geneval import COLORS, Detection, colour_requests, select_detections

DETECTOR_HUB_ID = "facebook/mask2former-swin-small-coco-instance"
CLIP_ARCH = "ViT-L-14"
CLIP_PRETRAINED = "openai"
COLOR_TEMPLATES = ("a photo of a {c} {obj}", "a photo of a {c}-colored {obj}", "a photo of a {c} object")
# GenEval's names for three COCO classes (its object_names.txt); every other COCO name is unchanged.
COCO_TO_GENEVAL = {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard"}
# The 80 COCO thing classes in the contiguous order of mmdet / detectron2 / the transformers checkpoint.
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)
# GenEval's 80 class names (its evaluation/object_names.txt), in the detector's label order.
GENEVAL_CLASSES = tuple(COCO_TO_GENEVAL.get(c, c) for c in COCO_CLASSES)
# mmdet 2.x test pipeline of the official config (mask2former_r50_lsj_8x2_50e_coco.py, inherited by the Swin-S
# config): Resize(img_scale=(1333, 800), keep_ratio=True) -> Pad(size_divisor=32, pad_val 128) ->
# Normalize(mean, std, to_rgb=True); mean and std are per RGB channel.
SHORT_SIDE, LONG_SIDE, SIZE_DIVISOR, TOPK = 800, 1333, 32, 100
PAD_VALUE = 128
PIXEL_MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
PIXEL_STD_INV = (1.0 / np.array([58.395, 57.12, 57.375], dtype=np.float64)).astype(np.float32)  # mmcv: 1 / std
RESIZE_COEF_BITS = 11  # OpenCV's INTER_RESIZE_COEF_BITS: bilinear weights in units of 1/2048
GREY = "#999999"

OFFLINE_HINT = "pass local copies with --detector-path / --clip-path, or use --suite shapes"


def mmdet_rescale_size(width: int, height: int, short: int = SHORT_SIDE, long: int = LONG_SIDE) -> tuple[int, int]:
    """mmcv ``rescale_size`` with keep_ratio: the largest scale fitting (long, short); -> (w, h)."""
    scale = min(long / max(width, height), short / min(width, height))
    return int(width * scale + 0.5), int(height * scale + 0.5)


def _cv2_linear_taps(n_in: int, n_out: int, clamp_weights: bool):
    """OpenCV INTER_LINEAR along one axis: source indices ``(i0, i1)`` and integer weights ``(w0, w1)``.

    Half-pixel centres: ``x = (d + 0.5) * (n_in / n_out) - 0.5`` in float32, weights ``round(2048 (1 - f))``
    and ``round(2048 f)``. Columns left of the first or right of the last source pixel copy that pixel
    (weight 2048, as OpenCV sets ``fx = 0`` there); rows only clamp their indices, as OpenCV does.
    """
    scale = 1.0 / (n_out / n_in)  # OpenCV: scale = 1 / inv_scale with inv_scale = dst / src, in double
    pos = ((np.arange(n_out) + 0.5) * scale - 0.5).astype(np.float32)
    i0 = np.floor(pos).astype(np.int64)
    frac = pos - i0.astype(np.float32)
    if clamp_weights:
        low, high = i0 < 0, i0 >= n_in - 1
        frac[low | high] = 0.0
        i0[low], i0[high] = 0, n_in - 1
    one = np.float32(1 << RESIZE_COEF_BITS)
    w0 = np.rint((np.float32(1.0) - frac) * one).astype(np.int32)
    w1 = np.rint(frac * one).astype(np.int32)
    i1 = np.clip(i0 + 1, 0, n_in - 1)
    return (torch.from_numpy(np.clip(i0, 0, n_in - 1)), torch.from_numpy(i1),
            torch.from_numpy(w0), torch.from_numpy(w1))


def cv2_resize_linear(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """``cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)`` for uint8 images, bit-exact.

    What mmcv's ``imrescale`` (mmdet's Resize) runs on the official detector input: bilinear with
    half-pixel centres and no antialiasing, in OpenCV's fixed-point arithmetic (11-bit weights, a
    horizontal pass to 19-bit integers, then the vertical pass of its SIMD kernel:
    ``((w0 (r0 >> 4)) >> 16) + ((w1 (r1 >> 4)) >> 16) + 2 >> 2``). Exact float bilinear with rounding
    (``F.interpolate(mode="bilinear", align_corners=False, antialias=False)``) lands one level off on
    about 1 pixel in 8; this matches OpenCV 4.7 (the official environment), 4.14 and 5.0 exactly.
    ``image``: uint8 ``(H, W)`` or ``(H, W, C)``.
    """
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise TypeError(f"cv2_resize_linear takes uint8 images, got {arr.dtype}")
    src = torch.from_numpy(arr.astype(np.int32))
    flat = src.ndim == 2
    if flat:
        src = src[:, :, None]
    x0, x1, wx0, wx1 = _cv2_linear_taps(src.shape[1], width, clamp_weights=True)
    y0, y1, wy0, wy1 = _cv2_linear_taps(src.shape[0], height, clamp_weights=False)
    rows = src[:, x0] * wx0[None, :, None] + src[:, x1] * wx1[None, :, None]  # (H, width, C), 19 bits
    top = ((rows[y0] >> 4) * wy0[:, None, None]) >> 16
    bottom = ((rows[y1] >> 4) * wy1[:, None, None]) >> 16
    out = ((top + bottom + 2) >> 2).clamp(0, 255).to(torch.uint8).numpy()
    return out[:, :, 0] if flat else out


def mmdet_preprocess(image: Any, short: int = SHORT_SIDE, long: int = LONG_SIDE) -> tuple[torch.Tensor, tuple[int, int]]:
    """The official test pipeline on a PIL image: ``(pixel_values (1, 3, Hp, Wp) float32, (new_h, new_w))``.

    uint8 RGB -> cv2 bilinear resize to ``mmdet_rescale_size`` -> pad bottom/right with 128 to a multiple
    of 32 -> ``(x - mean) * (1 / std)`` in float32 (mmcv's ``imnormalize``). The padding is grey before
    normalisation, as the config's Pad precedes its Normalize.
    """
    rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    height, width = rgb.shape[:2]
    new_w, new_h = mmdet_rescale_size(width, height, short, long)
    pad_h, pad_w = math.ceil(new_h / SIZE_DIVISOR) * SIZE_DIVISOR, math.ceil(new_w / SIZE_DIVISOR) * SIZE_DIVISOR
    padded = np.full((pad_h, pad_w, 3), PAD_VALUE, dtype=np.uint8)
    padded[:new_h, :new_w] = cv2_resize_linear(rgb, new_w, new_h)
    pixels = (padded.astype(np.float32) - PIXEL_MEAN) * PIXEL_STD_INV
    return torch.from_numpy(pixels).permute(2, 0, 1)[None].contiguous(), (new_h, new_w)


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Binary masks (K, H, W) -> boxes (K, 4) [x0, y0, x1, y1], x1/y1 exclusive; empty -> zeros."""
    k = masks.shape[0]
    boxes = torch.zeros(k, 4, dtype=torch.float32)
    xs, ys = masks.any(1), masks.any(2)  # (K, W), (K, H)
    for i in range(k):
        x, y = torch.nonzero(xs[i]).flatten(), torch.nonzero(ys[i]).flatten()
        if len(x) and len(y):
            boxes[i] = torch.tensor([x[0], y[0], x[-1] + 1, y[-1] + 1], dtype=torch.float32)
    return boxes


def instance_postprocess(class_logits: torch.Tensor, mask_logits: torch.Tensor, topk: int = TOPK):
    """Mask2Former instance results for one image, mmdet's rule, overlaps kept.

    class_logits (Q, C+1) with the last column "no object"; mask_logits (Q, H, W) at the original
    image size. Returns labels (K,), scores (K,), binary masks (K, H, W) bool, boxes (K, 4).
    We do not use ``post_process_instance_segmentation``: it paints instances into one map
    (overlapping instances are lost, GenEval keeps them and counts them), thresholds scores, and
    resizes masks through a fixed 384x384 grid.
    """
    num_classes = class_logits.shape[-1] - 1
    probs = class_logits.softmax(-1)[:, :-1]  # (Q, C)
    scores, idx = probs.flatten().topk(min(topk, probs.numel()), sorted=True)  # per (query, class)
    labels = idx % num_classes
    queries = torch.div(idx, num_classes, rounding_mode="floor")
    masks = mask_logits[queries]  # (K, H, W) logits
    binary = masks > 0
    mask_scores = (masks.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    return labels, scores * mask_scores, binary, masks_to_boxes(binary)


class Mask2FormerDetector:
    """COCO instance detector; ``detect(image)`` -> ``{geneval class: [{"box", "score", "mask"}]}``."""

    def __init__(self, model: torch.nn.Module, device: torch.device | str = "cpu", *,
                 short_side: int = SHORT_SIDE, long_side: int = LONG_SIDE):
        id2label = {int(k): v for k, v in model.config.id2label.items()}
        self.class_names = [COCO_TO_GENEVAL.get(id2label[i], id2label[i]) for i in range(len(id2label))]
        missing = [c for c in GENEVAL_CLASSES if c not in set(self.class_names)]
        if missing:
            raise UserError(f"the GenEval detector's labels (config.id2label) lack {len(missing)} of the 80 GenEval "
                            f"classes: {', '.join(missing)} (expected the COCO labels of {DETECTOR_HUB_ID})")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.short_side, self.long_side = short_side, long_side  # the official test scale; smaller only in tests

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, device: torch.device | str = "cpu") -> Mask2FormerDetector:
        from transformers import Mask2FormerForUniversalSegmentation

        source = str(path) if path else DETECTOR_HUB_ID
        if path and not os.path.exists(source):
            raise UserError(f"--detector-path {source}: not found (expected a save_pretrained copy of {DETECTOR_HUB_ID})")
        try:
            try:  # the local cache first: no network round trips when the weights are already here
                model = Mask2FormerForUniversalSegmentation.from_pretrained(source, local_files_only=True)
            except OSError:
                if path:
                    raise
                model = Mask2FormerForUniversalSegmentation.from_pretrained(source)
        except OSError as err:
            raise UserError(f"cannot load the GenEval detector {source} ({str(err).splitlines()[0]}); {OFFLINE_HINT}") from None
        return cls(model, device)  # the input pipeline is mmdet's (mmdet_preprocess), not the image processor's

    @torch.no_grad()
    def detect(self, image: Any) -> dict[str, list[dict[str, Any]]]:
        width, height = image.size
        pixel_values, (new_h, new_w) = mmdet_preprocess(image, self.short_side, self.long_side)
        out = self.model(pixel_values=pixel_values.to(self.device))
        class_logits = out.class_queries_logits[0].float()  # (Q, C+1)
        masks = out.masks_queries_logits[0].float()  # (Q, h/4, w/4)
        # mmdet: upsample to the padded input, crop the valid region, upsample to the original size
        masks = F.interpolate(masks[None], size=tuple(pixel_values.shape[-2:]), mode="bilinear", align_corners=False)
        masks = masks[:, :, :new_h, :new_w]
        masks = F.interpolate(masks, size=(height, width), mode="bilinear", align_corners=False)[0]  # (Q, H, W)
        labels, scores, binary, boxes = instance_postprocess(class_logits, masks)
        found: dict[str, list[dict[str, Any]]] = {}
        for lab, score, mask, box in zip(labels.tolist(), scores.tolist(), binary.cpu(), boxes.tolist(), strict=True):
            found.setdefault(self.class_names[lab], []).append({"box": box, "score": score, "mask": mask.numpy()})
        return found


class ClipColorClassifier:
    """Zero-shot colour of object crops with CLIP, GenEval's templates averaged per colour."""

    def __init__(self, model: torch.nn.Module, preprocess: Any, tokenizer: Any, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.preprocess, self.tokenizer = preprocess, tokenizer
        self._weights: dict[str, torch.Tensor] = {}

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, device: torch.device | str = "cpu") -> ClipColorClassifier:
        import open_clip

        if path and not os.path.isfile(path):
            raise UserError(f"--clip-path {path}: file not found (expected the OpenAI {CLIP_ARCH} CLIP weights)")
        try:
            # OpenAI's CLIP uses QuickGELU; the "openai" tag sets it, a local file needs it forced.
            model, _, preprocess = open_clip.create_model_and_transforms(
                CLIP_ARCH, pretrained=str(path) if path else CLIP_PRETRAINED, force_quick_gelu=True, device=device)
        except Exception as err:  # hub/network errors come in many types
            raise UserError(f"cannot load CLIP {CLIP_ARCH} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                            f"{OFFLINE_HINT}") from None
        return cls(model, preprocess, open_clip.get_tokenizer(CLIP_ARCH), device)

    @torch.no_grad()
    def text_weights(self, object_name: str) -> torch.Tensor:
        """(D, 10): per colour, the normalised mean of the normalised template embeddings."""
        if object_name not in self._weights:
            cols = []
            for c in COLORS:
                tokens = self.tokenizer([t.format(c=c, obj=object_name) for t in COLOR_TEMPLATES]).to(self.device)
                emb = F.normalize(self.model.encode_text(tokens).float(), dim=-1).mean(0)
                cols.append(emb / emb.norm())
            self._weights[object_name] = torch.stack(cols, dim=1)
        return self._weights[object_name]

    def crop(self, image: Any, box: Sequence[float], mask: np.ndarray | None) -> Any:
        """The object on grey #999 (its mask composited), cropped to its box."""
        from PIL import Image

        image = image.convert("RGB")
        if mask is not None:
            blank = Image.new("RGB", image.size, color=GREY)
            image = Image.composite(image, blank, Image.fromarray(np.asarray(mask, dtype=bool)))
        return image.crop(tuple(float(v) for v in box[:4]))

    @torch.no_grad()
    def classify(self, image: Any, objects: Sequence[tuple[Sequence[float], np.ndarray | None]],
                 object_name: str) -> list[str]:
        if not objects:
            return []
        batch = torch.stack([self.preprocess(self.crop(image, box, mask)) for box, mask in objects]).to(self.device)
        feats = F.normalize(self.model.encode_image(batch).float(), dim=-1)  # (K, D)
        logits = 100.0 * feats @ self.text_weights(object_name)  # (K, 10)
        return [COLORS[i] for i in logits.argmax(1).tolist()]


class GenEvalDetector:
    """Mask2Former detections, colour-classified for the classes (top ``count``) the prompt asks about."""

    def __init__(self, detector: Mask2FormerDetector, colors: ClipColorClassifier):
        self.detector, self.colors = detector, colors

    def __call__(self, image: Any, metadata: Mapping[str, Any]) -> dict[str, list[Detection]]:
        raw = self.detector.detect(image)
        detections: dict[str, list[Detection]] = {
            name: [{"box": d["box"], "score": d["score"], "color": None, "mask": d["mask"]} for d in dets]  # type: ignore[typeddict-unknown-key]
            for name, dets in raw.items()
        }
        kept = select_detections(metadata, detections)  # same dict objects, filtered and sorted
        for name, count in colour_requests(metadata).items():
            top = kept.get(name, [])[:count]
            answers = self.colors.classify(image, [(d["box"], d["mask"]) for d in top], name)  # type: ignore[typeddict-item]
            for det, colour in zip(top, answers, strict=True):
                det["color"] = colour
        for dets in detections.values():
            for d in dets:
                d.pop("mask", None)  # type: ignore[misc]
        return detections
