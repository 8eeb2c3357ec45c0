"""`megagpt export hf|torch` and `megagpt import hf`."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter

from megagpt.checkpoint import hf, layout
from megagpt.checkpoint.inference import consolidated_state_dict
from megagpt.config import Config, DataConfig, apply_overrides, save_config

log = logging.getLogger(__name__)


def export_hf(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the checkpoint as a transformers model directory, with its tokenizer."""
    directory = layout.resolve_checkpoint_dir(checkpoint)
    state, config = consolidated_state_dict(directory)
    tokenizer = directory / "tokenizer.model"
    return hf.save_hf(state, config.model, Path(out), tokenizer if tokenizer.is_file() else None)


def export_torch(checkpoint: str | Path, out: str | Path) -> Path:
    """One consolidated state dict (torch.save; load it with weights_only=True), and the
    resolved config beside it as <out>.yaml."""
    state, config = consolidated_state_dict(checkpoint)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    save_config(config, out.with_suffix(".yaml"))
    return out


def import_hf(model_dir: str | Path, out: str | Path, overrides: Sequence[str] = ()) -> Path:
    """Turn a local transformers GPT-2 or Llama directory into a megagpt checkpoint
    (weights only, step 0) under <out>/checkpoints, ready for `checkpoint.resume`."""
    import transformers

    model_dir = Path(model_dir)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model_config = hf.model_config_from_hf(hf_model.config)
    state = hf.from_hf(hf_model.state_dict(), model_config)
    seq_len = min(DataConfig().seq_len, model_config.max_seq_len)  # fit the model's context
    config = apply_overrides(
        Config(model=model_config, data=DataConfig(seq_len=seq_len)),
        [f"train.output_dir={out}", *overrides],
        "import",
    )
    tokenizer = model_dir / "tokenizer.model"
    if tokenizer.is_file():
        config.data.tokenizer = str(tokenizer)
    else:
        log.warning(
            "%s has no sentencepiece tokenizer.model; set data.tokenizer to the "
            "sentencepiece model your data was tokenized with",
            model_dir,
        )
    return write_weights_checkpoint(
        state, config, Path(out) / "checkpoints", {"imported_from": str(model_dir.resolve())}
    )


def write_weights_checkpoint(
    state: dict[str, torch.Tensor], config: Config, root: Path, extra: dict
) -> Path:
    """A step-0 checkpoint holding only model weights (training starts its optimizer
    fresh from it)."""
    partial = layout.partial_dir(root, 0)
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    save_config(config, partial / "config.yaml")
    if config.data.tokenizer and Path(config.data.tokenizer).is_file():
        shutil.copyfile(config.data.tokenizer, partial / "tokenizer.model")
    dcp.save({"model": state}, storage_writer=FileSystemWriter(partial / layout.STATE_DIR))
    metadata = {
        **layout.base_metadata(0),
        "consumed_samples": 0,
        "consumed_tokens": 0,
        "optimizer_state": False,
        **extra,
    }
    return layout.publish(partial, root, 0, metadata)
