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


def _click_exception() -> type[Exception]:
    """Click's ClickException (typer vendors click in recent versions: found through a public class)."""
    return next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def _usage_line(err: Exception) -> str:
    """A usage error (unknown option, bad option value) as one line naming the command."""
    ctx = getattr(err, "ctx", None)
    command = ctx.command_path if ctx is not None else "selfe"
    message = err.format_message() if hasattr(err, "format_message") else str(err)
    return f"{command}: {message} (see '{command} --help')"


def run_app(argv: list[str] | None = None) -> None:
    click_exception = _click_exception()
    try:
        code = app(args=argv, prog_name="selfe", standalone_mode=False)
    except UserError as err:
        fail(str(err))
    except click_exception as err:
        if type(err).__name__ == "NoArgsIsHelpError":  # `selfe` or `selfe eval` alone: the help, as before
            print(err.format_message(), file=sys.stderr)
            raise SystemExit(2) from None
        fail(_usage_line(err))
    except FileNotFoundError as err:
        fail(f"{err.filename or err}: file not found")
    except OSError as err:
        if err.filename is None:
            raise
        # an output that cannot be written (permissions, a file where a folder should be, a full disk)
        fail(f"{err.filename}: {err.strerror or err}")
    except (KeyboardInterrupt, typer.Abort):
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    if isinstance(code, int) and code:
        raise SystemExit(code)
