"""Imports every command module so that its commands register on the app."""

from selfe_cli.cli import recipes_cmd  # noqa: F401
