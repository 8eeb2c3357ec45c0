"""Counters of a preprocessing run, per shard and in total."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Counts:
    """Documents in and out, tokens, bytes and drops by reason."""

    documents_in: int = 0
    documents_out: int = 0
    tokens: int = 0
    text_bytes: int = 0  # UTF-8 bytes of the documents kept, after cleaning
    drops: Counter = field(default_factory=Counter)

    def add(self, other: Counts) -> None:
        self.documents_in += other.documents_in
        self.documents_out += other.documents_out
        self.tokens += other.tokens
        self.text_bytes += other.text_bytes
        self.drops.update(other.drops)

    def to_dict(self) -> dict:
        return {
            "documents_in": self.documents_in,
            "documents_out": self.documents_out,
            "tokens": self.tokens,
            "text_bytes": self.text_bytes,
            "drops": dict(sorted(self.drops.items())),
        }

    @classmethod
    def from_dict(cls, data: dict) -> Counts:
        return cls(
            data["documents_in"],
            data["documents_out"],
            data["tokens"],
            data["text_bytes"],
            Counter(data["drops"]),
        )
