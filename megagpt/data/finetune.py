"""Fine-tuning sets: the examples of `megagpt-preprocess --format sft`, packed.

data.path names the manifest (`<prefix>.manifest.json`) of a labeled set. Its examples,
in manifest order, are split by data.split (train / validation / test, by examples),
and each split is packed into windows of data.seq_len input tokens (packing.py): an
example of n tokens gives n - 1 (input, target) pairs; a target is trained on where
the example's loss mask is 1 (prompt tokens never are), and the rest of a window is
padding that is never trained on. Within a window, each example keeps its own
positions (0, 1, ...) and example number, from which the model builds the attention
mask that keeps examples apart; with finetune.pack = false every example is alone in
its window. Windows are read in a seeded order, reshuffled every epoch, by global sample
index, like the pretraining samples, so any layout sees the same examples at every step.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from megagpt.config.errors import ConfigError
from megagpt.config.schema import DataConfig
from megagpt.data.dataset import SplitDatasets, split_documents
from megagpt.data.indexed import IndexedDataset
from megagpt.data.labeled_format import LabeledManifest, read_labeled_manifest
from megagpt.data.manifest import MANIFEST_SUFFIX
from megagpt.data.packing import one_per_window, pack_examples
from megagpt.data.permutation import permute
from megagpt.data.settings import parse_data_path
from megagpt.model.gpt import IGNORE_INDEX
from megagpt.utils.seeds import derive_key

SPLIT_NAMES = ("train", "valid", "test")


def labeled_manifest(cfg: DataConfig) -> LabeledManifest | None:
    """The labeled set data.path names, or None for text corpora."""
    pairs = parse_data_path(cfg.path)
    manifests = [p for _, p in pairs if p.endswith(MANIFEST_SUFFIX)]
    if not manifests:
        return None
    read = read_labeled_manifest(manifests[0])
    if read.format == "text":
        return None
    if len(pairs) > 1 or pairs[0][0] is not None:
        raise ConfigError(
            f"data.path = {' '.join(cfg.path)!r}: a fine-tuning set ({read.format}) is "
            "trained alone, without weights; merge labeled sets in megagpt-preprocess "
            "(give it all their files) instead"
        )
    return read


class ExampleSource:
    """The examples of a labeled set, across its shards: tokens and loss masks."""

    def __init__(self, manifest: LabeledManifest):
        self.tokens = [IndexedDataset(p) for p in manifest.shard_prefixes]
        self.masks = [IndexedDataset(p + manifest.side_suffix) for p in manifest.shard_prefixes]
        for tokens, mask in zip(self.tokens, self.masks):
            if not np.array_equal(tokens.sizes, mask.sizes):
                raise ConfigError(
                    f"{mask.prefix}: its documents' lengths differ from {tokens.prefix}'s; "
                    "the loss mask must have been written by another run (preprocess again)"
                )
        self.lengths = np.concatenate([np.asarray(t.sizes, dtype=np.int64) for t in self.tokens])
        self._starts = np.cumsum([0, *(len(t.sizes) for t in self.tokens)])

    def __len__(self) -> int:
        return len(self.lengths)

    def example(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        within = index - int(self._starts[shard])
        return (
            np.asarray(self.tokens[shard][within], dtype=np.int64),
            np.asarray(self.masks[shard][within], dtype=np.int64),
        )


@dataclass
class PackingStats:
    windows: int
    examples: int
    tokens: int  # input positions holding an example (the rest is padding)
    supervised: int

    def describe(self, seq_len: int) -> str:
        return (
            f"{self.examples:,} examples in {self.windows:,} windows of {seq_len} tokens "
            f"({self.tokens / max(1, self.windows * seq_len):.1%} filled, "
            f"{self.supervised:,} trained tokens)"
        )


class PackedExamples:
    """One split's windows; sample i of epoch e is window permute(i, e)."""

    def __init__(
        self,
        source: ExampleSource,
        examples: np.ndarray,
        seq_len: int,
        seed: int,
        name: str,
        pack: bool,
        pad_id: int = 0,
    ):
        self.source, self.seq_len, self.name, self.pad_id = source, seq_len, name, pad_id
        pairs = source.lengths[examples] - 1
        too_long = np.flatnonzero(pairs > seq_len)
        if len(too_long):
            raise ConfigError(
                f"{name}: {len(too_long):,} examples are longer than data.seq_len + 1 = "
                f"{seq_len + 1} tokens (the longest {int(pairs.max()) + 1}); preprocess with "
                f"--max-tokens {seq_len + 1} (truncate or drop them) or raise data.seq_len"
            )
        usable = pairs > 0
        examples, pairs = examples[usable], pairs[usable]
        placed = pack_examples(pairs, seq_len) if pack else one_per_window(len(examples))
        self.windows = [examples[w] for w in placed]
        self.num_samples = len(self.windows)
        self.key = derive_key(seed, zlib.crc32(name.encode()))
        self.stats = PackingStats(len(self.windows), len(examples), int(pairs.sum()), 0)

    def __len__(self) -> int:
        return self.num_samples

    def window_order(self, indices: np.ndarray) -> np.ndarray:
        if self.num_samples == 0:
            raise ConfigError(f"{self.name} holds no example to train on")
        indices = np.asarray(indices, dtype=np.int64)
        epochs, within = np.divmod(indices, self.num_samples)
        windows = np.empty(within.shape, dtype=np.int64)
        for epoch in np.unique(epochs):
            chosen = epochs == epoch
            windows[chosen] = permute(
                within[chosen], self.num_samples, derive_key(self.key, int(epoch))
            )
        return windows

    def microbatch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """inputs, targets, positions, segments (B, seq_len) of the given samples."""
        rows, T = len(indices), self.seq_len
        out = {
            "inputs": np.full((rows, T), self.pad_id, dtype=np.int64),
            "targets": np.full((rows, T), IGNORE_INDEX, dtype=np.int64),
            "positions": np.zeros((rows, T), dtype=np.int64),
            "segments": np.zeros((rows, T), dtype=np.int64),
        }
        for row, window in enumerate(self.window_order(indices)):
            start = 0
            examples = self.windows[int(window)]
            for number, example in enumerate(examples.tolist()):
                tokens, mask = self.source.example(example)
                end = start + len(tokens) - 1
                out["inputs"][row, start:end] = tokens[:-1]
                out["targets"][row, start:end] = np.where(mask[1:] == 1, tokens[1:], IGNORE_INDEX)
                out["positions"][row, start:end] = np.arange(end - start)
                out["segments"][row, start:end] = number
                start = end
            out["segments"][row, start:] = len(examples)  # padding: a segment of its own
            out["positions"][row, start:] = np.arange(T - start)
        return out

    def count_supervised(self) -> int:
        """Trained tokens over the whole split (read once, for the start-up log)."""
        total = 0
        for window in self.windows:
            for example in window.tolist():
                total += int(self.source.example(example)[1][1:].sum())
        self.stats.supervised = total
        return total


def build_finetune_datasets(
    cfg: DataConfig, manifest: LabeledManifest, seed: int, pack: bool, pad_id: int = 0
) -> SplitDatasets:
    """The train, validation and test splits of a labeled set, by examples."""
    if manifest.format != "sft":
        raise ConfigError(f"data.path: a {manifest.format} set is not chat or instruction data")
    source = ExampleSource(manifest)
    ranges = split_documents(len(source), cfg.split)
    name = manifest.shard_prefixes[0]
    splits = [
        PackedExamples(source, np.arange(a, b), cfg.seq_len, seed, f"{name}:{split}", pack, pad_id)
        if b > a
        else None
        for split, (a, b) in zip(SPLIT_NAMES, ranges)
    ]
    if splits[0] is None or len(splits[0]) == 0:
        raise ConfigError(f"data.split = {cfg.split!r} leaves no training example in {name}")
    return SplitDatasets(train=splits[0], valid=splits[1], test=splits[2])
