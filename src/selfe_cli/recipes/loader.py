"""Load a recipe: YAML file (or bundled name) + ``--set key=value`` overrides -> validated Recipe."""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from selfe_cli.config import ConfigError, from_dict, to_dict, unknown_key_message
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
        text = path.read_text()
    except OSError as err:
        raise UserError(f"{path}: cannot read recipe ({err.strerror})") from None
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


def parse_recipe(raw: dict[str, Any], source: str, default_name: str = "run") -> Recipe:
    """Validate a raw recipe dict; errors name ``source`` and the key path."""
    from selfe_cli.data.config import DataConfig
    from selfe_cli.methods import METHODS
    from selfe_cli.models.registry import MODELS, model_schema

    try:
        for key in raw:
            if key not in SECTIONS:
                raise ConfigError(str(key), unknown_key_message(str(key), list(SECTIONS)))
        run = from_dict(RunConfig, raw.get("run"), "run")
        if run.name is None:
            run.name = default_name
        if run.dir is None:
            run.dir = str(Path("runs") / run.name)

        model_raw = dict(raw.get("model") or {})
        if "name" not in model_raw:
            raise ConfigError("model.name", f"required key is missing (one of: {', '.join(MODELS)})")
        model_name = model_raw.pop("name")
        if model_name not in MODELS:
            from selfe_cli.config import closest

            hint = closest(str(model_name), list(MODELS))
            raise ConfigError("model.name", f"unknown model {model_name!r}" + (f"; did you mean '{hint}'?" if hint else "")
                              + f" (known: {', '.join(MODELS)})")
        from selfe_cli.config import convert

        schema = model_schema(model_name)
        model_kwargs = {}
        for key, value in model_raw.items():
            if key not in schema:
                raise ConfigError(f"model.{key}", unknown_key_message(str(key), list(schema)))
            model_kwargs[key] = convert(value, schema[key][0], f"model.{key}")

        data = from_dict(DataConfig, raw.get("data"), "data")

        method_raw = dict(raw.get("method") or {})
        method_name = method_raw.pop("name", "flow_matching")
        if method_name not in METHODS:
            from selfe_cli.config import closest

            hint = closest(str(method_name), list(METHODS))
            raise ConfigError("method.name", f"unknown method {method_name!r}" + (f"; did you mean '{hint}'?" if hint else "")
                              + f" (known: {', '.join(METHODS)})")
        method_cfg = from_dict(METHODS[method_name].config_class, method_raw, "method")

        train = from_dict(TrainConfig, raw.get("train"), "train")
        sample = from_dict(SampleConfig, raw.get("sample"), "sample")
    except ConfigError as err:
        raise err.with_source(source) from None
    return Recipe(run=run, model=ModelSpec(model_name, model_kwargs), data=data,
                  method=MethodSpec(method_name, method_cfg), train=train, sample=sample, source=source)


def load_recipe(name_or_path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = find_recipe(name_or_path)
    raw = read_yaml(path)
    raw = copy.deepcopy(raw)
    for assignment in overrides or []:
        apply_override(raw, assignment)
    source = str(name_or_path) if Path(name_or_path).is_file() else str(path)
    return parse_recipe(raw, source, default_name=path.stem)


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
