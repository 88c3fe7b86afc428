"""User-facing errors: a user mistake becomes one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix (bad recipe value, missing file, unknown name).

    The message is printed as a single line by the CLI, which then exits with code 2.
    Write it so that it names the file, the key and what was expected.
    """

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # one line, always
