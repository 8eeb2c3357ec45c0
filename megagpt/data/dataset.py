"""Training samples from indexed token files.

A split is a contiguous range of documents. Its tokens are cut into windows of
seq_len + 1 tokens (inputs and the targets shifted by one; consecutive windows share
one token, as in Megatron), documents running into each other separated by EOD.
Sample i of the split is window permute(i mod n) of epoch i // n, so the order is
fixed by the seed alone: never by the number of ranks that read it.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from megagpt.config.errors import ConfigError
from megagpt.config.schema import DataConfig
from megagpt.data.blend import BlendSchedule
from megagpt.data.indexed import IndexedDataset
from megagpt.data.manifest import expand_manifests
from megagpt.data.permutation import permute
from megagpt.data.settings import parse_data_path, parse_split
from megagpt.utils.seeds import derive_key

SPLITS = ("train", "valid", "test")


class GPTDataset:
    """Windows of seq_len + 1 tokens over documents [first_doc, last_doc) of one file."""

    def __init__(
        self,
        indexed: IndexedDataset,
        first_doc: int,
        last_doc: int,
        seq_len: int,
        seed: int,
        name: str,
    ):
        self.indexed = indexed
        self.seq_len = seq_len
        self.name = name
        self.start = indexed.document_token_offset(first_doc)
        self.stop = indexed.document_token_offset(last_doc)
        self.num_samples = max(0, (self.stop - self.start - 1) // seq_len)
        # The key depends on the split's name so train and valid orders differ.
        self.key = derive_key(seed, zlib.crc32(name.encode()))

    def __len__(self) -> int:
        """Samples in one epoch."""
        return self.num_samples

    def samples(self, indices: np.ndarray) -> np.ndarray:
        """Token windows (len(indices), seq_len + 1) as int64; indices past one epoch
        wrap into the next epoch, reshuffled."""
        if self.num_samples == 0:
            raise ValueError(f"{self.name} has no complete sample of {self.seq_len + 1} tokens")
        indices = np.asarray(indices, dtype=np.int64)
        epochs, within = np.divmod(indices, self.num_samples)
        windows = np.empty(within.shape, dtype=np.int64)
        for epoch in np.unique(epochs):
            chosen = epochs == epoch
            key = derive_key(self.key, int(epoch))
            windows[chosen] = permute(within[chosen], self.num_samples, key)
        out = np.empty((len(indices), self.seq_len + 1), dtype=np.int64)
        for row, window in enumerate(windows):
            begin = self.start + int(window) * self.seq_len
            out[row] = self.indexed.token_range(begin, begin + self.seq_len + 1)
        return out


class BlendedDataset:
    """Several datasets mixed by weight; see `BlendSchedule`."""

    def __init__(self, datasets: list[GPTDataset], weights: list[float], name: str):
        self.datasets = datasets
        self.schedule = BlendSchedule(weights)
        self.name = name
        self.num_samples = sum(len(d) for d in datasets)

    def __len__(self) -> int:
        return self.num_samples

    def samples(self, indices: np.ndarray) -> np.ndarray:
        which, within = self.schedule.lookup(np.asarray(indices, dtype=np.int64))
        out = np.empty((len(which), self.datasets[0].seq_len + 1), dtype=np.int64)
        for k, dataset in enumerate(self.datasets):
            chosen = which == k
            if chosen.any():
                out[chosen] = dataset.samples(within[chosen])
        return out


@dataclass
class SplitDatasets:
    train: GPTDataset | BlendedDataset
    valid: GPTDataset | BlendedDataset | None
    test: GPTDataset | BlendedDataset | None


def split_documents(num_documents: int, split: str) -> list[tuple[int, int]]:
    """Document ranges of the train, valid and test splits."""
    fractions = np.cumsum((0.0, *parse_split(split)))
    bounds = np.round(fractions * num_documents).astype(np.int64)
    bounds[-1] = num_documents
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def build_datasets(cfg: DataConfig, seed: int) -> SplitDatasets:
    """Open every prefix in `cfg.path` and build the three splits (blended if several)."""
    pairs = expand_manifests(parse_data_path(cfg.path))
    if not pairs:
        raise ConfigError(
            "data.path is empty: give the prefix of a tokenized dataset "
            "(<prefix>.bin/.idx), e.g. data.path=data/corpus_text_document"
        )
    files = [IndexedDataset(prefix) for _, prefix in pairs]
    per_split: dict[str, list[GPTDataset]] = {s: [] for s in SPLITS}
    for (_, prefix), indexed in zip(pairs, files):
        ranges = split_documents(indexed.num_documents, cfg.split)
        for split, (first, last) in zip(SPLITS, ranges):
            per_split[split].append(
                GPTDataset(indexed, first, last, cfg.seq_len, seed, f"{prefix}:{split}")
            )
    weights = [w if w is not None else float(f.num_tokens) for (w, _), f in zip(pairs, files)]

    def combine(split: str) -> GPTDataset | BlendedDataset | None:
        parts = per_split[split]
        usable = [(d, w) for d, w in zip(parts, weights) if len(d) > 0]
        if not usable:
            return None
        if len(parts) == 1:
            return parts[0]
        if len(usable) < len(parts):
            empty = [d.name for d in parts if len(d) == 0]
            raise ConfigError(
                f"data.split = {cfg.split!r} leaves {', '.join(empty)} without "
                "a complete sample; give those datasets more documents or "
                "change the split"
            )
        return BlendedDataset([d for d, _ in usable], [w for _, w in usable], split)

    train = combine("train")
    if train is None:
        raise ConfigError(
            f"data.path: the train split of {' '.join(p for _, p in pairs)} holds fewer than "
            f"data.seq_len + 1 = {cfg.seq_len + 1} tokens; use more data or a shorter seq_len"
        )
    return SplitDatasets(train=train, valid=combine("valid"), test=combine("test"))


def global_sample_indices(
    step: int,
    micro_step: int,
    dp_rank: int,
    dp_size: int,
    micro_batch_size: int,
    global_batch_size: int,
) -> np.ndarray:
    """Samples one rank reads for one micro step of one optimizer step.

    Global batch `step` is samples [step * G, (step + 1) * G); micro step m of it is
    the next micro_batch_size x dp_size of them, rank r taking its own slice. Any
    layout with the same G therefore trains on the same samples at every step.
    """
    start = (
        step * global_batch_size
        + micro_step * micro_batch_size * dp_size
        + dp_rank * micro_batch_size
    )
    return np.arange(start, start + micro_batch_size, dtype=np.int64)
