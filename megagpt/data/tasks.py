"""Downstream tasks evaluated inside the training loop (`eval.tasks`), from local files.

Three kinds, told apart by the file's rows:

- multiple choice, JSONL rows `{"context": str, "choices": [str, ...], "answer": int}`:
  the choice with the highest log-likelihood given the context is the model's answer;
  `acc` counts right answers, `acc_norm` divides each choice's log-likelihood by its
  length in characters first (lm-evaluation-harness's acc and acc_norm).
- cloze, JSONL rows `{"context": str, "continuation": str}`: `acc` counts the
  continuations greedy decoding would produce exactly (every token the argmax), and
  `ppl` is the perplexity of the continuations (lm-eval's LAMBADA metrics).
- text, a `.txt` file (one document) or JSONL rows `{"text": str}`: `bpb`, the bits per
  UTF-8 byte of the whole text, scored in windows that predict every token once
  (lm-eval's loglikelihood_rolling: the first window starts with EOD).

Text is joined to continuations exactly as they are given (write a leading space into
the choices if the text needs one). Context and continuation are encoded as lm-eval
encodes them: whitespace at the end of the context moves to the continuation, the pair
is encoded whole, and the continuation's tokens are those after the context's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from megagpt.config.errors import ConfigError

KINDS = ("multiple_choice", "cloze", "text")


@dataclass
class Request:
    """One sequence to score: its tokens and how many of the last ones are scored."""

    tokens: list[int]
    scored: int  # the last `scored` tokens are predicted and counted


@dataclass
class Task:
    name: str
    kind: str
    path: Path
    rows: list[dict] = field(default_factory=list)


def load_task(spec: str) -> Task:
    """A task from `spec`: a path (the name is its stem) or NAME=PATH."""
    name, _, path = spec.rpartition("=")
    path = Path(path)
    name = name or path.name.split(".")[0]
    if not path.is_file():
        raise ConfigError(f"eval.tasks: {spec}: no such file")
    if path.suffix == ".txt":
        return Task(name, "text", path, [{"text": path.read_text(encoding="utf-8")}])
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as error:
            raise ConfigError(f"eval.tasks: {path}:{number}: not JSON ({error})") from None
        rows.append(_checked(row, path, number))
    if not rows:
        raise ConfigError(f"eval.tasks: {path} holds no rows")
    kinds = {_kind(row) for row in rows}
    if len(kinds) > 1:
        raise ConfigError(f"eval.tasks: {path} mixes rows of kinds {sorted(kinds)}; one per file")
    return Task(name, kinds.pop(), path, rows)


def _kind(row: dict) -> str:
    if "text" in row:
        return "text"
    return "multiple_choice" if "choices" in row else "cloze"


def _checked(row, path: Path, number: int) -> dict:
    where = f"eval.tasks: {path}:{number}"
    if not isinstance(row, dict):
        raise ConfigError(f"{where}: a row must be a JSON object")
    kind = _kind(row)
    wanted = {
        "multiple_choice": ("context", "choices", "answer"),
        "cloze": ("context", "continuation"),
        "text": ("text",),
    }[kind]
    missing = [key for key in wanted if key not in row]
    if missing:
        raise ConfigError(
            f"{where}: no {', '.join(missing)} (multiple choice rows need context, choices and "
            "answer; cloze rows context and continuation; text rows text)"
        )
    if kind == "multiple_choice":
        choices, answer = row["choices"], row["answer"]
        strings = isinstance(choices, list) and all(isinstance(c, str) for c in choices)
        if not (strings and len(choices) >= 2):
            raise ConfigError(f"{where}: choices must be a list of two or more strings")
        if not (isinstance(answer, int) and 0 <= answer < len(choices)):
            raise ConfigError(
                f"{where}: answer must be the index of a choice, 0-{len(choices) - 1}"
            )
    return row


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids), encoded as lm-evaluation-harness does."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context) if context else []
    if not context_ids:  # nothing to condition on: the document start, as in training
        return [tokenizer.eod_id], whole
    return whole[: len(context_ids)], whole[len(context_ids) :]


def pair_request(tokenizer, context: str, continuation: str, window: int) -> Request:
    """The request scoring `continuation` after `context`, keeping the last `window` + 1
    tokens (lm-eval keeps the end of a context that does not fit)."""
    context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
    tokens = (context_ids + continuation_ids)[-(window + 1) :]
    return Request(tokens, min(len(continuation_ids), window))


def rolling_requests(tokenizer, text: str, window: int) -> list[Request]:
    """Windows of at most `window` predicted tokens that together predict every token of
    `text` once, each with as much context before it as fits (lm-eval's rolling
    windows with context length 1): the first predicts from EOD."""
    ids = tokenizer.encode(text)
    requests = []
    start = 0
    while start < len(ids):
        end = min(len(ids), start + window)
        prefix = [tokenizer.eod_id] if start == 0 else []
        context = ids[max(0, end - window - 1) : start] if start else []
        tokens = [*prefix, *context, *ids[start:end]]
        requests.append(Request(tokens, end - start))
        start = end
    return requests
