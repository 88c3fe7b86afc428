"""GenEval: the prompts, the official scoring rules, the on-disk layout, the summary.

Ghosh et al., arXiv 2310.11513; the rules as implemented are in docs/methods.md §6.2.

The rule engine ``score_detections`` is pure (no models, no I/O) and follows the official
``evaluation/evaluate_images.py`` of djghosh13/geneval: per class, detections ranked as its
``np.argsort(scores)[::-1]`` on float32 scores (NumPy 1.x's tie order, ``numpy1_argsort``), kept if ``score > 0.3`` (``> 0.9`` when the prompt's tag is ``counting``), at most 16; include
clauses need their ``count`` most confident detections (and only those are checked for colour and
position); exclude clauses fail with ``>= count`` kept detections. Detectors (Mask2Former + CLIP,
or the shapes detector) only produce the detections.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Protocol, TypedDict

import numpy as np

from selfe_cli.errors import UserError

GENEVAL_SHA256 = "5c48e0813e812e3c373fa5c8ed07a8f0a483be30272b4427b0559c8048e67c13"
GENEVAL_NUM_PROMPTS = 553
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")

THRESHOLD = 0.3  # official `threshold`
COUNTING_THRESHOLD = 0.9  # official `counting_threshold`, used when metadata["tag"] == "counting"
MAX_OBJECTS = 16  # official `max_objects`: per class, applied before the exclude count
POSITION_THRESHOLD = 0.1  # official `position_threshold`: margin 0.1 * (dim_A + dim_B) per axis
RELATIONS = ("left of", "right of", "above", "below")


class Detection(TypedDict):
    box: Sequence[float]  # [x0, y0, x1, y1] pixels, x1/y1 exclusive, y grows down
    score: float
    color: str | None  # the colour classifier's answer for this detection's crop


Detections = Mapping[str, Sequence[Detection]]


class Detector(Protocol):
    """Image + the prompt's metadata -> detections (colours filled in where the prompt needs them)."""

    def __call__(self, image: Any, metadata: Mapping[str, Any]) -> dict[str, list[Detection]]: ...


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------
def _data_file(name: str) -> Path:
    return Path(str(resources.files("selfe_cli.evaluation").joinpath("geneval_data", name)))


def load_geneval_prompts() -> list[dict[str, Any]]:
    """The 553 official GenEval prompt metadata lines (checked against their sha256)."""
    path = _data_file("evaluation_metadata.jsonl")
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != GENEVAL_SHA256:
        raise UserError(f"{path}: sha256 {digest} does not match the official GenEval prompts ({GENEVAL_SHA256})")
    prompts = [json.loads(line) for line in raw.decode("utf-8").splitlines() if line.strip()]
    assert len(prompts) == GENEVAL_NUM_PROMPTS
    return prompts


# ---------------------------------------------------------------------------------------------
# Rule engine
# ---------------------------------------------------------------------------------------------
def confidence_threshold(metadata: Mapping[str, Any]) -> float:
    return COUNTING_THRESHOLD if metadata.get("tag") == "counting" else THRESHOLD


_SMALL_SORT = 15  # NumPy's SMALL_QUICKSORT: spans of at most 16 elements are insertion-sorted


def _less(a: float, b: float) -> bool:
    """NumPy's float order: NaN after every number."""
    return a < b or (b != b and a == a)


def _heap_argsort(v: Sequence[float], idx: list[int], base: int, n: int) -> None:
    """NumPy's argsort heapsort (the introsort fallback) of ``idx[base + 1 : base + n + 1]``, 1-based."""
    def sift(i: int, tmp: int, n: int) -> None:
        j = 2 * i
        while j <= n:
            if j < n and _less(v[idx[base + j]], v[idx[base + j + 1]]):
                j += 1
            if not _less(v[tmp], v[idx[base + j]]):
                break
            idx[base + i] = idx[base + j]
            i, j = j, 2 * j
        idx[base + i] = tmp

    for top in range(n >> 1, 0, -1):
        sift(top, idx[base + top], n)
    while n > 1:
        tmp = idx[base + n]
        idx[base + n] = idx[base + 1]
        n -= 1
        sift(1, tmp, n)


