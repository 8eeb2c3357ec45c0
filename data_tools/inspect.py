"""megagpt-inspect: what a .bin/.idx dataset holds, and sample documents decoded.

    megagpt-inspect data/web_00000 --tokenizer data/tok.model --samples 3

Prints documents, sequences, tokens, dtype and a histogram of document lengths
(computed in chunks: flat memory on any size), then decodes sample documents.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np

from data_tools.cli import run_tool, setup_logging
from megagpt.data.indexed import IndexedDataset, IndexedDatasetError

CHUNK = 1 << 20
BAR_WIDTH = 40


def document_lengths(dataset: IndexedDataset, start: int, stop: int) -> np.ndarray:
    """Tokens of documents [start, stop) (a document may hold several sequences)."""
    seq = np.asarray(dataset.document_indices[start : stop + 1])
    first = int(seq[0])
    cumulative = np.concatenate(
        ([0], np.cumsum(dataset.sizes[first : int(seq[-1])], dtype=np.int64))
    )
    return np.diff(cumulative[seq - first])


def length_histogram(dataset: IndexedDataset) -> tuple[np.ndarray, np.ndarray]:
    """Counts of documents per power-of-two length bin: [0,1), [1,2), [2,4), ..."""
    counts = np.zeros(64, dtype=np.int64)
    for start in range(0, dataset.num_documents, CHUNK):
        lengths = document_lengths(dataset, start, min(start + CHUNK, dataset.num_documents))
        bins = np.where(
            lengths > 0, np.floor(np.log2(np.maximum(lengths, 1))).astype(np.int64) + 1, 0
        )
        counts += np.bincount(bins, minlength=64)[:64]
    used = np.flatnonzero(counts)
    last = int(used[-1]) + 1 if len(used) else 1
    edges = np.array([0] + [1 << k for k in range(last)])
    return counts[:last], edges


def describe(dataset: IndexedDataset) -> list[str]:
    lines = [
        f"{dataset.prefix}: {dataset.num_documents:,} documents, {len(dataset):,} sequences, "
        f"{dataset.num_tokens:,} tokens, dtype {dataset.dtype}",
    ]
    if dataset.num_documents:
        counts, edges = length_histogram(dataset)
        mean = dataset.num_tokens / dataset.num_documents
        lines.append(f"document length in tokens (mean {mean:,.1f}):")
        peak = counts.max()
        first_used = int(np.flatnonzero(counts)[0])
        for k, count in enumerate(counts):
            if k < first_used:
                continue
            low = edges[k]
            high = edges[k + 1] - 1 if k + 1 < len(edges) else 2 * max(1, low) - 1
            bar = "#" * int(round(BAR_WIDTH * count / peak))
            lines.append(f"  {low:>9,} - {high:>9,}  {count:>12,}  {bar}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="megagpt-inspect", description=__doc__.split("\n\n")[0])
    p.add_argument("prefix", help="dataset prefix (<prefix>.bin/.idx)")
    p.add_argument("--tokenizer", help="tokenizer (.model or .json) to decode samples with")
    p.add_argument("--samples", type=int, default=2, help="random documents to decode")
    p.add_argument("--documents", type=int, nargs="*", default=(), help="these documents too")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-chars", type=int, default=600, help="show at most this much of each")
    args = p.parse_args(argv)
    setup_logging()

    def body() -> int:
        dataset = IndexedDataset(args.prefix)
        print("\n".join(describe(dataset)))
        if not args.tokenizer or not dataset.num_documents:
            return 0
        from megagpt.tokenizer import Tokenizer

        tokenizer = Tokenizer(args.tokenizer)
        rng = np.random.default_rng(args.seed)
        chosen = [
            *args.documents,
            *rng.choice(
                dataset.num_documents, min(args.samples, dataset.num_documents), replace=False
            ),
        ]
        for document in chosen:
            if not 0 <= document < dataset.num_documents:
                raise IndexedDatasetError(
                    f"--documents {document}: the dataset has {dataset.num_documents} documents"
                )
            start, stop = dataset.document_indices[document], dataset.document_indices[document + 1]
            ids = np.concatenate(
                [dataset[i] for i in range(int(start), int(stop))] or [np.zeros(0, int)]
            )
            text = tokenizer.decode(ids[ids != tokenizer.eod_id])
            shown = text if len(text) <= args.max_chars else text[: args.max_chars] + " [...]"
            print(f"\n--- document {document}: {len(ids):,} tokens ---\n{shown}")
        return 0

    return run_tool("megagpt-inspect", body)


if __name__ == "__main__":
    sys.exit(main())
