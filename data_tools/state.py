"""What a preprocessing run leaves on disk so a restart can skip finished work.

Next to the output prefix P:
  P_00000.bin/.idx, ...   the shards, each appearing only once complete
  P.state/                config.json (what the run was started with), and per
                          finished shard a completion marker (JSON: its counts and
                          where in the input the next shard starts) and the hashes
                          of its documents, which rebuild the dedup index on restart
  P.manifest.json         the shards, written when the run completes
  P.summary.json          documents in/out, tokens, bytes, drops by reason, speed

Every file is written to a `.partial` name, flushed and renamed, so a kill at any
moment leaves either the old state or the new one.
"""

from __future__ import annotations

import glob
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from megagpt.errors import MegagptError
from megagpt.utils.files import atomic_write


class StateError(MegagptError):
    """The output prefix holds a run started with other inputs or settings."""


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def read_json(path: Path) -> Any:
    """A state file's contents; a damaged one is a StateError that says what to do."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise StateError(
            f"{path} is not valid JSON (damaged outside megagpt?); pass --overwrite to start over"
        ) from None


class RunState:
    """The state directory of one output prefix."""

    def __init__(self, prefix: str | Path):
        self.prefix = str(prefix)
        self.directory = Path(self.prefix + ".state")
        self.manifest_path = Path(self.prefix + ".manifest.json")
        self.summary_path = Path(self.prefix + ".summary.json")

    def shard_prefix(self, index: int) -> str:
        return f"{self.prefix}_{index:05d}"

    def marker_path(self, index: int) -> Path:
        return self.directory / f"shard_{index:05d}.done"

    def hashes_path(self, index: int) -> Path:
        return self.directory / f"shard_{index:05d}.hashes"

    def open(self, config: dict, overwrite: bool) -> None:
        """Start or resume: check that an existing state was made by the same command."""
        config_path = self.directory / "config.json"
        if overwrite:
            self.discard()
        if config_path.exists():
            previous = read_json(config_path)
            if previous != config:
                changed = sorted(
                    k for k in config.keys() | previous.keys() if config.get(k) != previous.get(k)
                )
                raise StateError(
                    f"{self.directory} holds a run started with different {', '.join(changed)}; "
                    "rerun the same command to resume it, or pass --overwrite to start over "
                    "(or choose another --output-prefix)"
                )
            return
        if self.manifest_path.exists() or Path(self.shard_prefix(0) + ".idx").exists():
            raise StateError(
                f"{self.prefix}: output from another run exists but no {config_path}; pass "
                "--overwrite to replace it or choose another --output-prefix"
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write_json(config_path, config)

    def discard(self) -> None:
        """Delete everything an earlier run with this prefix wrote."""
        shutil.rmtree(self.directory, ignore_errors=True)
        self.manifest_path.unlink(missing_ok=True)
        self.summary_path.unlink(missing_ok=True)
        prefix = Path(self.prefix)
        for path in prefix.parent.glob(f"{glob.escape(prefix.name)}_[0-9][0-9][0-9][0-9][0-9]*"):
            if path.suffix in (".bin", ".idx", ".partial"):
                path.unlink()

    def completed(self) -> list[dict]:
        """Markers of the finished shards, in order (only the unbroken prefix counts)."""
        markers = []
        for index in range(1 << 30):
            path = self.marker_path(index)
            if not path.exists():
                return markers
            markers.append(read_json(path))
        return markers

    def mark_done(self, index: int, marker: dict) -> None:
        atomic_write_json(self.marker_path(index), marker)

    def completed_hashes(self, markers: list[dict]) -> Iterator[Path]:
        return (self.hashes_path(m["shard"]) for m in markers)
