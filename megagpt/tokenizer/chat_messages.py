"""The messages of a conversation, TRL's way: a list of {"role", "content"} turns, and
why one cannot be rendered."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from megagpt.errors import MegagptError

ROLES = ("system", "user", "assistant")


class ExampleError(MegagptError):
    """One conversation that cannot be rendered; `reason` names why, as a drop reason
    of megagpt-preprocess (bad_messages, unknown_role, empty_completion,
    no_supervised_token, marker_in_content)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def parse_messages(messages: Any, markers: Sequence[str] = ()) -> list[tuple[str, str]]:
    """(role, content) of each message of a TRL-style list of {"role", "content"}.

    Raises:
        ExampleError: Not such a list (bad_messages), a role other than system, user
            and assistant (unknown_role), or a content holding a marker, which would
            forge or end a turn (marker_in_content).
    """
    if not isinstance(messages, list) or not messages:
        shape = "an empty list" if messages == [] else f"a {type(messages).__name__}"
        raise ExampleError("bad_messages", f"messages is {shape}, not a list of turns")
    turns = []
    for number, message in enumerate(messages, 1):
        if not isinstance(message, Mapping):
            raise ExampleError("bad_messages", f"turn {number} is a {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise ExampleError(
                "bad_messages", f"turn {number} needs a string role and a string content"
            )
        if role not in ROLES:
            raise ExampleError("unknown_role", f"turn {number} has role {role!r}")
        check_markers(content, markers, f"turn {number}")
        turns.append((role, content))
    return turns


def check_markers(content: str, markers: Sequence[str], where: str) -> None:
    """Refuse a content holding a template marker: in a reply, it would teach the model
    to end its turn there; in a prompt, it would forge a turn."""
    for marker in markers:
        if marker in content:
            raise ExampleError("marker_in_content", f"{where} contains {marker}")
