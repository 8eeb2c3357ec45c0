"""Durations and rates as people read them in progress lines."""

from __future__ import annotations

import math


def format_duration(seconds: float) -> str:
    """H:MM:SS, or M:SS under an hour; "?" when unknown (an ETA before any progress)."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_rate(per_second: float) -> str:
    """A rate with a k or M suffix: 7.2k, 1.35M."""
    if per_second >= 1e6:
        return f"{per_second / 1e6:.2f}M"
    if per_second >= 1e3:
        return f"{per_second / 1e3:.1f}k"
    return f"{per_second:.0f}"
