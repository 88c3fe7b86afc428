"""Typed, validated configuration objects built from plain dicts (YAML).

Every section of a recipe is a dataclass. ``from_dict`` checks unknown keys (suggesting the closest
valid one), types and ranges, and raises ``ConfigError`` with the key path, what was expected and
what was found. Ranges live in field metadata: ``field(default=..., metadata=spec(ge=0, help=...))``.

Why not pydantic: dataclasses keep the dependency list short and give us exactly the one-line error
format the CLI needs (file, key path, expected, closest key); the whole validator is this file.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

from selfe_cli.errors import UserError

# Integers: at most int64 (what torch and numpy can hold); a float stands for an integer only while it is exact.
MAX_INT = 2**63 - 1
MAX_EXACT_FLOAT_INT = 2**53


class ConfigError(UserError):
    """A recipe value is wrong. ``path`` is the dotted key path, e.g. ``train.lr``."""

    def __init__(self, path: str, message: str, source: str | None = None):
        self.path, self.detail, self.source = path, message, source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{path}: {message}" if path else f"{where}{message}")

    def with_source(self, source: str) -> ConfigError:
        return ConfigError(self.path, self.detail, source)


def spec(*, help: str = "", ge: float | None = None, gt: float | None = None, le: float | None = None,
         lt: float | None = None) -> dict[str, Any]:
    """Field metadata: a one-line help text and an optional numeric range."""
    return {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt}


def closest(name: str, options: list[str]) -> str | None:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return match[0] if match else None


def unknown_key_message(key: str, valid: list[str]) -> str:
    hint = closest(key, valid)
    did_you_mean = f"; did you mean '{hint}'?" if hint else ""
    return f"unknown key{did_you_mean} (valid keys: {', '.join(sorted(valid))})"


def type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = get_args(tp)
        inner = type_name(args[0]) if args else "any"
        return f"a list of {inner}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_finite(value: Any, path: str) -> None:
    """Refuse NaN and infinities anywhere inside ``value`` (YAML's .nan / .inf): nothing trains with them."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(path, f"expected a finite number, got {_describe(value)}")
    if isinstance(value, dict):
        for key, item in value.items():
            check_finite(item, f"{path}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_finite(item, f"{path}[{i}]")


def convert(value: Any, tp: Any, path: str) -> Any:
    """Convert/check ``value`` against the type annotation ``tp``; raise ConfigError on mismatch."""
    origin = get_origin(tp)
    if tp is Any:
        check_finite(value, path)
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping, got {_describe(value)}")
        return from_dict(tp, value, path)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(path, f"expected {type_name(tp)}, got null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert(value, arg, path)
            except ConfigError as err:
                errors.append(err)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(path, f"expected {type_name(tp)}, got {_describe(value)}")
    if origin is Literal:
        choices = get_args(tp)
        if value in choices and type(value) is type(choices[choices.index(value)]):
            return value
        hint = closest(str(value), [str(c) for c in choices])
        extra = f"; did you mean {hint!r}?" if hint else ""
        raise ConfigError(path, f"expected one of {', '.join(repr(c) for c in choices)}, got {_describe(value)}{extra}")
    if origin in (list, tuple):
        if isinstance(value, (int, float, str)) and not isinstance(value, bool) and origin is list:
            value = [value]  # a scalar where a list is expected: `steps: 4` means [4]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"expected {type_name(tp)}, got {_describe(value)}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(path, f"expected a list of {len(args)} values, got {len(value)}")
            return tuple(convert(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
        inner = args[0] if args else Any
        items = [convert(v, inner, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping, got {_describe(value)}")
        check_finite(value, path)
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(path, f"expected true or false, got {_describe(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) > MAX_INT:
                raise ConfigError(path, f"expected an integer of at most {MAX_INT} in magnitude, got {_describe(value)}")
            return value
        number = value
        if isinstance(value, str):  # YAML 1.1 reads "1e4" as a string
            try:
                number = float(value.replace("_", ""))
            except ValueError:
                number = None
        if isinstance(number, float):
            # a whole float (1e4, 1.0e4) is accepted where it is an exact integer; 1e30 or 1000.5 are not
            if math.isfinite(number) and number.is_integer() and abs(number) <= MAX_EXACT_FLOAT_INT:
                return int(number)
            if math.isfinite(number) and number.is_integer():
                raise ConfigError(path, f"expected an integer, got {_describe(value)} (a float this large is not "
                                        f"an exact integer; write the digits, at most {MAX_EXACT_FLOAT_INT})")
        raise ConfigError(path, f"expected an integer, got {_describe(value)}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value) if abs(value) < 1e308 else math.inf
        elif isinstance(value, str):
            try:  # YAML 1.1 reads "1e-4" as a string; accept numeric strings
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(path, f"expected a number, got {_describe(value)}")
        if not math.isfinite(number):
            raise ConfigError(path, f"expected a finite number, got {_describe(value)}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(path, f"expected a string, got {_describe(value)}")
    return value


def _check_range(value: Any, meta: dict[str, Any], path: str) -> None:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    for key, ok, words in (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                           ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")):
        bound = meta.get(key)
        if bound is not None and not ok(value, bound):
            raise ConfigError(path, f"expected a value {words} {bound}, got {value!r}")


def resolved_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type, data: dict[str, Any] | None, path: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, validating keys, types and ranges."""
    data = dict(data or {})
    hints = resolved_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        sub = f"{path}.{key}" if path else str(key)
        if key not in fields:
            raise ConfigError(sub, unknown_key_message(str(key), list(fields)))
        converted = convert(value, hints[key], sub)
        _check_range(converted, dict(fields[key].metadata), sub)
        if isinstance(converted, list):
            for i, item in enumerate(converted):
                _check_range(item, dict(fields[key].metadata), f"{sub}[{i}]")
        kwargs[key] = converted
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        sub = f"{path}.{missing[0]}" if path else missing[0]
        raise ConfigError(sub, f"required key is missing (expected {type_name(hints[missing[0]])})")
    try:
        obj = cls(**kwargs)
    except (ValueError, TypeError) as err:  # __post_init__ cross-field checks
        raise ConfigError(path, str(err)) from None
    return obj


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain dict/list/scalars (tuples become lists), ready for YAML/JSON."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def signature_schema(fn: Any, skip: tuple[str, ...] = ("self",)) -> dict[str, tuple[Any, Any]]:
    """``{param: (annotation, default)}`` of a callable's keyword parameters (for model kwargs)."""
    sig = inspect.signature(fn)
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - unresolvable annotations: fall back to Any
        hints = {}
    out = {}
    for name, p in sig.parameters.items():
        if name in skip or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        out[name] = (hints.get(name, Any), p.default)
    return out


def validate_kwargs(fn: Any, data: dict[str, Any], path: str, skip: tuple[str, ...] = ("self",)) -> dict[str, Any]:
    """Validate a dict of keyword arguments against a callable's typed signature."""
    schema = signature_schema(fn, skip)
    out = {}
    for key, value in data.items():
        sub = f"{path}.{key}"
        if key not in schema:
            raise ConfigError(sub, unknown_key_message(str(key), list(schema)))
        tp = schema[key][0]
        out[key] = convert(value, tp, sub)
    return out
