"""Load a recipe: YAML file (or bundled name) + ``--set key=value`` overrides -> validated Recipe."""

from __future__ import annotations

import copy
import math
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from selfe_cli.config import ConfigError, _describe, closest, convert, from_dict, to_dict, unknown_key_message
from selfe_cli.errors import UserError
from selfe_cli.recipes.schema import MethodSpec, ModelSpec, Recipe, RunConfig, SampleConfig, TrainConfig

SECTIONS = ("run", "model", "data", "method", "train", "sample")


def bundled_dir() -> Path:
    return Path(str(resources.files("selfe_cli.recipes") / "bundled"))


def bundled_recipes() -> dict[str, Path]:
    """Bundled recipe names -> paths."""
    return {p.stem: p for p in sorted(bundled_dir().glob("*.yaml"))}


def find_recipe(name_or_path: str | Path) -> Path:
    """A path as given, or a bundled recipe by name ("quickstart") or by repo path ("recipes/x.yaml")."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    bundled = bundled_recipes()
    stem = path.name[:-5] if path.name.endswith(".yaml") else path.name
    if stem in bundled and (path.parent in (Path("."), Path("recipes")) or not path.exists()):
        return bundled[stem]
    from selfe_cli.config import closest

    hint = closest(stem, list(bundled))
    extra = f"; did you mean the bundled recipe '{hint}'?" if hint else ""
    raise UserError(f"{name_or_path}: recipe file not found{extra} (see `selfe recipes`)")


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as err:
        raise UserError(f"{path}: cannot read recipe ({err.strerror})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file (expected a YAML recipe in UTF-8)") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise UserError(f"{path}: invalid YAML{where}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of sections ({', '.join(SECTIONS)}), got {type(data).__name__}")
    return data


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """``train.lr=1e-4`` -> raw["train"]["lr"] = 1e-4 (the value parsed as YAML)."""
    if "=" not in assignment:
        raise UserError(f"--set {assignment}: expected KEY=VALUE, e.g. --set train.lr=1e-4")
    key, _, text = assignment.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise UserError(f"--set {assignment}: empty key")
    if parts[0] not in SECTIONS:
        raise UserError(f"--set {assignment}: {parts[0]}: {unknown_key_message(parts[0], list(SECTIONS))}")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(f"--set {assignment}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def _section(raw: dict[str, Any], name: str) -> dict[str, Any]:
    """A recipe section as a dict: absent or null is empty; anything but a mapping is an error."""
    value = raw.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(name, f"expected a mapping of {name} keys (e.g. `{name}: {{{_SECTION_EXAMPLE[name]}}}`), "
                                f"got {_describe(value)}")
    return dict(value)


_SECTION_EXAMPLE = {"run": "name: my_run", "model": "name: unet", "data": "name: shapes",
                    "method": "name: flow_matching", "train": "total_steps: 1000", "sample": "steps: 4"}


def _name(value: Any, key: str, known: list[str], what: str) -> str:
    """A registry name (model.name, method.name): a known string, else an error with the closest name."""
    if isinstance(value, str) and value in known:
        return value
    if not isinstance(value, str):
        raise ConfigError(key, f"expected a {what} name (one of: {', '.join(known)}), got {_describe(value)}")
    hint = closest(value, known)
    raise ConfigError(key, f"unknown {what} {value!r}" + (f"; did you mean '{hint}'?" if hint else "")
                      + f" (known: {', '.join(known)})")


# The U-Net's input skip (V = c_skip(t) x_t + F): a number >= 0 (0: off) or "data" (the training data's standard
# deviation, measured when a new run starts; see selfe_cli.training.run.resolve_skip_sigma_data).
SKIP_SIGMA_DATA_KEY = "skip_sigma_data"
MEASURED = "data"


def skip_sigma_data_value(value: Any, path: str) -> float | str:
    """``model.skip_sigma_data``: the string ``data``, or a finite number >= 0; anything else a ConfigError."""
    if value == MEASURED and isinstance(value, str):
        return MEASURED
    expected = "a number >= 0 (0: off) or 'data' (the training data's standard deviation, measured)"
    if isinstance(value, str):
        try:
            value = float(value)  # YAML 1.1 reads "1e-1" as a string
        except ValueError:
            hint = " (did you mean 'data'?)" if closest(value.lower(), [MEASURED]) else ""
            raise ConfigError(path, f"expected {expected}, got {_describe(value)}{hint}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(path, f"expected {expected}, got {_describe(value)}")
    if not math.isfinite(value) or value < 0:
        raise ConfigError(path, f"expected {expected}, got {_describe(value)}")
    return float(value)


def parse_recipe(raw: dict[str, Any], source: str, default_name: str = "run") -> Recipe:
    """Validate a raw recipe dict; errors name ``source`` and the key path.

    The sections that need no torch (run, data, method, train, sample) are checked first, so a mistake in
    them is reported before torch and the model registry are imported; the model section comes last.
    """
    from selfe_cli.data.config import DataConfig
    from selfe_cli.methods.configs import METHOD_CONFIGS, method_config_class

    try:
        if not isinstance(raw, dict):
            raise ConfigError("", f"expected a mapping of sections ({', '.join(SECTIONS)}), got {_describe(raw)}")
        for key in raw:
            if key not in SECTIONS:
                raise ConfigError(str(key), unknown_key_message(str(key), list(SECTIONS)))
        sections = {name: _section(raw, name) for name in SECTIONS}
        run = from_dict(RunConfig, sections["run"], "run")
        if run.name is None:
            run.name = default_name
        if run.dir is None:
            run.dir = str(Path("runs") / run.name)

        data = from_dict(DataConfig, sections["data"], "data")

        method_raw = sections["method"]
        method_name = _name(method_raw.pop("name", "flow_matching"), "method.name", list(METHOD_CONFIGS), "method")
        method_cfg = from_dict(method_config_class(method_name), method_raw, "method")

        train = from_dict(TrainConfig, sections["train"], "train")
        sample = from_dict(SampleConfig, sections["sample"], "sample")

        from selfe_cli.models.registry import MODELS, model_schema

        model_raw = sections["model"]
        if "name" not in model_raw:
            raise ConfigError("model.name", f"required key is missing (one of: {', '.join(MODELS)})")
        model_name = _name(model_raw.pop("name"), "model.name", list(MODELS), "model")
        schema = model_schema(model_name)
        model_kwargs = {}
        for key, value in model_raw.items():
            if key not in schema:
                raise ConfigError(f"model.{key}", unknown_key_message(str(key), list(schema)))
            if key == SKIP_SIGMA_DATA_KEY:
                model_kwargs[key] = skip_sigma_data_value(value, f"model.{key}")
            else:
                model_kwargs[key] = convert(value, schema[key][0], f"model.{key}")
    except ConfigError as err:
        raise err.with_source(source) from None
    return Recipe(run=run, model=ModelSpec(model_name, model_kwargs), data=data,
                  method=MethodSpec(method_name, method_cfg), train=train, sample=sample, source=source)


def guidance_trained_in(method_cfg: Any) -> bool:
    """True for a method config whose classifier-free guidance is part of the training target
    (MeanFlow's ``guidance`` with w != 1 or kappa != 0): sampling CFG on top would apply it twice."""
    return bool(getattr(getattr(method_cfg, "guidance", None), "active", False))


def check_guidance(recipe: Recipe) -> None:
    """A recipe whose guidance is trained in must not also ask for sampling CFG (``sample.cfg_scale``)."""
    if guidance_trained_in(recipe.method.config) and recipe.sample.cfg_scale != 1.0:
        raise ConfigError("sample.cfg_scale", f"expected 1.0 for a method whose guidance is trained in "
                                              f"(method.guidance is active), got {recipe.sample.cfg_scale!r}: "
                                              "sampling CFG would apply guidance twice", recipe.source)


def check_sample_steps(recipe: Recipe) -> None:
    """A shortcut model samples with a power of two steps up to its finest trained step (``denoise_timesteps``)."""
    if recipe.method.name != "shortcut":
        return
    steps, most = recipe.sample.steps, recipe.method.config.denoise_timesteps
    if steps & (steps - 1) or steps > most:
        raise ConfigError("sample.steps", f"expected a power of two up to {most} for method shortcut (its trained "
                                          f"step sizes), got {steps}", recipe.source)


def data_info_or_none(data: Any) -> Any:
    """The dataset's ``DatasetInfo`` when the data is there, else None (e.g. latents not encoded yet)."""
    from selfe_cli.data import dataset_info

    try:
        return dataset_info(data)
    except (UserError, OSError, ValueError):
        return None


def check_model(recipe: Recipe, info: Any = None) -> int:
    """Build the recipe's network on the meta device (kwargs completed from the data where it is there);
    refuse what cannot train with a one-line error naming the file and ``model.<key>``. Returns the
    parameter count."""
    from selfe_cli.models.registry import check_model_kwargs
    from selfe_cli.training.run import model_kwargs

    try:
        kwargs = model_kwargs(recipe, info)
        n_params = check_model_kwargs(recipe.model.name, kwargs, list(recipe.model.kwargs))
        check_method_model(recipe.method.name, recipe.model.name, kwargs, recipe.method.config)
        return n_params
    except ConfigError as err:
        raise err.with_source(recipe.source) from None


def _model_option(model: str, kwargs: dict[str, Any], key: str) -> Any:
    """The value ``key`` takes for the recipe's network: set, fixed by the preset, or the default; None if the
    network has no such option."""
    import inspect

    from selfe_cli.models.registry import MODELS

    factory = MODELS[model]
    params = inspect.signature(factory).parameters
    return kwargs.get(key, getattr(factory, "fixed", {}).get(key, params[key].default if key in params else None))


def check_method_model(method: str, model: str, kwargs: dict[str, Any], method_cfg: Any = None) -> None:
    """Network options a method needs: iMF feeds omega and the guidance interval to the network, which must be
    built with ``guidance_embed: true`` (the iMF-DiT presets are); sCT with ``weighting: logvar`` reads the
    learned log-variance off the network, which must be built with ``logvar_channels > 0``."""
    if method == "sct" and getattr(method_cfg, "weighting", None) == "logvar":
        channels = _model_option(model, kwargs, "logvar_channels")
        if channels is None:
            raise ConfigError("model.name", f"method.weighting logvar needs a network with a log-variance head "
                                            f"(logvar_channels); {model} has none")
        if not channels or channels < 1:
            raise ConfigError("model.logvar_channels", f"expected > 0 for method.weighting logvar (the learned "
                                                       f"log-variance l(t) is a head of the network), got "
                                                       f"{channels!r}; or set method.weighting: adaptive")
        return
    if method != "imf":
        return
    from selfe_cli.models.registry import MODELS

    factory = MODELS[model]
    if getattr(getattr(factory, "model_class", factory), "guidance_inputs", False):
        return
    value = _model_option(model, kwargs, "guidance_embed")
    if value is None:
        raise ConfigError("model.name", f"method imf needs a network that takes guidance conditions "
                                        f"(guidance_embed); {model} has none")
    if value is not True:
        raise ConfigError("model.guidance_embed", "expected true for method.name imf (omega and the guidance "
                                                  f"interval are inputs of the network), got {value!r}")


def load_recipe(name_or_path: str | Path, overrides: list[str] | None = None, *, check_network: bool = True) -> Recipe:
    """A validated recipe from a file or bundled name and ``--set`` overrides.

    ``check_network``: also build the network on the meta device (see ``check_model``), so kwargs the
    constructor rejects, or an empty or absurdly large network, are refused now rather than at training.
    """
    path = find_recipe(name_or_path)
    raw = read_yaml(path)
    raw = copy.deepcopy(raw)
    for assignment in overrides or []:
        apply_override(raw, assignment)
    source = str(name_or_path) if Path(name_or_path).is_file() else str(path)
    recipe = parse_recipe(raw, source, default_name=path.stem)
    check_guidance(recipe)
    check_sample_steps(recipe)
    if check_network:
        check_model(recipe, data_info_or_none(recipe.data))
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The resolved recipe as plain data (what `--dry-run` prints and the run directory keeps)."""
    return {
        "run": to_dict(recipe.run),
        "model": {"name": recipe.model.name, **to_dict(recipe.model.kwargs)},
        "data": to_dict(recipe.data),
        "method": {"name": recipe.method.name, **to_dict(recipe.method.config)},
        "train": to_dict(recipe.train),
        "sample": to_dict(recipe.sample),
    }


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False, default_flow_style=None)


def load_resolved(run_dir: Path) -> Recipe:
    """The resolved recipe saved in a run directory."""
    path = Path(run_dir) / "recipe.yaml"
    if not path.is_file():
        raise UserError(f"{run_dir}: not a run directory (no recipe.yaml)")
    raw = read_yaml(path)
    return parse_recipe(raw, str(path), default_name=Path(run_dir).name)
