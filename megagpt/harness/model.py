"""A checkpoint's model and tokenizer, built for evaluation on this process's layout.

The model is built as training builds it (`parallelize`) on the layout the command line
asks for (parallel.tensor_parallel_size=..., parallel.pipeline_parallel_size=...; the
rest of the processes are data-parallel replicas), whatever layout saved it, and its
weights are loaded into it. A few training-only settings are switched off, because an
evaluation's replicas answer different requests and its sequences come in every length
(see megagpt.parallel.inference): sequence and context parallelism, ZeRO sharding,
activation checkpointing and torch.compile; none of them changes the weights or what
the model computes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from megagpt.checkpoint import CheckpointError
from megagpt.checkpoint.inference import checkpoint_config, load_weights
from megagpt.checkpoint.layout import read_metadata, resolve_checkpoint_dir
from megagpt.config import Config, apply_overrides
from megagpt.parallel import init_distributed
from megagpt.parallel.env import DistributedEnv
from megagpt.parallel.inference import InferenceRunner
from megagpt.parallel.parallelize import parallelize
from megagpt.tokenizer import Tokenizer

log = logging.getLogger(__name__)

EVALUATION_DEFAULTS = ("parallel.pipeline_schedule=gpipe", "parallel.virtual_stages=1")
"""The pipeline the evaluation model gets unless the command line says otherwise (the
training schedule is not used, and one stage per rank suits any number of layers)."""

EVALUATION_LAYOUT = (
    "parallel.sequence_parallel=false",
    "parallel.zero_stage=0",
    "parallel.activation_checkpointing=none",
    "parallel.data_parallel_size=null",
    "parallel.context_parallel_size=1",
    "train.compile=false",
)
"""Settings every evaluation model is built with (see the module docstring)."""


@dataclass
class EvaluationModel:
    """What scoring and generation need: the model's runner, its tokenizer, and where
    it came from."""

    runner: InferenceRunner
    tokenizer: Tokenizer
    config: Config
    directory: Path
    step: int
    env: DistributedEnv


def checkpoint_tokenizer(directory: Path, config: Config) -> Tokenizer:
    """The tokenizer the checkpoint's model was trained with, or a CheckpointError."""
    if not config.data.tokenizer:
        raise CheckpointError(
            f"{directory} names no tokenizer (data.tokenizer) and holds no copy of one "
            "(tokenizer.model or tokenizer.json): evaluation needs the tokenizer the model "
            "was trained with; add data.tokenizer=PATH"
        )
    return Tokenizer(config.data.tokenizer)


def evaluation_config(
    checkpoint: str | Path, overrides: Sequence[str] = (), device: str = "cpu"
) -> tuple[Path, Config]:
    """The checkpoint's directory and its config for evaluation: the command line's
    overrides (a layout, data.tokenizer=...) on top of EVALUATION_DEFAULTS, then
    EVALUATION_LAYOUT."""
    directory = resolve_checkpoint_dir(checkpoint)
    config = apply_overrides(
        checkpoint_config(directory),
        [f"train.device={device}", *EVALUATION_DEFAULTS, *overrides, *EVALUATION_LAYOUT],
        source="checkpoint config + command line",
    )
    return directory, config


def load_evaluation_model(directory: Path, config: Config) -> EvaluationModel:
    """Build `config`'s model on this process's layout (joining the process group torchrun
    describes, or one of its own) and load the checkpoint's weights into it."""
    tokenizer = checkpoint_tokenizer(directory, config)
    env = init_distributed(config.train.device)
    p = config.parallel
    model_ranks = p.tensor_parallel_size * p.pipeline_parallel_size
    replicas = max(1, env.world_size // model_ranks)
    # One sequence per microbatch: the training schedule is built but never run, and
    # any batch size must pass the layout checks.
    config = apply_overrides(
        config,
        [
            "train.micro_batch_size=1",
            f"train.global_batch_size={replicas * p.pipeline_parallel_size * p.virtual_stages}",
        ],
        source="evaluation layout",
    )
    module = parallelize(config, env)
    load_weights(module.parts, directory, config)
    metadata = read_metadata(directory)
    log.info(
        "evaluating %s (step %d) on %d process(es): %d replica(s)",
        directory,
        metadata["step"],
        env.world_size,
        replicas,
    )
    return EvaluationModel(
        InferenceRunner.from_module(module), tokenizer, config, directory, metadata["step"], env
    )
