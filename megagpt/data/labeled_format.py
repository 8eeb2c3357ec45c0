"""The on-disk format of labeled data for fine-tuning, shared by its writer
(megagpt-preprocess --format sft|classify) and its readers.

Beside `<prefix>.manifest.json`, whose "format" is "sft" or "classify" (a manifest
without one is "text", megagpt-preprocess's default), each shard listed in data_path is
a Megatron `.bin/.idx` pair of token ids, one document per example, and beside it:

- sft: `<shard>_mask.bin/.idx`, uint8, the same document lengths: mask[i] == 1 where
  token i is a training target (predicted from tokens < i); the chat template that
  rendered the examples is `<prefix>.chat_template.json` (manifest "chat_template":
  {"name", "version", "file"}), to be kept with the tokenizer.
- classify: `<shard>_labels.bin/.idx`, int32, one element per document: the label id
  of the example whose last token (EOD) the classifier reads; the label names, in id
  order, are `<prefix>.labels.json` (a JSON list) and the manifest's "labels".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from megagpt.config.errors import ConfigError
from megagpt.data.manifest import shard_path

MASK_SUFFIX = "_mask"
"""Added to a token shard's prefix for its loss mask (sft)."""
LABELS_SUFFIX = "_labels"
"""Added to a token shard's prefix for its label ids (classify)."""
TEMPLATE_FILE_SUFFIX = ".chat_template.json"
"""Added to the output prefix for the chat template (sft)."""
LABELS_FILE_SUFFIX = ".labels.json"
"""Added to the output prefix for the label names (classify)."""
LABELED_FORMATS = ("sft", "classify")


@dataclass(frozen=True)
class LabeledManifest:
    """What a manifest says of its data.

    Attributes:
        format: "text", "sft" or "classify".
        shard_prefixes: The token shards, resolved as data.path entries.
        side_suffix: What names each shard's parallel dataset (MASK_SUFFIX or
            LABELS_SUFFIX); None for text.
        template_path: The chat template (sft), else None.
        labels: The label names in id order (classify), else None.
    """

    format: str
    shard_prefixes: list[str]
    side_suffix: str | None = None
    template_path: Path | None = None
    labels: list[str] | None = None


def read_labeled_manifest(path: str | Path, setting: str = "data.path") -> LabeledManifest:
    """Read a megagpt-preprocess manifest; `setting` names where it was given.

    Raises:
        ConfigError: Not a manifest, or a labeled one without the fields it needs.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        prefixes = [shard_path(path, prefix) for prefix in data["data_path"]]
    except OSError as error:
        raise ConfigError(f"{setting} {path}: {error.strerror}") from None
    except (ValueError, KeyError, TypeError):
        raise ConfigError(
            f"{setting} {path} is not a megagpt-preprocess manifest (a JSON object with a "
            "data_path list, as <output-prefix>.manifest.json)"
        ) from None
    kind = data.get("format", "text")

    def needs(key: str, kind_of_value: type):
        value = data.get(key)
        if not isinstance(value, kind_of_value):
            raise ConfigError(
                f"{setting} {path}: a {kind} manifest needs {key!r} ({kind_of_value.__name__}); "
                f"rerun megagpt-preprocess --format {kind} to write it again"
            )
        return value

    if kind == "text":
        return LabeledManifest(kind, prefixes)
    if kind == "sft":
        template = needs("chat_template", dict)
        file = template.get("file")
        if not isinstance(file, str):
            raise ConfigError(f"{setting} {path}: its chat_template names no file")
        suffix = needs("mask_suffix", str)
        return LabeledManifest(kind, prefixes, suffix, template_path=path.parent / file)
    if kind == "classify":
        labels = needs("labels", list)
        return LabeledManifest(kind, prefixes, needs("labels_suffix", str), labels=labels)
    raise ConfigError(
        f"{setting} {path}: unknown format {kind!r}; known: text, {', '.join(LABELED_FORMATS)}"
    )
