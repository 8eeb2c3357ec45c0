"""Our .bin/.idx files against megatron-core's own reader and writer, both ways."""

import sys

import numpy as np
import pytest

from megagpt.data import IndexedDataset, IndexedDatasetWriter

if sys.version_info[:2] != (3, 11):
    pytest.skip(
        "megatron-core 0.16.1 (the dev extra's pin) installs only on Python 3.11",
        allow_module_level=True,
    )

import torch  # noqa: E402
from megatron.core.datasets.indexed_dataset import (  # noqa: E402
    IndexedDataset as MegatronDataset,
)
from megatron.core.datasets.indexed_dataset import (  # noqa: E402
    IndexedDatasetBuilder,
)


def random_documents(rng, count, vocab, max_sequences=1):
    """Documents as lists of sequences (arrays), some of them empty."""
    return [
        [
            rng.integers(0, vocab, rng.integers(0, 40))
            for _ in range(rng.integers(1, max_sequences + 1))
        ]
        for _ in range(count)
    ]


def write_ours(prefix, documents, dtype):
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for sequences in documents:
            for tokens in sequences:
                writer.add_item(tokens)
            writer.end_document()


def write_megatron(prefix, documents, dtype):
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for sequences in documents:
        for tokens in sequences:
            builder.add_item(torch.from_numpy(np.asarray(tokens, dtype=np.int64)))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")


def same_files(a, b):
    return all(
        open(f"{a}{ext}", "rb").read() == open(f"{b}{ext}", "rb").read() for ext in (".bin", ".idx")
    )


@pytest.mark.parametrize(
    "dtype, vocab, max_sequences",
    [(np.uint16, 65_000, 1), (np.int32, 200_000, 1), (np.uint16, 500, 3), (np.int64, 10, 2)],
)
def test_our_files_are_byte_identical_to_megatrons(tmp_path, dtype, vocab, max_sequences):
    documents = random_documents(np.random.default_rng(vocab), 300, vocab, max_sequences)
    write_ours(tmp_path / "ours", documents, dtype)
    write_megatron(tmp_path / "megatron", documents, dtype)
    assert same_files(tmp_path / "ours", tmp_path / "megatron")
    theirs = MegatronDataset(str(tmp_path / "ours"))  # and Megatron reads ours
    flat = [tokens for sequences in documents for tokens in sequences]
    assert len(theirs) == len(flat)
    for i, tokens in enumerate(flat):
        assert theirs[i].tolist() == list(tokens)


def test_bulk_add_documents_writes_the_same_files(tmp_path):
    rng = np.random.default_rng(0)
    documents = [[rng.integers(0, 1000, rng.integers(1, 50))] for _ in range(500)]
    write_megatron(tmp_path / "megatron", documents, np.uint16)
    with IndexedDatasetWriter(tmp_path / "ours", np.uint16) as writer:
        for start in range(0, 500, 64):  # batches, as megagpt-preprocess writes them
            batch = [d[0] for d in documents[start : start + 64]]
            writer.add_documents(np.concatenate(batch), [len(t) for t in batch])
    assert same_files(tmp_path / "ours", tmp_path / "megatron")


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_we_read_megatrons_files(tmp_path, dtype):
    documents = random_documents(np.random.default_rng(1), 200, 60_000, max_sequences=2)
    write_megatron(tmp_path / "m", documents, dtype)
    ours, theirs = IndexedDataset(tmp_path / "m"), MegatronDataset(str(tmp_path / "m"))
    assert ours.dtype == np.dtype(dtype)
    assert np.array_equal(ours.sizes, theirs.sequence_lengths)
    assert np.array_equal(ours.document_indices, theirs.document_indices)
    assert ours.num_documents == len(documents)
    for i in range(len(ours)):
        assert np.array_equal(ours[i], theirs[i])


def test_streaming_merge_equals_megatrons_add_index(tmp_path):
    rng = np.random.default_rng(2)
    parts = []
    for k in range(3):
        write_megatron(tmp_path / f"part{k}", random_documents(rng, 50 + k, 30_000, 2), np.uint16)
        parts.append(tmp_path / f"part{k}")
    builder = IndexedDatasetBuilder(str(tmp_path / "megatron.bin"), dtype=np.uint16)
    for part in parts:
        builder.add_index(str(part))
    builder.finalize(str(tmp_path / "megatron.idx"))
    with IndexedDatasetWriter(tmp_path / "ours", np.uint16) as writer:
        for part in parts:
            writer.append_dataset(IndexedDataset(part), chunk=7)  # small chunks: many of them
    assert same_files(tmp_path / "ours", tmp_path / "megatron")
