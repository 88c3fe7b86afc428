"""The built-in ``shapes`` dataset: flat-coloured squares, circles and triangles on a grey background.

Everything is rendered procedurally from a seed (no files), so the toolkit can train and evaluate a
text-to-image model end to end anywhere. Captions follow GenEval's six prompt tags (docs/methods.md §6.2) and
are always *true* for their image: every object in the image is described, counts are exact, and
position scenes satisfy GenEval's position rule with a margin. Each image also carries a GenEval-format
metadata dict (the format of ``evaluation_metadata.jsonl``) with the canonical shape names as classes,
so the GenEval rule engine can score shapes models with the same code as real models.

Caption grammar (``parse_caption`` reads it back):
  single_object  "a [colour] <noun>"                                 include [{class, count 1}]
  two_object     "a [colour] <noun> and a [colour] <noun>"           two distinct classes
  counting       "<two|three|four> [colour] <plural noun>"           include count N, exclude N + 1
  colors         "a <colour> <noun>"                                 include [{class, count 1, color}]
  position       "a [colour] <A> <relation> a [colour] <B>"          include [B, A + position [rel, 0]]
  color_attr     "a <colour> <noun> and a <colour> <noun>"           distinct classes and colours
Colour words in brackets are optional in the caption; only the colors and color_attr tags check
colours in the metadata (as in GenEval), but an optional colour word is always true for the image.
"""

from __future__ import annotations

import itertools
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from selfe_cli.data.info import DatasetInfo
from selfe_cli.data.shapes_spec import (  # noqa: F401 - re-exported
    DEFAULT_BACKGROUND,
    MAX_RESOLUTION,
    MIN_RESOLUTION,
    TAGS,
    allowed_tags,
)

SHAPES: tuple[str, ...] = ("square", "circle", "triangle")
SYNONYMS: dict[str, tuple[str, ...]] = {
    "square": ("square", "cube"),
    "circle": ("circle", "sphere"),
    "triangle": ("triangle",),
}
# The ten GenEval colour names, in GenEval's order, with flat RGB values chosen to be far apart from
# each other and from the background (the tests check the pairwise distances).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (250, 225, 20),
    "green": (30, 160, 50),
    "blue": (30, 70, 230),
    "purple": (130, 40, 180),
    "pink": (255, 130, 200),
    "brown": (120, 70, 20),
    "black": (0, 0, 0),
    "white": (255, 255, 255),
}
# GenEval's prompt counts per tag: the default size of the shapes suite, capped by what is unique.
GENEVAL_TAG_COUNTS: dict[str, int] = {"single_object": 80, "two_object": 99, "counting": 80, "colors": 94,
                                      "position": 100, "color_attr": 100}
RELATIONS: dict[str, str] = {"left of": "to the left of", "right of": "to the right of",
                             "above": "above", "below": "below"}
NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}
POSITION_MARGIN = 0.15  # position scenes satisfy GenEval's threshold 0.5 by this much (0.65)

_PLURALS = {syn: syn + "s" for syns in SYNONYMS.values() for syn in syns}
_NOUNS = {syn: shape for shape, syns in SYNONYMS.items() for syn in syns}
_NOUNS.update({_PLURALS[syn]: shape for syn, shape in list(_NOUNS.items())})
_WORD_NUMBERS = {w: n for n, w in NUMBER_WORDS.items()}


@dataclass
class ShapeObject:
    shape: str
    color: str
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1) in pixels, x1/y1 exclusive

    def to_dict(self) -> dict[str, Any]:
        return {"shape": self.shape, "color": self.color, "box": list(self.box)}


@dataclass
class Scene:
    objects: list[ShapeObject]
    resolution: int
    background: tuple[int, int, int] = DEFAULT_BACKGROUND


@dataclass
class _Group:
    """One noun phrase of a caption: ``count`` objects of ``shape``; ``colors`` per object."""

    shape: str
    colors: list[str]
    noun: str
    mention_color: bool
    count: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Rendering


