"""Chat templates: how a conversation becomes tokens, and which of those are trained.

A template has a name and a version (megagpt-chat-v1), and is saved as JSON beside the
data it rendered and in every checkpoint trained on that data, so generation renders a
chat exactly as training saw it.

The loss mask is built from the structure, never from the text: each segment (a role's
prefix, a message's content, the turn's end) is tokenized on its own and the pieces are
concatenated, each with the mask of what it is. Nothing searches the rendered text for
markers, so a template without generation markers cannot silently train prompt tokens:
a template whose assistant turn has no place for the reply is refused instead.

The mask convention, shared with the trainer: mask[i] == 1 means token i is a training
target (the model is trained to predict token i from tokens < i).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megagpt.errors import MegagptError
from megagpt.tokenizer.chat_messages import ROLES, ExampleError, check_markers, parse_messages
from megagpt.utils.files import atomic_write

if TYPE_CHECKING:
    from megagpt.tokenizer import Tokenizer

CONTENT = "{content}"
"""Where a message's content goes in a role's turn."""
FIELD_DEFAULTS = ("generation_prompt", "markers", "append_eod", "prompt_completion")
"""The keys a template file may leave out (see ChatTemplate.load)."""
PROMPT_COMPLETION_STYLES = ("chat", "text")
DEFAULT_TEMPLATE = "megagpt-chat"


class TemplateError(MegagptError):
    """A chat template that is malformed or that the tokenizer cannot spell."""


@dataclass(frozen=True)
class ChatTemplate:
    """A named, versioned way to write a conversation as tokens.

    Attributes:
        name: The template's name, e.g. "megagpt-chat".
        version: Its version; a changed rendering is a new version, never the same one.
        system: How a system turn is written: text with one "{content}" where the
            message goes. What precedes it is the role's prefix, what follows the turn's
            end, e.g. "<|system|>\\n{content}<|end|>\\n".
        user: The same for a user turn.
        assistant: The same for an assistant turn; its content and end are trained.
        generation_prompt: What starts an assistant reply at inference (the assistant
            turn's prefix, for the built-in templates).
        markers: Strings that must each be exactly one token of the tokenizer (`check`).
        append_eod: Whether EOD follows the last turn; it is trained when that turn is a
            trained assistant turn, so the model learns where an example ends.
        prompt_completion: How a {"prompt": ..., "completion": ...} row is written:
            "chat" as a user turn and an assistant turn, "text" as the prompt text
            followed at once by the completion text (TRL's convention for plain text).
    """

    name: str
    version: int
    system: str
    user: str
    assistant: str
    generation_prompt: str
    markers: tuple[str, ...] = ()
    append_eod: bool = True
    prompt_completion: str = "chat"

    def __post_init__(self) -> None:
        label = f"chat template {self.name!r}"
        if not isinstance(self.name, str) or not self.name.strip():
            raise TemplateError(f"{label}: give it a non-empty name")
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 1:
            raise TemplateError(f"{label}: version {self.version!r} must be an integer >= 1")
        for role in ROLES:
            turn = getattr(self, role)
            if not isinstance(turn, str) or turn.count(CONTENT) != 1:
                why = (
                    "so no token of a reply could be trained"
                    if role == "assistant"
                    else "so its messages would be lost"
                )
                raise TemplateError(
                    f"{label}: the {role} turn {turn!r} must contain {CONTENT} exactly once "
                    f"(where the message goes), {why}; e.g. "
                    f"{MEGAGPT_CHAT_V1_TURNS[role]!r}"
                )
        if not isinstance(self.generation_prompt, str) or not isinstance(self.append_eod, bool):
            raise TemplateError(f"{label}: generation_prompt is text, append_eod true or false")
        if self.prompt_completion not in PROMPT_COMPLETION_STYLES:
            raise TemplateError(
                f"{label}: prompt_completion {self.prompt_completion!r} must be one of "
                f"{', '.join(PROMPT_COMPLETION_STYLES)}"
            )
        if not all(isinstance(m, str) and m for m in self.markers):
            raise TemplateError(f"{label}: markers must be non-empty strings")

    @property
    def full_name(self) -> str:
        """name-vN, as --chat-template accepts it."""
        return f"{self.name}-v{self.version}"

    def prefix(self, role: str) -> str:
        return getattr(self, role).split(CONTENT)[0]

    def end(self, role: str) -> str:
        return getattr(self, role).split(CONTENT)[1]

    def render(
        self, tokenizer: Tokenizer, messages: Sequence[Any], context_turns: int = 0
    ) -> tuple[list[int], list[int]]:
        """The ids of a conversation and its loss mask (1: a training target).

        Each segment is tokenized on its own: the first as the start of a document
        (`tokenizer.encode`), the rest as continuations (`encode_continuation`), so the
        ids are those of the rendered text (`text`). The mask is 1 exactly on the content
        and the end of assistant turns (so the model learns to stop), and on the final
        EOD after a trained assistant turn; 0 on role prefixes and on system and user
        turns. The first `context_turns` turns are context only, assistant ones
        included (the prompt of a conversational prompt/completion row).

        Raises:
            ExampleError: The messages are malformed, or nothing in them is trained.
        """
        turns = parse_messages(messages, self.markers)
        trained = [
            i for i, (role, _) in enumerate(turns) if role == "assistant" and i >= context_turns
        ]
        if not trained:
            raise ExampleError("no_supervised_token", "no assistant turn to train on")
        for i in trained:
            if not turns[i][1].strip():
                raise ExampleError("empty_completion", f"assistant turn {i + 1} is empty")
        segments = self._turn_segments(turns, set(trained))
        ending_trained = trained[-1] == len(turns) - 1
        return self._encode(tokenizer, segments, ending_trained)

    def render_completion(
        self, tokenizer: Tokenizer, prompt: str, completion: str
    ) -> tuple[list[int], list[int]]:
        """The ids and mask of a prompt/completion pair (see `prompt_completion`)."""
        for key, value in (("prompt", prompt), ("completion", completion)):
            if not isinstance(value, str):
                raise ExampleError("bad_messages", f"{key} is a {type(value).__name__}")
        if self.prompt_completion == "chat":
            return self.render(tokenizer, [_turn("user", prompt), _turn("assistant", completion)])
        check_markers(prompt, self.markers, "the prompt")
        check_markers(completion, self.markers, "the completion")
        if not completion.strip():
            raise ExampleError("empty_completion", "the completion is empty")
        return self._encode(tokenizer, [(prompt, False), (completion, True)], True)

    def render_prompt(self, tokenizer: Tokenizer, messages: Sequence[Any]) -> list[int]:
        """Ids for generating the next assistant reply: the conversation so far and the
        generation prompt, exactly as a training example begins (the fine-tuning packer
        starts every example at position 0, with nothing before it)."""
        turns = parse_messages(messages, self.markers)
        segments = [*self._turn_segments(turns, set()), (self.generation_prompt, False)]
        ids, _ = self._encode(tokenizer, segments, False, eod=False)
        return ids

    def text(self, messages: Sequence[Any]) -> str:
        """The rendered text of a conversation, without EOD (for reading and tests)."""
        turns = parse_messages(messages, self.markers)
        return "".join(text for text, _ in self._turn_segments(turns, set()))

    def _turn_segments(self, turns, trained: set[int]) -> list[tuple[str, bool]]:
        segments = []
        for i, (role, content) in enumerate(turns):
            segments += [
                (self.prefix(role), False),
                (content, i in trained),
                (self.end(role), i in trained),
            ]
        return segments

    def _encode(self, tokenizer, segments, ending_trained: bool, eod: bool = True):
        ids: list[int] = []
        mask: list[int] = []
        for text, trained in segments:
            if not text:
                continue
            piece = tokenizer.encode_continuation(text) if ids else tokenizer.encode(text)
            ids += piece
            mask += [int(trained)] * len(piece)
        if eod and self.append_eod:
            ids.append(tokenizer.eod_id)
            mask.append(int(ending_trained))
        return ids, mask

    def check(self, tokenizer: Tokenizer) -> None:
        """Refuse a tokenizer this template cannot be used with.

        Every marker must encode to exactly one id that decodes back to it and is not
        EOD (which separates examples, so it must never end a turn), and a sample
        conversation must decode to the template's text.

        Raises:
            TemplateError: Naming the markers missing and what would work.
        """
        missing, eod = [], []
        for marker in self.markers:
            ids = tokenizer.encode_continuation(marker)
            if len(ids) != 1 or tokenizer.decode(ids) != marker:
                missing.append(f"{marker} ({len(ids)} tokens)")
            elif ids[0] == tokenizer.eod_id:
                eod.append(marker)
        if missing:
            specials = ",".join(self.markers)
            raise TemplateError(
                f"chat template {self.full_name}: the tokenizer {tokenizer.path} does not "
                f"have {', '.join(missing)} as single tokens. Train a tokenizer with them "
                f"(megagpt-train-tokenizer --special-tokens '{specials}', either --type), or "
                "use --chat-template plain, which needs no markers"
            )
        if eod:
            raise TemplateError(
                f"chat template {self.full_name}: {', '.join(eod)} is the tokenizer's EOD, "
                "which separates examples; a turn must end with a token of its own"
            )
        sample = [_turn("system", "Be brief."), _turn("user", "Hi"), _turn("assistant", "Yes")]
        ids, _ = self.render(tokenizer, sample)
        expected, got = self.text(sample), tokenizer.decode(ids)
        if got != expected:
            raise TemplateError(
                f"chat template {self.full_name}: with the tokenizer {tokenizer.path}, a "
                f"conversation rendered a segment at a time decodes to {got!r}, not "
                f"{expected!r}: the tokenizer cannot spell the template's text as it is, or "
                "changes a text where it is joined to another; use another template or "
                "tokenizer"
            )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "roles": {role: getattr(self, role) for role in ROLES},
            "generation_prompt": self.generation_prompt,
            "markers": list(self.markers),
            "append_eod": self.append_eod,
            "prompt_completion": self.prompt_completion,
        }

    def save(self, path: str | Path) -> None:
        atomic_write(path, json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ChatTemplate:
        """A template saved by `save`, or written by hand in the same form; "markers",
        "append_eod" (default true), "prompt_completion" (default "chat") and
        "generation_prompt" (default: the assistant turn's prefix) may be left out."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as error:
            raise TemplateError(f"chat template {path}: {error.strerror}") from None
        except ValueError as error:
            raise TemplateError(f"chat template {path} is not valid JSON: {error}") from None
        try:
            return cls.from_json(data)
        except TemplateError as error:
            raise TemplateError(f"{path}: {error}") from None

    @classmethod
    def from_json(cls, data: Any) -> ChatTemplate:
        if not isinstance(data, dict):
            raise TemplateError("a chat template is a JSON object")
        known = ("name", "version", "roles", *FIELD_DEFAULTS)
        unknown = sorted(set(data) - set(known))
        if unknown:  # a misspelt optional key would silently be its default
            raise TemplateError(f"unknown key(s) {unknown}; the keys are {', '.join(known)}")
        roles = _field(data, "roles", dict)
        for role in ROLES:
            if role not in roles:
                raise TemplateError(
                    f'"roles" has no "{role}" turn'
                    + (": without one no token could be trained" if role == "assistant" else "")
                    + f'; e.g. "{role}": {json.dumps(MEGAGPT_CHAT_V1_TURNS[role])}'
                )
        unknown = sorted(set(roles) - set(ROLES))
        if unknown:
            raise TemplateError(f'"roles" has {unknown}; the roles are {", ".join(ROLES)}')
        assistant = roles["assistant"]
        default_prompt = assistant.split(CONTENT)[0] if isinstance(assistant, str) else ""
        return cls(
            name=_field(data, "name", str),
            version=_field(data, "version", int),
            **{role: roles[role] for role in ROLES},
            generation_prompt=_field(data, "generation_prompt", str, default_prompt),
            markers=tuple(_field(data, "markers", list, [])),
            append_eod=_field(data, "append_eod", bool, True),
            prompt_completion=_field(data, "prompt_completion", str, "chat"),
        )


def _field(data: dict, key: str, kind: type, default: Any = ...) -> Any:
    if key not in data:
        if default is ...:
            raise TemplateError(f'the key "{key}" is missing')
        return default
    value = data[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TemplateError(f'"{key}" must be a JSON {kind.__name__}, not {json.dumps(value)}')
    return value


def _turn(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


MEGAGPT_CHAT_V1_TURNS = {role: f"<|{role}|>\n{CONTENT}<|end|>\n" for role in ROLES}

BUILTIN: dict[tuple[str, int], ChatTemplate] = {
    ("megagpt-chat", 1): ChatTemplate(
        name="megagpt-chat",
        version=1,
        **MEGAGPT_CHAT_V1_TURNS,
        generation_prompt="<|assistant|>\n",
        markers=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
    ),
    # For tokenizers without chat markers (e.g. an imported GPT-2).
    ("plain", 1): ChatTemplate(
        name="plain",
        version=1,
        system=f"System: {CONTENT}\n",
        user=f"User: {CONTENT}\n",
        assistant=f"Assistant: {CONTENT}\n",
        generation_prompt="Assistant: ",
        prompt_completion="text",
    ),
}
"""The built-in templates by (name, version); a new rendering is a new version."""


def load_chat_template(spec: str | Path) -> ChatTemplate:
    """A built-in template by name (its newest version) or by name-vN, or a template
    JSON file.

    Raises:
        TemplateError: No such template, or a malformed file.
    """
    spec = str(spec)
    if spec.endswith(".json") or Path(spec).is_file():
        return ChatTemplate.load(spec)
    versioned = re.fullmatch(r"(.+)-v(\d+)", spec)
    name, version = (versioned[1], int(versioned[2])) if versioned else (spec, None)
    versions = sorted(v for n, v in BUILTIN if n == name)
    if version is None and versions:
        version = versions[-1]
    if (name, version) not in BUILTIN:
        known = ", ".join(f"{n}, {n}-v{v}" for n, v in BUILTIN)
        raise TemplateError(
            f"--chat-template {spec}: no such template; the built-in ones are {known}, or "
            "give a template .json file"
        )
    return BUILTIN[(name, version)]
