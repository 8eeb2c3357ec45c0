"""`megagpt eval`: loss and perplexity of a checkpoint on a data split (and accuracy and
macro-F1 for a classifier).

The checkpoint's model is built as training builds it (a train module, here the layout
of one process) and its weights are loaded into it, so evaluation computes exactly
the validation loss that training logs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from megagpt.checkpoint import resolve_checkpoint_dir
from megagpt.checkpoint.inference import checkpoint_config, load_weights
from megagpt.checkpoint.layout import read_metadata
from megagpt.config import ConfigError, apply_overrides
from megagpt.parallel import init_distributed, shutdown_distributed
from megagpt.parallel.parallelize import parallelize
from megagpt.training.finetune import build_run_datasets


def evaluate_checkpoint(
    checkpoint: str,
    split: str = "valid",
    iters: int | None = None,
    overrides: Sequence[str] = (),
    device: str = "cpu",
) -> dict:
    """Mean loss over `iters` global batches (default: the config's eval_iters)."""
    directory = resolve_checkpoint_dir(checkpoint)
    metadata = read_metadata(directory)
    overrides = [f"train.device={device}", *overrides]
    if iters is not None:
        overrides.append(f"train.eval_iters={iters}")
    config = apply_overrides(
        checkpoint_config(directory), overrides, source="checkpoint config + command line"
    )
    datasets = build_run_datasets(config)  # a text corpus or a labeled set
    dataset = getattr(datasets, split)
    if dataset is None:
        raise ConfigError(
            f"data.split = {config.data.split!r} leaves the {split} split empty; "
            "choose another --split or data.split"
        )
    env = init_distributed(config.train.device)
    try:
        module = parallelize(config, env)
        load_weights(module.parts, directory, config)  # a LoRA one: base, then adapters
        if config.model.num_labels:
            metrics = module.evaluate_classifier(dataset)
            loss = metrics.pop("val_loss")
        else:
            metrics, loss = {}, module.evaluate(dataset)
    finally:
        shutdown_distributed(env)
    return {
        **{name.removeprefix("val_"): value for name, value in metrics.items()},
        "step": metadata["step"],
        "split": split,
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "tokens": config.train.eval_iters * config.train.global_batch_size * config.data.seq_len,
    }
