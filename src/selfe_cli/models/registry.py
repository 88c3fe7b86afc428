"""Model registry: names -> factories, kwargs schemas for recipes, building, strict loading, conditioners.

Registering a model is one line, from any module::

    register_model("mmdit", MMDiT)                                   # every __init__ kwarg configurable
    register_model("DiT-B/2", DiT, fixed=dict(depth=12, hidden_size=768, num_heads=12, patch_size=2))

``fixed`` kwargs define the preset (a recipe may not set them: unknown key); ``defaults`` replace the class
defaults but stay settable. Modules listed in ``EXTENSION_MODULES`` are imported when this module is, if they
exist, so their ``register_model`` calls run (``selfe_cli.models.mmdit`` for the MMDiT).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import re
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from selfe_cli.config import ConfigError, closest, signature_schema, validate_kwargs
from selfe_cli.errors import UserError
from selfe_cli.models.base import MODEL_CLASSES, TwoTimeModel
from selfe_cli.models.conditioning import ClassConditioner, Conditioner
from selfe_cli.models.dit import DiT
from selfe_cli.models.text import TextConditioner
from selfe_cli.models.unet import UNet

ModelFactory = Callable[..., TwoTimeModel]
MODELS: dict[str, ModelFactory] = {}

EXTENSION_MODULES = ("selfe_cli.models.mmdit", "selfe_cli.models.mlp", "selfe_cli.models.imf_dit")


def preset(cls: type[TwoTimeModel], name: str, *, fixed: Mapping[str, Any] | None = None,
           defaults: Mapping[str, Any] | None = None) -> ModelFactory:
    """A factory for ``cls`` with some kwargs fixed and some defaults changed.

    The factory carries a real signature (and resolved annotations), so ``signature_schema`` and
    ``validate_kwargs`` see exactly the kwargs a recipe may set.
    """
    fixed, defaults = dict(fixed or {}), dict(defaults or {})
    init_sig = inspect.signature(cls.__init__)
    hints = typing.get_type_hints(cls.__init__)
    for key in (*fixed, *defaults):
        if key not in init_sig.parameters:
            raise ValueError(f"preset {name!r}: {cls.__name__} has no argument {key!r}")
    params, annotations = [], {}
    for pname, p in init_sig.parameters.items():
        if pname == "self" or pname in fixed or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        default = defaults.get(pname, p.default)
        annotation = hints.get(pname, Any)
        params.append(inspect.Parameter(pname, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=annotation))
        annotations[pname] = annotation

    def factory(**kwargs: Any) -> TwoTimeModel:
        clash = sorted(set(kwargs) & set(fixed))
        if clash:
            raise TypeError(f"{name}: {clash[0]!r} is fixed by the preset ({fixed[clash[0]]!r})")
        return cls(**{**fixed, **defaults, **kwargs})

    factory.__name__ = factory.__qualname__ = name.replace("-", "_").replace("/", "_")
    factory.__doc__ = f"{cls.__name__} preset {name!r}: fixed {fixed or '{}'}, defaults {defaults or '{}'}."
    factory.__signature__ = inspect.Signature(params, return_annotation=cls)  # type: ignore[attr-defined]
    factory.__annotations__ = annotations
    factory.model_class = cls  # type: ignore[attr-defined]
    factory.fixed = fixed  # type: ignore[attr-defined]
    factory.defaults = defaults  # type: ignore[attr-defined]
    return factory


def register_model(name: str, factory: ModelFactory | type[TwoTimeModel] | None = None, *,
                   fixed: Mapping[str, Any] | None = None, defaults: Mapping[str, Any] | None = None,
                   replace: bool = False) -> Any:
    """Register ``factory`` (a TwoTimeModel class or a function) under ``name``; usable as a decorator.

    A class is wrapped by ``preset`` (with ``fixed`` / ``defaults``); a function is registered as is, and its
    typed keyword parameters are the recipe schema.
    """

    def add(obj: Any) -> Any:
        if name in MODELS and not replace:
            raise ValueError(f"model name {name!r} is already registered")
        if isinstance(obj, type):
            if not issubclass(obj, TwoTimeModel):
                raise TypeError(f"{obj.__name__} is not a TwoTimeModel subclass")
            MODELS[name] = preset(obj, name, fixed=fixed, defaults=defaults)
        else:
            if fixed or defaults:
                raise TypeError("fixed/defaults apply to a class; a factory function sets its own")
            MODELS[name] = obj
        return obj

    return add if factory is None else add(factory)


def _lookup(name: str) -> ModelFactory:
    if name not in MODELS:
        hint = closest(name, list(MODELS))
        extra = f"; did you mean '{hint}'?" if hint else ""
        raise UserError(f"model: unknown model name {name!r}{extra} (available: {', '.join(sorted(MODELS))})")
    return MODELS[name]


def model_schema(name: str) -> dict[str, tuple[Any, Any]]:
    """``{kwarg: (annotation, default)}`` a recipe's ``model:`` section may set for model ``name``."""
    return signature_schema(_lookup(name))