def numpy1_argsort(values: Sequence[float]) -> list[int]:
    """``np.argsort(np.float32 array)`` as NumPy 1.x computes it (the default, unstable "quicksort").

    The official scorer ranks with ``np.argsort(scores)[::-1]`` on mmdet's float32 score column, under
    NumPy 1.23 (its environment.yml), whose default argsort is an introsort: median-of-3 quicksort,
    insertion sort for spans of 16 or fewer, heapsort past depth 2 floor(log2 n). Ties come out in an order set by that
    algorithm. NumPy >= 1.25 may dispatch the same call to SIMD sorts (AVX-512, and AVX2 in 2.x) that break
    ties differently (5 or more equal scores already differ on an AVX2 machine with NumPy 2.4), so the
    algorithm is replayed here rather than calling ``np.argsort``.
    """
    v = [float(x) for x in np.asarray(values, dtype=np.float32).reshape(-1)]  # float32 values, exact as floats
    n = len(v)
    idx = list(range(n))
    if n < 2:
        return idx
    stack: list[tuple[int, int, int]] = []
    lo, hi, depth = 0, n - 1, 2 * (n.bit_length() - 1)
    while True:
        if depth < 0:
            _heap_argsort(v, idx, lo - 1, hi - lo + 1)
        else:
            while hi - lo > _SMALL_SORT:
                mid = lo + ((hi - lo) >> 1)
                if _less(v[idx[mid]], v[idx[lo]]):
                    idx[mid], idx[lo] = idx[lo], idx[mid]
                if _less(v[idx[hi]], v[idx[mid]]):
                    idx[hi], idx[mid] = idx[mid], idx[hi]
                if _less(v[idx[mid]], v[idx[lo]]):
                    idx[mid], idx[lo] = idx[lo], idx[mid]
                pivot = v[idx[mid]]
                i, j = lo, hi - 1
                idx[mid], idx[j] = idx[j], idx[mid]
                while True:
                    i += 1
                    while _less(v[idx[i]], pivot):
                        i += 1
                    j -= 1
                    while _less(pivot, v[idx[j]]):
                        j -= 1
                    if i >= j:
                        break
                    idx[i], idx[j] = idx[j], idx[i]
                idx[i], idx[hi - 1] = idx[hi - 1], idx[i]
                depth -= 1
                if i - lo < hi - i:  # the larger side waits on the stack
                    stack.append((i + 1, hi, depth))
                    hi = i - 1
                else:
                    stack.append((lo, i - 1, depth))
                    lo = i + 1
            for k in range(lo + 1, hi + 1):  # insertion sort (stable)
                item, key = idx[k], v[idx[k]]
                m = k
                while m > lo and _less(key, v[idx[m - 1]]):
                    idx[m] = idx[m - 1]
                    m -= 1
                idx[m] = item
        if not stack:
            return idx
        lo, hi, depth = stack.pop()


def rank_by_score(scores: Sequence[float]) -> list[int]:
    """Indices from most to least confident: the official ``np.argsort(scores)[::-1]`` on float32 scores."""
    return numpy1_argsort(scores)[::-1]


def select_detections(metadata: Mapping[str, Any], detections: Detections) -> dict[str, list[Detection]]:
    """Per class: rank by score (descending), keep ``score > threshold`` (strict), cap at 16.

    As the official scorer: the order is ``np.argsort(scores)[::-1]`` on float32 scores (NumPy 1.x's
    tie order, see ``numpy1_argsort``), and the threshold is compared in float32 (a float32 array against
    a Python float), so a score of ``float32(0.3)`` is dropped. Classes with no kept detection are absent
    from the result. No NMS: the official default ``max_overlap=1.0`` disables it.
    """
    threshold = np.float32(confidence_threshold(metadata))
    kept: dict[str, list[Detection]] = {}
    for name, dets in detections.items():
        scores = np.asarray([float(d["score"]) for d in dets], dtype=np.float32)
        order = [i for i in rank_by_score(scores) if scores[i] > threshold][:MAX_OBJECTS]
        if order:
            kept[name] = [dets[i] for i in order]
    return kept


