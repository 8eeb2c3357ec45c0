"""A small wrapper over sentencepiece: train, encode in batches, decode, special ids.

Documents are separated by EOD, which is the model's EOS id, as in Megatron's GPT
data. Models trained here also reserve PAD; for other models PAD falls back to EOS.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

from megagpt.errors import MegagptError, MissingFileError
from megagpt.utils.files import atomic_write

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3


class TokenizerError(MegagptError):
    """A file named as a tokenizer is not one."""


class Tokenizer:
    """A sentencepiece model with the ids a GPT data pipeline needs."""

    def __init__(self, model_path: str | Path):
        self.path = Path(model_path)
        if not self.path.is_file():
            raise MissingFileError(
                f"tokenizer model {self.path} does not exist; train one with "
                "Tokenizer.train(...) or megagpt-train-tokenizer, or set data.tokenizer"
            )
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as error:  # "could not parse ModelProto", ...
            raise TokenizerError(
                f"{self.path} is not a sentencepiece model ({str(error).strip()}); give the "
                ".model file that megagpt-train-tokenizer (or sentencepiece) wrote"
            ) from None

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def eod_id(self) -> int:
        """End-of-document marker appended after every document."""
        return self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        pad = self.sp.pad_id()
        return pad if pad >= 0 else self.sp.eos_id()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_prompt(self, text: str) -> list[int]:
        """Ids that start a new document with `text`: training data separates documents
        with EOD, so EOD (not BOS) is what the model has seen before a document."""
        return [self.eod_id, *self.sp.encode(text)]

    def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]:
        """Encode many texts at once; sentencepiece spreads them over `num_threads`
        threads (-1: all cores)."""
        return self.sp.encode(list(texts), num_threads=num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        model_path: str | Path,
        vocab_size: int,
        model_type: str = "bpe",
        byte_fallback: bool = True,
        user_defined_symbols: Sequence[str] = (),
        max_sentences: int = 2_000_000,
        num_threads: int | None = None,
    ) -> Tokenizer:
        """Train a sentencepiece model from an iterator of texts and save it.

        Each text is split into lines, which are what sentencepiece samples from; at
        most `max_sentences` of them are kept (uniformly at random) so memory stays
        bounded whatever the iterator yields. sentencepiece silently skips lines longer
        than MAX_LINE_BYTES, so a corpus of one-line documents (scraped or exported
        text) would leave it nothing: longer lines are cut at sentence ends or spaces
        into pieces below that, each sampled like any other line.

        Text is kept as it is (Llama's settings): no Unicode normalization, repeated
        spaces kept, digits split one per piece, and characters never seen in training
        (the newline among them, since training reads lines) encoded as bytes. So
        decode(encode(text)) == text, and the model converts exactly to a Hugging Face
        tokenizer.
        """
        model_path = Path(model_path)
        model_path.parent.mkdir(parents=True, exist_ok=True)
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
        return cls(model_path)


MAX_LINE_BYTES = 4192
"""sentencepiece's max_sentence_length: it skips longer lines without a word."""
_CUT = (b". ", b"! ", b"? ", b"; ", "\u3002".encode())  # sentence ends, best first


@dataclass
class LineCounts:
    """What tokenizer training was given, for messages when it is too little."""

    texts: int = 0
    lines: int = 0
    long_lines: int = 0
    pieces: int = 0
    bytes: int = 0

    def describe(self) -> str:
        cut = (
            f", {self.long_lines:,} of them longer than {MAX_LINE_BYTES:,} bytes and cut into "
            f"{self.pieces:,} pieces"
            if self.long_lines
            else ""
        )
        return (
            f"{self.lines:,} non-empty lines ({self.bytes:,} bytes) from {self.texts:,} texts{cut}"
        )


def training_lines(texts: Iterable[str], counts: LineCounts | None = None) -> Iterator[str]:
    """The lines of `texts` as sentencepiece trains on them: stripped, non-empty, and
    none longer than MAX_LINE_BYTES (longer ones cut by `cut_line`)."""
    counts = counts if counts is not None else LineCounts()
    for text in texts:
        counts.texts += 1
        for line in text.splitlines():
            line = line.strip()
            if not line:
                continue
            counts.lines += 1
            data = line.encode("utf-8")
            counts.bytes += len(data)
            if len(data) <= MAX_LINE_BYTES:
                yield line
                continue
            counts.long_lines += 1
            for piece in cut_line(data, MAX_LINE_BYTES):
                counts.pieces += 1
                yield piece


def cut_line(data: bytes, limit: int) -> Iterator[str]:
    """UTF-8 `data` as pieces of at most `limit` bytes, each ending at the last sentence
    end in its window, else at the last space, else at a character boundary."""
    start = 0
    while len(data) - start > limit:
        window = data[start : start + limit]
        cut = max(window.rfind(mark) + len(mark) for mark in _CUT)
        if cut < limit // 2:  # no sentence end in the second half: the last space
            cut = window.rfind(b" ") + 1
        if cut < limit // 2:  # no space either (a URL, base64, CJK): a character boundary
            cut = limit
            while cut > 0 and data[start + cut] & 0xC0 == 0x80:  # inside a character
                cut -= 1
        piece = data[start : start + cut].decode("utf-8").strip()
        if piece:
            yield piece
        start += cut
    piece = data[start:].decode("utf-8").strip()
    if piece:
        yield piece