def render(scene: Scene) -> Image.Image:
    """Rasterise a scene: RGB, flat colours, no anti-aliasing (every pixel is a palette colour)."""
    res = scene.resolution
    img = Image.new("RGB", (res, res), tuple(scene.background))
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.box
        rgb = COLORS[obj.color]
        # PIL boxes are inclusive, ours exclusive: the last pixel is x1 - 1.
        if obj.shape == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=rgb)
        elif obj.shape == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=rgb)
        elif obj.shape == "triangle":
            # Apex at the top centre, base along the bottom edge of the box.
            draw.polygon([(x0, y1 - 1), (x1 - 1, y1 - 1), ((x0 + x1 - 1) / 2, y0)], fill=rgb)
        else:
            raise ValueError(f"unknown shape {obj.shape!r}; expected one of {', '.join(SHAPES)}")
    return img


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float32 in [-1, 1]."""
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())  # (H, W, 3)
    return arr.permute(2, 0, 1).float().div_(127.5).sub_(1.0)


# ----------------------------------------------------------------------------------------------
# GenEval position rule (docs/methods.md §6.2) and layout


def position_score(box_a: Sequence[float], box_b: Sequence[float]) -> tuple[float, float] | None:
    """GenEval's normalised revised offset ``(dx, dy)`` of box A relative to box B, or None if no relation.

    ``offset = centre_A - centre_B``; per axis ``revised = max(|offset| - 0.1 (dim_A + dim_B), 0) sign``;
    ``(dx, dy) = revised / ||offset||``. y grows downwards.
    """
    ca = ((box_a[0] + box_a[2]) / 2, (box_a[1] + box_a[3]) / 2)
    cb = ((box_b[0] + box_b[2]) / 2, (box_b[1] + box_b[3]) / 2)
    dims = (box_a[2] - box_a[0] + box_b[2] - box_b[0], box_a[3] - box_a[1] + box_b[3] - box_b[1])
    off = (ca[0] - cb[0], ca[1] - cb[1])
    rev = [max(abs(o) - 0.1 * d, 0.0) * math.copysign(1.0, o) for o, d in zip(off, dims, strict=True)]
    if abs(rev[0]) < 1e-3 and abs(rev[1]) < 1e-3:
        return None
    norm = math.hypot(*off)
    return rev[0] / norm, rev[1] / norm


def satisfies_position(box_a: Sequence[float], box_b: Sequence[float], relation: str,
                       margin: float = 0.0) -> bool:
    """Is A ``relation`` of B under GenEval's rule, with ``margin`` beyond its 0.5 threshold?"""
    score = position_score(box_a, box_b)
    if score is None:
        return False
    dx, dy = score
    limit = 0.5 + margin
    return {"left of": dx < -limit, "right of": dx > limit, "above": dy < -limit, "below": dy > limit}[relation]


def size_range(resolution: int) -> tuple[int, int]:
    """Object side lengths in pixels: large enough to read at 16 px, small enough for four objects."""
    smin = max(5, round(0.22 * resolution))
    smax = max(smin, round(0.40 * resolution))
    return smin, smax


