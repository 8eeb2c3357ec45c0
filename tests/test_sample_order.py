"""The on-demand sample order: every token of an epoch once, exact blend weights,
determinism, and independence from the number of ranks."""

import numpy as np
import pytest

from megagpt.config.schema import DataConfig
from megagpt.data import IndexedDatasetWriter, build_datasets, global_sample_indices


def positional_dataset(prefix, lengths, base=0):
    """Documents whose tokens are their own positions in the file (+ base)."""
    with IndexedDatasetWriter(prefix, np.int32) as writer:
        start = base
        for n in lengths:
            writer.add_document(np.arange(start, start + n))
            start += n
    return str(prefix)


@pytest.mark.parametrize("seq_len", [7, 32, 100])
def test_an_epoch_covers_every_token_of_the_split_exactly_once(tmp_path, seq_len):
    rng = np.random.default_rng(seq_len)
    prefix = positional_dataset(tmp_path / "d", rng.integers(1, 300, 400))
    splits = build_datasets(DataConfig(path=[prefix], split="80,15,5", seq_len=seq_len), seed=9)
    for split in (splits.train, splits.valid, splits.test):
        n = len(split)
        rows = split.samples(np.arange(n))
        inputs = rows[:, :-1].reshape(-1)
        assert np.array_equal(np.sort(inputs), np.arange(split.start, split.start + n * seq_len))
        assert np.array_equal(rows[:, 1:], rows[:, :-1] + 1)  # targets are the next tokens
        assert split.stop - (split.start + n * seq_len) <= seq_len  # only a short tail is left
        later = split.samples(np.arange(3 * n, 4 * n))[:, :-1].reshape(-1)  # any epoch, same cover
        assert np.array_equal(np.sort(later), np.sort(inputs))


@pytest.mark.parametrize(
    "weights", [(0.5, 0.5), (0.2, 0.8), (0.1, 0.3, 0.6), (0.4, 0.3, 0.2, 0.1), (3, 1, 1, 5)]
)
def test_blend_weights_are_honoured_within_one_percent(tmp_path, weights):
    sizes = (40, 300, 1500, 90)[: len(weights)]  # very different sizes: small ones repeat epochs
    prefixes = [
        positional_dataset(tmp_path / f"d{k}", np.full(n, 50), base=k * 10_000_000)
        for k, n in enumerate(sizes)
    ]
    path = [item for w, p in zip(weights, prefixes) for item in (str(w), p)]
    train = build_datasets(DataConfig(path=path, split="1,0,0", seq_len=16), seed=1).train
    count = 20_000
    source = train.samples(np.arange(count))[:, 0] // 10_000_000
    share = np.bincount(source, minlength=len(weights)) / count
    expected = np.asarray(weights) / sum(weights)
    assert np.abs(share - expected).max() <= 0.01
    for prefix_count in (100, 1000, 7777):  # and at every prefix, within a sample or so
        head = np.bincount(source[:prefix_count], minlength=len(weights))
        assert np.abs(head - expected * prefix_count).max() <= 1.0


def test_order_is_deterministic_and_depends_on_the_seed(tmp_path):
    prefix = positional_dataset(tmp_path / "d", np.full(300, 41))
    config = DataConfig(path=[prefix], split="1,0,0", seq_len=20)

    def first(seed):
        return build_datasets(config, seed=seed).train.samples(np.arange(500))

    assert np.array_equal(first(5), first(5))
    assert not np.array_equal(first(5), first(6))


def test_each_step_reads_the_same_samples_whatever_the_number_of_ranks(tmp_path):
    a = positional_dataset(tmp_path / "a", np.full(200, 33))
    b = positional_dataset(tmp_path / "b", np.full(90, 70), base=1_000_000)
    train = build_datasets(
        DataConfig(path=["0.7", a, "0.3", b], split="1,0,0", seq_len=16), 3
    ).train
    global_batch = 24

    def step_batch(step, dp_size, micro):
        rows = []
        for m in range(global_batch // (micro * dp_size)):
            for rank in range(dp_size):  # (micro step, rank) order is global sample order
                indices = global_sample_indices(step, m, rank, dp_size, micro, global_batch)
                rows.append(train.samples(indices))
        return np.concatenate(rows)

    for step in (0, 7, 40):  # 40 steps x 24 is past one epoch of b
        reference = step_batch(step, 1, 24)
        for dp_size, micro in ((2, 12), (4, 3), (8, 1), (3, 4)):
            assert np.array_equal(step_batch(step, dp_size, micro), reference)
