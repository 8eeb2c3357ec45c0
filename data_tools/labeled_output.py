"""Writing labeled data: token shards with a parallel dataset beside each, and the
manifest that names them.

Shard i is PREFIX_0000i.bin/.idx (token ids, one Megatron document per example) and
PREFIX_0000i<suffix>.bin/.idx (the mask, one element per token, or the label, one
element per document). Every file appears under its final name only once complete; a
run that fails removes what it wrote, so an output prefix holds a whole run or none.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from data_tools.state import RunState, StateError, atomic_write_json
from megagpt.data.indexed import IndexedDatasetWriter, data_file_paths
from megagpt.utils.files import file_sha256

log = logging.getLogger(__name__)


class PairedShards:
    """Examples in, shards of tokens and their parallel dataset out.

    Args:
        prefix: The output prefix.
        dtype: Token dtype (token_dtype of the vocabulary).
        side_suffix: Added to a shard's prefix for the parallel dataset ("_mask").
        side_dtype: Its element type (uint8 for a mask, int32 for a label).
        shard_tokens: Start a new shard after the example that brings one to this
            many tokens; None: one shard.
    """

    def __init__(
        self,
        prefix: str,
        dtype: np.dtype,
        side_suffix: str,
        side_dtype: np.dtype | type,
        shard_tokens: int | None,
    ):
        self.state = RunState(prefix)
        self.dtype, self.side_suffix, self.side_dtype = dtype, side_suffix, side_dtype
        self.shard_tokens = shard_tokens
        self.shards: list[dict] = []  # the finished ones
        self._writers: tuple[IndexedDatasetWriter, IndexedDatasetWriter] | None = None
        self._current: dict = {}

    def add(self, ids: list[int], side: list[int], source: str) -> None:
        """Append one example: its ids, its row of the parallel dataset, its input file."""
        if self._writers is None:
            self._open()
        tokens, extra = self._writers
        tokens.add_document(np.asarray(ids, dtype=self.dtype))
        extra.add_document(np.asarray(side, dtype=self.side_dtype))
        self._current["documents"] += 1
        self._current["tokens"] += len(ids)
        self._current["input_files"].setdefault(source)
        if self.shard_tokens and self._current["tokens"] >= self.shard_tokens:
            self._close()

    def finish(self) -> list[dict]:
        """Close the last shard (an empty one if there was no example); the shards."""
        if self._writers is None and not self.shards:
            self._open()
        if self._writers is not None:
            self._close()
        return self.shards

    def abort(self) -> None:
        """Remove every file this writer made."""
        if self._writers is not None:
            for writer in self._writers:
                writer.abort()
            self._writers = None
        for shard in self.shards:
            for prefix in (shard["path"], shard["path"] + self.side_suffix):
                for path in data_file_paths(prefix):
                    path.unlink(missing_ok=True)
        self.shards = []

    def _open(self) -> None:
        prefix = self.state.shard_prefix(len(self.shards))
        self._writers = (
            IndexedDatasetWriter(prefix, self.dtype),
            IndexedDatasetWriter(prefix + self.side_suffix, self.side_dtype),
        )
        self._current = {"path": prefix, "documents": 0, "tokens": 0, "input_files": {}}

    def _close(self) -> None:
        for writer in self._writers:
            writer.finalize()
        self._writers = None
        shard = dict(self._current, input_files=list(self._current["input_files"]))
        self.shards.append(shard)
        log.info(
            "shard %d done: %s examples, %s tokens -> %s.bin/.idx and %s%s.bin/.idx",
            len(self.shards) - 1,
            f"{shard['documents']:,}",
            f"{shard['tokens']:,}",
            shard["path"],
            shard["path"],
            self.side_suffix,
        )


def prepare_output(prefix: str, overwrite: bool, side_files: list[Path]) -> None:
    """Refuse an output prefix holding an earlier run's files, or (overwrite) delete them."""
    state = RunState(prefix)
    existing = [
        path
        for path in (
            state.manifest_path,
            Path(state.shard_prefix(0) + ".idx"),
            state.directory,
            *side_files,
        )
        if path.exists()
    ]
    if existing and not overwrite:
        raise StateError(
            f"--output-prefix {prefix}: output from another run exists ({existing[0]}); pass "
            "--overwrite to replace it or choose another --output-prefix"
        )
    state.discard()
    for path in side_files:
        path.unlink(missing_ok=True)


def write_manifest(
    prefix: str, tokenizer, dtype: np.dtype, eod_appended: bool, shards: list[dict], extra: dict
) -> Path:
    """PREFIX.manifest.json, in the schema of the text format's (data_tools/pipeline.py)
    plus the fields of the labeled format (megagpt/data/labeled_format.py); shards are
    named relative to the manifest's directory."""
    state = RunState(prefix)
    manifest = {
        "tokenizer": str(Path(tokenizer.path).resolve()),
        "tokenizer_sha256": file_sha256(tokenizer.path),
        "vocab_size": tokenizer.vocab_size,
        "dtype": str(dtype),
        "eod_appended": eod_appended,
        "shards": [
            {
                "prefix": Path(shard["path"]).name,
                "documents": shard["documents"],
                "tokens": shard["tokens"],
                "input_files": shard["input_files"],
            }
            for shard in shards
        ],
        "data_path": [Path(shard["path"]).name for shard in shards],
        **extra,
    }
    atomic_write_json(state.manifest_path, manifest)
    return state.manifest_path