def validate_model_kwargs(name: str, kwargs: Mapping[str, Any], path: str = "model") -> dict[str, Any]:
    """Check and convert recipe kwargs for model ``name`` (unknown key with closest match, types)."""
    return validate_kwargs(_lookup(name), dict(kwargs), path)


def build_model(name: str, **kwargs: Any) -> TwoTimeModel:
    """Build registered model ``name``; bad names / kwargs / combinations raise a one-line UserError."""
    factory = _lookup(name)
    fixed = getattr(factory, "fixed", {})
    for key in kwargs:
        if key in fixed:
            raise ConfigError(f"model.{key}", f"fixed to {fixed[key]!r} by the preset {name!r}; "
                                              "pick another preset or the configurable base model")
    converted = validate_kwargs(factory, kwargs, "model")
    try:
        return factory(**converted)
    except (ValueError, TypeError) as err:
        raise UserError(f"model {name!r}: {err}") from None


# Explicit checks of model kwargs that the constructors accept silently (an empty or inert network) or reject
# with an obscure error (ZeroDivisionError); each applies to every model that has the kwarg.
AT_LEAST_ONE = ("sample_size", "in_channels", "out_channels", "model_channels", "num_heads", "emb_mult",
                "patch_size", "hidden_size", "depth", "width", "text_width", "text_layers", "text_heads",
                "text_context_length", "t5_max_length")
AT_LEAST_ZERO = ("num_blocks", "num_classes", "context_dim", "pooled_dim", "depth_double", "depth_single")
POSITIVE_NUMBERS = ("time_scale", "mlp_ratio", "rope_theta")
POSITIVE_LISTS = ("channel_mult", "attn_resolutions", "cross_attn_resolutions", "rope_axes")
MAX_SAMPLE_SIZE = 16_384  # network input side (pixels or latents)
MAX_PARAMETERS = 10**11  # 100B: beyond any network this toolkit trains; usually a typo (model_channels: 100000)
# a constructor's message may name an internal argument; the recipe key that sets it
_MESSAGE_ALIASES = {"num_channels": "model_channels", "num_groups": "model_channels"}
_MESSAGE_HINTS = {"num_groups": "the U-Net's widths are model_channels x channel_mult and must split into GroupNorm "
                                "groups; multiples of 32 always do"}


def _check_model_values(kwargs: Mapping[str, Any], schema: Mapping[str, Any]) -> None:
    def bad(key: str, expected: str) -> ConfigError:
        value = kwargs[key]
        return ConfigError(f"model.{key}", f"expected {expected}, got {list(value) if isinstance(value, tuple) else value!r}")

    for key, value in kwargs.items():
        if value is None or key not in schema:
            continue
        if key in AT_LEAST_ONE and isinstance(value, int) and value < 1:
            raise bad(key, "an integer >= 1")
        if key in AT_LEAST_ZERO and isinstance(value, int) and value < 0:
            raise bad(key, "an integer >= 0")
        if key in POSITIVE_NUMBERS and isinstance(value, (int, float)) and not value > 0:
            raise bad(key, "a number > 0")
        if key in POSITIVE_LISTS and isinstance(value, (list, tuple)) and any(v < 1 for v in value):
            raise bad(key, "a list of integers >= 1")
    if "channel_mult" in kwargs and not kwargs["channel_mult"]:
        raise bad("channel_mult", "at least one level, e.g. [1, 2, 2]")
    if "time_freq_dim" in kwargs and kwargs["time_freq_dim"] < 2:
        raise bad("time_freq_dim", "an integer >= 2 (sine and cosine features of the times)")
    if "dropout" in kwargs and not 0 <= kwargs["dropout"] < 1:
        raise bad("dropout", "a probability in [0, 1)")
    if "sample_size" in kwargs and kwargs["sample_size"] > MAX_SAMPLE_SIZE:
        raise bad("sample_size", f"at most {MAX_SAMPLE_SIZE}")


