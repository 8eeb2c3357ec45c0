"""The tokenizer's error, apart so that every backend can raise it."""

from __future__ import annotations

from pathlib import Path

from megagpt.errors import MegagptError


class TokenizerError(MegagptError):
    """A file named as a tokenizer is not one, or training had too little text."""


def not_a_tokenizer(path: Path, why: str) -> TokenizerError:
    """The one message for a file that neither backend can read."""
    return TokenizerError(
        f"{path} is not a sentencepiece model or a Hugging Face tokenizer.json ({why}); give "
        "the .model or .json file that megagpt-train-tokenizer wrote, or a model's tokenizer.json"
    )
