"""The sentencepiece backend: load a .model file, or train one from an iterator of texts."""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

from megagpt.tokenizer.errors import TokenizerError, not_a_tokenizer
from megagpt.tokenizer.lines import MAX_LINE_BYTES, LineCounts, training_lines
from megagpt.utils.files import atomic_write

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
"""The ids models trained here give their special pieces."""


class SentencePieceModel:
    """A sentencepiece .model file. Models trained here reserve PAD; for other models
    PAD falls back to EOS."""

    def __init__(self, path: Path):
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as error:  # "could not parse ModelProto", ...
            raise not_a_tokenizer(path, str(error).strip()) from None
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id
        self.unk_id = self.sp.unk_id() if self.sp.unk_id() >= 0 else None

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int) -> list[list[int]]:
        return self.sp.encode(list(texts), num_threads=num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        return self.sp.id_to_piece(token_id)

    def piece_to_id(self, piece: str) -> int | None:
        token_id = self.sp.piece_to_id(piece)  # unknown pieces get unk's id
        return token_id if self.sp.id_to_piece(token_id) == piece else None


def train_sentencepiece(
    texts: Iterable[str],
    model_path: Path,
    vocab_size: int,
    model_type: str,
    byte_fallback: bool,
    user_defined_symbols: Sequence[str],
    max_sentences: int,
    num_threads: int | None,
) -> None:
    """Train a sentencepiece model and write it to `model_path` (see Tokenizer.train)."""
    buffer = io.BytesIO()
    counts = LineCounts()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=training_lines(texts, counts),
            model_writer=buffer,
            max_sentence_length=MAX_LINE_BYTES,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=byte_fallback,
            character_coverage=0.9995,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=PAD_ID,
            user_defined_symbols=list(user_defined_symbols),
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as error:  # e.g. "!sentences_.empty()", or vocabulary too large
        raise TokenizerError(
            f"sentencepiece could not train a model of {vocab_size:,} pieces: "
            f"{str(error).strip().rstrip('.')}. It was given {counts.describe()}; use "
            "more text or a smaller vocabulary"
        ) from None
    atomic_write(model_path, buffer.getvalue())  # a half-written model never appears