def _key_named_in(message: str, keys: Sequence[str], preferred: Sequence[str]) -> str | None:
    """The model kwarg a constructor's error message is about: one the recipe sets if it names several."""
    words = [_MESSAGE_ALIASES.get(w, w) for w in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", message)]
    named = [w for w in words if w in keys]
    for word in named:
        if word in preferred:
            return word
    return named[0] if named else None


def check_model_kwargs(name: str, kwargs: Mapping[str, Any], recipe_keys: Sequence[str] = ()) -> int:
    """Refuse model kwargs that cannot build a trainable network; return its parameter count.

    ``kwargs`` are the converted recipe kwargs completed from the data (``recipe_keys``: those the recipe
    sets itself). Explicit range checks first, then the network is built on the meta device (no memory, no
    initialisation cost), so every check of the constructor runs; its ValueError / TypeError becomes a
    ConfigError against the ``model.<key>`` its message names. A network without parameters, or one with
    more than ``MAX_PARAMETERS``, is refused as well.
    """
    import torch

    factory = _lookup(name)
    schema = signature_schema(factory)
    _check_model_values(kwargs, schema)
    try:
        with torch.device("meta"):
            net = factory(**kwargs)
    except UserError:
        raise
    except (ValueError, TypeError, RuntimeError, ZeroDivisionError, IndexError, OverflowError, AssertionError) as err:
        message = " ".join(str(err).split()) or type(err).__name__
        message += "".join(f" ({hint})" for word, hint in _MESSAGE_HINTS.items() if word in message)
        key = _key_named_in(message, list(schema), list(recipe_keys))
        if key is None:
            raise ConfigError("model", f"{name}: cannot build the network: {message}") from None
        derived = "" if key in recipe_keys else (f" ({key} = {kwargs.get(key, schema[key][1])!r} comes from the data "
                                                 "or the model's default)")
        raise ConfigError(f"model.{key}", f"{message}{derived}") from None
    n = sum(p.numel() for p in net.parameters())
    if n == 0:
        raise ConfigError("model", f"{name}: these settings build a network without parameters")
    if n > MAX_PARAMETERS:
        set_here = f" (set here: {', '.join(recipe_keys)})" if recipe_keys else ""
        raise ConfigError("model", f"{name}: these settings build a network of {n:.3g} parameters, more than the "
                                   f"{MAX_PARAMETERS:.0e} accepted; is a size mistyped?{set_here}")
    return n


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def load_model(path: str | Path, **kwargs: Any) -> TwoTimeModel:
    """Load a ``save_pretrained`` directory (or its ``config.json``) with the class named in the config.

    Strict: missing, unexpected or shape-mismatched weights are an error. ``kwargs`` go to ``from_pretrained``
    (e.g. ``torch_dtype``).
    """
    path = Path(path)
    directory = path.parent if path.name == "config.json" else path
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise UserError(f"{directory}: not a saved model directory (no config.json)")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{config_file}: invalid JSON ({err})") from None
    class_name = config.get("_class_name")
    if class_name not in MODEL_CLASSES:
        hint = closest(str(class_name), list(MODEL_CLASSES))
        extra = f"; did you mean '{hint}'?" if hint else ""
        raise UserError(f"{config_file}: _class_name {class_name!r} is not a known model class{extra} "
                        f"(known: {', '.join(sorted(MODEL_CLASSES))})")
    cls = MODEL_CLASSES[class_name]
    # without accelerate diffusers warns and falls back to a plain load anyway: ask for it directly
    kwargs.setdefault("low_cpu_mem_usage", importlib.util.find_spec("accelerate") is not None)
    try:
        model, info = cls.from_pretrained(directory, output_loading_info=True, **kwargs)
    except (OSError, RuntimeError, ValueError) as err:
        raise UserError(f"{directory}: cannot load {class_name}: {str(err).splitlines()[0] if str(err) else err}"
                        ) from None
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k) for k in info.get(kind) or [])
        if keys:
            raise UserError(f"{directory}: weights do not match {class_name}'s config: {len(keys)} "
                            f"{kind.replace('_', ' ')} (e.g. {keys[0]})")
    if info.get("error_msgs"):
        raise UserError(f"{directory}: {info['error_msgs'][0]}")
    return model


