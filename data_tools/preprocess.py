"""megagpt-preprocess: clean, deduplicate and tokenize a corpus into .bin/.idx shards.

    megagpt-preprocess 'data/*.jsonl.zst' --tokenizer tok.model --output-prefix out/web

Streams end to end (memory depends on --workers and --batch-mb, not on the corpus),
never stops on bad input (it is counted per reason and summarized), and resumes: a
killed run restarted with the same command skips the shards it finished.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from data_tools.cleaning import CleaningOptions
from data_tools.cli import run_tool, setup_logging
from data_tools.pipeline import PreprocessOptions, run_preprocess
from data_tools.sources import SUPPORTED, InputError, expand_inputs
from megagpt.tokenizer import Tokenizer

DEFAULTS = CleaningOptions()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megagpt-preprocess",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Writes PREFIX_00000.bin/.idx ..., PREFIX.manifest.json, PREFIX.summary.json "
        "and PREFIX.state/ (what a restart needs to resume).",
    )
    p.add_argument("inputs", nargs="+", help=f"files, directories or globs ({SUPPORTED})")
    p.add_argument("--output-prefix", required=True, help="shards are PREFIX_00000.bin/.idx, ...")
    p.add_argument("--tokenizer", required=True, help="sentencepiece .model file")
    p.add_argument("--text-field", default="text", help="JSON key / parquet column with the text")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes")
    p.add_argument(
        "--shard-tokens",
        type=lambda value: int(float(value)),  # accepts 1e10
        default=None,
        help="start a new shard after this many tokens (default: one shard per input file)",
    )
    p.add_argument("--batch-mb", type=float, default=1.0, help="input per batch sent to a worker")
    p.add_argument(
        "--max-record-mb",
        type=float,
        default=16.0,
        help="records larger than this are skipped unread (counted as too_long)",
    )
    p.add_argument(
        "--txt-unit",
        choices=("file", "line"),
        default="file",
        help="what a document is in .txt files",
    )
    clean = p.add_argument_group("cleaning (on by default) and filters (off by default)")
    clean.add_argument("--no-normalize", action="store_true", help="skip Unicode NFC normalization")
    clean.add_argument("--no-strip-control", action="store_true", help="keep control characters")
    clean.add_argument("--no-strip-markup", action="store_true", help="keep HTML tags and comments")
    clean.add_argument("--no-dedup", action="store_true", help="keep exact duplicate documents")
    clean.add_argument("--min-chars", type=int, default=DEFAULTS.min_chars)
    clean.add_argument("--max-chars", type=int, default=DEFAULTS.max_chars)
    clean.add_argument(
        "--min-alpha-fraction",
        type=float,
        default=0.0,
        help="drop documents whose non-space characters are less than this fraction letters",
    )
    clean.add_argument(
        "--max-repeated-lines",
        type=float,
        default=1.0,
        help="drop documents in which more than this fraction of lines repeat an earlier one",
    )
    p.add_argument("--strict", action="store_true", help="stop at the first bad record")
    p.add_argument("--overwrite", action="store_true", help="discard an earlier run's output")
    p.add_argument(
        "--log-interval", type=float, default=30.0, help="seconds between progress lines (no TTY)"
    )
    p.add_argument("--verbose", action="store_true")
    return p


def options_from_args(args: argparse.Namespace) -> PreprocessOptions:
    for name in ("workers", "min_chars", "max_chars"):
        if getattr(args, name) < (1 if name == "workers" else 0):
            raise InputError(f"--{name.replace('_', '-')} = {getattr(args, name)} must be positive")
    if args.shard_tokens is not None and args.shard_tokens < 1:
        raise InputError(f"--shard-tokens = {args.shard_tokens}: give a positive token count")
    if not Path(args.tokenizer).is_file():
        raise InputError(
            f"--tokenizer {args.tokenizer}: no such file (train one with megagpt-train-tokenizer)"
        )
    Tokenizer(args.tokenizer)  # a file that is not a tokenizer fails here, before any output
    return PreprocessOptions(
        inputs=expand_inputs(args.inputs),
        output_prefix=args.output_prefix,
        tokenizer=args.tokenizer,
        text_field=args.text_field,
        workers=args.workers,
        shard_tokens=args.shard_tokens,
        batch_bytes=max(1, int(args.batch_mb * (1 << 20))),
        max_record_bytes=max(1, int(args.max_record_mb * (1 << 20))),
        txt_unit=args.txt_unit,
        cleaning=CleaningOptions(
            normalize=not args.no_normalize,
            strip_control=not args.no_strip_control,
            strip_markup=not args.no_strip_markup,
            min_chars=args.min_chars,
            max_chars=args.max_chars,
            min_alpha_fraction=args.min_alpha_fraction,
            max_repeated_line_fraction=args.max_repeated_lines,
        ),
        dedup=not args.no_dedup,
        strict=args.strict,
        overwrite=args.overwrite,
        log_interval=args.log_interval,
    )


def print_summary(summary: dict) -> None:
    run = summary["this_run"]
    drops = ", ".join(f"{k} {v:,}" for k, v in summary["drops"].items()) or "none"
    print(
        f"documents: {summary['documents_in']:,} in, {summary['documents_out']:,} out; "
        f"tokens: {summary['tokens']:,}; text: {summary['text_bytes'] / 1e6:,.1f} MB; "
        f"shards: {summary['shards']}"
    )
    print(f"dropped: {drops}")
    print(
        f"this run: {run['seconds']:.1f}s, {run['documents_per_s']:,.0f} docs/s, "
        f"{run['tokens_per_s']:,.0f} tokens/s, {run['text_mb_per_s']:.2f} MB/s of text"
        + (
            f" (resumed after {summary['resumed_after_shards']} shards)"
            if summary["resumed_after_shards"]
            else ""
        )
    )
    print(f"manifest: {summary['manifest']}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)

    def body() -> int:
        summary = run_preprocess(options_from_args(args))
        print_summary(summary)
        return 0

    return run_tool("megagpt-preprocess", body)


if __name__ == "__main__":
    sys.exit(main())
