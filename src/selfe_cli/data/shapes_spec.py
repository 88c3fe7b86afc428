"""The ``shapes`` world's constants that a recipe's ``data:`` section is checked against (no torch, numpy, PIL).

``selfe_cli.data.shapes`` renders the world; this module only holds what validating a recipe needs.
"""

from __future__ import annotations

from collections.abc import Sequence

DEFAULT_BACKGROUND: tuple[int, int, int] = (128, 128, 128)  # neutral grey, far from black and white
TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
MIN_RESOLUTION, MAX_RESOLUTION = 16, 64


def allowed_tags(min_objects: int, max_objects: int, tags: Sequence[str] | None) -> list[str]:
    counts = {"single_object": (1, 1), "colors": (1, 1), "two_object": (2, 2), "position": (2, 2),
              "color_attr": (2, 2), "counting": (2, 4)}
    out = []
    for tag in tags or TAGS:
        if tag not in counts:
            raise ValueError(f"unknown tag {tag!r}; expected one of {', '.join(TAGS)}")
        lo, hi = counts[tag]
        if max(lo, min_objects) <= min(hi, max_objects):
            out.append(tag)
    if not out:
        raise ValueError(f"no caption tag of {list(tags or TAGS)} fits {min_objects}-{max_objects} objects")
    return out
