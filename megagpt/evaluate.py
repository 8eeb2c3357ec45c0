"""`megagpt eval`: loss and perplexity of a checkpoint on a data split."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from megagpt.checkpoint import load_model_for_inference
from megagpt.config import ConfigError, apply_overrides
from megagpt.data import build_datasets
from megagpt.parallel.env import DistributedEnv
from megagpt.parallel.model import ParallelModel
from megagpt.training.steps import evaluate
from megagpt.training.trainer import autocast_for, resolve_precision


def evaluate_checkpoint(
    checkpoint: str,
    split: str = "valid",
    iters: int | None = None,
    overrides: Sequence[str] = (),
    device: str = "cpu",
) -> dict:
    """Mean loss over `iters` global batches (default: the config's eval_iters)."""
    model, config, metadata = load_model_for_inference(checkpoint, device)
    if iters is not None:
        overrides = [*overrides, f"train.eval_iters={iters}"]
    config = apply_overrides(config, overrides, source="checkpoint config + command line")
    datasets = build_datasets(config.data, config.train.seed)
    dataset = getattr(datasets, split)
    if dataset is None:
        raise ConfigError(
            f"data.split = {config.data.split!r} leaves the {split} split empty; "
            "choose another --split or data.split"
        )
    dev = torch.device(device)
    single = ParallelModel([model], config, DistributedEnv(0, 1, 0, dev))
    single.autocast = autocast_for(resolve_precision(config, dev), dev)
    loss = evaluate(single, dataset, config)
    single.train(False)
    return {
        "step": metadata["step"],
        "split": split,
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "tokens": config.train.eval_iters * config.train.global_batch_size * config.data.seq_len,
    }