def _gap(resolution: int) -> int:
    return max(1, resolution // 16)


def _separated(a: Sequence[int], b: Sequence[int], gap: int) -> bool:
    """Boxes are disjoint with at least ``gap`` free pixels between them along some axis."""
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _grid_layout(n: int, resolution: int, rng: np.random.Generator) -> list[tuple[int, int, int, int]]:
    """Fallback that always fits: one object per grid cell (cells in random order)."""
    gap = _gap(resolution)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    cell = resolution // max(cols, rows)
    side = max(3, min(size_range(resolution)[0], cell - gap))
    cells = rng.permutation(cols * rows)[:n]
    boxes = []
    for c in cells:
        cx, cy = int(c) % cols, int(c) // cols
        x0 = cx * cell + (cell - side) // 2
        y0 = cy * cell + (cell - side) // 2
        boxes.append((x0, y0, x0 + side, y0 + side))
    return boxes


def _directional_layout(relation: str, resolution: int) -> list[tuple[int, int, int, int]]:
    """Fallback for position scenes: [B, A] with A on the requested side of B, centred across."""
    gap = _gap(resolution)
    side = min(size_range(resolution)[0], (resolution - 3 * gap) // 2)
    lo = gap
    hi = resolution - gap - side
    mid = (resolution - side) // 2
    first, second = (lo, hi) if relation in ("left of", "above") else (hi, lo)
    if relation in ("left of", "right of"):
        a, b = (first, mid), (second, mid)
    else:
        a, b = (mid, first), (mid, second)
    return [(b[0], b[1], b[0] + side, b[1] + side), (a[0], a[1], a[0] + side, a[1] + side)]


def layout(n: int, resolution: int, rng: np.random.Generator, relation: str | None = None,
           tries: int = 400) -> list[tuple[int, int, int, int]]:
    """``n`` square boxes inside the image, pairwise separated by a gap (so every object is fully visible).

    With ``relation`` (n must be 2) the second box is ``relation`` of the first under GenEval's rule with
    a margin of ``POSITION_MARGIN``. Rejection sampling; sizes shrink towards the minimum as tries fail,
    and a fixed layout is the last resort, so this never fails.
    """
    if relation is not None and n != 2:
        raise ValueError("a position scene has exactly two objects")
    gap = _gap(resolution)
    smin, smax = size_range(resolution)
    boxes: list[tuple[int, int, int, int]] = []
    for attempt in range(tries):
        hi = smax - (smax - smin) * attempt // tries  # shrink the largest allowed size over time
        boxes = []
        for _ in range(n):
            side = int(rng.integers(smin, hi + 1))
            x0 = int(rng.integers(gap, resolution - gap - side + 1))
            y0 = int(rng.integers(gap, resolution - gap - side + 1))
            box = (x0, y0, x0 + side, y0 + side)
            if not all(_separated(box, other, gap) for other in boxes):
                break
            boxes.append(box)
        if len(boxes) == n and (relation is None or satisfies_position(boxes[1], boxes[0], relation,
                                                                        POSITION_MARGIN)):
            return boxes
    if relation is not None:
        return _directional_layout(relation, resolution)
    return _grid_layout(n, resolution, rng)


# ----------------------------------------------------------------------------------------------
# Captions and GenEval metadata


def article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


def _phrase(group: _Group) -> str:
    color = group.colors[0] if group.mention_color else None
    if group.count == 1:
        words = [color, group.noun] if color else [group.noun]
        return f"{article(words[0])} {' '.join(words)}"
    words = [NUMBER_WORDS[group.count]] + ([color] if color else []) + [_PLURALS[group.noun]]
    return " ".join(words)


def _caption_and_metadata(tag: str, groups: list[_Group], relation: str | None) -> tuple[str, dict[str, Any]]:
    """The caption and GenEval metadata of a plan (``groups`` in GenEval include order)."""
    include: list[dict[str, Any]] = []
    for g in groups:
        item: dict[str, Any] = {"class": g.shape, "count": g.count}
        if tag in ("colors", "color_attr"):
            item["color"] = g.colors[0]
        include.append(item)
    meta: dict[str, Any] = {"tag": tag, "include": include}
    if tag == "counting":
        meta["exclude"] = [{"class": groups[0].shape, "count": groups[0].count + 1}]
    if tag == "position":
        assert relation is not None
        include[1]["position"] = [relation, 0]
        # GenEval word order: "<A> <relation> <B>" with A = include[1], B = include[0].
        caption = f"{_phrase(groups[1])} {RELATIONS[relation]} {_phrase(groups[0])}"
    else:
        caption = " and ".join(_phrase(g) for g in groups)
    meta["prompt"] = caption
    return caption, meta


def parse_caption(caption: str) -> list[tuple[int, str | None, str]]:
    """Noun phrases of a shapes caption in order of mention: ``(count, colour or None, shape)``."""
    words = caption.lower().replace(",", " ").split()
    phrases = []
    for i, word in enumerate(words):
        if word not in _NOUNS:
            continue
        color = words[i - 1] if i >= 1 and words[i - 1] in COLORS else None
        j = i - 2 if color else i - 1
        count = _WORD_NUMBERS.get(words[j], 1) if j >= 0 else 1
        phrases.append((count, color, _NOUNS[word]))
    return phrases


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def _random_plan(rng: np.random.Generator, tag: str, min_objects: int, max_objects: int,
                 color_prob: float) -> tuple[list[_Group], str | None]:
    colors = list(COLORS)

    def group(shape: str, color: str, mention: bool, count: int = 1, colors_: list[str] | None = None) -> _Group:
        return _Group(shape, colors_ or [color] * count, _pick(rng, SYNONYMS[shape]), mention, count)

    if tag in ("single_object", "colors"):
        mention = tag == "colors" or bool(rng.random() < color_prob)
        return [group(_pick(rng, SHAPES), _pick(rng, colors), mention)], None
    if tag == "counting":
        n = int(rng.integers(max(2, min_objects), min(4, max_objects) + 1))
        shape = _pick(rng, SHAPES)
        if rng.random() < color_prob:  # "three red squares": all the same colour
            return [group(shape, _pick(rng, colors), True, n)], None
        per_object = [_pick(rng, colors) for _ in range(n)]  # "three squares": any colours
        return [group(shape, per_object[0], False, n, per_object)], None
    # Two objects of distinct classes (as in GenEval); color_attr also uses distinct colours.
    s1, s2 = (SHAPES[int(i)] for i in rng.choice(len(SHAPES), size=2, replace=False))
    if tag == "color_attr":
        c1, c2 = (colors[int(i)] for i in rng.choice(len(colors), size=2, replace=False))
        return [group(s1, c1, True), group(s2, c2, True)], None
    c1, c2 = _pick(rng, colors), _pick(rng, colors)
    mention = bool(rng.random() < color_prob)  # both or neither, so the caption reads evenly
    relation = _pick(rng, list(RELATIONS)) if tag == "position" else None
    return [group(s1, c1, mention), group(s2, c2, mention)], relation


def _scene_from_plan(groups: list[_Group], relation: str | None, rng: np.random.Generator, resolution: int,
                     background: tuple[int, int, int]) -> Scene:
    shapes = [(g.shape, c) for g in groups for c in g.colors]
    boxes = layout(len(shapes), resolution, rng, relation)
    objects = [ShapeObject(s, c, b) for (s, c), b in zip(shapes, boxes, strict=True)]
    return Scene(objects, resolution, tuple(background))


def _check_resolution(resolution: int) -> None:
    if not MIN_RESOLUTION <= resolution <= MAX_RESOLUTION:
        raise ValueError(f"shapes resolution must be in [{MIN_RESOLUTION}, {MAX_RESOLUTION}], got {resolution}")


def random_scene(rng: np.random.Generator, resolution: int = 32, min_objects: int = 1, max_objects: int = 4,
                 *, background: tuple[int, int, int] = DEFAULT_BACKGROUND, tags: Sequence[str] | None = None,
                 color_prob: float = 0.5) -> tuple[Scene, str, dict[str, Any]]:
    """A random scene with a true caption and its GenEval metadata: ``(scene, caption, metadata)``.

    The tag is drawn uniformly among ``tags`` (default: all six) that fit ``[min_objects, max_objects]``;
    ``color_prob`` is the chance that a tag whose colours are optional mentions them.
    """
    _check_resolution(resolution)
    if not 1 <= min_objects <= max_objects <= 4:
        raise ValueError(f"need 1 <= min_objects <= max_objects <= 4, got {min_objects}, {max_objects}")
    tag = _pick(rng, allowed_tags(min_objects, max_objects, tags))
    groups, relation = _random_plan(rng, tag, min_objects, max_objects, color_prob)
    caption, meta = _caption_and_metadata(tag, groups, relation)
    return _scene_from_plan(groups, relation, rng, resolution, background), caption, meta


def scene_for_prompt(metadata: dict[str, Any], rng: np.random.Generator, resolution: int = 32, *,
                     background: tuple[int, int, int] = DEFAULT_BACKGROUND) -> Scene:
    """A scene that satisfies a GenEval-format prompt (and its caption's colour words, if any).

    Objects without a colour get random colours; position prompts are laid out with a margin.
    """
    _check_resolution(resolution)
    include = metadata["include"]
    phrases = parse_caption(metadata.get("prompt", ""))
    used: set[int] = set()
    groups: list[_Group] = []
    relation = None
    for item in include:
        shape = item["class"]
        if shape not in SHAPES:
            raise ValueError(f"unknown shapes class {shape!r}; expected one of {', '.join(SHAPES)}")
        count = int(item["count"])
        color = item.get("color")
        if color is None:  # an optional colour word in the caption must hold too
            for k, (n, c, s) in enumerate(phrases):
                if k not in used and s == shape and n == count:
                    used.add(k)
                    color = c
                    break
        if color is not None and color not in COLORS:
            raise ValueError(f"unknown colour {color!r}; expected one of {', '.join(COLORS)}")
        colors = [color] * count if color else [_pick(rng, list(COLORS)) for _ in range(count)]
        groups.append(_Group(shape, colors, shape, color is not None, count))
        if "position" in item:
            relation, ref = item["position"]
            if ref != 0 or len(groups) != 2 or count != 1 or groups[0].count != 1:
                raise ValueError("position prompts need two single objects, the second relative to the first")
    total = sum(g.count for g in groups)
    if total > 4 and resolution < 32:
        raise ValueError(f"{total} objects do not fit in a {resolution}-px shapes image")
    return _scene_from_plan(groups, relation, rng, resolution, background)


# ----------------------------------------------------------------------------------------------
# The fixed prompt set of the shapes GenEval suite


def _candidates(tag: str) -> list[tuple[str, list[_Group], str | None]]:
    """Every distinct prompt of a tag (deterministic order)."""
    nouns = [(s, n) for s in SHAPES for n in SYNONYMS[s]]
    colors: list[str | None] = list(COLORS)
    optional: list[str | None] = [None, *colors]
    out: list[tuple[str, list[_Group], str | None]] = []

    def g(shape: str, noun: str, color: str | None, count: int = 1) -> _Group:
        return _Group(shape, [color or "red"] * count, noun, color is not None, count)

    if tag == "single_object":
        out = [(tag, [g(s, n, c)], None) for (s, n), c in itertools.product(nouns, optional)]
    elif tag == "colors":
        out = [(tag, [g(s, n, c)], None) for (s, n), c in itertools.product(nouns, colors)]
    elif tag == "counting":
        out = [(tag, [g(s, n, c, k)], None) for (s, n), c, k in itertools.product(nouns, optional, (2, 3, 4))]
    else:
        for (s1, n1), (s2, n2) in itertools.product(nouns, nouns):
            if s1 == s2:
                continue
            if tag == "color_attr":
                for c1, c2 in itertools.permutations(colors, 2):
                    out.append((tag, [g(s1, n1, c1), g(s2, n2, c2)], None))
            elif tag == "two_object":
                for c1, c2 in [(None, None)] + list(itertools.product(colors, colors)):
                    out.append((tag, [g(s1, n1, c1), g(s2, n2, c2)], None))
            else:
                for rel in RELATIONS:
                    for c1, c2 in [(None, None)] + list(itertools.product(colors, colors)):
                        out.append((tag, [g(s1, n1, c1), g(s2, n2, c2)], rel))
    return out


def shapes_prompts(seed: int = 0, per_tag: int | None = None) -> list[dict[str, Any]]:
    """The shapes GenEval suite: GenEval-format prompt dicts, the six tags in GenEval's order.

    ``per_tag`` None uses GenEval's own counts per tag (80, 99, 80, 94, 100, 100), capped by the number of
    distinct prompts a tag has (single_object 55, colors 50). Deterministic in ``seed``; no duplicates.
    Uncoloured prompts come first in the shuffle with probability proportional to their share, so the
    suite mixes prompts with and without colour words.
    """
    rng = np.random.default_rng(seed)
    prompts: list[dict[str, Any]] = []
    for tag in TAGS:
        cands = _candidates(tag)
        n = min(GENEVAL_TAG_COUNTS[tag] if per_tag is None else per_tag, len(cands))
        if tag in ("two_object", "position"):
            # Keep uncoloured prompts (a few dozen among thousands) at a fair share of the suite.
            plain = [c for c in cands if not c[1][0].mention_color]
            colored = [c for c in cands if c[1][0].mention_color]
            n_plain = min(len(plain), n // 4)
            chosen = [plain[int(i)] for i in rng.choice(len(plain), n_plain, replace=False)]
            chosen += [colored[int(i)] for i in rng.choice(len(colored), n - n_plain, replace=False)]
            order = rng.permutation(len(chosen))
            chosen = [chosen[int(i)] for i in order]
        else:
            chosen = [cands[int(i)] for i in rng.choice(len(cands), n, replace=False)]
        for t, groups, relation in chosen:
            prompts.append(_caption_and_metadata(t, groups, relation)[1])
    return prompts


# ----------------------------------------------------------------------------------------------
# Dataset


class ShapesDataset(torch.utils.data.Dataset):
    """``size`` procedurally rendered scenes; item ``i`` comes from an RNG seeded by ``(seed, i)``.

    Items: ``{"image": (3, H, W) float in [-1, 1], "caption": str, "meta": {"objects", "geneval"}}``.
    Split "train" uses the seed sequence ``(seed, i)``; any other split ``(seed, i, k)`` with a fixed
    per-split ``k``, so a test split never repeats training images.
    """

    def __init__(self, size: int = 100_000, resolution: int = 32, seed: int = 0, min_objects: int = 1,
                 max_objects: int = 4, background: tuple[int, int, int] = DEFAULT_BACKGROUND,
                 tags: Sequence[str] | None = None, color_prob: float = 0.5, hflip: bool = False,
                 split: str = "train"):
        _check_resolution(resolution)
        allowed_tags(min_objects, max_objects, tags)  # fail now, not in a worker
        self.size, self.resolution, self.seed = size, resolution, seed
        self.min_objects, self.max_objects = min_objects, max_objects
        self.background = tuple(background)
        self.tags = list(tags) if tags else None
        self.color_prob = color_prob
        self.split_key = [] if split == "train" else [zlib.crc32(split.encode())]
        if hflip:
            # A flip would make "left of" captions false; the data are symmetric by construction anyway.
            raise ValueError("hflip is not allowed for shapes: it would falsify 'left of'/'right of' captions")
        self.info = DatasetInfo(channels=3, resolution=resolution, num_classes=None, class_names=None,
                                has_captions=True, is_latent=False, vae=None)

    def __len__(self) -> int:
        return self.size

    def example(self, index: int) -> tuple[Scene, str, dict[str, Any]]:
        if not 0 <= index < self.size:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, index, *self.split_key])
        return random_scene(rng, self.resolution, self.min_objects, self.max_objects,
                            background=self.background, tags=self.tags, color_prob=self.color_prob)

    def __getitem__(self, index: int) -> dict[str, Any]:
        scene, caption, meta = self.example(index)
        return {"image": to_tensor(render(scene)), "caption": caption,
                "meta": {"objects": [o.to_dict() for o in scene.objects], "geneval": meta}}
