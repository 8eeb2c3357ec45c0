"""megagpt-preprocess --format sft|classify: labeled data for fine-tuning.

    megagpt-preprocess chats.jsonl --format sft --tokenizer tok.model \\
        --output-prefix data/chat --max-tokens 2049
    megagpt-preprocess reviews.jsonl --format classify --label-field label \\
        --tokenizer tok.model --output-prefix data/reviews

Labeled sets are small (up to about a million rows), so this is one streaming pass in
one process, writing as it goes; the text format's cleaning, deduplication and
filters do not apply (the data is used as written). The on-disk format is
megagpt/data/labeled_format.py's. A bad row is counted by reason and never fatal (the
first few of each reason are logged with file:line); --strict stops at the first.
"""

from __future__ import annotations

import argparse
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

from data_tools.classify import ClassifyExamples, collect_labels
from data_tools.labeled_output import PairedShards, prepare_output, write_manifest
from data_tools.labeled_rows import BadRows, RowDrop, read_rows
from data_tools.pipeline import output_lock
from data_tools.progress import Progress
from data_tools.sft import SftExamples
from data_tools.sources import InputError, check_tokenizer_and_shards, expand_inputs
from data_tools.state import atomic_write_json
from megagpt.data.indexed import token_dtype
from megagpt.tokenizer import Tokenizer
from megagpt.tokenizer.chat_template import DEFAULT_TEMPLATE, load_chat_template

log = logging.getLogger(__name__)

FORMATS = ("text", "sft", "classify")
ONLY_FOR = {  # option: the formats it belongs to
    "chat_template": ("sft",),
    "label_field": ("classify",),
    "labels": ("classify",),
    "max_tokens": ("sft", "classify"),
    "overlong": ("sft", "classify"),
}


