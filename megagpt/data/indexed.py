"""Megatron's indexed dataset format (`<prefix>.bin` + `<prefix>.idx`, "MMIDIDX").

`.bin` holds the token ids of every sequence, back to back. `.idx`, little-endian:
magic b"MMIDIDX\\x00\\x00", u64 version (1), u8 dtype code, u64 sequence count,
u64 document-index count, int32 sequence lengths, int64 byte offsets of each
sequence in `.bin`, int64 document indices (sequence numbers where documents start,
beginning with 0 and ending with the sequence count).

The writer streams: tokens go straight to `.bin`, lengths to a spill file, so its
memory does not grow with the corpus; the index is assembled in chunks at the end
and both files appear under their final names only once complete.
"""

from __future__ import annotations

import os
import struct
from array import array
from pathlib import Path

import numpy as np

from megagpt.errors import MegagptError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = len(MAGIC) + 8 + 1 + 8 + 8
DTYPE_CODES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
CODE_OF_DTYPE = {np.dtype(v): k for k, v in DTYPE_CODES.items()}
_CHUNK = 1 << 20  # entries per chunk when assembling the index


class IndexedDatasetError(MegagptError):
    """A .bin/.idx pair is missing, truncated or inconsistent."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (Megatron's rule: vocabulary under 65,500), else int32."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


def data_file_paths(prefix: str | Path) -> tuple[Path, Path]:
    prefix = str(prefix)
    return Path(prefix + ".bin"), Path(prefix + ".idx")


class IndexedDatasetWriter:
    """Write sequences to `<prefix>.bin/.idx` with memory independent of corpus size.

    Use `add_document(tokens)` for a one-sequence document, or `add_item` for each
    sequence followed by `end_document()`. Call `finalize()` (or use it as a context
    manager) to make the files appear.
    """

    def __init__(self, prefix: str | Path, dtype: np.dtype | type = np.uint16):
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise ValueError(
                f"unsupported token dtype {self.dtype}; use one of "
                f"{sorted(str(np.dtype(d)) for d in DTYPE_CODES.values())}"
            )
        self.bin_path, self.idx_path = data_file_paths(prefix)
        self._partial_bin = _partial(self.bin_path)
        self._lengths_path = _partial(self.idx_path, ".lengths")
        self._docs_path = _partial(self.idx_path, ".docs")
        try:
            self.bin_path.parent.mkdir(parents=True, exist_ok=True)
            self._bin = open(self._partial_bin, "wb")
            self._lengths_file = open(self._lengths_path, "wb")
            self._docs_file = open(self._docs_path, "wb")
        except OSError as error:  # read-only, a file where the directory should be, ...
            raise IndexedDatasetError(
                f"cannot write the dataset {prefix}: {error.strerror} ({error.filename}); "
                "choose an output prefix in a writable directory"
            ) from None
        self._lengths = array("i")
        self._docs = array("q", [0])
        self.sequence_count = 0
        self.document_count = 0
        self.token_count = 0
        self._finished = False

    def add_item(self, tokens) -> None:
        """Append one sequence (any 1-D array-like of ids) to the current document."""
        data = np.asarray(tokens, dtype=self.dtype)
        self._bin.write(data.tobytes(order="C"))
        self._lengths.append(data.size)
        self.sequence_count += 1
        self.token_count += data.size
        if len(self._lengths) >= _CHUNK:
            self._flush_lengths()

    def end_document(self) -> None:
        self._docs.append(self.sequence_count)
        self.document_count += 1
        if len(self._docs) >= _CHUNK:
            self._flush_docs()

    def add_document(self, tokens) -> None:
        self.add_item(tokens)
        self.end_document()

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append many one-sequence documents at once: `tokens` holds them back to back,
        `lengths[i]` is the size of document i. Same files as add_document in a loop."""
        tokens = np.asarray(tokens, dtype=self.dtype)
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != tokens.size:
            raise ValueError(f"lengths add up to {int(lengths.sum())}, but {tokens.size} tokens")
        self._bin.write(tokens.tobytes(order="C"))
        self._docs_chunk(self.sequence_count + 1 + np.arange(len(lengths), dtype=np.int64))
        self._lengths_chunk(lengths)
        self.token_count += tokens.size

    def append_dataset(self, dataset: IndexedDataset, chunk: int = _CHUNK) -> None:
        """Append every sequence and document of `dataset`, streaming in chunks (as
        Megatron's `add_index`, without loading its index or data into memory)."""
        if dataset.dtype != self.dtype:
            raise ValueError(
                f"{dataset.idx_path}: token dtype {dataset.dtype}, but this dataset is "
                f"{self.dtype}; merge only datasets written with the same dtype"
            )
        with open(dataset.bin_path, "rb") as f:
            _copy_file_object(f, self._bin)
        docs = dataset.document_indices
        for start in range(1, len(docs), chunk):  # docs[0] == 0 is implied
            self._docs_chunk(np.asarray(docs[start : start + chunk]) + self.sequence_count)
        for start in range(0, len(dataset.sizes), chunk):
            self._lengths_chunk(np.asarray(dataset.sizes[start : start + chunk]))
        self.token_count += dataset.num_tokens

    def _lengths_chunk(self, lengths: np.ndarray) -> None:
        self._flush_lengths()
        self._lengths_file.write(np.asarray(lengths, dtype=np.int32).tobytes())
        self.sequence_count += len(lengths)

    def _docs_chunk(self, document_ends: np.ndarray) -> None:
        self._flush_docs()
        self._docs_file.write(np.asarray(document_ends, dtype=np.int64).tobytes())
        self.document_count += len(document_ends)

    def _flush_lengths(self) -> None:
        self._lengths_file.write(self._lengths.tobytes())
        self._lengths = array("i")

    def _flush_docs(self) -> None:
        self._docs_file.write(self._docs.tobytes())
        self._docs = array("q")

    def finalize(self) -> None:
        """Write the index and move both files to their final names."""
        if self._finished:
            return
        self._flush_lengths()
        self._flush_docs()
        for f in (self._bin, self._lengths_file, self._docs_file):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        doc_entries = self.document_count + 1
        partial_idx = _partial(self.idx_path)
        with open(partial_idx, "wb") as out:
            out.write(MAGIC)
            out.write(struct.pack("<Q", VERSION))
            out.write(struct.pack("<B", CODE_OF_DTYPE[self.dtype]))
            out.write(struct.pack("<Q", self.sequence_count))
            out.write(struct.pack("<Q", doc_entries))
            _copy_file(self._lengths_path, out)
            offset = 0  # byte offsets, computed chunk by chunk from the spilled lengths
            lengths = (
                np.memmap(self._lengths_path, dtype=np.int32, mode="r")
                if (self.sequence_count)
                else np.zeros(0, np.int32)
            )
            for start in range(0, self.sequence_count, _CHUNK):
                chunk = lengths[start : start + _CHUNK].astype(np.int64) * self.dtype.itemsize
                pointers = np.cumsum(chunk) - chunk + offset
                offset += int(chunk.sum())
                out.write(pointers.tobytes())
            del lengths
            _copy_file(self._docs_path, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(self._partial_bin, self.bin_path)
        os.replace(partial_idx, self.idx_path)
        self._lengths_path.unlink()
        self._docs_path.unlink()
        self._finished = True

    def abort(self) -> None:
        """Close and delete the partial files without producing a dataset."""
        for f in (self._bin, self._lengths_file, self._docs_file):
            f.close()
        for path in (
            self._partial_bin,
            self._lengths_path,
            self._docs_path,
            _partial(self.idx_path),
        ):
            path.unlink(missing_ok=True)
        self._finished = True

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


def _partial(path: Path, suffix: str = "") -> Path:
    return path.with_name(f"{path.name}{suffix}.partial")


def _copy_file(source: Path, out) -> None:
    with open(source, "rb") as f:
        _copy_file_object(f, out)


def _copy_file_object(source, out) -> None:
    while chunk := source.read(1 << 24):
        out.write(chunk)


class IndexedDataset:
    """Read-only view of `<prefix>.bin/.idx` through numpy memmaps; O(1) access."""

    def __init__(self, prefix: str | Path):
        self.prefix = str(prefix)
        self.bin_path, self.idx_path = data_file_paths(prefix)
        for path in (self.idx_path, self.bin_path):
            if not path.is_file():
                raise IndexedDatasetError(f"{path}: file not found (dataset prefix {prefix!r})")
        idx_size = self.idx_path.stat().st_size

        def corrupt(problem: str) -> IndexedDatasetError:
            return IndexedDatasetError(f"{self.idx_path}: {problem}")

        with open(self.idx_path, "rb") as f:
            header = f.read(HEADER_SIZE)
        if len(header) < HEADER_SIZE:
            raise corrupt(f"truncated header ({len(header)} of {HEADER_SIZE} bytes)")
        if header[: len(MAGIC)] != MAGIC:
            raise corrupt(
                f"bad magic {header[: len(MAGIC)]!r}; expected {MAGIC!r} (not a "
                "Megatron MMIDIDX index)"
            )
        version, code, n_seq, n_doc = struct.unpack("<QBQQ", header[len(MAGIC) :])
        if version != VERSION:
            raise corrupt(f"unsupported version {version}; this reader knows version {VERSION}")
        if code not in DTYPE_CODES:
            raise corrupt(f"unknown dtype code {code}; known codes {sorted(DTYPE_CODES)}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        expected = HEADER_SIZE + 4 * n_seq + 8 * n_seq + 8 * n_doc
        if idx_size != expected:
            raise corrupt(
                f"size {idx_size} bytes does not match the header ({n_seq} sequences, "
                f"{n_doc} document entries need {expected} bytes); truncated or corrupt"
            )
        index = np.memmap(self.idx_path, dtype=np.uint8, mode="r")
        offset = HEADER_SIZE
        self.sizes = index[offset : offset + 4 * n_seq].view(np.int32)
        offset += 4 * n_seq
        self.pointers = index[offset : offset + 8 * n_seq].view(np.int64)
        offset += 8 * n_seq
        self.document_indices = index[offset:].view(np.int64)
        if n_doc < 1 or self.document_indices[0] != 0 or self.document_indices[-1] != n_seq:
            raise corrupt("document indices must start at 0 and end at the sequence count")
        bin_size = self.bin_path.stat().st_size
        end = int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize if n_seq else 0
        if bin_size != end:
            raise IndexedDatasetError(
                f"{self.bin_path}: size {bin_size} bytes, but {self.idx_path} says its "
                f"sequences end at byte {end}; the .bin is truncated or belongs to another index"
            )
        if bin_size % self.dtype.itemsize:
            raise IndexedDatasetError(f"{self.bin_path}: size is not a multiple of {self.dtype}")
        self._bin = (
            np.memmap(self.bin_path, dtype=self.dtype, mode="r")
            if bin_size
            else np.zeros(0, self.dtype)
        )
        # A size or pointer damaged in the middle would otherwise give wrong samples
        # and statistics, or fail deep inside training: check it all now (O(n), in
        # chunks; ~0.1 s per 10M sequences).
        self.validate()

    def __len__(self) -> int:
        return len(self.sizes)

    def validate(self, chunk: int = _CHUNK) -> None:
        """Check, in chunks of `chunk` entries, what the header cannot tell (it is
        O(n); opening runs it): no negative length, each pointer where the previous
        sequence ends, document indices non-decreasing. Raises IndexedDatasetError
        naming the file."""
        itemsize = self.dtype.itemsize
        expected_start = 0
        for start in range(0, len(self.sizes), chunk):
            sizes = np.asarray(self.sizes[start : start + chunk], dtype=np.int64)
            pointers = np.asarray(self.pointers[start : start + chunk])
            if (sizes < 0).any():
                bad = start + int(np.argmax(sizes < 0))
                raise IndexedDatasetError(f"{self.idx_path}: sequence {bad} has a negative length")
            expected = expected_start + np.concatenate(([0], np.cumsum(sizes[:-1]))) * itemsize
            if not np.array_equal(pointers, expected):
                bad = start + int(np.argmax(pointers != expected))
                raise IndexedDatasetError(
                    f"{self.idx_path}: sequence {bad} starts at byte {int(self.pointers[bad])}, "
                    "but the sequences before it end elsewhere; pointers must be cumulative"
                )
            expected_start = int(expected[-1]) + int(sizes[-1]) * itemsize
        docs = self.document_indices
        for start in range(0, len(docs) - 1, chunk):
            piece = np.asarray(docs[start : start + chunk + 1])
            if (np.diff(piece) < 0).any():
                bad = start + int(np.argmax(np.diff(piece) < 0)) + 1
                raise IndexedDatasetError(
                    f"{self.idx_path}: document index {bad} goes backwards; "
                    "document indices must be non-decreasing"
                )

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        return len(self._bin)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens of sequence `i`, from `offset`, at most `length` of them."""
        start = int(self.pointers[i]) // self.dtype.itemsize + offset
        size = int(self.sizes[i]) - offset if length is None else length
        return self._bin[start : start + size]

    def token_range(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the whole file, across sequence boundaries."""
        return self._bin[start:stop]

    def document_token_offset(self, document: int) -> int:
        """Index of the first token of `document` in the flat token array."""
        if document >= self.num_documents:
            return self.num_tokens
        sequence = int(self.document_indices[document])
        return int(self.pointers[sequence]) // self.dtype.itemsize
