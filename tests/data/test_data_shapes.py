"""The built-in shapes dataset: determinism, caption truth (checked on pixels), GenEval formats."""

from __future__ import annotations

import itertools
import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from selfe_cli.data import shapes
from selfe_cli.data.shapes import (
    COLORS,
    SHAPES,
    SYNONYMS,
    Scene,
    ShapeObject,
    ShapesDataset,
    position_score,
    random_scene,
    render,
    scene_for_prompt,
    shapes_prompts,
)

GENEVAL_FILES = [Path("/work/shared/geneval/evaluation_metadata.jsonl"),
                 Path(__file__).resolve().parents[2] / "src/selfe_cli/evaluation/geneval_data/evaluation_metadata.jsonl"]
NUMBERS = {"two": 2, "three": 3, "four": 4}
NOUN_TO_SHAPE = {n: s for s, ns in SYNONYMS.items() for n in ns}


# ---- independent reference implementations (docs/methods.md §6.2 and the caption grammar) -----------


def spec_relation(box_a, box_b, relation: str) -> bool:
    """GenEval's position rule (docs/methods.md §6.2), written out independently of the library."""
    ca = np.array([(box_a[0] + box_a[2]) / 2, (box_a[1] + box_a[3]) / 2])
    cb = np.array([(box_b[0] + box_b[2]) / 2, (box_b[1] + box_b[3]) / 2])
    dim_a = np.array([box_a[2] - box_a[0], box_a[3] - box_a[1]])
    dim_b = np.array([box_b[2] - box_b[0], box_b[3] - box_b[1]])
    offset = ca - cb
    revised = np.maximum(np.abs(offset) - 0.1 * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return False
    dx, dy = revised / np.linalg.norm(offset)
    return {"left of": dx < -0.5, "right of": dx > 0.5, "above": dy < -0.5, "below": dy > 0.5}[relation]


PHRASE = re.compile(r"\b(a|an|two|three|four) (?:(" + "|".join(COLORS) + r") )?(" +
                    "|".join(sorted(NOUN_TO_SHAPE, key=len, reverse=True)) + r")(s?)\b")


def parse(caption: str) -> list[tuple[int, str | None, str, str]]:
    """(count, colour, shape, article-or-number) per noun phrase, by regex."""
    out = []
    for m in PHRASE.finditer(caption):
        word, color, noun, plural = m.groups()
        count = NUMBERS.get(word, 1)
        assert (count > 1) == (plural == "s"), caption
        out.append((count, color, NOUN_TO_SHAPE[noun], word))
    return out


def check_pixels(img: np.ndarray, scene: Scene) -> None:
    """Every object is drawn in its colour, fills its box tightly with the right shape, nothing else."""
    bg = np.array(scene.background)
    covered = np.zeros(img.shape[:2], bool)
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.box
        assert 0 <= x0 < x1 <= scene.resolution and 0 <= y0 < y1 <= scene.resolution
        patch = img[y0:y1, x0:x1]
        fg = np.any(patch != bg, axis=-1)
        colours = {tuple(c) for c in patch[fg]}
        assert colours == {COLORS[obj.color]}, (obj, colours)
        # tight box: the shape touches all four sides
        assert fg[0].any() and fg[-1].any() and fg[:, 0].any() and fg[:, -1].any(), obj
        fill = fg.mean()
        expected = {"square": (0.99, 1.0), "circle": (0.6, 0.95), "triangle": (0.4, 0.75)}[obj.shape]
        assert expected[0] <= fill <= expected[1], (obj, fill)
        if obj.shape == "triangle":  # apex up: the top row is narrower than the bottom row
            assert fg[0].sum() < fg[-1].sum()
        covered[y0:y1, x0:x1] = True
    assert np.all(img[~covered] == bg)
    for a, b in itertools.combinations(scene.objects, 2):
        ax0, ay0, ax1, ay1 = a.box
        bx0, by0, bx1, by1 = b.box
        assert ax1 < bx0 or bx1 < ax0 or ay1 < by0 or by1 < ay0, (a, b)  # disjoint with >= 1 px gap


def check_caption(scene: Scene, caption: str, meta: dict) -> None:
    objs = scene.objects
    phrases = parse(caption)
    assert phrases, caption
    assert sum(p[0] for p in phrases) == len(objs), (caption, objs)
    for count, color, shape, _ in phrases:
        of_shape = [o for o in objs if o.shape == shape]
        assert len(of_shape) >= count, caption
        if color is not None:
            assert sum(o.color == color for o in of_shape) >= count, caption
    # every phrase's article agrees with the next word
    for m in re.finditer(r"\b(a|an) (\w+)", caption):
        assert m.group(1) == ("an" if m.group(2)[0] in "aeiou" else "a"), caption
    # GenEval metadata agrees with the objects
    assert meta["prompt"] == caption
    counts = Counter(o.shape for o in objs)
    inc = meta["include"]
    assert sum(i["count"] for i in inc) == len(objs)
    for item in inc:
        assert counts[item["class"]] >= item["count"]
        if "color" in item:
            assert sum(o.shape == item["class"] and o.color == item["color"] for o in objs) >= item["count"]
    if meta["tag"] == "counting":
        assert counts[inc[0]["class"]] == inc[0]["count"] == len(objs)
        assert meta["exclude"] == [{"class": inc[0]["class"], "count": inc[0]["count"] + 1}]
    if meta["tag"] == "position":
        rel, ref = inc[1]["position"]
        assert ref == 0
        a = next(o for o in objs if o.shape == inc[1]["class"])
        b = next(o for o in objs if o.shape == inc[0]["class"])
        assert spec_relation(a.box, b.box, rel), (caption, a, b)
        assert shapes.RELATIONS[rel] in caption


# ---- tests --------------------------------------------------------------------------------------


def test_same_seed_same_pixels_different_seed_differs():
    a, b, c = ShapesDataset(size=8, seed=3), ShapesDataset(size=8, seed=3), ShapesDataset(size=8, seed=4)
    for i in range(8):
        assert torch.equal(a[i]["image"], b[i]["image"]) and a[i]["caption"] == b[i]["caption"]
    assert any(not torch.equal(a[i]["image"], c[i]["image"]) for i in range(8))
    assert not torch.equal(a[0]["image"], a[1]["image"])
    test_split = ShapesDataset(size=8, seed=3, split="test")
    assert all(not torch.equal(a[i]["image"], test_split[i]["image"]) for i in range(8))


@pytest.mark.parametrize("resolution", [16, 32, 64])
def test_captions_are_true_for_the_pixels(resolution):
    ds = ShapesDataset(size=240, resolution=resolution, seed=resolution)
    tags = Counter()
    for i in range(len(ds)):
        scene, caption, meta = ds.example(i)
        item = ds[i]
        img = ((item["image"].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
        assert item["image"].shape == (3, resolution, resolution) and item["image"].dtype == torch.float32
        assert item["caption"] == caption and item["meta"]["geneval"] == meta
        assert [o["box"] for o in item["meta"]["objects"]] == [list(o.box) for o in scene.objects]
        check_pixels(img, scene)
        check_caption(scene, caption, meta)
        tags[meta["tag"]] += 1
    assert set(tags) == set(shapes.TAGS)


def test_all_tags_colours_synonyms_and_counts_appear():
    ds = ShapesDataset(size=600, seed=1)
    captions = [ds.example(i)[1] for i in range(600)]
    words = Counter(w for c in captions for w in c.split())
    for name in COLORS:
        assert words[name] > 0, name
    for noun in ("square", "cube", "circle", "sphere", "triangle", "cubes", "spheres"):
        assert words[noun] > 0, noun
    for n in ("two", "three", "four"):
        assert words[n] > 0
    assert "an" in words and "orange" in words
    assert any(c in ("a triangle", "a cube", "a sphere", "a square", "a circle") for c in captions)


def test_colours_distinct_and_rendering_uses_only_palette():
    palette = [np.array(c, float) for c in COLORS.values()] + [np.array(shapes.DEFAULT_BACKGROUND, float)]
    dists = [np.linalg.norm(a - b) for a, b in itertools.combinations(palette, 2)]
    assert min(dists) > 60, min(dists)
    assert list(COLORS) == ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]
    # Each colour, rendered as each shape at 16 px, is recovered exactly from the pixels.
    for name, shape in itertools.product(COLORS, SHAPES):
        scene = Scene([ShapeObject(shape, name, (4, 4, 11, 11))], 16, shapes.DEFAULT_BACKGROUND)
        arr = np.asarray(render(scene))
        uniq = {tuple(c) for c in arr.reshape(-1, 3)}
        assert uniq == {COLORS[name], shapes.DEFAULT_BACKGROUND}


def test_position_rule_hand_computed():
    # A left of B: offset (-20, 0), dims 10 + 10 -> revised -18 -> dx = -0.9
    assert position_score((0, 0, 10, 10), (20, 0, 30, 10)) == pytest.approx((-0.9, 0.0))
    # |offset| = 0.1 * (dim sum) along x: revised 0 on both axes -> no relation
    assert position_score((0, 0, 10, 10), (2, 0, 12, 10)) is None
    # |offset| = 0.2 * (dim sum): dx = -2 / 4 = -0.5 exactly, and the comparison is strict
    assert position_score((0, 0, 10, 10), (4, 0, 14, 10)) == pytest.approx((-0.5, 0.0))
    assert not shapes.satisfies_position((0, 0, 10, 10), (4, 0, 14, 10), "left of")
    assert shapes.satisfies_position((0, 0, 10, 10), (5, 0, 15, 10), "left of")
    # diagonal: offset (-20, -20), revised (-18, -18), norm 28.28 -> dx = dy = -0.636
    dx, dy = position_score((0, 0, 10, 10), (20, 20, 30, 30))
    assert dx == pytest.approx(-18 / math.hypot(20, 20)) and dy == pytest.approx(dx)
    assert shapes.satisfies_position((0, 0, 10, 10), (20, 20, 30, 30), "above")
    assert not shapes.satisfies_position((0, 0, 10, 10), (20, 20, 30, 30), "above", margin=0.15)


@pytest.mark.parametrize("resolution", [16, 24, 64])
@pytest.mark.parametrize("relation", ["left of", "right of", "above", "below"])
def test_position_layout_keeps_a_margin(resolution, relation):
    rng = np.random.default_rng(0)
    for _ in range(40):
        b, a = shapes.layout(2, resolution, rng, relation)
        assert spec_relation(a, b, relation)
        assert shapes.satisfies_position(a, b, relation, margin=shapes.POSITION_MARGIN)
    fb, fa = shapes._directional_layout(relation, resolution)  # the last-resort layout holds too
    assert spec_relation(fa, fb, relation)


def test_object_count_limits():
    rng = np.random.default_rng(0)
    for _ in range(100):
        scene, caption, meta = random_scene(rng, 16, min_objects=3, max_objects=4)
        assert 3 <= len(scene.objects) <= 4 and meta["tag"] == "counting"
        check_pixels(np.asarray(render(scene)), scene)
    for _ in range(50):
        scene, _, meta = random_scene(rng, 32, min_objects=1, max_objects=1)
        assert len(scene.objects) == 1 and meta["tag"] in ("single_object", "colors")
    with pytest.raises(ValueError, match="fits"):
        random_scene(rng, 32, min_objects=3, max_objects=4, tags=["position"])
    with pytest.raises(ValueError, match="resolution"):
        random_scene(rng, 128)


def test_prompt_suite_is_deterministic_unique_and_satisfiable():
    prompts = shapes_prompts()
    assert prompts == shapes_prompts(seed=0) and prompts != shapes_prompts(seed=1)
    by_tag = Counter(p["tag"] for p in prompts)
    assert list(by_tag) == list(shapes.TAGS)
    assert all(50 <= n <= 100 for n in by_tag.values()), by_tag
    for tag in shapes.TAGS:
        texts = [p["prompt"] for p in prompts if p["tag"] == tag]
        assert len(texts) == len(set(texts)), tag
    assert Counter(p["tag"] for p in shapes_prompts(per_tag=7)) == {t: 7 for t in shapes.TAGS}
    rng = np.random.default_rng(0)
    for p in prompts:
        assert {i["class"] for i in p["include"]} <= set(SHAPES)
        scene = scene_for_prompt(p, rng, 32)
        check_pixels(np.asarray(render(scene)), scene)
        check_caption(scene, p["prompt"], p)
        for count, color, shape, _ in parse(p["prompt"]):  # colour words hold even where unchecked
            if color:
                assert sum(o.shape == shape and o.color == color for o in scene.objects) >= count


def test_metadata_matches_geneval_format():
    path = next((p for p in GENEVAL_FILES if p.is_file()), None)
    if path is None:
        pytest.skip("GenEval evaluation_metadata.jsonl not available")
    ref = [json.loads(line) for line in path.read_text().splitlines()]

    def signature(meta):
        return (tuple(meta), tuple(tuple(i) for i in meta["include"]),
                tuple(tuple(i) for i in meta.get("exclude", [])))

    ref_sigs = {}
    for m in ref:
        ref_sigs.setdefault(m["tag"], set()).add(signature(m))
    rng = np.random.default_rng(0)
    ours = shapes_prompts() + [random_scene(rng)[2] for _ in range(300)]
    for m in ours:
        assert signature(m) in ref_sigs[m["tag"]], m
        json.dumps(m)  # plain JSON
    assert {m["tag"] for m in ours} == set(ref_sigs)


def test_scene_for_prompt_rejects_unknown_classes():
    with pytest.raises(ValueError, match="unknown shapes class"):
        scene_for_prompt({"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a dog"},
                         np.random.default_rng(0))
