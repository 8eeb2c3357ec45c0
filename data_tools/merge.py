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
import sys
from collections.abc import Sequence
from pathlib import Path

from data_tools.cli import run_tool, setup_logging
from megagpt.data.indexed import IndexedDataset, IndexedDatasetError, IndexedDatasetWriter


def manifest_prefixes(manifest: Path) -> list[str]:
    """The shard prefixes a megagpt-preprocess manifest lists, in order."""
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
        prefixes = data["data_path"]
    except OSError as error:
        raise IndexedDatasetError(f"--manifest {manifest}: {error.strerror}") from None
    except (ValueError, KeyError, TypeError):  # not JSON, or not a manifest
        raise IndexedDatasetError(
            f"--manifest {manifest} is not a megagpt-preprocess manifest (a JSON object "
            "with a data_path list, as <output-prefix>.manifest.json)"
        ) from None
    if not isinstance(prefixes, list) or not all(isinstance(p, str) for p in prefixes):
        raise IndexedDatasetError(f"--manifest {manifest}: data_path must be a list of prefixes")
    return prefixes


def input_prefixes(patterns: Sequence[str], manifest: str | None) -> list[str]:
    """Dataset prefixes from paths/globs (of prefixes, .bin or .idx files) and a manifest."""
    prefixes: list[str] = []
    if manifest:
        prefixes.extend(manifest_prefixes(Path(manifest)))
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        if not matches:
            raise IndexedDatasetError(f"{pattern!r} matches no file")
        for match in matches:
            prefix = match[:-4] if match.endswith((".bin", ".idx")) else match
            if prefix not in prefixes:
                prefixes.append(prefix)
    if not prefixes:
        raise IndexedDatasetError("no input datasets: give prefixes, globs or --manifest")
    return prefixes


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
