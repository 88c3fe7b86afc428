"""Recipes: YAML -> validated, typed configuration."""

from selfe_cli.recipes.loader import (
    bundled_recipes,
    dump_recipe,
    load_recipe,
    load_resolved,
    recipe_to_dict,
)
from selfe_cli.recipes.schema import Recipe, SampleConfig, TrainConfig

__all__ = ["Recipe", "SampleConfig", "TrainConfig", "bundled_recipes", "dump_recipe", "load_recipe",
           "load_resolved", "recipe_to_dict"]
