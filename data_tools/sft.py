"""--format sft: chat and prompt/completion rows into tokens and a loss mask.

Rows follow TRL's conventions: {"messages": [{"role", "content"}, ...]}, or
{"prompt": str, "completion": str}, or a conversational prompt/completion
({"prompt": [turns], "completion": [turns]}, where only the completion's assistant
turns are trained). A chat template renders each (megagpt/tokenizer/chat_template.py),
building the mask segment by segment; the example is written as one document of the
token shard and, with the same length, of the mask shard.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from data_tools.labeled_rows import RowDrop
from data_tools.reasons import Reason
from megagpt.data.labeled_format import MASK_SUFFIX, TEMPLATE_FILE_SUFFIX
from megagpt.tokenizer import Tokenizer
from megagpt.tokenizer.chat_messages import ExampleError
from megagpt.tokenizer.chat_template import ChatTemplate


class SftExamples:
    """Turns rows into (ids, mask); counts what a summary reports."""

    format = "sft"
    side_suffix = MASK_SUFFIX
    side_dtype = np.uint8

    def __init__(
        self,
        tokenizer: Tokenizer,
        template: ChatTemplate,
        max_tokens: int | None,
        overlong: str,
    ):
        template.check(tokenizer)  # before anything is written
        self.tokenizer, self.template = tokenizer, template
        # A truncated example loses its EOD: readers take examples from the index.
        self.eod_appended = template.append_eod
        self.max_tokens, self.overlong = max_tokens, overlong
        self.supervised_tokens = 0
        self.truncated = 0
        self.shapes: Counter[str] = Counter()  # rows kept, by kind

    def example(self, row: dict[str, Any]) -> tuple[list[int], list[int]]:
        """The ids and mask of one row.

        Raises:
            RowDrop: The row is malformed, has nothing to train, or is too long.
        """
        try:
            ids, mask, shape = self._render(row)
        except ExampleError as error:
            raise RowDrop(Reason[error.reason.upper()], error.detail) from None
        if self.max_tokens is not None and len(ids) > self.max_tokens:
            if self.overlong == "drop":
                raise RowDrop(
                    Reason.TOO_LONG, f"{len(ids):,} tokens > --max-tokens {self.max_tokens:,}"
                )
            ids, mask = ids[: self.max_tokens], mask[: self.max_tokens]
            if not any(mask):
                raise RowDrop(
                    Reason.NO_SUPERVISED_TOKEN,
                    f"no trained token in the first {self.max_tokens:,} (--overlong truncate)",
                )
            self.truncated += 1
        self.supervised_tokens += sum(mask)
        self.shapes[shape] += 1
        return ids, mask

    def _render(self, row: dict[str, Any]) -> tuple[list[int], list[int], str]:
        has_messages = "messages" in row
        has_pair = "prompt" in row or "completion" in row
        if has_messages and has_pair:
            raise ExampleError("bad_messages", "both messages and prompt/completion")
        if has_messages:
            return (*self.template.render(self.tokenizer, row["messages"]), "messages")
        if not has_pair:
            raise ExampleError(
                "bad_messages", f"neither messages nor prompt/completion (keys: {list(row)[:5]})"
            )
        prompt, completion = row.get("prompt"), row.get("completion")
        if isinstance(prompt, list) and isinstance(completion, list):
            ids, mask = self.template.render(
                self.tokenizer, prompt + completion, context_turns=len(prompt)
            )
            return ids, mask, "conversational_prompt_completion"
        if prompt is None or completion is None:
            missing = "prompt" if prompt is None else "completion"
            raise ExampleError("bad_messages", f"no {missing}")
        if isinstance(prompt, list) or isinstance(completion, list):
            raise ExampleError("bad_messages", "prompt and completion: both strings or both lists")
        ids, mask = self.template.render_completion(self.tokenizer, prompt, completion)
        return ids, mask, "prompt_completion"

    def write_files(self, prefix: str) -> dict[str, Any]:
        """Save the template beside the output; the manifest's fields of this format."""
        path = Path(prefix + TEMPLATE_FILE_SUFFIX)
        self.template.save(path)
        return {
            "format": self.format,
            "chat_template": {
                "name": self.template.name,
                "version": self.template.version,
                "file": path.name,
            },
            "mask_suffix": MASK_SUFFIX,
        }

    def side_files(self, prefix: str) -> list[Path]:
        return [Path(prefix + TEMPLATE_FILE_SUFFIX)]

    def summary(self) -> dict[str, Any]:
        return {
            "supervised_tokens": self.supervised_tokens,
            "truncated": self.truncated,
            "rows_kept": dict(sorted(self.shapes.items())),
            "chat_template": {"name": self.template.name, "version": self.template.version},
        }
