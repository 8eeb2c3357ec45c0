"""The syntax of the data settings: data.path (Megatron's weighted blends) and data.split.

The config layer stores both as strings; the data layer, which reads them, parses and
checks them. Commands call `check_data_config` right after loading a config, so a bad
value fails before any work starts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from megagpt.config.errors import ConfigError
from megagpt.config.schema import DataConfig


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_data_path(path: Sequence[str]) -> list[tuple[float | None, str]]:
    """Parse ["0.3", "a", "0.7", "b"] or ["a", "b"] into (weight, prefix) pairs.

    Unweighted prefixes get weight None (the caller weighs them by size).
    """
    items = [p for item in path for p in str(item).split()]
    if not any(_is_number(p) for p in items):
        return [(None, p) for p in items]
    if len(items) % 2 or not all(_is_number(w) for w in items[::2]):
        raise ConfigError(
            f"data.path = {' '.join(items)!r}: write either prefixes alone or "
            "weight/prefix pairs such as '0.3 corpusA 0.7 corpusB'"
        )
    pairs = [(float(w), p) for w, p in zip(items[::2], items[1::2])]
    for weight, prefix in pairs:
        if not (math.isfinite(weight) and weight > 0):
            raise ConfigError(f"data.path: weight {weight} of {prefix!r} must be positive")
    return pairs


def parse_split(split: str) -> tuple[float, float, float]:
    """Parse "969,30,1" into normalized train/validation/test fractions."""
    parts = [p.strip() for p in split.replace("/", ",").split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) == 2:
        values.append(0.0)
    if len(values) != 3 or min(values) < 0 or values[0] <= 0:
        raise ConfigError(
            f"data.split = {split!r}: expected three non-negative weights for train, "
            "validation and test with a positive train weight, e.g. '969,30,1'"
        )
    total = sum(values)
    return values[0] / total, values[1] / total, values[2] / total


def check_data_config(cfg: DataConfig) -> None:
    """Raise ConfigError if data.path or data.split cannot be read."""
    parse_data_path(cfg.path)
    parse_split(cfg.split)
