"""Time to the first batch: megagpt's on-demand sample order vs Megatron's index arrays.

Writes a synthetic dataset (random document lengths; the .bin is a sparse file of
the right size, so it takes no time to write), then measures, for a run reading
`--epochs` epochs of `--seq-len` samples:

  megagpt:  build_datasets() + the first global batch (nothing to build)
  Megatron: a faithful vectorized-numpy version of what megatron-core's GPTDataset
            does on rank 0 before the first batch: document index (documents x
            epochs, shuffled), sample index (where each sample starts: Megatron
            does this in C++, here cumsum + searchsorted), shuffle index, all saved
            as .npy (cold start), and, on later starts, loaded with mmap (warm)

    python benchmarks/sample_index.py [--tokens 5e8] [--mean-doc 400]
"""

from __future__ import annotations

import argparse
import struct
import tempfile
import time
from pathlib import Path

import numpy as np

from megagpt.config.schema import DataConfig
from megagpt.data import build_datasets
from megagpt.data.indexed import MAGIC, VERSION


def write_synthetic(prefix: Path, tokens: float, mean_doc: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    count = int(tokens / mean_doc)
    sizes = rng.integers(1, 2 * mean_doc, count).astype(np.int32)
    pointers = np.concatenate(([0], np.cumsum(sizes[:-1], dtype=np.int64))) * 2
    with open(f"{prefix}.idx", "wb") as f:
        f.write(MAGIC + struct.pack("<QBQQ", VERSION, 8, count, count + 1))
        f.write(sizes.tobytes())
        f.write(pointers.tobytes())
        f.write(np.arange(count + 1, dtype=np.int64).tobytes())
    with open(f"{prefix}.bin", "wb") as f:
        f.truncate(int(sizes.sum(dtype=np.int64)) * 2)  # sparse: reads as zeros
    return sizes


def megatron_indices(sizes: np.ndarray, seq_len: int, num_samples: int, seed: int, cache: Path):
    """doc_idx, sample_idx, shuffle_idx as megatron-core's GPTDataset builds them."""
    rng = np.random.RandomState(seed)
    tokens_per_epoch = int(sizes.sum(dtype=np.int64))
    num_epochs = 1
    while (num_epochs * tokens_per_epoch - 1) // seq_len < num_samples:
        num_epochs += 1
    doc_idx = np.mgrid[0:num_epochs, 0 : len(sizes)][1].reshape(-1).astype(np.int32)
    rng.shuffle(doc_idx)
    total = (num_epochs * tokens_per_epoch - 1) // seq_len
    ends = np.cumsum(sizes[doc_idx], dtype=np.int64)  # helpers.cpp build_sample_idx, vectorized
    starts = np.arange(total + 1, dtype=np.int64) * seq_len
    doc_position = np.searchsorted(ends, starts, side="right").astype(np.int32)
    offset = (starts - np.where(doc_position > 0, ends[np.maximum(doc_position - 1, 0)], 0)).astype(
        np.int32
    )
    sample_idx = np.stack([doc_position, offset], axis=1)
    shuffle_idx = np.arange(total, dtype=np.int64 if total >= 2**32 - 1 else np.uint32)
    rng.shuffle(shuffle_idx)
    for name, array in (("doc", doc_idx), ("sample", sample_idx), ("shuffle", shuffle_idx)):
        np.save(cache / f"{name}_idx.npy", array, allow_pickle=False)
    return doc_idx, sample_idx, shuffle_idx


def megatron_batch(
    bin_tokens, sizes, starts_of_docs, doc_idx, sample_idx, shuffle_idx, seq_len, batch
):
    rows = []
    for i in shuffle_idx[:batch]:
        (d0, o0), (d1, o1) = sample_idx[i], sample_idx[i + 1]
        pieces = []
        for position in range(d0, d1 + 1):
            doc = doc_idx[position]
            begin = o0 if position == d0 else 0
            end = o1 + 1 if position == d1 else sizes[doc]
            pieces.append(bin_tokens[starts_of_docs[doc] + begin : starts_of_docs[doc] + end])
        rows.append(np.concatenate(pieces)[: seq_len + 1])
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=float, default=5e8)
    p.add_argument("--mean-doc", type=int, default=400)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--epochs", type=float, default=1.0, help="samples the run reads, in epochs")
    p.add_argument("--global-batch", type=int, default=512)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        prefix = Path(tmp) / "synthetic"
        sizes = write_synthetic(prefix, args.tokens, args.mean_doc)
        tokens = int(sizes.sum(dtype=np.int64))
        print(
            f"synthetic dataset: {len(sizes):,} documents, {tokens:,} tokens; seq_len "
            f"{args.seq_len}, {args.epochs:g} epochs, global batch {args.global_batch}"
        )
        num_samples = int(args.epochs * tokens / args.seq_len)
        batch = np.arange(args.global_batch)
        with open(f"{prefix}.bin", "rb") as f:  # page cache warm for both: time the order,
            while f.read(1 << 24):  # not the disk
                pass

        start = time.perf_counter()
        splits = build_datasets(
            DataConfig(path=[str(prefix)], split="1,0,0", seq_len=args.seq_len), 1234
        )
        splits.train.samples(batch)
        ours = time.perf_counter() - start

        cache = Path(tmp) / "cache"
        cache.mkdir()
        start = time.perf_counter()
        bin_tokens = np.memmap(f"{prefix}.bin", dtype=np.uint16, mode="r")
        doc_starts = np.concatenate(([0], np.cumsum(sizes[:-1], dtype=np.int64)))
        doc_idx, sample_idx, shuffle_idx = megatron_indices(
            sizes, args.seq_len, num_samples, 1234, cache
        )
        megatron_batch(
            bin_tokens,
            sizes,
            doc_starts,
            doc_idx,
            sample_idx,
            shuffle_idx,
            args.seq_len,
            args.global_batch,
        )
        cold = time.perf_counter() - start

        start = time.perf_counter()
        loaded = [
            np.load(cache / f"{n}_idx.npy", mmap_mode="r") for n in ("doc", "sample", "shuffle")
        ]
        megatron_batch(bin_tokens, sizes, doc_starts, *loaded, args.seq_len, args.global_batch)
        warm = time.perf_counter() - start

    print(f"megagpt (on demand)          {ours * 1e3:9.1f} ms to the first batch")
    print(f"Megatron, cold (build+save)  {cold * 1e3:9.1f} ms   ratio {cold / ours:,.0f}x")
    print(f"Megatron, warm (mmap cache)  {warm * 1e3:9.1f} ms   ratio {warm / ours:,.1f}x")


if __name__ == "__main__":
    main()
