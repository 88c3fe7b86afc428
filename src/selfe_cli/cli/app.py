"""The Typer application and the error boundary: user mistakes -> one line on stderr, exit 2."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from selfe_cli.errors import UserError

app = typer.Typer(
    name="selfe",
    help="Train, sample and evaluate few-step and any-step generative image models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def table_console(stderr: bool = False) -> Console:
    """A Rich console for tables: the terminal's width, or 160 columns when the output is a file or pipe
    (Rich's default of 80 would cut the model and tag columns of sweep tables)."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else 160)


def fail(message: str) -> None:
    """Print one line to stderr and exit with code 2."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    raise SystemExit(2)


def run_app(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, standalone_mode=True)
    except UserError as err:
        fail(str(err))
    except FileNotFoundError as err:
        fail(f"{err.filename or err}: file not found")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
