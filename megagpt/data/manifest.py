"""Reading a megagpt-preprocess manifest: the shards of one tokenized corpus, in order.

`<prefix>.manifest.json` lists its shards in `data_path`, each named relative to the
manifest's own directory (where the shards are), so a corpus directory can be moved
or read from any working directory. Manifests written before that named shards
relative to the preprocessing command's directory; those names are still found.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from megagpt.config.errors import ConfigError

MANIFEST_SUFFIX = ".manifest.json"


@dataclass(frozen=True)
class ManifestShard:
    prefix: str
    tokens: int | None  # None where the manifest does not say
    documents: int | None


def read_manifest(path: str | Path, setting: str = "data.path") -> list[ManifestShard]:
    """The shards of the manifest at `path`; `setting` names where it was given, for
    error messages."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        prefixes = data["data_path"]
    except OSError as error:
        raise ConfigError(f"{setting} {path}: {error.strerror}") from None
    except (ValueError, KeyError, TypeError):  # not JSON, or not a manifest
        raise ConfigError(
            f"{setting} {path} is not a megagpt-preprocess manifest (a JSON object "
            "with a data_path list, as <output-prefix>.manifest.json)"
        ) from None
    if not isinstance(prefixes, list) or not all(isinstance(p, str) for p in prefixes):
        raise ConfigError(f"{setting} {path}: data_path must be a list of prefixes")
    sizes = {Path(s.get("prefix", "")).name: s for s in data.get("shards", [])}
    shards = []
    for prefix in prefixes:
        size = sizes.get(Path(prefix).name, {})
        shards.append(
            ManifestShard(shard_path(path, prefix), size.get("tokens"), size.get("documents"))
        )
    return shards


def shard_path(manifest: Path, prefix: str) -> str:
    """A shard named in `manifest`: beside it, or (older manifests) as written."""
    beside = manifest.parent / prefix
    if Path(prefix).is_absolute() or Path(str(beside) + ".idx").exists():
        return str(beside)
    return prefix


def expand_manifests(pairs: list[tuple[float | None, str]]) -> list[tuple[float | None, str]]:
    """data.path entries with each manifest replaced by its non-empty shards; a weighted
    manifest's weight is shared among them in proportion to their tokens."""
    expanded: list[tuple[float | None, str]] = []
    for weight, prefix in pairs:
        if not prefix.endswith(MANIFEST_SUFFIX):
            expanded.append((weight, prefix))
            continue
        shards = [s for s in read_manifest(prefix) if s.documents != 0 and s.tokens != 0]
        if not shards:
            raise ConfigError(f"data.path {prefix}: the manifest lists no non-empty shard")
        if weight is None:
            expanded += [(None, s.prefix) for s in shards]
            continue
        if any(s.tokens is None for s in shards):
            raise ConfigError(
                f"data.path {prefix}: the manifest does not give its shards' token counts, "
                "which a weight is shared by; give the shard prefixes with weights instead"
            )
        total = sum(s.tokens for s in shards)
        expanded += [(weight * s.tokens / total, s.prefix) for s in shards]
    return expanded
