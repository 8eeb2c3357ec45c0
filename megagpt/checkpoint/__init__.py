"""Sharded checkpoints (torch.distributed.checkpoint): crash-safe, asynchronous, and
loadable on any layout. The rest of megagpt reaches checkpoints only through here."""

from megagpt.checkpoint.checksums import verify_checkpoints
from megagpt.checkpoint.inference import consolidated_state_dict, load_model_for_inference
from megagpt.checkpoint.layout import CheckpointError, read_metadata, resolve_checkpoint_dir
from megagpt.checkpoint.manager import Checkpointer

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "consolidated_state_dict",
    "load_model_for_inference",
    "read_metadata",
    "resolve_checkpoint_dir",
    "verify_checkpoints",
]
