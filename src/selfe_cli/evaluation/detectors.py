"""GenEval's detector and colour classifier: Mask2Former Swin-S (COCO instances) + CLIP ViT-L/14.

Official GenEval runs the mmdet 2.x checkpoint ``mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco``;
the closest checkpoint in transformers is ``facebook/mask2former-swin-small-coco-instance``. We
reproduce mmdet's test path around it: resize keeping the aspect ratio to shortest side 800 /
longest 1333, pad to a multiple of 32, top-100 (query, class) pairs, binary mask = mask logit > 0
at the original resolution, score = class probability x mean mask probability inside the binary
mask, box = the binary mask's extent (x1, y1 exclusive). Colour: open_clip ViT-L-14 ("openai")
zero-shot among GenEval's 10 colours, on the object pasted onto grey #999 and cropped to its box.
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
SHORT_SIDE, LONG_SIDE, SIZE_DIVISOR, TOPK = 800, 1333, 32, 100
GREY = "#999999"

OFFLINE_HINT = "pass local copies with --detector-path / --clip-path, or use --suite shapes"


def mmdet_rescale_size(width: int, height: int, short: int = SHORT_SIDE, long: int = LONG_SIDE) -> tuple[int, int]:
    """mmcv ``rescale_size`` with keep_ratio: the largest scale fitting (long, short); -> (w, h)."""
    scale = min(long / max(width, height), short / min(width, height))
    return int(width * scale + 0.5), int(height * scale + 0.5)


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

    def __init__(self, model: torch.nn.Module, processor: Any, device: torch.device | str = "cpu", *,
                 short_side: int = SHORT_SIDE, long_side: int = LONG_SIDE):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.processor = processor
        self.short_side, self.long_side = short_side, long_side  # the official test scale; smaller only in tests
        id2label = {int(k): v for k, v in model.config.id2label.items()}
        self.class_names = [COCO_TO_GENEVAL.get(id2label[i], id2label[i]) for i in range(len(id2label))]

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, device: torch.device | str = "cpu") -> Mask2FormerDetector:
        from transformers import Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor

        source = str(path) if path else DETECTOR_HUB_ID
        if path and not os.path.exists(source):
            raise UserError(f"--detector-path {source}: not found (expected a save_pretrained copy of {DETECTOR_HUB_ID})")
        try:
            try:  # the local cache first: no network round trips when the weights are already here
                model = Mask2FormerForUniversalSegmentation.from_pretrained(source, local_files_only=True)
                processor = Mask2FormerImageProcessor.from_pretrained(source, local_files_only=True)
            except OSError:
                if path:
                    raise
                model = Mask2FormerForUniversalSegmentation.from_pretrained(source)
                processor = Mask2FormerImageProcessor.from_pretrained(source)
        except OSError as err:
            raise UserError(f"cannot load the GenEval detector {source} ({str(err).splitlines()[0]}); {OFFLINE_HINT}") from None
        return cls(model, processor, device)

    @torch.no_grad()
    def detect(self, image: Any) -> dict[str, list[dict[str, Any]]]:
        width, height = image.size
        new_w, new_h = mmdet_rescale_size(width, height, self.short_side, self.long_side)
        pad = {"height": math.ceil(new_h / SIZE_DIVISOR) * SIZE_DIVISOR,
               "width": math.ceil(new_w / SIZE_DIVISOR) * SIZE_DIVISOR}
        from transformers.image_utils import SizeDict

        # mmdet pads (bottom/right) to a multiple of 32; the processor's size_divisor would stretch instead
        inputs = self.processor(images=image, size={"height": new_h, "width": new_w}, size_divisor=0,
                                pad_size=SizeDict(**pad), return_tensors="pt")
        out = self.model(pixel_values=inputs["pixel_values"].to(self.device))
        class_logits = out.class_queries_logits[0].float()  # (Q, C+1)
        masks = out.masks_queries_logits[0].float()  # (Q, h/4, w/4)
        # mmdet: upsample to the padded input, crop the valid region, upsample to the original size
        masks = F.interpolate(masks[None], size=(pad["height"], pad["width"]), mode="bilinear", align_corners=False)
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
