"""The Hugging Face `tokenizers` backend: a tokenizer.json, as GPT-2, Llama 3 and most
current models ship one, or as `megagpt-train-tokenizer --type byte-bpe` writes one.

Megatron's GPT data separates documents with one end-of-text id (EOD), so a tokenizer
must have one: it is found among the added tokens by its usual names, or named by the
eos_token of a tokenizer_config.json beside a file called tokenizer.json (as a model
directory has it).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tokenizers

from megagpt.tokenizer.errors import TokenizerError, not_a_tokenizer

log = logging.getLogger(__name__)

CONFIG_NAME = "tokenizer_config.json"
EOS_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>")
BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")
PAD_NAMES = ("<|pad|>", "<pad>", "<|padding|>", "[PAD]")


class HFTokenizerFile:
    """A tokenizer.json read with the `tokenizers` library. Without a BOS or PAD token,
    both fall back to EOS (GPT-2 uses <|endoftext|> for all three)."""

    def __init__(self, path: Path):
        self.tok = _load(path)
        # Special-token text inside a document ("<|endoftext|>" in a web page about GPT-2)
        # stays text: it cannot forge a document boundary, and decode(encode(x)) == x.
        self.tok.encode_special_tokens = True
        self._encode_batch = getattr(self.tok, "encode_batch_fast", self.tok.encode_batch)
        self.config_path = config_beside(path)
        config = _read_config(self.config_path)
        added = {token.content: i for i, token in self.tok.get_added_tokens_decoder().items()}
        self.vocab_size = max(self.tok.get_vocab(with_added_tokens=True).values()) + 1
        eos_id = self._find("eos_token", EOS_NAMES, config, added)
        if eos_id is None:
            raise TokenizerError(
                f"{path} has no end-of-text token, which megagpt appends after every "
                f"document: none of its added tokens is {' '.join(EOS_NAMES)}, and no "
                f"{CONFIG_NAME} beside it names an eos_token. Add one (with the tokenizers "
                "library: tok.add_special_tokens(['<|endoftext|>']); tok.save(path)), or "
                f"name the file tokenizer.json and put a {CONFIG_NAME} with an eos_token "
                "beside it"
            )
        self.eos_id: int = eos_id
        bos_id = self._find("bos_token", BOS_NAMES, config, added)
        self.bos_id: int = eos_id if bos_id is None else bos_id
        pad_id = self._find("pad_token", PAD_NAMES, config, added)
        self.pad_id: int = eos_id if pad_id is None else pad_id
        self.unk_id = self._find("unk_token", (getattr(self.tok.model, "unk_token", None),), config)

    def _find(
        self,
        role: str,
        names: Sequence[str | None],
        config: dict[str, Any],
        added: dict[str, int] | None = None,
    ) -> int | None:
        """The id of the token tokenizer_config.json names for `role`, else of the first
        of `names` that is an added token (any token, when `added` is None)."""
        named = config.get(role)
        if isinstance(named, dict):  # a serialized AddedToken
            named = named.get("content")
        if isinstance(named, str):
            token_id = self.tok.token_to_id(named)
            if token_id is not None:
                return token_id
            log.warning("%s: %s %r is not one of the tokenizer's tokens", CONFIG_NAME, role, named)
        for name in names:
            if name is None:
                continue
            token_id = self.tok.token_to_id(name) if added is None else added.get(name)
            if token_id is not None:
                return token_id
        return None

    def encode(self, text: str) -> list[int]:
        # add_special_tokens=False: no post-processor template (Llama 3's adds BOS).
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], num_threads: int) -> list[list[int]]:
        """`num_threads` is not the library's to take per call: its one thread pool per
        process is sized by RAYON_NUM_THREADS and switched off by
        TOKENIZERS_PARALLELISM=false, both read when it first starts."""
        return [e.ids for e in self._encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        # Encoding never yields a special token (see __init__), so skipping them loses no
        # text; it drops a generated BOS or PAD, as sentencepiece drops its control pieces.
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def id_to_piece(self, token_id: int) -> str:
        piece = self.tok.id_to_token(token_id)
        if piece is None:
            raise IndexError(f"token id {token_id} is outside the vocabulary")
        return piece

    def piece_to_id(self, piece: str) -> int | None:
        return self.tok.token_to_id(piece)


def config_beside(path: Path) -> Path | None:
    """The tokenizer_config.json read with a tokenizer.json: beside it, as in a model
    directory. Beside a file of another name (data/tok.json), a tokenizer_config.json
    may belong to something else, so it is not read."""
    beside = path.with_name(CONFIG_NAME)
    return beside if path.name == "tokenizer.json" and beside.is_file() else None


def _load(path: Path) -> tokenizers.Tokenizer:
    """Parse the file ourselves first: the library's messages for a JSON file that is
    not a tokenizer ("expected `,` or `}` at line 1 column 8") mislead."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM is not JSON
        data = json.loads(text)
    except UnicodeDecodeError:
        raise not_a_tokenizer(path, "not UTF-8 text") from None
    except ValueError as error:
        raise not_a_tokenizer(path, f"not valid JSON: {error}") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise not_a_tokenizer(path, 'JSON without the "model" section of a tokenizer.json')
    try:
        return tokenizers.Tokenizer.from_str(text)
    except Exception as error:  # the library raises plain Exception for what it cannot read
        raise not_a_tokenizer(path, f"the tokenizers library cannot read it: {error}") from None


def _read_config(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise TokenizerError(
            f"{path} is not valid JSON ({error}); fix it or remove it (it is read for the "
            "eos_token, bos_token and pad_token of the tokenizer.json beside it)"
        ) from None
    return config if isinstance(config, dict) else {}
