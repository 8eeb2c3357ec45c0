import struct

import numpy as np
import pytest

from megagpt.config.schema import DataConfig
from megagpt.data import (
    IndexedDataset,
    IndexedDatasetError,
    IndexedDatasetWriter,
    build_datasets,
    global_sample_indices,
    token_dtype,
)
from megagpt.data.blend import BlendSchedule
from megagpt.data.dataset import split_documents
from megagpt.data.indexed import HEADER_SIZE
from megagpt.data.permutation import permute


def write_dataset(prefix, documents, dtype=np.uint16):
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for doc in documents:
            writer.add_document(doc)
    return str(prefix)


def test_round_trip_and_layout(tmp_path):
    docs = [np.arange(n, dtype=np.int64) + 10 * n for n in (3, 1, 5, 2)]
    prefix = write_dataset(tmp_path / "ds", docs)
    ds = IndexedDataset(prefix)
    assert (len(ds), ds.num_documents, ds.num_tokens) == (4, 4, 11)
    assert ds.dtype == np.uint16
    for i, doc in enumerate(docs):
        assert ds[i].tolist() == doc.tolist()
    assert ds.get(2, offset=1, length=3).tolist() == docs[2][1:4].tolist()
    assert ds.document_indices.tolist() == [0, 1, 2, 3, 4]
    assert ds.pointers.tolist() == [0, 6, 8, 18]
    raw = (tmp_path / "ds.idx").read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    assert struct.unpack("<QBQQ", raw[9:HEADER_SIZE]) == (1, 8, 4, 5)
    assert not list(tmp_path.glob("*.partial"))


def test_multi_sequence_documents_and_int32(tmp_path):
    with IndexedDatasetWriter(tmp_path / "big", token_dtype(100_000)) as writer:
        writer.add_item([70_000, 1])
        writer.add_item([2])
        writer.end_document()
        writer.add_document([99_999])
    ds = IndexedDataset(tmp_path / "big")
    assert ds.dtype == np.int32
    assert ds.document_indices.tolist() == [0, 2, 3]
    assert ds[0].tolist() == [70_000, 1]


def test_writer_error_leaves_no_files(tmp_path):
    with pytest.raises(RuntimeError), IndexedDatasetWriter(tmp_path / "bad") as writer:
        writer.add_document([1, 2, 3])
        raise RuntimeError("tokenizer crashed")
    assert list(tmp_path.iterdir()) == []


def corrupt(tmp_path, how):
    prefix = write_dataset(tmp_path / "ds", [np.arange(5), np.arange(7)])
    idx, bin_ = tmp_path / "ds.idx", tmp_path / "ds.bin"
    raw = bytearray(idx.read_bytes())
    if how == "magic":
        raw[:4] = b"NOPE"
    elif how == "version":
        raw[9:17] = struct.pack("<Q", 2)
    elif how == "dtype":
        raw[17] = 42
    elif how == "truncated-idx":
        raw = raw[:-8]
    elif how == "short-header":
        raw = raw[:10]
    elif how == "truncated-bin":
        bin_.write_bytes(bin_.read_bytes()[:-2])
    elif how == "missing-bin":
        bin_.unlink()
    idx.write_bytes(bytes(raw))
    return prefix


@pytest.mark.parametrize(
    "how, message",
    [
        ("magic", "ds.idx: bad magic"),
        ("version", "ds.idx: unsupported version 2"),
        ("dtype", "ds.idx: unknown dtype code 42"),
        ("truncated-idx", "ds.idx: size .* does not match the header"),
        ("short-header", "ds.idx: truncated header"),
        ("truncated-bin", "ds.bin: size 22 bytes, but .*ds.idx says its sequences end at byte 24"),
        ("missing-bin", "ds.bin: file not found"),
    ],
)
def test_corrupt_files_are_named_with_the_problem(tmp_path, how, message):
    prefix = corrupt(tmp_path, how)
    with pytest.raises(IndexedDatasetError, match=message):
        IndexedDataset(prefix)


@pytest.mark.parametrize("n", [1, 2, 3, 10, 257, 1000, 65_537])
def test_permutation_is_a_bijection(n):
    image = permute(np.arange(n), n, key=1234)
    assert np.array_equal(np.sort(image), np.arange(n))


def test_permutation_depends_on_key_and_is_stable():
    a = permute(np.arange(1000), 1000, key=1)
    assert not np.array_equal(a, permute(np.arange(1000), 1000, key=2))
    assert np.array_equal(a[[5, 17, 999]], permute(np.array([5, 17, 999]), 1000, key=1))


