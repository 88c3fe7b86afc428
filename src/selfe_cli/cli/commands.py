"""Imports every command module so that its commands register on the app."""

from selfe_cli.cli import data_cmd, eval_cmd, recipes_cmd, sample_cmd, train_cmd  # noqa: F401
