"""What the data tools' command lines share: logging and error reporting."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from megagpt.errors import report_user_errors


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def run_tool(name: str, body: Callable[[], int | None]) -> int:
    """Run a tool's main body: a user error (MegagptError) prints one clear line and
    exits 2, as in every megagpt command; Ctrl-C says how to resume and exits 130."""
    return report_user_errors(name, body, "; rerun the same command to resume")
