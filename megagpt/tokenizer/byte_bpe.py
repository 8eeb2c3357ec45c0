"""Training a byte-level BPE (GPT-2's kind, as Llama 3 and most current models use) with
the Hugging Face `tokenizers` library.

Every text is first bytes (UTF-8), shown to the BPE as 256 printable characters, so any
text encodes with no unknown token and decodes back exactly: the 256 bytes are in the
vocabulary from the start, and nothing is normalized. Words are split by GPT-2's regex,
a space kept at the front of the word it precedes (no space is added to the text).
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from megagpt.tokenizer.errors import TokenizerError
from megagpt.utils.files import atomic_write

END_OF_TEXT, PAD = "<|endoftext|>", "<|pad|>"
"""Our special tokens, ids 0 and 1: EOD (= EOS = BOS, as GPT-2's) and padding."""
PIECE_CHARS = 4096
"""Texts are sampled in pieces of at most this many characters, cut at line ends."""


@dataclass
class SampleCounts:
    """What byte-level BPE training was given, for messages when it is too little."""

    texts: int = 0
    characters: int = 0
    pieces: int = 0
    sampled_characters: int = 0

    def describe(self) -> str:
        sampled = (
            f", of which a sample of {self.sampled_characters:,} was kept"
            if self.sampled_characters < self.characters
            else ""
        )
        return f"{self.characters:,} characters from {self.texts:,} texts{sampled}"


def train_byte_bpe(
    texts: Iterable[str],
    path: Path,
    vocab_size: int,
    user_defined_symbols: Sequence[str],
    max_sample_chars: int,
) -> None:
    """Train a byte-level BPE of `vocab_size` ids on a random sample of `texts` of at
    most `max_sample_chars` characters, and write it to `path` as a tokenizer.json."""
    fixed = 256 + 2 + len(user_defined_symbols)
    if vocab_size <= fixed:
        raise TokenizerError(
            f"a byte-level BPE of {vocab_size:,} ids has no room to learn: the 256 bytes, "
            f"{END_OF_TEXT}, {PAD} and {len(user_defined_symbols)} special symbol(s) take "
            f"{fixed:,}; ask for more (e.g. 32000)"
        )
    counts = SampleCounts()
    sample = sample_pieces(texts, max_sample_chars, counts)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(user_defined_symbols),
        special_tokens=[END_OF_TEXT, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(sample, trainer, length=len(sample))
    # Plain added tokens: matched in text and never split, as sentencepiece's
    # user-defined symbols (special ones would be encoded as text, see hf_json).
    tokenizer.add_tokens(list(user_defined_symbols))
    learned = tokenizer.get_vocab_size(with_added_tokens=True)
    if learned < vocab_size:
        raise TokenizerError(
            f"byte-level BPE training found only {learned:,} of the {vocab_size:,} ids asked "
            f"for: it was given {counts.describe()}; use more text or a smaller vocabulary"
        )
    atomic_write(path, tokenizer.to_str(pretty=True))  # a half-written file never appears


def sample_pieces(texts: Iterable[str], max_chars: int, counts: SampleCounts) -> list[str]:
    """A uniform random sample of the pieces of `texts` (see `text_pieces`) of at most
    `max_chars` characters in all, read in one pass with memory bounded by the sample.

    Every piece gets a random key and those with the smallest keys are kept: a heap
    holds the sample, and drops its largest key whenever the sample is over budget.
    """
    rng = random.Random(0)  # the same corpus gives the same tokenizer
    heap: list[tuple[float, str]] = []  # (-key, piece): heap[0] has the largest key
    total = 0
    for text in texts:
        counts.texts += 1
        counts.characters += len(text)
        for piece in text_pieces(text):
            counts.pieces += 1
            key = rng.random()
            if total + len(piece) > max_chars and heap and key > -heap[0][0]:
                continue  # it would be the first piece dropped
            heapq.heappush(heap, (-key, piece))
            total += len(piece)
            while total > max_chars:
                total -= len(heapq.heappop(heap)[1])
    counts.sampled_characters = total
    return [piece for _, piece in heap]


def text_pieces(text: str, limit: int = PIECE_CHARS) -> Iterator[str]:
    """`text` in pieces of at most `limit` characters, whitespace kept (newlines and
    indentation are tokens too): cut after the last newline in the second half of the
    window, else before its last space (which belongs to the next word), else anywhere."""
    start = 0
    while len(text) - start > limit:
        end = start + limit
        cut = text.rfind("\n", start, end) + 1
        if cut < start + limit // 2:
            cut = text.rfind(" ", start + 1, end)
        if cut < start + limit // 2:
            cut = end
        yield text[start:cut]
        start = cut
    if start < len(text):
        yield text[start:]
