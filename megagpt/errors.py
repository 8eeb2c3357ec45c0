"""The one base class for mistakes a user can make, and how commands report them.

Every error that means "what you asked for cannot be done as asked" (a setting, a
path, a checkpoint, an input file, a launch option) derives from `MegagptError`, and
its message names the setting, file or line and what would work. Commands catch this
class alone: they print the message on one line and exit with `USER_ERROR_EXIT_CODE`.
Anything else is a bug or a failure of the machine and keeps its traceback.

This module imports nothing, so every layer (config at the bottom, data_tools beside
it) can derive its errors from it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

USER_ERROR_EXIT_CODE = 2
"""Exit status of every megagpt command stopped by a MegagptError (as argparse's usage
errors, so a wrapper script tells "fix the command" from a crash, which exits 1)."""


class MegagptError(Exception):
    """Something the user asked for cannot be done as asked; the message says why."""


class MissingFileError(MegagptError, FileNotFoundError):
    """A file or directory the user named (or that a setting names) does not exist."""


INTERRUPTED_EXIT_CODE = 130
"""Exit status after Ctrl-C (128 + SIGINT, as a shell reports it)."""


def report_user_errors(
    program: str, body: Callable[[], int | None], after_interrupt: str = ""
) -> int:
    """Run a command's body: its exit code; or the message of a MegagptError on one
    line of stderr and USER_ERROR_EXIT_CODE; or, on Ctrl-C, "interrupted" (followed by
    `after_interrupt`, e.g. how to resume) and INTERRUPTED_EXIT_CODE. Other exceptions
    propagate unchanged."""
    try:
        return body() or 0
    except MegagptError as error:
        print(f"{program}: error: {error}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    except KeyboardInterrupt:
        print(f"{program}: interrupted{after_interrupt}", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
