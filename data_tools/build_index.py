"""megagpt-build-index: check a training run's data before the job starts.

    megagpt-build-index --config configs/gpt2-124m.yaml data.path="0.3 a 0.7 b" --check-tokens

There is no sample index to build: megagpt computes the sample order on demand (a
seeded Feistel permutation over each split's windows, and an exact integer blend
schedule), in O(1) memory and with no start-up work, where Megatron builds, saves and
memory-maps document/sample/shuffle index arrays on rank 0 first (minutes on large
corpora). What can still fail at start-up is the data itself, and that is what this
tool checks offline: every dataset of data.path opens, its index is consistent
(pointers cumulative, document indices ordered), optionally every token is below
model.vocab_size, and each split has enough tokens. It then prints per split the
documents, tokens, samples per epoch, the epochs the run will read
(train.max_steps x train.global_batch_size samples) and the blend shares.
Exit status 1 and a message naming the dataset on any problem.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np

from data_tools.cli import run_tool, setup_logging
from megagpt.config import load_config
from megagpt.config.errors import ConfigError
from megagpt.data.dataset import SPLITS, BlendedDataset, build_datasets, split_documents
from megagpt.data.epochs import epochs_read
from megagpt.data.indexed import IndexedDataset, IndexedDatasetError
from megagpt.data.manifest import expand_manifests
from megagpt.data.settings import parse_data_path

CHUNK = 1 << 24


def check_tokens(dataset: IndexedDataset, vocab_size: int) -> None:
    """Raise if any token is negative or not below vocab_size (scanned in chunks)."""
    for start in range(0, dataset.num_tokens, CHUNK):
        tokens = np.asarray(dataset.token_range(start, start + CHUNK))
        bad = (
            (tokens >= vocab_size) | (tokens < 0)
            if tokens.dtype.kind == "i"
            else tokens >= vocab_size
        )
        if bad.any():
            where = start + int(np.argmax(bad))
            raise IndexedDatasetError(
                f"{dataset.bin_path}: token {where:,} is {int(tokens[where - start])}, not below "
                f"model.vocab_size = {vocab_size}; was it made with another tokenizer?"
            )


def report(config, check: bool) -> list[str]:
    pairs = expand_manifests(parse_data_path(config.data.path))
    if not pairs:
        raise ConfigError("data.path is empty: give the prefix of a tokenized dataset")
    lines = []
    for _, prefix in pairs:
        dataset = IndexedDataset(prefix)  # opening validates the whole index
        if check:
            check_tokens(dataset, config.model.vocab_size)
        ranges = split_documents(dataset.num_documents, config.data.split)
        docs = "/".join(f"{b - a:,}" for a, b in ranges)
        lines.append(
            f"{prefix}: {dataset.num_documents:,} documents ({docs} train/valid/test), "
            f"{dataset.num_tokens:,} tokens, {dataset.dtype}: ok"
            + (f", every token < {config.model.vocab_size}" if check else "")
        )
    splits = build_datasets(config.data, config.train.seed)
    needed = config.train.max_steps * config.train.global_batch_size
    for split in SPLITS:
        data = getattr(splits, split)
        if data is None:
            lines.append(f"{split}: empty")
            continue
        parts = data.datasets if isinstance(data, BlendedDataset) else [data]
        tokens = sum(p.stop - p.start for p in parts)
        window = config.data.seq_len + 1
        line = f"{split}: {tokens:,} tokens, {len(data):,} samples of {window} tokens per epoch"
        if split == "train":
            line += f"; the run reads {needed:,} samples = {needed / len(data):,.2f} epochs"
        lines.append(line)
        if isinstance(data, BlendedDataset):
            for part in epochs_read(data, needed):  # the same counts a run checks
                epochs = f", {part.epochs:,.2f} epochs read" if split == "train" else ""
                lines.append(
                    f"    {part.share:6.1%}  {part.name}: {part.samples_per_epoch:,} samples "
                    f"per epoch{epochs}"
                )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="megagpt-build-index",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[2:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML file, or a preset name from configs/")
    p.add_argument("overrides", nargs="*", help="settings as section.key=value")
    p.add_argument(
        "--check-tokens", action="store_true", help="scan every token against model.vocab_size"
    )
    args = p.parse_args(argv)
    setup_logging()

    def body() -> int:
        config = load_config(args.config, args.overrides)
        print("\n".join(report(config, args.check_tokens)))
        return 0

    return run_tool("megagpt-build-index", body)


if __name__ == "__main__":
    sys.exit(main())
