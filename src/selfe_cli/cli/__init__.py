"""Command-line interface. Each module registers its commands on ``app``."""

from selfe_cli.cli.app import app, run_app


def main() -> None:
    # Importing the command modules registers their commands on `app`.
    from selfe_cli.cli import commands  # noqa: F401

    run_app()


__all__ = ["app", "main"]