def relative_position(box_a: Sequence[float], box_b: Sequence[float]) -> set[str]:
    """Relations of A with respect to B ("A is left of B", ...), y growing downwards.

    offset = centre_A - centre_B; per axis the offset shrinks by 0.1 * (dim_A + dim_B) towards 0
    (never past it); with both revised components < 1e-3 there is no relation; otherwise the
    revised offset is divided by the norm of the *raw* offset and compared with +-0.5, strictly.
    """
    a = np.asarray(box_a[:4], dtype=np.float64).reshape(2, 2)  # [[x0, y0], [x1, y1]]
    b = np.asarray(box_b[:4], dtype=np.float64).reshape(2, 2)
    offset = a.mean(0) - b.mean(0)  # (2,) centre difference
    dims = np.abs(a[1] - a[0]) + np.abs(b[1] - b[0])  # x1 - x0, y1 - y0 (no +1)
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * dims, 0.0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


def _ordered(rels: Iterable[str]) -> list[str]:
    return [r for r in RELATIONS if r in rels]


def score_detections(metadata: Mapping[str, Any], detections: Detections,
                     image_size: tuple[int, int]) -> tuple[bool, str]:
    """Official GenEval correctness of one image: ``(correct, reason)``.

    ``detections``: ``{class: [{"box": [x0, y0, x1, y1], "score": s, "color": c | None}]}`` in the
    pixel coordinates of an image of ``image_size = (width, height)``, unfiltered (thresholds and
    the cap are applied here). Reasons use the official scorer's wording, joined by newlines.
    """
    width, height = image_size
    if width <= 0 or height <= 0:
        raise ValueError(f"image_size must be positive (width, height), got {image_size}")
    objects = select_detections(metadata, detections)
    correct = True
    reasons: list[str] = []
    matched_groups: list[list[Detection] | None] = []
    for req in metadata.get("include", []):
        name, count = req["class"], int(req["count"])
        found = objects.get(name, [])[:count]  # only the `count` most confident ever matter
        matched = True
        if len(found) < count:
            correct = matched = False
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        else:
            if "color" in req:
                colors = [d.get("color") for d in found]
                n_right = colors.count(req["color"])
                if n_right < count:
                    correct = matched = False
                    reasons.append(f"expected {req['color']} {name}>={count}, found {n_right} {req['color']}; and "
                                   + ", ".join(f"{colors.count(c)} {c}" for c in COLORS if c in colors))
            if "position" in req and matched:
                expected_rel, target = req["position"]
                targets = matched_groups[int(target)]
                if targets is None:
                    correct = matched = False
                    reasons.append(f"no target for {name} to be {expected_rel}")
                else:
                    for det in found:
                        for tgt in targets:
                            rels = relative_position(det["box"], tgt["box"])
                            if expected_rel not in rels:
                                correct = matched = False
                                reasons.append(f"expected {name} {expected_rel} target, found "
                                               f"{' and '.join(_ordered(rels))} target")
                                break
                        if not matched:
                            break
        matched_groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        name, count = req["class"], int(req["count"])
        n_found = len(objects.get(name, []))  # after the 16 cap
        if n_found >= count:
            correct = False
            reasons.append(f"expected {name}<{count}, found {n_found}")
    return correct, "\n".join(reasons)


def colour_requests(metadata: Mapping[str, Any]) -> dict[str, int]:
    """Classes whose colour the rules read, and how many top detections (detectors colour only those)."""
    out: dict[str, int] = {}
    for req in metadata.get("include", []):
        if "color" in req:
            out[req["class"]] = max(out.get(req["class"], 0), int(req["count"]))
    return out


