"""megagpt-merge: merge .bin/.idx datasets into one (or fewer), streaming.

    megagpt-merge out/web_00000 out/web_00001 ... --output-prefix data/web
    megagpt-merge --manifest out/web.manifest.json --output-prefix data/web --shard-tokens 1e10

Tokens are copied in 16 MB chunks and the index in chunks of a million entries, so
memory stays flat for any number and size of inputs (Megatron's merge loads every
index into Python lists). Outputs appear only once complete.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from data_tools.cli import run_tool, setup_logging
from megagpt.data.indexed import IndexedDataset, IndexedDatasetError, IndexedDatasetWriter
from megagpt.data.manifest import read_manifest, shard_path


def manifest_prefixes(manifest: Path) -> list[str]:
    """The shard prefixes a megagpt-preprocess manifest lists, in order."""
    return [shard.prefix for shard in read_manifest(manifest, "--manifest")]


def input_prefixes(patterns: Sequence[str], manifest: str | None) -> list[str]:
    """Dataset prefixes from paths/globs (of prefixes, .bin or .idx files) and a manifest."""
    candidates = manifest_prefixes(Path(manifest)) if manifest else []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        if not matches:
            raise IndexedDatasetError(f"{pattern!r} matches no file")
        candidates += [m[:-4] if m.endswith((".bin", ".idx")) else m for m in matches]
    # One dataset named twice (x, ./x, x//, a link to x) is merged once.
    prefixes, seen = [], set()
    for prefix in candidates:
        if os.path.realpath(prefix) not in seen:
            seen.add(os.path.realpath(prefix))
            prefixes.append(prefix)
    if not prefixes:
        raise IndexedDatasetError("no input datasets: give prefixes, globs or --manifest")
    return prefixes


def recorded_tokenizer(prefix: str) -> tuple[str, str, str] | None:
    """(identity, tokenizer path, manifest) for a dataset made by megagpt-preprocess,
    whose manifest (<P>.manifest.json, beside its shards P_00000, ...) records the
    tokenizer; the identity is the tokenizer's SHA-256 where recorded, else its path."""
    real = os.path.realpath(prefix)
    base = re.sub(r"_\d{5}$", "", prefix)
    for manifest in dict.fromkeys([f"{prefix}.manifest.json", f"{base}.manifest.json"]):
        try:
            data = json.loads(Path(manifest).read_text(encoding="utf-8"))
            listed = {
                os.path.realpath(shard_path(Path(manifest), p)) for p in data.get("data_path", [])
            }
            tokenizer = data.get("tokenizer")
        except (OSError, ValueError, AttributeError, TypeError):
            continue  # no manifest there, or not one we can read: nothing recorded
        if real in listed and tokenizer:
            return str(data.get("tokenizer_sha256") or tokenizer), tokenizer, manifest
    return None


def check_same_tokenizer(prefixes: list[str]) -> None:
    """Refuse inputs whose manifests record different tokenizers: their token ids mean
    different things, and a merged dataset would train on nonsense."""
    known = [(p, t) for p in prefixes if (t := recorded_tokenizer(p)) is not None]
    for prefix, (identity, tokenizer, manifest) in known[1:]:
        first, (first_identity, first_tokenizer, first_manifest) = known[0]
        if identity != first_identity:
            raise IndexedDatasetError(
                f"inputs were tokenized with different tokenizers: {first} with "
                f"{first_tokenizer} (per {first_manifest}), {prefix} with {tokenizer} "
                f"(per {manifest}); merge only datasets made with one tokenizer"
            )


def group_by_tokens(
    datasets: list[IndexedDataset], shard_tokens: float | None
) -> list[list[IndexedDataset]]:
    """Consecutive inputs into groups of at most `shard_tokens` (an input larger than
    that is a group of its own); everything in one group without a limit."""
    if not shard_tokens:
        return [datasets]
    groups: list[list[IndexedDataset]] = [[]]
    size = 0
    for dataset in datasets:
        if groups[-1] and size + dataset.num_tokens > shard_tokens:
            groups.append([])
            size = 0
        groups[-1].append(dataset)
        size += dataset.num_tokens
    return groups


def merge(
    prefixes: list[str], output_prefix: str, shard_tokens: float | None = None
) -> list[tuple[str, int, int, int]]:
    """Merge datasets; return (prefix, documents, tokens, inputs) of each output (one
    unless shard_tokens splits them)."""
    check_same_tokenizer(prefixes)
    datasets = [IndexedDataset(p) for p in prefixes]
    dtypes = {d.dtype for d in datasets}
    if len(dtypes) > 1:
        found = ", ".join(f"{d.prefix}: {d.dtype}" for d in datasets)
        raise IndexedDatasetError(
            f"inputs have different token dtypes ({found}); merge only equal ones"
        )
    groups = group_by_tokens(datasets, shard_tokens)
    outputs = []
    for k, group in enumerate(groups):
        prefix = output_prefix if len(groups) == 1 else f"{output_prefix}_{k:05d}"
        if any(Path(prefix).resolve() == Path(d.prefix).resolve() for d in datasets):
            raise IndexedDatasetError(
                f"output {prefix} is also an input; choose another --output-prefix"
            )
        with IndexedDatasetWriter(prefix, group[0].dtype) as writer:
            for dataset in group:
                writer.append_dataset(dataset)
        outputs.append((prefix, writer.document_count, writer.token_count, len(group)))
    return outputs


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="megagpt-merge", description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="*", help="dataset prefixes, or globs of .bin/.idx files")
    p.add_argument("--manifest", help="a megagpt-preprocess manifest: merge its shards, in order")
    p.add_argument("--output-prefix", required=True)
    p.add_argument(
        "--shard-tokens",
        type=float,
        default=None,
        help="write several outputs of at most this many tokens (whole inputs each)",
    )
    args = p.parse_args(argv)
    setup_logging()

    def body() -> int:
        prefixes = input_prefixes(args.inputs, args.manifest)
        for prefix, documents, tokens, inputs in merge(
            prefixes, args.output_prefix, args.shard_tokens
        ):
            print(
                f"{prefix}.bin/.idx: {documents:,} documents, {tokens:,} tokens ({inputs} inputs)"
            )
        return 0

    return run_tool("megagpt-merge", body)


if __name__ == "__main__":
    sys.exit(main())
