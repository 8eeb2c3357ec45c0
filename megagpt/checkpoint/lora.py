"""LoRA checkpoints: the adapters and their optimizer state, and where the base is.

A LoRA run trains only its adapters, so its checkpoints hold only those (the frozen
parameters are left out of the state, see state.py) and, in metadata.json, what to
put them on:

    "lora": {"rank": 8, "alpha": 16.0, "dropout": 0.0, "targets": [...],
             "base": "/abs/path/runs/pre/checkpoints/step_00000030",
             "base_weights_hash": "<sha256 of the base's recorded state/ checksums>"}

The base is the checkpoint finetune.init resolved to when the run started (a Hugging
Face init is the converted copy under <output_dir>/init), by absolute path. Its hash
covers the XXH3-64 sums and sizes of its state/ files that its own metadata.json
records (computed from the files for a checkpoint written without them), so any
rewrite of the base, even one with equal values on another layout, counts as a
change. Resuming, generation, evaluation and export load the base from there, after
checking the hash, and the adapters on top; a base that changed or is gone is refused,
naming both checkpoints. A LoRA checkpoint is not a base for another fine-tune: export
it merged (`megagpt export hf --merge-lora`) and start from that.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
)

from megagpt.checkpoint import layout
from megagpt.checkpoint.checksums import file_summary
from megagpt.checkpoint.layout import CheckpointError
from megagpt.checkpoint.safe_dcp import read_index
from megagpt.checkpoint.state import collect, load_into
from megagpt.config.schema import LoraConfig, ModelConfig
from megagpt.model.build import build_meta_model
from megagpt.model.lora import apply_lora, is_adapter
from megagpt.parallel.optimizer import Optimizers

log = logging.getLogger(__name__)

METADATA_KEY = "lora"
"""The key of metadata.json that marks a LoRA checkpoint and records its base."""


def weights_hash(directory: Path) -> str:
    """A hash of the checkpoint's state/ files (see the module docstring)."""
    sums = layout.read_metadata(directory).get("checksums")
    if sums is None:  # written before checksums: sum the files themselves
        files = sorted(p for p in (directory / layout.STATE_DIR).rglob("*") if p.is_file())
        sums = {str(p.relative_to(directory)): file_summary(p) for p in files}
    weights = {k: v for k, v in sums.items() if k.startswith(f"{layout.STATE_DIR}/")}
    return hashlib.sha256(json.dumps(weights, sort_keys=True).encode()).hexdigest()


def lora_record(base: Path, cfg: LoraConfig) -> dict[str, Any]:
    """What a LoRA run's checkpoints record of their settings and base checkpoint."""
    return {
        "rank": cfg.rank,
        "alpha": cfg.alpha,
        "dropout": cfg.dropout,
        "targets": list(cfg.targets),
        "base": str(base.resolve()),
        "base_weights_hash": weights_hash(base),
    }


def record_of(directory: Path, cfg: LoraConfig) -> dict[str, Any] | None:
    """The LoRA record of checkpoint `directory`, or None for a checkpoint of every
    weight, after checking that the run's finetune.lora agrees with which it is."""
    record = layout.read_metadata(directory).get(METADATA_KEY)
    if record is None and cfg.rank:
        raise CheckpointError(
            f"{directory} holds every weight of a run without LoRA, but finetune.lora.rank = "
            f"{cfg.rank} would train adapters: resume it with finetune.lora.rank=0, or "
            f"start a LoRA fine-tune from it with finetune.init={directory} in a new "
            "train.output_dir"
        )
    if record is not None and not cfg.rank:
        raise CheckpointError(
            f"{directory} holds only LoRA adapters (rank {record['rank']}) for the base "
            f"{record['base']}: resume it with finetune.lora.rank={record['rank']} (its "
            "config.yaml has every setting), or export the merged model with "
            "megagpt export hf --merge-lora"
        )
    return record


def refuse_as_init(directory: Path) -> None:
    """A LoRA checkpoint holds no base weights: it cannot be finetune.init."""
    record = layout.read_metadata(directory).get(METADATA_KEY)
    if record is not None:
        raise CheckpointError(
            f"finetune.init = {directory} holds only LoRA adapters (for the base "
            f"{record['base']}); write the adapted model with megagpt export hf "
            f"--checkpoint {directory} --merge-lora --out DIR and fine-tune from DIR"
        )