def add_labeled_arguments(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("fine-tuning data (--format sft|classify)")
    group.add_argument(
        "--format",
        choices=FORMATS,
        default="text",
        help="text: documents for pretraining; sft: chats or prompt/completion rows into "
        "tokens and a loss mask; classify: texts with labels",
    )
    group.add_argument(
        "--chat-template",
        metavar="NAME|FILE.json",
        help="sft: megagpt-chat (default; its markers must be tokens of the tokenizer), "
        "plain (no markers), name-vN, or a template JSON file",
    )
    group.add_argument(
        "--max-tokens",
        type=int,
        help="the most tokens an example may have: pass data.seq_len + 1, the window "
        "training packs examples into (default: no limit)",
    )
    group.add_argument(
        "--overlong",
        choices=("truncate", "drop"),
        help="an example over --max-tokens is cut there or dropped (default: truncate)",
    )
    group.add_argument("--label-field", help="classify: JSON key of the label (default: label)")
    group.add_argument(
        "--labels",
        metavar="A,B,...",
        help="classify: the label names, in id order (default: those found, sorted); a row "
        "with another label is dropped",
    )


@dataclass
class LabeledOptions:
    """What megagpt-preprocess --format sft|classify does; see its --help."""

    format: str
    inputs: list[Path]
    output_prefix: str
    tokenizer: str
    text_field: str = "text"
    chat_template: str = DEFAULT_TEMPLATE
    max_tokens: int | None = None
    overlong: str = "truncate"
    label_field: str = "label"
    labels: list[str] | None = None
    shard_tokens: int | None = None
    batch_bytes: int = 1 << 20
    max_record_bytes: int = 16 << 20
    strict: bool = False
    overwrite: bool = False
    log_interval: float = 30.0
    progress_bar: bool | None = None  # None: when stderr is a terminal


def check_format_options(args: argparse.Namespace) -> None:
    """Refuse an option of another format (e.g. --chat-template without --format sft)."""
    for name, formats in ONLY_FOR.items():
        if getattr(args, name) is not None and args.format not in formats:
            flag = "--" + name.replace("_", "-")
            raise InputError(f"{flag} is for --format {' or '.join(formats)}, not {args.format}")
    if args.format == "text":
        return
    for given, flag in (
        (args.near_dedup, "--near-dedup"),
        (args.filters, "--filters"),
        (args.num_tasks != 1 or args.phase != "all", "--num-tasks/--phase"),
    ):
        if given:
            raise InputError(f"{flag} is for --format text; labeled data is used as written")


def labeled_options_from_args(args: argparse.Namespace) -> LabeledOptions:
    check_format_options(args)
    if args.max_tokens is not None and args.max_tokens < 2:
        raise InputError(f"--max-tokens {args.max_tokens}: give data.seq_len + 1, at least 2")
    check_tokenizer_and_shards(args)
    inputs = expand_inputs(args.inputs)
    for path in inputs:
        if not re.search(r"\.(jsonl?(\.gz|\.zst)?|parquet)$", path.name):
            raise InputError(
                f"input {path}: --format {args.format} reads rows of .jsonl (also .gz, .zst) "
                "or .parquet files"
            )
    labels = None
    if args.labels is not None:
        labels = [name.strip() for name in args.labels.split(",")]
        if "" in labels or len(set(labels)) != len(labels):
            raise InputError(f"--labels {args.labels}: give distinct, non-empty names")
    return LabeledOptions(
        format=args.format,
        inputs=inputs,
        output_prefix=args.output_prefix,
        tokenizer=args.tokenizer,
        text_field=args.text_field,
        chat_template=args.chat_template or DEFAULT_TEMPLATE,
        max_tokens=args.max_tokens,
        overlong=args.overlong or "truncate",
        label_field=args.label_field or "label",
        labels=labels,
        shard_tokens=args.shard_tokens,
        batch_bytes=max(1, int(args.batch_mb * (1 << 20))),
        max_record_bytes=max(1, int(args.max_record_mb * (1 << 20))),
        strict=args.strict,
        overwrite=args.overwrite,
        log_interval=args.log_interval,
    )


def build_examples(options: LabeledOptions, tokenizer: Tokenizer):
    """The SftExamples or ClassifyExamples of the run (the template checked first)."""
    if options.format == "sft":
        template = load_chat_template(options.chat_template)
        return SftExamples(tokenizer, template, options.max_tokens, options.overlong)
    labels = options.labels
    if labels is None:
        labels = collect_labels(
            options.inputs,
            options.text_field,
            options.label_field,
            options.batch_bytes,
            options.max_record_bytes,
        )
        log.info("labels found: %s", ", ".join(labels) or "none")
    return ClassifyExamples(
        tokenizer,
        options.text_field,
        options.label_field,
        labels,
        options.max_tokens,
        options.overlong,
    )


def run_labeled(options: LabeledOptions) -> dict:
    """Write the labeled data set; return the summary written beside it."""
    started = time.perf_counter()
    tokenizer = Tokenizer(options.tokenizer)
    examples = build_examples(options, tokenizer)  # a bad template fails before any output
    prefix = options.output_prefix
    with output_lock(prefix):
        prepare_output(prefix, options.overwrite, examples.side_files(prefix))
        dtype = token_dtype(tokenizer.vocab_size)
        shards = PairedShards(
            prefix, dtype, examples.side_suffix, examples.side_dtype, options.shard_tokens
        )
        bad = BadRows(options.strict)
        counts = {"documents_in": 0, "documents_out": 0, "tokens": 0}
        total_bytes = sum(path.stat().st_size for path in options.inputs)
        progress = Progress(total_bytes, 0, options.log_interval, options.progress_bar)
        try:
            for batch in read_rows(options.inputs, options.batch_bytes, options.max_record_bytes):
                for row in batch.rows:
                    counts["documents_in"] += 1
                    try:
                        if row.data is None:
                            raise RowDrop(row.reason, row.detail)
                        ids, side = examples.example(row.data)
                    except RowDrop as drop:
                        bad.drop(row.where, drop.reason, drop.detail)
                        continue
                    shards.add(ids, side, str(options.inputs[row.file_index]))
                    counts["documents_out"] += 1
                    counts["tokens"] += len(ids)
                progress.update(batch.done_bytes, len(batch.rows))
            written = shards.finish()
            extra = examples.write_files(prefix)
            manifest = write_manifest(
                prefix, tokenizer, dtype, examples.eod_appended, written, extra
            )
        except BaseException:
            shards.abort()
            for path in examples.side_files(prefix):
                path.unlink(missing_ok=True)
            raise
        finally:
            progress.close()
        summary = {
            "format": options.format,
            **counts,
            "drops": bad.to_dict(),
            **examples.summary(),
            "input_files": len(options.inputs),
            "shards": len(written),
            "seconds": round(time.perf_counter() - started, 3),
            "manifest": str(manifest),
        }
        atomic_write_json(Path(prefix + ".summary.json"), summary)
    return summary


def print_labeled_summary(summary: dict) -> None:
    drops = ", ".join(f"{k} {v:,}" for k, v in summary["drops"].items()) or "none"
    print(
        f"examples: {summary['documents_in']:,} in, {summary['documents_out']:,} out; "
        f"tokens: {summary['tokens']:,}"
        + (f" ({summary['supervised_tokens']:,} trained)" if "supervised_tokens" in summary else "")
        + f"; truncated: {summary['truncated']:,}; shards: {summary['shards']}"
    )
    if "label_counts" in summary:
        print("labels: " + ", ".join(f"{k} {v:,}" for k, v in summary["label_counts"].items()))
    print(f"dropped: {drops}")
    print(f"manifest: {summary['manifest']}")
