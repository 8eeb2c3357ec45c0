"""megagpt-preprocess: clean, deduplicate and tokenize a corpus into .bin/.idx shards.

    megagpt-preprocess 'data/*.jsonl.zst' --tokenizer tok.model --output-prefix out/web

Streams end to end (memory depends on --workers and --batch-mb, not on the corpus),
never stops on bad input (it is counted per reason and summarized), and resumes: a
killed run restarted with the same command skips the shards it finished.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from data_tools.cleaning import CleaningOptions
from data_tools.cli import run_tool, setup_logging
from data_tools.job import MULTI_TASK_PHASES, is_phased, run_job
from data_tools.labeled import (
    add_labeled_arguments,
    check_format_options,
    labeled_options_from_args,
    print_labeled_summary,
    run_labeled,
)
from data_tools.minhash import MinHashSettings, settings_for_threshold
from data_tools.pipeline import PreprocessOptions, run_preprocess
from data_tools.quality_settings import PRESETS, quality_filters_from_args
from data_tools.sources import SUPPORTED, InputError, check_tokenizer_and_shards, expand_inputs
from data_tools.tasks import PHASES, task_index
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
    p.add_argument(
        "--tokenizer", required=True, help="sentencepiece .model or Hugging Face tokenizer.json"
    )
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
    clean.add_argument(
        "--filters",
        metavar="NAMES",
        help="quality filters, comma-separated: "
        f"{', '.join(PRESETS)} (gopher = gopher-quality + gopher-repetition), with the "
        "papers' thresholds; a failing document is dropped and counted under its rule in "
        "summary.json, except that C4's line rules remove lines (no terminal punctuation, "
        "under 3 words, 'javascript', cookie notices) and keep the rest of the document",
    )
    clean.add_argument(
        "--filter-set",
        metavar="NAME=VALUE",
        action="append",
        default=[],
        help="override one threshold of an enabled filter, e.g. gopher.min_words=20 or "
        "c4.min_sentences=3 (repeatable; a wrong name lists the valid ones)",
    )
    add_dedup_arguments(p)
    add_task_arguments(p)
    add_labeled_arguments(p)
    p.add_argument("--strict", action="store_true", help="stop at the first bad record")
    p.add_argument("--overwrite", action="store_true", help="discard an earlier run's output")
    p.add_argument(
        "--log-interval", type=float, default=30.0, help="seconds between progress lines (no TTY)"
    )
    p.add_argument("--verbose", action="store_true")
    return p


def add_dedup_arguments(p: argparse.ArgumentParser) -> None:
    dedup = p.add_argument_group(
        "deduplication (exact on by default; the first document of each group is kept)"
    )
    dedup.add_argument(
        "--near-dedup",
        action="store_true",
        help="also remove near duplicates: MinHash over word n-grams with LSH bands (runs the "
        "scan, dedup and tokenize phases in turn)",
    )
    dedup.add_argument(
        "--near-dedup-threshold",
        type=float,
        help="the Jaccard similarity where the LSH S-curve is steepest; chooses bands x rows "
        "(default: datatrove's 14 x 8, threshold ~0.72)",
    )
    dedup.add_argument("--minhash-bands", type=int, help="LSH bands (with --minhash-rows)")
    dedup.add_argument("--minhash-rows", type=int, help="MinHash values per band")
    dedup.add_argument(
        "--shingle-words", type=int, default=5, help="words per shingle (n-gram) for MinHash"
    )
    dedup.add_argument(
        "--dedup-partitions",
        type=int,
        help="hash partitions of the keys (a power of two; default one per 512 MB of input): "
        "the dedup phase holds one in memory",
    )


def add_task_arguments(p: argparse.ArgumentParser) -> None:
    tasks = p.add_argument_group(
        "many machines (see data_tools/tasks.py; `megagpt launch preprocess` submits them)"
    )
    tasks.add_argument(
        "--num-tasks", type=int, default=1, help="tasks sharing the inputs (whole files each)"
    )
    tasks.add_argument(
        "--task-index", type=int, help="this task, 0 to N-1 (default: SLURM_ARRAY_TASK_ID)"
    )
    tasks.add_argument(
        "--phase",
        choices=("all", *PHASES),
        default="all",
        help="with --num-tasks > 1: scan (every task), dedup (one task), tokenize (every task)",
    )


def near_dedup_settings(args: argparse.Namespace) -> MinHashSettings | None:
    tuning = ("near_dedup_threshold", "minhash_bands", "minhash_rows", "dedup_partitions")
    if not args.near_dedup:
        given = [name for name in tuning[:3] if getattr(args, name) is not None]
        if given:
            raise InputError(f"--{given[0].replace('_', '-')} needs --near-dedup")
        return None
    if args.shingle_words < 1:
        raise InputError(f"--shingle-words {args.shingle_words}: give at least 1")
    if (args.minhash_bands is None) != (args.minhash_rows is None):
        raise InputError("give --minhash-bands and --minhash-rows together")
    if args.minhash_bands is not None:
        if args.near_dedup_threshold is not None:
            raise InputError("give either --near-dedup-threshold or --minhash-bands/-rows")
        if min(args.minhash_bands, args.minhash_rows) < 1:
            raise InputError("--minhash-bands and --minhash-rows must be positive")
        return MinHashSettings(args.minhash_bands, args.minhash_rows, args.shingle_words)
    if args.near_dedup_threshold is not None:
        if not 0 < args.near_dedup_threshold < 1:
            raise InputError(
                f"--near-dedup-threshold {args.near_dedup_threshold}: give a Jaccard "
                "similarity between 0 and 1, e.g. 0.8"
            )
        return settings_for_threshold(args.near_dedup_threshold, shingle_words=args.shingle_words)
    return MinHashSettings(shingle_words=args.shingle_words)


def task_settings(args: argparse.Namespace) -> tuple[int, int]:
    if args.num_tasks < 1:
        raise InputError(f"--num-tasks {args.num_tasks}: give at least 1")
    if args.num_tasks > 1 and args.phase == "all":
        raise InputError(MULTI_TASK_PHASES.format(tasks=args.num_tasks))
    partitions = args.dedup_partitions
    if partitions is not None and (partitions < 1 or partitions & (partitions - 1)):
        raise InputError(f"--dedup-partitions {partitions}: give a power of two, e.g. 64")
    return args.num_tasks, task_index(args.task_index, args.num_tasks)


def options_from_args(args: argparse.Namespace) -> PreprocessOptions:
    for name in ("workers", "min_chars", "max_chars"):
        if getattr(args, name) < (1 if name == "workers" else 0):
            raise InputError(f"--{name.replace('_', '-')} = {getattr(args, name)} must be positive")
    check_tokenizer_and_shards(args)
    Tokenizer(args.tokenizer)  # a file that is not a tokenizer fails here, before any output
    num_tasks, index = task_settings(args)
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
            filters=quality_filters_from_args(args.filters, args.filter_set),
        ),
        dedup=not args.no_dedup,
        strict=args.strict,
        overwrite=args.overwrite,
        log_interval=args.log_interval,
        near_dedup=near_dedup_settings(args),
        num_tasks=num_tasks,
        task_index=index,
        phase=args.phase,
        dedup_partitions=args.dedup_partitions,
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


def print_report(report: dict) -> None:
    """What a phase of a job did (job.run_job's report)."""
    if report.get("skipped"):
        print(f"{report['phase']}: nothing to do without deduplication")
    elif report["phase"] == "scan":
        print(
            f"scan of task {report['task']}: {report['documents']:,} documents kept by the "
            f"filters, {report['keys']:,} keys written this run, in {report['seconds']:.1f}s"
        )
    elif report["phase"] == "dedup":
        print(
            f"dedup: {report['documents']:,} documents, {report['duplicates']:,} exact and "
            f"{report['near_duplicates']:,} near duplicates marked, in {report['seconds']:.1f}s"
        )
    else:
        print_summary(report)
        job = report["job"]
        if job is None:
            print("job: other tasks are still tokenizing; the last one writes the manifest")
        elif job.get("tasks"):
            print(
                f"job complete: {len(job['tasks'])} tasks, {job['documents_out']:,} documents, "
                f"{job['tokens']:,} tokens; manifest: {job['manifest']}"
            )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)

    def body() -> int:
        if args.format != "text":
            print_labeled_summary(run_labeled(labeled_options_from_args(args)))
            return 0
        check_format_options(args)  # e.g. --chat-template without --format sft
        options = options_from_args(args)
        if not is_phased(options):
            print_summary(run_preprocess(options))
            return 0
        if options.near_dedup:
            logging.getLogger(__name__).info("near-dedup: %s", options.near_dedup.describe())
        print_report(run_job(options))
        return 0

    return run_tool("megagpt-preprocess", body)


if __name__ == "__main__":
    sys.exit(main())