def check_base(directory: Path, record: dict[str, Any]) -> Path:
    """The base checkpoint of LoRA checkpoint `directory`, if it still holds the
    weights the adapters were trained on."""
    base = Path(record["base"])
    if not (base / layout.METADATA).is_file():
        raise CheckpointError(
            f"{directory} holds LoRA adapters for the base checkpoint {base}, which is gone: "
            "restore that checkpoint at that path (adapters are useless without their base)"
        )
    now, then = weights_hash(base), record["base_weights_hash"]
    if now != then:
        raise CheckpointError(
            f"{directory} holds LoRA adapters trained on the base checkpoint {base}, whose "
            f"files have changed since (weights hash {then[:16]} then, {now[:16]} now): "
            "adapters fit only the weights they were trained on. Restore the original "
            f"base at {base}, or fine-tune anew from the current one"
        )
    return base


def adapter_shapes(model_config: ModelConfig, cfg: LoraConfig) -> dict[str, tuple[int, ...]]:
    """Every adapter parameter of the whole model, with its global shape."""
    meta = build_meta_model(model_config)
    apply_lora(meta, cfg)
    return {k: tuple(v.shape) for k, v in meta.state_dict().items() if is_adapter(k)}


def _check_adapters_fit(directory: Path, stored: dict, expected: dict, cfg: LoraConfig) -> None:
    problems = []
    for key, shape in expected.items():
        size = stored.get(f"model.{key}")
        if size is None:
            problems.append(f"missing {key}")
        elif tuple(size) != shape:
            problems.append(f"{key}: checkpoint {tuple(size)} vs model {shape}")
    problems += sorted(
        f"unexpected {k[len('model.') :]}"
        for k in stored
        if k.startswith("model.") and k[len("model.") :] not in expected
    )
    if problems:
        raise CheckpointError(
            f"{directory}'s adapters do not fit finetune.lora (rank {cfg.rank}, targets "
            f"{', '.join(cfg.targets)}): {'; '.join(problems[:10])}. Resume with the "
            "finetune.lora settings of its config.yaml"
        )


def load_adapters(
    parts: list[nn.Module],
    optimizers: Optimizers | None,
    directory: Path,
    model_config: ModelConfig,
    cfg: LoraConfig,
) -> None:
    """Fill the adapters of `parts` (and the state of `optimizers`, if given: a resume)
    from LoRA checkpoint `directory`, on any layout; the base weights are not touched."""
    state_dir = directory / layout.STATE_DIR
    index = read_index(state_dir).state_dict_metadata
    stored = {k: getattr(v, "size", None) for k, v in index.items()}
    _check_adapters_fit(directory, stored, adapter_shapes(model_config, cfg), cfg)
    if optimizers is None:
        state = {"model": {}}
        for part in parts:
            adapters = get_model_state_dict(part)
            state["model"].update({k: v for k, v in adapters.items() if is_adapter(k)})
    else:
        state = collect(parts, optimizers)  # with frozen parameters: adapters only
    request = {}
    for section, entries in state.items():
        for key, value in entries.items():
            name = f"{section}.{key}"
            if section == "optimizer" and not key.startswith("state."):
                continue  # hyperparameters come from the current config
            if section == "rng" and name not in stored:
                continue  # RNG states only carry over to the same layout
            if name not in stored:
                raise CheckpointError(f"{directory} lacks {name}, which this run needs")
            request[name] = value
    load_into(parts, optimizers, state, request, state_dir)


def check_lora_export(directory: Path, merge_lora: bool) -> None:
    """A LoRA checkpoint exports only merged: a transformers model has no adapters."""
    record = layout.read_metadata(directory).get(METADATA_KEY)
    if record is not None and not merge_lora:
        raise CheckpointError(
            f"{directory} holds LoRA adapters (rank {record['rank']}) for the base "
            f"{record['base']}: add --merge-lora to write the adapted model, its weights "
            "W + (alpha / rank) B A, or export the base checkpoint itself for the model "
            "without adapters"
        )
    if record is None and merge_lora:
        log.warning("--merge-lora: %s has no LoRA adapters; exported as it is", directory)
