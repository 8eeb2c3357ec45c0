"""The tokenizer: a sentencepiece `.model` or a Hugging Face `tokenizer.json`, one API.

Documents are separated by EOD, which is the model's EOS id, as in Megatron's GPT data.
Either kind is accepted wherever a tokenizer is named (data.tokenizer, --tokenizer);
the file's content says which it is. Both are trained here: `Tokenizer.train`
(sentencepiece BPE or unigram, Llama's settings) and `Tokenizer.train_byte_bpe`
(GPT-2's byte-level BPE). Neither normalizes text, so decode(encode(text)) == text.
A chat template (chat_template.py) writes a conversation as ids and a loss mask.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

from megagpt.errors import MissingFileError
from megagpt.tokenizer.byte_bpe import train_byte_bpe
from megagpt.tokenizer.chat_messages import ExampleError
from megagpt.tokenizer.chat_template import ChatTemplate, TemplateError, load_chat_template
from megagpt.tokenizer.errors import TokenizerError
from megagpt.tokenizer.hf_json import CONFIG_NAME, HFTokenizerFile, config_beside
from megagpt.tokenizer.lines import MAX_LINE_BYTES, LineCounts, cut_line, training_lines
from megagpt.tokenizer.sentencepiece_model import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    SentencePieceModel,
    train_sentencepiece,
)

__all__ = [
    "BOS_ID",
    "EOS_ID",
    "ChatTemplate",
    "ExampleError",
    "MAX_LINE_BYTES",
    "PAD_ID",
    "TemplateError",
    "UNK_ID",
    "LineCounts",
    "Tokenizer",
    "TokenizerError",
    "cut_line",
    "load_chat_template",
    "tokenizer_files",
    "tokenizer_kind",
    "training_lines",
]

Kind = Literal["sentencepiece", "hf"]


def tokenizer_kind(path: str | Path) -> Kind:
    """Which kind of tokenizer file `path` is: "hf" for JSON (a tokenizer.json), else
    "sentencepiece" (a serialized model starts with a protobuf tag byte, never "{")."""
    with open(path, "rb") as f:
        head = f.read(64)
    return "hf" if head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"{") else "sentencepiece"


def tokenizer_files(path: str | Path) -> dict[str, Path]:
    """What a copy of the tokenizer at `path` (a checkpoint's) needs, by the names a
    model directory gives them: {"tokenizer.model": path}, or {"tokenizer.json":
    path} and the tokenizer_config.json that names its special tokens, if one is read."""
    path = Path(path)
    if tokenizer_kind(path) == "sentencepiece":
        return {"tokenizer.model": path}
    config = config_beside(path)
    return {"tokenizer.json": path, **({CONFIG_NAME: config} if config else {})}


class Tokenizer:
    """A sentencepiece model or a tokenizer.json, with the ids a GPT data pipeline needs."""

    def __init__(self, model_path: str | Path):
        self.path = Path(model_path)
        if not self.path.is_file():
            raise MissingFileError(
                f"tokenizer model {self.path} does not exist; train one with "
                "Tokenizer.train(...) or megagpt-train-tokenizer, or set data.tokenizer"
            )
        self.kind: Kind = tokenizer_kind(self.path)
        self._backend = (
            HFTokenizerFile(self.path) if self.kind == "hf" else SentencePieceModel(self.path)
        )
        self._continuation = None  # built on first use of encode_continuation

    @property
    def config_path(self) -> Path | None:
        """The tokenizer_config.json read beside a tokenizer.json, if any: it names the
        special tokens, so a copy of the tokenizer must take it along."""
        return getattr(self._backend, "config_path", None)

    @property
    def vocab_size(self) -> int:
        """One more than the largest id: the least model.vocab_size that fits."""
        return self._backend.vocab_size

    @property
    def bos_id(self) -> int:
        return self._backend.bos_id

    @property
    def eos_id(self) -> int:
        return self._backend.eos_id

    @property
    def eod_id(self) -> int:
        """End-of-document marker appended after every document."""
        return self._backend.eos_id

    @property
    def pad_id(self) -> int:
        return self._backend.pad_id

    @property
    def unk_id(self) -> int | None:
        """None for a byte-level BPE: every text is bytes it knows."""
        return self._backend.unk_id

    def encode(self, text: str) -> list[int]:
        """The ids of `text`, with no BOS/EOS added."""
        return self._backend.encode(text)

    def encode_continuation(self, text: str) -> list[int]:
        """The ids of `text` where it continues a text already encoded, with no BOS/EOS.

        sentencepiece puts a word start ("▁", its dummy prefix, which decode removes)
        in front of every text it encodes, so encode(a) + encode(b) decodes to a + " " +
        b; encode(a) + encode_continuation(b) decodes to a + b, and equals encode(a + b)
        wherever no token would span the join. A chat is encoded so, a segment at a time
        (see chat_template). For a tokenizer.json this is encode: a byte-level BPE adds
        nothing (one that does fails ChatTemplate.check, which decodes a sample chat).
        """
        if self.kind == "hf":
            return self._backend.encode(text)
        if self._continuation is None:
            self._continuation = _without_dummy_prefix(self._backend.sp)
        return self._continuation.encode(text)

    def encode_prompt(self, text: str) -> list[int]:
        """Ids that start a new document with `text`: training data separates documents
        with EOD, so EOD (not BOS) is what the model has seen before a document."""
        return [self.eod_id, *self._backend.encode(text)]

    def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]:
        """Encode many texts at once. sentencepiece spreads them over `num_threads`
        threads (-1: all cores); the tokenizers library over its own pool, sized once per
        process by RAYON_NUM_THREADS (TOKENIZERS_PARALLELISM=false: one thread)."""
        return self._backend.encode_batch(texts, num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        return self._backend.decode(ids)

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary entry of `token_id`, as the backend spells it."""
        return self._backend.id_to_piece(token_id)

    def piece_to_id(self, piece: str) -> int | None:
        """The id of a vocabulary entry, or None if `piece` is not one."""
        return self._backend.piece_to_id(piece)

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
        train_sentencepiece(
            texts,
            model_path,
            vocab_size,
            model_type,
            byte_fallback,
            user_defined_symbols,
            max_sentences,
            num_threads,
        )
        return cls(model_path)

    @classmethod
    def train_byte_bpe(
        cls,
        texts: Iterable[str],
        path: str | Path,
        vocab_size: int,
        user_defined_symbols: Sequence[str] = (),
        max_sample_chars: int = 1_000_000_000,
    ) -> Tokenizer:
        """Train a byte-level BPE (GPT-2's kind) from an iterator of texts and save it as
        a tokenizer.json.

        Texts are cut at line ends into pieces of at most 4,096 characters, whitespace
        kept, and a uniform random sample of at most `max_sample_chars` characters of
        them is trained on, so memory stays bounded whatever the iterator yields. Ids 0
        and 1 are <|endoftext|> (EOD, EOS and BOS) and <|pad|>; `user_defined_symbols`
        come last and always stay one token. Any text encodes (every byte is in the
        vocabulary) and decodes back exactly.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        train_byte_bpe(texts, path, vocab_size, user_defined_symbols, max_sample_chars)
        return cls(path)


def _without_dummy_prefix(processor):
    """A copy of a sentencepiece processor that adds no "▁" in front of a text."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2  # needs protobuf (tensorboard's too)

    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(processor.serialized_model_proto())
    model.normalizer_spec.add_dummy_prefix = False
    return spm.SentencePieceProcessor(model_proto=model.SerializeToString())