ConditionerFactory = Callable[[TwoTimeModel, Any], Conditioner]
TEXT_CONDITIONERS: dict[str, ConditionerFactory] = {
    "tiny": lambda model, info: TextConditioner(int(getattr(model, "config", {}).get("text_context_length", 77))),
}


def register_text_conditioner(text_encoder: str, factory: ConditionerFactory) -> None:
    """Conditioner factory for models with ``text_encoder=<text_encoder>`` (e.g. frozen T5/CLIP features)."""
    TEXT_CONDITIONERS[text_encoder] = factory


def _info(dataset_info: Any, key: str) -> Any:
    if dataset_info is None:
        return None
    if isinstance(dataset_info, Mapping):
        return dataset_info.get(key)
    return getattr(dataset_info, key, None)


def make_conditioner(model: nn.Module, dataset_info: Any = None) -> Conditioner:
    """The Conditioner that feeds ``model``: plain (none), ClassConditioner or a text conditioner.

    ``dataset_info``: a mapping or object with optional ``num_classes`` and ``class_names``.
    """
    kind = getattr(model, "cond_kind", "none")
    if kind == "none":
        return Conditioner()
    if kind == "class":
        num_classes = int(model.config.num_classes)
        data_classes = _info(dataset_info, "num_classes")
        if data_classes is not None and int(data_classes) != num_classes:
            raise UserError(f"model.num_classes is {num_classes} but the dataset has {data_classes} classes")
        names = _info(dataset_info, "class_names")
        if names is not None and len(names) != num_classes:
            names = None  # names that do not line up with the labels are worse than none
        return ClassConditioner(num_classes, names)
    if kind == "text":
        encoder = getattr(model, "text_encoder_kind", None) or "tiny"
        if encoder not in TEXT_CONDITIONERS:
            raise UserError(f"model.text_encoder: no conditioner is registered for {encoder!r} "
                            f"(available: {', '.join(sorted(TEXT_CONDITIONERS))})")
        return TEXT_CONDITIONERS[encoder](model, dataset_info)
    raise UserError(f"model.condition: unknown condition kind {kind!r}")


# ---- built-in models ---------------------------------------------------------------------------------

register_model("unet", UNet)  # the class defaults: a small U-Net for 16-32 px CPU training
# DDPM++ CIFAR-10 (score_sde cifar10_ddpmpp / EDM "ddpmpp"), the ~55M network of MeanFlow's CIFAR-10 runs
register_model("unet-ddpmpp-cifar10", UNet,
               fixed=dict(model_channels=128, channel_mult=(2, 2, 2), num_blocks=4, attn_resolutions=(16,),
                          num_heads=1, resample="biggan", emb_mult=4, time_freq_dim=128),
               defaults=dict(sample_size=32, in_channels=3, dropout=0.2))

register_model("dit", DiT)  # every DiT kwarg configurable
DIT_SIZES = {  # (depth, hidden_size, num_heads); B/M/L/XL as MF Table 4, S as DiT
    "tiny": (6, 192, 3),
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "M": (16, 1024, 16),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
for _size, (_depth, _width, _heads) in DIT_SIZES.items():
    for _patch in ((2, 4) if _size == "tiny" else (2, 4, 8)):
        register_model(
            f"DiT-{_size}/{_patch}", DiT,
            fixed=dict(depth=_depth, hidden_size=_width, num_heads=_heads, patch_size=_patch),
            # tiny ones are CPU pixel models; the paper sizes default to SD-VAE latents 32x32x4
            defaults=dict(sample_size=32, in_channels=3 if _size == "tiny" else 4))
        globals()[f"DiT_{_size}_{_patch}"] = MODELS[f"DiT-{_size}/{_patch}"]  # DiT_XL_2 etc., as in DiT

for _module in EXTENSION_MODULES:
    try:
        importlib.import_module(_module)
    except ModuleNotFoundError as _err:
        if _err.name != _module:
            raise
