"""The GenEval rule engine against hand-built cases (official evaluate_images.py rules, docs/methods.md §6.2)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from selfe_cli.evaluation.geneval import (
    GENEVAL_SHA256,
    load_geneval_prompts,
    numpy1_argsort,
    rank_by_score,
    relative_position,
    score_detections,
    select_detections,
    summarize,
)

SIZE = (512, 512)


def det(box, score=0.95, color=None):
    return {"box": list(box), "score": score, "color": color}


def single(cls="dog"):
    return {"tag": "single_object", "include": [{"class": cls, "count": 1}], "prompt": f"a photo of a {cls}"}


def counting(cls="clock", n=2):
    return {"tag": "counting", "include": [{"class": cls, "count": n}], "exclude": [{"class": cls, "count": n + 1}],
            "prompt": f"a photo of {n} {cls}s"}


def colors(cls="car", color="red"):
    return {"tag": "colors", "include": [{"class": cls, "count": 1, "color": color}], "prompt": f"a photo of a {color} {cls}"}


def position(rel, a="dog", b="cat"):
    return {"tag": "position", "include": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}],
            "prompt": f"a photo of a {a} {rel} a {b}"}


# --- prompts -----------------------------------------------------------------------------------
def test_prompts_are_the_official_file():
    prompts = load_geneval_prompts()
    assert len(prompts) == 553
    tags = [p["tag"] for p in prompts]
    assert {t: tags.count(t) for t in set(tags)} == {"single_object": 80, "two_object": 99, "counting": 80,
                                                     "colors": 94, "position": 100, "color_attr": 100}
    from importlib import resources

    raw = resources.files("selfe_cli.evaluation").joinpath("geneval_data", "evaluation_metadata.jsonl").read_bytes()
    assert hashlib.sha256(raw).hexdigest() == GENEVAL_SHA256
    assert prompts[353]["include"][1]["position"] == ["right of", 0]


# --- thresholds ---------------------------------------------------------------------------------
# float32(0.3) = 0.30000001192...: above 0.3 in float64, dropped by the official float32 comparison
@pytest.mark.parametrize("score, ok", [(0.3, False), (0.30000001192092896, False), (0.30001, True), (0.2, False),
                                       (0.9, True)])
def test_strict_threshold_03(score, ok):
    correct, reason = score_detections(single(), {"dog": [det((0, 0, 10, 10), score)]}, SIZE)
    assert correct is ok
    assert ok or reason == "expected dog>=1, found 0"


@pytest.mark.parametrize("score, ok", [(0.9, False), (0.90001, True), (0.5, False)])
def test_counting_uses_strict_09(score, ok):
    dets = {"clock": [det((0, 0, 10, 10), 0.99), det((50, 0, 60, 10), score)]}
    assert score_detections(counting(n=2), dets, SIZE)[0] is ok


def test_non_counting_prompts_use_03_even_with_low_scores():
    dets = {"dog": [det((0, 0, 10, 10), 0.5)]}
    assert score_detections(single(), dets, SIZE)[0]


# --- ranking: the official np.argsort(scores)[::-1] on float32, NumPy 1.x tie order -------------------
def test_rank_ties_hand_computed():
    # up to 16 elements NumPy 1.x insertion-sorts (stable ascending), so reversed, ties come last-first
    assert rank_by_score([1.0, 1.0, 0.5]) == [1, 0, 2]
    assert rank_by_score([1.0] * 5) == [4, 3, 2, 1, 0]
    assert rank_by_score([0.5, 1.0, 0.5, 1.0]) == [3, 1, 2, 0]
    # 18 ties: one quicksort partition. Pivot = middle (index 8), swapped to position 16; the scans stop at
    # every tie and swap positions (1, 15) ... (7, 9); position 8 takes the pivot back; both halves
    # (<= 16 long) are then insertion-sorted unchanged: [0, 15..9, 8, 7..1, 16, 17], reversed below.
    assert rank_by_score([1.0] * 18) == [17, 16, *range(1, 16), 0]


def test_rank_heapsort_fallback_matches_numpy1():
    # McIlroy's adversary against this introsort, values then capped at 20 (ties): the partitions degrade
    # past depth 2 floor(log2 40) = 10 and NumPy 1.x finishes with heapsort. Expected: np.argsort of this
    # float32 array under NumPy 1.26.4 (generic sort, no AVX-512). NumPy 2.4 on AVX2 orders the ties differently.
    v = [0, 20, 2, 20, 4, 20, 6, 20, 8, 20, 10, 20, 12, 20, 14, 20, 16, 20, 18, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19,
         *[20] * 11]
    expected = [0, 19, 2, 20, 4, 21, 6, 22, 8, 23, 10, 24, 12, 25, 14, 26, 16, 27, 18, 28, 1, 37, 36, 35, 34, 33, 32,
                31, 30, 29, 15, 13, 11, 9, 7, 5, 3, 38, 39, 17]
    assert numpy1_argsort(np.array(v, dtype=np.float32)) == expected


def test_numpy1_argsort_is_a_sort_nan_last():
    rng = np.random.default_rng(0)
    for n in (0, 1, 2, 16, 17, 50, 120):
        v = rng.choice(np.array([0.2, 0.5, 1.0, np.nan], dtype=np.float32), n)
        order = numpy1_argsort(v)
        assert sorted(order) == list(range(n))
        finite = [float(v[i]) for i in order if not np.isnan(v[i])]
        assert finite == sorted(finite) and all(np.isnan(v[i]) for i in order[len(finite):])
        if n <= 16:
            assert order == np.argsort(v, kind="stable").tolist()


@pytest.mark.skipif(tuple(int(p) for p in np.__version__.split(".")[:2]) >= (1, 25),
                    reason="NumPy >= 1.25 may use SIMD argsorts with another tie order")
def test_numpy1_argsort_is_numpys_own():
    rng = np.random.default_rng(1)
    for n in (5, 17, 40, 100):
        v = rng.choice(np.array([0.5, 0.9, 1.0], dtype=np.float32), n)
        assert numpy1_argsort(v) == np.argsort(v).tolist()


def test_tied_scores_pick_the_official_top_detection():
    # the shapes detector scores every clean object 1.0: the official order takes the *last* of the ties
    dets = {"car": [det((0, 0, 10, 10), 1.0, "red"), det((20, 0, 30, 10), 1.0, "blue")]}
    assert [d["color"] for d in select_detections(colors("car", "red"), dets)["car"]] == ["blue", "red"]
    correct, reason = score_detections(colors("car", "red"), dets, SIZE)
    assert not correct and reason == "expected red car>=1, found 0 red; and 1 blue"
    dets["car"].reverse()
    assert score_detections(colors("car", "red"), dets, SIZE)[0]


def test_cap_keeps_the_official_16_of_tied_scores():
    meta = {"tag": "single_object", "include": [{"class": "bird", "count": 1}], "prompt": "x"}
    dets = {"bird": [det((i, 0, i + 5, 5), 1.0) for i in range(18)]}
    kept = select_detections(meta, dets)["bird"]
    assert [d["box"][0] for d in kept] == [17, 16, *range(1, 15)]  # rank_by_score([1.0] * 18)[:16]


# --- counting: exactly N --------------------------------------------------------------------------
@pytest.mark.parametrize("found, ok", [(1, False), (2, True), (3, False), (5, False)])
def test_counting_exactly_n(found, ok):
    dets = {"clock": [det((20 * i, 0, 20 * i + 10, 10), 0.95) for i in range(found)]}
    correct, reason = score_detections(counting(n=2), dets, SIZE)
    assert correct is ok
    if found == 3:
        assert reason == "expected clock<3, found 3"
    if found == 1:
        assert reason == "expected clock>=2, found 1"


def test_low_scored_extras_do_not_hurt_counting():
    dets = {"clock": [det((0, 0, 10, 10), 0.95), det((20, 0, 30, 10), 0.95), det((40, 0, 50, 10), 0.85)]}
    assert score_detections(counting(n=2), dets, SIZE)[0]


def test_cap_of_16_applies_before_exclude():
    meta = {"tag": "counting", "include": [{"class": "bird", "count": 1}],
            "exclude": [{"class": "bird", "count": 17}], "prompt": "x"}
    dets = {"bird": [det((i, 0, i + 5, 5), 0.95) for i in range(20)]}
    assert score_detections(meta, dets, SIZE)[0]  # 20 found, capped to 16 < 17
    assert len(select_detections(meta, dets)["bird"]) == 16
    meta["exclude"][0]["count"] = 16
    correct, reason = score_detections(meta, dets, SIZE)
    assert not correct and reason == "expected bird<16, found 16"


def test_extra_instances_do_not_hurt_non_counting():
    dets = {"dog": [det((0, 0, 10, 10)) for _ in range(5)]}
    assert score_detections(single(), dets, SIZE)[0]


def test_two_object_needs_both():
    meta = {"tag": "two_object", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}], "prompt": "x"}
    assert score_detections(meta, {"dog": [det((0, 0, 5, 5))], "cat": [det((9, 9, 15, 15))]}, SIZE)[0]
    correct, reason = score_detections(meta, {"dog": [det((0, 0, 5, 5))]}, SIZE)
    assert not correct and reason == "expected cat>=1, found 0"


# --- colour -----------------------------------------------------------------------------------------
def test_colour_checked_on_most_confident_only():
    # the top detection is blue: a lower-scored red one never helps
    dets = {"car": [det((0, 0, 10, 10), 0.5, "red"), det((20, 0, 30, 10), 0.9, "blue")]}
    correct, reason = score_detections(colors("car", "red"), dets, SIZE)
    assert not correct
    assert reason == "expected red car>=1, found 0 red; and 1 blue"
    dets["car"][0]["score"] = 0.95
    assert score_detections(colors("car", "red"), dets, SIZE)[0]


def test_colour_count_needs_all_top_n():
    meta = {"tag": "counting", "include": [{"class": "cup", "count": 2, "color": "green"}], "prompt": "x"}
    dets = {"cup": [det((0, 0, 5, 5), 0.99, "green"), det((9, 0, 15, 5), 0.98, "pink"),
                    det((20, 0, 25, 5), 0.97, "green")]}
    assert not score_detections(meta, dets, SIZE)[0]
    dets["cup"][1]["color"] = "green"
    assert score_detections(meta, dets, SIZE)[0]


def test_color_attr_both_colours():
    meta = {"tag": "color_attr", "include": [{"class": "bus", "count": 1, "color": "green"},
                                             {"class": "apple", "count": 1, "color": "black"}], "prompt": "x"}
    good = {"bus": [det((0, 0, 5, 5), color="green")], "apple": [det((9, 9, 15, 15), color="black")]}
    assert score_detections(meta, good, SIZE)[0]
    swapped = {"bus": [det((0, 0, 5, 5), color="black")], "apple": [det((9, 9, 15, 15), color="green")]}
    correct, reason = score_detections(meta, swapped, SIZE)
    assert not correct and reason.count("\n") == 1  # both clauses fail, one line each


# --- position ---------------------------------------------------------------------------------------
def test_relative_position_hand_computed():
    # A centre (55, 5), B centre (5, 5): offset (50, 0), dims 10 + 10 -> revised 48 -> dx 0.96
    assert relative_position([50, 0, 60, 10], [0, 0, 10, 10]) == {"right of"}
    assert relative_position([0, 0, 10, 10], [50, 0, 60, 10]) == {"left of"}
    assert relative_position([0, 50, 10, 60], [0, 0, 10, 10]) == {"below"}  # y grows down
    assert relative_position([0, 0, 10, 10], [0, 50, 10, 60]) == {"above"}


def test_margin_needs_more_than_02_dims_along_one_axis():
    # equal boxes of width 10: margin 0.1 * 20 = 2; dx = (|o| - 2) / |o| > 0.5 <=> |o| > 4
    b = [0, 0, 10, 10]
    assert relative_position([4, 0, 14, 10], b) == set()  # offset 4: dx = 0.5 exactly, strict -> none
    assert relative_position([4.01, 0, 14.01, 10], b) == {"right of"}
    assert relative_position([2, 0, 12, 10], b) == set()  # offset 2: revised 0 -> no relation at all


def test_no_relation_when_both_revised_below_1e3():
    b = [0, 0, 10, 10]
    assert relative_position([2.0005, 2.0005, 12.0005, 12.0005], b) == set()


def test_diagonal_placements():
    b = [0, 0, 10, 10]
    # 45 degrees: offset (40, 40), revised (38, 38) / 56.57 = 0.67 each -> two relations
    assert relative_position([40, 40, 50, 50], b) == {"right of", "below"}
    assert relative_position([-40, -40, -30, -30], b) == {"left of", "above"}
    # steeper: offset (10, 40): dx = 8 / 41.2 = 0.19, dy = 38 / 41.2 = 0.92
    assert relative_position([10, 40, 20, 50], b) == {"below"}


def test_box_sizes_are_x1_minus_x0():
    # widths x1 - x0 = 10: margin 2, dx = 2.1 / 4.1 = 0.512 -> right of; with +1 sizes (11) the margin
    # would be 2.2 and dx = 1.9 / 4.1 = 0.46 -> no relation
    assert relative_position([4.1, 0, 14.1, 10], [0, 0, 10, 10]) == {"right of"}


@pytest.mark.parametrize("rel, a_box, ok", [
    ("right of", [60, 0, 70, 10], True), ("left of", [60, 0, 70, 10], False),
    ("above", [0, -60, 10, -50], True), ("below", [0, -60, 10, -50], False),
])
def test_position_prompt(rel, a_box, ok):
    dets = {"cat": [det([0, 0, 10, 10])], "dog": [det(a_box)]}
    correct, reason = score_detections(position(rel), dets, SIZE)
    assert correct is ok
    if not ok:
        assert reason.startswith(f"expected dog {rel} target, found ")


def test_position_uses_only_top_detection_and_needs_target():
    dets = {"cat": [det([0, 0, 10, 10])], "dog": [det([-60, 0, -50, 10], 0.9), det([60, 0, 70, 10], 0.5)]}
    assert not score_detections(position("right of"), dets, SIZE)[0]  # the top dog is left of the cat
    correct, reason = score_detections(position("right of"), {"dog": [det([60, 0, 70, 10])]}, SIZE)
    assert not correct
    assert reason == "expected cat>=1, found 0\nno target for dog to be right of"


def test_summary_is_unweighted_mean_of_tags():
    recs = [{"tag": "single_object", "correct": True, "metadata": "a"}] * 3 + \
           [{"tag": "counting", "correct": False, "metadata": "b"}, {"tag": "counting", "correct": True, "metadata": "c"}]
    s = summarize(recs)
    assert s["tags"] == {"single_object": 1.0, "counting": 0.5}
    assert s["overall"] == pytest.approx(0.75)  # not 4/5
    assert s["correct_images"] == pytest.approx(0.8)
    assert json.dumps(s)
