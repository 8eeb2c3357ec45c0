"""What the data tools' command lines share: logging and error reporting."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def run_tool(
    name: str, body: Callable[[], int | None], user_errors: tuple[type[BaseException], ...]
) -> int:
    """Run a tool's main body; a user error prints one clear line and exits 1."""
    try:
        return body() or 0
    except user_errors as error:
        print(f"{name}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{name}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