# ---------------------------------------------------------------------------------------------
# Official on-disk layout: <root>/<NNNNN>/metadata.jsonl + <root>/<NNNNN>/samples/<kkkk>.png
# ---------------------------------------------------------------------------------------------
def write_prompt_folder(root: str | os.PathLike, index: int, metadata: Mapping[str, Any],
                        images: Sequence[Any], start: int = 0) -> list[Path]:
    """Write one prompt's folder; ``images`` are PIL images or uint8 ``(H, W, 3)`` arrays."""
    from PIL import Image

    folder = Path(root) / f"{index:05d}"
    (folder / "samples").mkdir(parents=True, exist_ok=True)
    with open(folder / "metadata.jsonl", "w") as fh:
        fh.write(json.dumps(dict(metadata)) + "\n")
    paths = []
    for k, img in enumerate(images, start=start):
        pil = img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img, dtype=np.uint8))
        path = folder / "samples" / f"{k:04d}.png"
        pil.save(path)
        paths.append(path)
    return paths


def read_layout(root: str | os.PathLike) -> list[tuple[Path, dict[str, Any]]]:
    """``(image path, metadata)`` pairs of a folder in the official layout, sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--images {root}: folder not found")
    pairs: list[tuple[Path, dict[str, Any]]] = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit()):
        meta_path = sub / "metadata.jsonl"
        if not meta_path.is_file():
            raise UserError(f"{meta_path}: missing (expected the prompt's metadata line)")
        try:
            metadata = json.loads(meta_path.read_text().strip().splitlines()[0])
        except (json.JSONDecodeError, IndexError) as err:
            raise UserError(f"{meta_path}: not a JSON metadata line ({err})") from None
        samples = sub / "samples"
        if not samples.is_dir():
            continue
        for img in sorted(samples.iterdir()):
            if img.is_file() and re.fullmatch(r"\d+\.png", img.name):
                pairs.append((img, metadata))
    if not pairs:
        raise UserError(f"--images {root}: no images in the GenEval layout <NNNNN>/samples/<kkkk>.png")
    return pairs


# ---------------------------------------------------------------------------------------------
# Scoring a folder, results.jsonl, summary
# ---------------------------------------------------------------------------------------------
def evaluate_image(path: Path, metadata: Mapping[str, Any], detector: Detector) -> dict[str, Any]:
    """One image -> one record with the official scorer's fields."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        image = ImageOps.exif_transpose(im).convert("RGB")
    detections = detector(image, metadata)
    correct, reason = score_detections(metadata, detections, image.size)
    kept = select_detections(metadata, detections)
    return {
        "filename": str(path),
        "tag": metadata["tag"],
        "prompt": metadata["prompt"],
        "correct": bool(correct),
        "reason": reason,
        "metadata": json.dumps(dict(metadata)),
        # official `details`: per class, [x0, y0, x1, y1, score] of the kept detections (score as float32, mmdet's dtype)
        "details": json.dumps({name: [[float(v) for v in d["box"][:4]] + [float(np.float32(d["score"]))] for d in dets]
                               for name, dets in kept.items()}),
    }


def evaluate_folder(root: str | os.PathLike, detector: Detector,
                    progress: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    records = []
    for path, metadata in read_layout(root):
        records.append(evaluate_image(path, metadata, detector))
        if progress:
            progress(1)
    return records


def write_results(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for rec in records:
            fh.write(json.dumps(dict(rec)) + "\n")
    return path


def read_results(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def summarize(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per tag the fraction of correct images; overall = unweighted mean of the tag scores."""
    by_tag: dict[str, list[bool]] = {}
    for rec in records:
        by_tag.setdefault(rec["tag"], []).append(bool(rec["correct"]))
    order = [t for t in TAGS if t in by_tag] + sorted(t for t in by_tag if t not in TAGS)
    tags = {t: float(np.mean(by_tag[t])) for t in order}
    prompts: dict[str, bool] = {}
    for rec in records:
        prompts[rec["metadata"]] = prompts.get(rec["metadata"], False) or bool(rec["correct"])
    return {
        "overall": float(np.mean(list(tags.values()))) if tags else float("nan"),
        "tags": tags,
        "counts": {t: [int(sum(by_tag[t])), len(by_tag[t])] for t in order},
        "images": len(records),
        "prompts": len(prompts),
        "correct_images": float(np.mean([bool(r["correct"]) for r in records])) if records else float("nan"),
        "correct_prompts": float(np.mean(list(prompts.values()))) if prompts else float("nan"),
    }
