"""The recipe validator: keys, types, ranges, suggestions."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from selfe_cli.config import ConfigError, convert, from_dict, spec, to_dict


@dataclass
class Inner:
    mean: float = 0.0
    std: float = field(default=1.0, metadata=spec(gt=0))


@dataclass
class Outer:
    lr: float = field(default=1e-4, metadata=spec(gt=0))
    steps: int = field(default=10, metadata=spec(ge=1))
    kind: Literal["adam", "adamw"] = "adam"
    betas: tuple[float, float] = (0.9, 0.999)
    decays: list[float] = field(default_factory=lambda: [0.999], metadata=spec(ge=0, lt=1))
    clip: float | None = 1.0
    inner: Inner = field(default_factory=Inner)


def test_valid_values_convert():
    cfg = from_dict(Outer, {"lr": "3e-4", "steps": 1e4, "betas": [0.9, 0.95], "decays": 0.99, "clip": None,
                            "inner": {"std": 2}})
    assert cfg.lr == pytest.approx(3e-4) and cfg.steps == 10000 and cfg.betas == (0.9, 0.95)
    assert cfg.decays == [0.99] and cfg.clip is None and cfg.inner.std == 2.0
    assert to_dict(cfg)["betas"] == [0.9, 0.95]


@pytest.mark.parametrize("data, path, words", [
    ({"lrr": 1}, "lrr", "did you mean 'lr'"),
    ({"inner": {"stdd": 1}}, "inner.stdd", "did you mean 'std'"),
    ({"lr": "fast"}, "lr", "expected a number"),
    ({"steps": 1.5}, "steps", "expected an integer"),
    ({"steps": 0}, "steps", ">= 1"),
    ({"lr": 0}, "lr", "> 0"),
    ({"kind": "adamm"}, "kind", "did you mean 'adam'"),
    ({"betas": [0.9]}, "betas", "2 values"),
    ({"decays": [0.5, 1.0]}, "decays[1]", "< 1"),
    ({"inner": 3}, "inner", "mapping"),
    ({"clip": "x"}, "clip", "number"),
])
def test_errors_name_key_and_expectation(data, path, words):
    with pytest.raises(ConfigError) as info:
        from_dict(Outer, data)
    assert info.value.path == path
    assert words in str(info.value)
    assert "\n" not in str(info.value)


def test_bool_is_not_a_number():
    with pytest.raises(ConfigError):
        convert(True, float, "x")
    with pytest.raises(ConfigError):
        convert(1, bool, "x")
