"""megagpt-train-tokenizer: train a sentencepiece model or a byte-level BPE on a random
sample of a corpus.

    megagpt-train-tokenizer 'data/*.jsonl.gz' --model data/tok.model --vocab-size 32000
    megagpt-train-tokenizer 'data/*.jsonl.gz' --type byte-bpe --model data/tok.json

Documents are streamed from the inputs (any format megagpt-preprocess reads, with its
default cleaning). For sentencepiece they are cut into lines, lines longer than
sentencepiece takes (4,192 bytes) into pieces at sentence ends or spaces; sentencepiece
keeps a uniform random sample of at most --sample-lines of them (reservoir sampling).
A byte-level BPE (GPT-2's kind, written as a Hugging Face tokenizer.json) is trained on
a uniform random sample of at most --sample-chars characters of the documents, cut at
line ends into pieces. Either way memory is bounded by the sample, never by the corpus.
--max-documents stops reading early on huge corpora.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from data_tools.cli import run_tool, setup_logging
from data_tools.corpus import iter_documents
from data_tools.sources import SUPPORTED, InputError, expand_inputs
from megagpt.tokenizer import Tokenizer

log = logging.getLogger(__name__)

SUFFIX = {"sentencepiece": ".model", "byte-bpe": ".json"}
"""What each --type writes; the other suffix would make the file look like the other kind."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megagpt-train-tokenizer",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", help=f"files, directories or globs ({SUPPORTED})")
    p.add_argument(
        "--model",
        required=True,
        help="where to write the tokenizer: a .model file (sentencepiece) or a .json file "
        "(byte-bpe)",
    )
    p.add_argument(
        "--type",
        choices=tuple(SUFFIX),
        default="sentencepiece",
        help="sentencepiece (Llama 2's kind) or byte-bpe (GPT-2's and Llama 3's kind, as a "
        "Hugging Face tokenizer.json)",
    )
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe", help="sentencepiece")
    p.add_argument(
        "--no-byte-fallback",
        action="store_true",
        help="sentencepiece: map unseen characters to <unk> instead of their UTF-8 bytes",
    )
    p.add_argument(
        "--special-tokens",
        default="",
        help="comma-separated symbols that always stay one token (e.g. '<sep>,<cls>')",
    )
    p.add_argument("--text-field", default="text", help="JSON key / parquet column with the text")
    p.add_argument("--txt-unit", choices=("file", "line"), default="file")
    p.add_argument(
        "--sample-lines", type=int, default=2_000_000, help="sentencepiece: lines sampled at most"
    )
    p.add_argument(
        "--sample-chars",
        type=lambda value: int(float(value)),  # accepts 1e9
        default=1_000_000_000,
        help="byte-bpe: characters sampled at most",
    )
    p.add_argument("--max-documents", type=int, default=None, help="stop reading after this many")
    p.add_argument("--threads", type=int, default=None, help="training threads (default: all)")
    return p


def check_model_path(path: str, kind: str) -> None:
    """Refuse a --model whose suffix belongs to the other kind of tokenizer."""
    suffix = Path(path).suffix
    for other, other_suffix in SUFFIX.items():
        if other != kind and suffix == other_suffix:
            wanted = Path(path).with_suffix(SUFFIX[kind])
            raise InputError(
                f"--model {path}: a {other_suffix} file is what --type {other} writes, but "
                f"--type is {kind}; name it {wanted}, or give --type {other}"
            )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()

    def body() -> int:
        if args.vocab_size < 8:
            raise InputError(f"--vocab-size {args.vocab_size} is too small")
        check_model_path(args.model, args.type)
        files = expand_inputs(args.inputs)
        counted = {"documents": 0}

        def texts():
            for text in itertools.islice(
                iter_documents(files, args.text_field, txt_unit=args.txt_unit), args.max_documents
            ):
                counted["documents"] += 1
                yield text

        specials = [s.strip() for s in args.special_tokens.split(",") if s.strip()]
        # A TokenizerError says what training was given, if it was too little.
        if args.type == "byte-bpe":
            if args.threads:  # the tokenizers library's pool reads it when it starts
                os.environ["RAYON_NUM_THREADS"] = str(args.threads)
            tokenizer = Tokenizer.train_byte_bpe(
                texts(),
                args.model,
                vocab_size=args.vocab_size,
                user_defined_symbols=specials,
                max_sample_chars=args.sample_chars,
            )
            what, sample = "byte-level BPE", "a sample of the text"
        else:
            tokenizer = Tokenizer.train(
                texts(),
                args.model,
                vocab_size=args.vocab_size,
                model_type=args.model_type,
                byte_fallback=not args.no_byte_fallback,
                user_defined_symbols=specials,
                max_sentences=args.sample_lines,
                num_threads=args.threads,
            )
            what, sample = f"sentencepiece {args.model_type}", "a sample of the lines"
        print(
            f"{tokenizer.path}: {what} with {tokenizer.vocab_size:,} ids, trained on {sample} "
            f"of {counted['documents']:,} documents from {len(files)} file(s)"
        )
        return 0

    return run_tool("megagpt-train-tokenizer", body)


if __name__ == "__main__":
    sys.exit(main())
