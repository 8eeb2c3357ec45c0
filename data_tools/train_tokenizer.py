"""megagpt-train-tokenizer: train a sentencepiece model on a random sample of a corpus.

    megagpt-train-tokenizer 'data/*.jsonl.gz' --model data/tok.model --vocab-size 32000

Documents are streamed from the inputs (any format megagpt-preprocess reads, with its
default cleaning) and cut into lines, lines longer than sentencepiece takes (4,192
bytes) into pieces at sentence ends or spaces; sentencepiece keeps a uniform random
sample of at most --sample-lines of them (reservoir sampling), so memory is bounded by
the sample, never by the corpus. --max-documents stops reading early on huge corpora.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
from collections.abc import Sequence

from data_tools.cli import run_tool, setup_logging
from data_tools.corpus import iter_documents
from data_tools.sources import SUPPORTED, InputError, expand_inputs
from megagpt.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megagpt-train-tokenizer",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", help=f"files, directories or globs ({SUPPORTED})")
    p.add_argument("--model", required=True, help="where to write the .model file")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    p.add_argument(
        "--no-byte-fallback",
        action="store_true",
        help="map unseen characters to <unk> instead of their UTF-8 bytes",
    )
    p.add_argument(
        "--special-tokens",
        default="",
        help="comma-separated symbols that always stay one token (e.g. '<sep>,<cls>')",
    )
    p.add_argument("--text-field", default="text", help="JSON key / parquet column with the text")
    p.add_argument("--txt-unit", choices=("file", "line"), default="file")
    p.add_argument("--sample-lines", type=int, default=2_000_000, help="lines sampled at most")
    p.add_argument("--max-documents", type=int, default=None, help="stop reading after this many")
    p.add_argument("--threads", type=int, default=None, help="training threads (default: all)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()

    def body() -> int:
        if args.vocab_size < 8:
            raise InputError(f"--vocab-size {args.vocab_size} is too small")
        files = expand_inputs(args.inputs)
        counted = {"documents": 0}

        def texts():
            for text in itertools.islice(
                iter_documents(files, args.text_field, txt_unit=args.txt_unit), args.max_documents
            ):
                counted["documents"] += 1
                yield text

        specials = [s.strip() for s in args.special_tokens.split(",") if s.strip()]
        tokenizer = Tokenizer.train(  # a TokenizerError says what it was given, if too little
            texts(),
            args.model,
            vocab_size=args.vocab_size,
            model_type=args.model_type,
            byte_fallback=not args.no_byte_fallback,
            user_defined_symbols=specials,
            max_sentences=args.sample_lines,
            num_threads=args.threads,
        )
        print(
            f"{tokenizer.path}: {args.model_type} with {tokenizer.vocab_size:,} pieces, trained on "
            f"a sample of the lines of {counted['documents']:,} documents from {len(files)} file(s)"
        )
        return 0

    return run_tool("megagpt-train-tokenizer", body)


if __name__ == "__main__":
    sys.exit(main())