@pytest.mark.parametrize("weights", [[0.3, 0.7], [1, 1, 1], [0.01, 0.99], [5, 1, 2, 2]])
def test_blend_tracks_weights_within_one_sample(weights):
    n = 5000
    dataset, within = BlendSchedule(weights).lookup(np.arange(n))
    share = np.asarray(weights) / sum(weights)
    for k in range(len(weights)):
        taken = dataset == k
        assert np.array_equal(within[taken], np.arange(taken.sum()))  # each sample once, in order
        error = np.abs(np.cumsum(taken) - np.arange(1, n + 1) * share[k])
        assert error.max() <= 1.0


def test_splits_are_disjoint_document_ranges():
    assert split_documents(1000, "969,30,1") == [(0, 969), (969, 999), (999, 1000)]
    assert split_documents(10, "8,2") == [(0, 8), (8, 10), (10, 10)]


def test_samples_are_shifted_windows_of_the_split(tmp_path):
    docs = [np.arange(100 * i, 100 * i + 50) for i in range(10)]
    prefix = write_dataset(tmp_path / "ds", docs)
    splits = build_datasets(DataConfig(path=[prefix], split="8,2,0", seq_len=16), seed=3)
    train, valid = splits.train, splits.valid
    assert splits.test is None
    assert len(train) == (8 * 50 - 1) // 16 and len(valid) == (2 * 50 - 1) // 16
    flat = np.concatenate(docs)
    windows = train.samples(np.arange(len(train)))
    starts = sorted(int(np.flatnonzero(flat == row[0])[0]) for row in windows)
    assert starts == [16 * i for i in range(len(train))]  # every window exactly once
    for row in windows:
        begin = int(np.flatnonzero(flat == row[0])[0])
        assert row.tolist() == flat[begin : begin + 17].tolist()
    assert set(valid.samples(np.arange(len(valid)))[:, 0]) <= set(range(800, 1000))
    second_epoch = train.samples(np.arange(len(train), 2 * len(train)))
    assert sorted(second_epoch[:, 0]) == sorted(windows[:, 0])
    assert not np.array_equal(second_epoch, windows)  # reshuffled


def test_blended_datasets(tmp_path):
    a = write_dataset(tmp_path / "a", [np.full(40, 1)] * 20)
    b = write_dataset(tmp_path / "b", [np.full(40, 2)] * 20)
    splits = build_datasets(
        DataConfig(path=["0.25", a, "0.75", b], split="1,0,0", seq_len=8), seed=0
    )
    first = splits.train.samples(np.arange(400))[:, 0]
    assert (first == 1).sum() == 100 and (first == 2).sum() == 300


def test_every_sample_of_a_global_batch_is_read_once_whatever_the_layout():
    for dp, micro in [(1, 8), (2, 4), (4, 1), (2, 2)]:
        seen = []
        for m in range(16 // (micro * dp)):
            for rank in range(dp):
                seen.extend(global_sample_indices(3, m, rank, dp, micro, 16).tolist())
        assert sorted(seen) == list(range(48, 64)), (dp, micro)


def test_a_preprocess_manifest_stands_for_its_shards(tmp_path, monkeypatch):
    """data.path may name <prefix>.manifest.json: its shards, found beside it from any
    working directory, the empty ones left out; a weight is shared by their tokens."""
    import json

    from megagpt.config import ConfigError
    from megagpt.data.manifest import expand_manifests

    rng = np.random.default_rng(0)
    sizes = {"c_00000": 40, "c_00001": 0, "c_00002": 25}
    for name, count in sizes.items():
        write_dataset(tmp_path / name, [rng.integers(0, 100, 30) for _ in range(count)])
    manifest = tmp_path / "c.manifest.json"
    manifest.write_text(json.dumps({
        "data_path": list(sizes),
        "shards": [{"prefix": n, "documents": c, "tokens": 30 * c} for n, c in sizes.items()],
    }))  # fmt: skip
    monkeypatch.chdir(tmp_path.parent)  # not the manifest's directory
    shards = [str(tmp_path / "c_00000"), str(tmp_path / "c_00002")]
    assert expand_manifests([(None, str(manifest))]) == [(None, s) for s in shards]
    assert expand_manifests([(0.5, str(manifest)), (0.5, "x")]) == [
        (0.5 * 40 / 65, shards[0]), (0.5 * 25 / 65, shards[1]), (0.5, "x")
    ]  # fmt: skip
    config = DataConfig(split="8,2,0", seq_len=16)
    by_manifest = build_datasets(DataConfig(**{**vars(config), "path": [str(manifest)]}), seed=3)
    by_shards = build_datasets(DataConfig(**{**vars(config), "path": shards}), seed=3)
    indices = np.arange(20)
    assert (by_manifest.train.samples(indices) == by_shards.train.samples(indices)).all()
    manifest.write_text("{not json")
    with pytest.raises(ConfigError, match="is not a megagpt-preprocess manifest"):
        expand_manifests([(None, str(manifest))])
