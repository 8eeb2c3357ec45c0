"""Checkpoints: the one module that knows their format.

Everything else calls `save_checkpoint`, `load_checkpoint` and
`resolve_checkpoint_dir`, so the format can change behind them.
"""

from megagpt.checkpoint.store import (
    CheckpointError,
    LoadedCheckpoint,
    load_checkpoint,
    load_model_for_inference,
    resolve_checkpoint_dir,
    save_checkpoint,
)

__all__ = [
    "CheckpointError",
    "LoadedCheckpoint",
    "load_checkpoint",
    "load_model_for_inference",
    "resolve_checkpoint_dir",
    "save_checkpoint",
]
