"""Classification sets: the texts and labels of `megagpt-preprocess --format classify`.

Each example is one text (ending in EOD) and a label id. A sample is one example,
padded to data.seq_len: the classifier reads the final hidden state of its last token
(GPT-1's recipe), and the text's own next-token targets serve the auxiliary
language-modelling loss. Training samples come in a seeded order, reshuffled every
epoch; evaluation reads every example once, in order (rows past the end of the split
are marked with IGNORE_INDEX labels and count for nothing).
"""

from __future__ import annotations

import zlib

import numpy as np

from megagpt.config.errors import ConfigError
from megagpt.config.schema import DataConfig
from megagpt.data.dataset import SplitDatasets, split_documents
from megagpt.data.indexed import IndexedDataset
from megagpt.data.labeled_format import LabeledManifest
from megagpt.data.permutation import permute
from megagpt.model.gpt import IGNORE_INDEX
from megagpt.utils.seeds import derive_key


class LabeledTexts:
    """Every example of a classify set, across its shards: tokens and label ids."""

    def __init__(self, manifest: LabeledManifest):
        self.tokens = [IndexedDataset(p) for p in manifest.shard_prefixes]
        labels = [IndexedDataset(p + manifest.side_suffix) for p in manifest.shard_prefixes]
        for tokens, shard in zip(self.tokens, labels):
            if len(shard) != len(tokens) or (np.asarray(shard.sizes) != 1).any():
                raise ConfigError(
                    f"{shard.prefix}: expected one label per document of {tokens.prefix}; "
                    "preprocess the set again with --format classify"
                )
        self.labels = np.concatenate(
            [np.asarray(s.token_range(0, len(s)), np.int64) for s in labels]
        )
        self.lengths = np.concatenate([np.asarray(t.sizes, dtype=np.int64) for t in self.tokens])
        self._starts = np.cumsum([0, *(len(t) for t in self.tokens)])
        self.names = list(manifest.labels)

    def __len__(self) -> int:
        return len(self.labels)

    def text(self, index: int) -> np.ndarray:
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        return np.asarray(self.tokens[shard][index - int(self._starts[shard])], dtype=np.int64)


class ClassificationExamples:
    """One split of a classify set, as samples of one padded example each."""

    def __init__(
        self,
        source: LabeledTexts,
        examples: np.ndarray,
        seq_len: int,
        seed: int,
        name: str,
        shuffle: bool,
    ):
        self.source, self.examples, self.seq_len = source, examples, seq_len
        self.name, self.shuffle = name, shuffle
        too_long = np.flatnonzero(source.lengths[examples] > seq_len)
        if len(too_long):
            raise ConfigError(
                f"{name}: {len(too_long):,} texts are longer than data.seq_len = {seq_len} "
                f"tokens; preprocess with --max-tokens {seq_len} or raise data.seq_len"
            )
        self.num_samples = len(examples)
        self.key = derive_key(seed, zlib.crc32(name.encode()))

    def __len__(self) -> int:
        return self.num_samples

    def _examples_of(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Example numbers of the samples, and which samples are real (not past the
        end of an evaluation pass)."""
        indices = np.asarray(indices, dtype=np.int64)
        if not self.shuffle:
            real = indices < self.num_samples
            return self.examples[np.where(real, indices, 0)], real
        epochs, within = np.divmod(indices, self.num_samples)
        order = np.empty(within.shape, dtype=np.int64)
        for epoch in np.unique(epochs):
            chosen = epochs == epoch
            order[chosen] = permute(
                within[chosen], self.num_samples, derive_key(self.key, int(epoch))
            )
        return self.examples[order], np.ones(len(indices), dtype=bool)

    def microbatch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """inputs, targets (B, seq_len), labels and label_positions (B,)."""
        rows, T = len(indices), self.seq_len
        out = {
            "inputs": np.zeros((rows, T), dtype=np.int64),
            "targets": np.full((rows, T), IGNORE_INDEX, dtype=np.int64),
            "labels": np.full(rows, IGNORE_INDEX, dtype=np.int64),
            "label_positions": np.zeros(rows, dtype=np.int64),
        }
        examples, real = self._examples_of(indices)
        for row, (example, counted) in enumerate(zip(examples.tolist(), real.tolist())):
            tokens = self.source.text(example)
            n = len(tokens)
            out["inputs"][row, :n] = tokens
            out["label_positions"][row] = n - 1
            if counted:
                out["targets"][row, : n - 1] = tokens[1:]
                out["labels"][row] = self.source.labels[example]
        return out


def build_classification_datasets(
    cfg: DataConfig, manifest: LabeledManifest, seed: int
) -> SplitDatasets:
    """The train, validation and test splits of a classify set, by examples."""
    source = LabeledTexts(manifest)
    name = manifest.shard_prefixes[0]
    splits = []
    for split, (a, b) in zip(("train", "valid", "test"), split_documents(len(source), cfg.split)):
        examples = np.arange(a, b)
        splits.append(
            ClassificationExamples(
                source, examples, cfg.seq_len, seed, f"{name}:{split}", shuffle=split == "train"
            )
            if b > a
            else None
        )
    if splits[0] is None:
        raise ConfigError(f"data.split = {cfg.split!r} leaves no training example in {name}")
    return SplitDatasets(train=splits[0], valid=splits[1], test=splits[2])
