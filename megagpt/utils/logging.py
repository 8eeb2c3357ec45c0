"""Console logging tagged with the rank; rank 0 speaks, the others only warn."""

from __future__ import annotations

import logging
import sys


class _RankFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


def setup_logging(rank: int = 0, level: str = "INFO", all_ranks: bool = False) -> None:
    """Configure the root logger for this process (idempotent)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_megagpt", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stdout)
    handler._megagpt = True  # type: ignore[attr-defined]
    handler.addFilter(_RankFilter(rank))
    handler.setFormatter(
        logging.Formatter(
            "%(asctime)s [rank%(rank)d] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
        )
    )
    root.addHandler(handler)
    root.setLevel(level if rank == 0 or all_ranks else "WARNING")
    # DTensor warns, every step, that reducing a norm over a 3-D mesh takes two
    # collectives; that is the expected cost of clipping across data and tensor shards.
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel("ERROR")
