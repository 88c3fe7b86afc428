"""User-facing errors: a user mistake becomes one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix (bad recipe value, missing file, unknown name).

    The message is printed as a single line by the CLI, which then exits with code 2.
    Write it so that it names the file, the key and what was expected.
    """

    exit_code = 2

    def __init__(self, message: str):
        text = str(message)
        if "Original Traceback" in text:  # raised in a DataLoader worker: torch re-raises it with the worker's
            last = text.rstrip().rsplit("\n", 1)[-1]  # traceback; the last line holds the message itself
            prefix = f"{type(self).__module__}.{type(self).__qualname__}: "
            if last.startswith(prefix):
                text = last[len(prefix):]
        super().__init__(" ".join(text.split()))  # one line, always
