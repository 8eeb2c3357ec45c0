"""Fine-tuning: a run that starts from pretrained weights, on a labeled set.

`finetune.init` names the weights: a megagpt checkpoint saved on any layout, or a
Hugging Face GPT-2, Llama or Mixtral directory (converted once into the run's output directory).
The model's shape comes from there (model.* settings other than dropout are replaced,
with a warning where they differ), the tokenizer too unless data.tokenizer is given,
and only the weights are loaded: the optimizer and learning-rate schedule start at step
0. Once the fine-tune has checkpoints of its own, checkpoint.resume continues from
them exactly, as any run does.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from pathlib import Path

import torch.distributed as dist

from megagpt.checkpoint import layout
from megagpt.checkpoint.inference import checkpoint_config
from megagpt.config import Config, ConfigError, ModelConfig
from megagpt.data import build_datasets
from megagpt.data.classify import build_classification_datasets
from megagpt.data.dataset import SplitDatasets
from megagpt.data.finetune import build_finetune_datasets, labeled_manifest
from megagpt.data.manifest import MANIFEST_SUFFIX
from megagpt.data.settings import parse_data_path
from megagpt.utils.files import file_sha256

log = logging.getLogger(__name__)

KEPT_MODEL_FIELDS = ("dropout", "attention_dropout")
"""model.* settings a fine-tune may choose; the rest describe the pretrained weights."""


def is_hf_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and not (path / layout.METADATA).exists()


def init_model_config(init: str) -> tuple[ModelConfig, str | None]:
    """The model shape and tokenizer of the weights `init` names."""
    path = Path(init)
    if path.is_dir() and is_hf_model_dir(path):
        import transformers

        from megagpt.model import hf

        model = hf.model_config_from_hf(transformers.AutoConfig.from_pretrained(path))
        tokenizers = [path / name for name in ("tokenizer.model", "tokenizer.json")]
        found = next((str(t) for t in tokenizers if t.is_file()), None)
        return model, found
    try:
        directory = layout.resolve_checkpoint_dir(path)
    except layout.CheckpointError as error:
        raise ConfigError(
            f"finetune.init = {init}: {error}; give a megagpt checkpoint (step_N/, its "
            "checkpoints/ root or run directory) or a Hugging Face model directory"
        ) from None
    config = checkpoint_config(directory)
    return config.model, config.data.tokenizer


def apply_init(config: Config) -> Config:
    """The config with the model (and, if unset, the tokenizer) of finetune.init."""
    model, tokenizer = init_model_config(config.finetune.init)
    kept = {name: getattr(config.model, name) for name in KEPT_MODEL_FIELDS}
    default = ModelConfig()
    differing = [
        f"model.{f.name}"
        for f in dataclasses.fields(ModelConfig)
        if f.name not in KEPT_MODEL_FIELDS
        and getattr(config.model, f.name) != getattr(default, f.name)
        and getattr(config.model, f.name) != getattr(model, f.name)
    ]
    if differing:
        log.warning(
            "finetune.init decides the model's shape: ignoring %s (only %s can be set)",
            ", ".join(differing),
            " and ".join(f"model.{n}" for n in KEPT_MODEL_FIELDS),
        )
    config.model = dataclasses.replace(model, **kept)
    if config.data.tokenizer is None:
        config.data.tokenizer = tokenizer
    if config.data.seq_len > config.model.max_seq_len:
        raise ConfigError(
            f"data.seq_len = {config.data.seq_len} exceeds the context of finetune.init "
            f"({config.model.max_seq_len} tokens); set data.seq_len={config.model.max_seq_len} "
            "or less (and preprocess with --max-tokens to match)"
        )
    return config


def build_run_datasets(config: Config) -> SplitDatasets:
    """The run's splits: a text corpus, or a labeled set packed into windows."""
    manifest = labeled_manifest(config.data)
    if manifest is None:
        return build_datasets(config.data, config.train.seed)
    _check_data_tokenizer(config)
    if manifest.format == "classify":
        return _classification_datasets(config, manifest)
    if config.data.chat_template is None and manifest.template_path is not None:
        config.data.chat_template = str(manifest.template_path)
    datasets = build_finetune_datasets(
        config.data, manifest, config.train.seed, config.finetune.pack
    )
    for name in ("train", "valid"):
        split = getattr(datasets, name)
        if split is not None:
            split.count_supervised()
            log.info("fine-tuning %s split: %s", name, split.stats.describe(config.data.seq_len))
    return datasets


def _classification_datasets(config: Config, manifest) -> SplitDatasets:
    """A classify set: the model gets a head of one output per label (GPT-1's)."""
    if config.parallel.pipeline_parallel_size > 1:
        raise ConfigError(
            "parallel.pipeline_parallel_size > 1: classification trains on data- and "
            "tensor-parallel layouts (with ZeRO); set parallel.pipeline_parallel_size=1"
        )
    if config.finetune.lora.rank:
        raise ConfigError(
            "finetune.lora.rank > 0 with classification data: LoRA checkpoints hold only "
            "adapters, not a new classification head; fine-tune the classifier without "
            "LoRA (finetune.lora.rank=0)"
        )
    labels = [str(name) for name in manifest.labels]
    if config.finetune.labels and config.finetune.labels != labels:
        raise ConfigError(
            f"finetune.labels = {config.finetune.labels} but the data's labels are {labels}; "
            "fine-tune one classifier per label set (or leave finetune.labels unset)"
        )
    config.finetune.labels = labels
    config.model.num_labels = len(labels)
    datasets = build_classification_datasets(config.data, manifest, config.train.seed)
    log.info(
        "classification: %d labels (%s); %s training and %s validation texts; loss = "
        "classification + %g x language modelling",
        len(labels),
        ", ".join(labels[:10]) + (" ..." if len(labels) > 10 else ""),
        f"{len(datasets.train):,}",
        f"{len(datasets.valid):,}" if datasets.valid else "no",
        config.finetune.lm_loss_weight,
    )
    return datasets


def _check_data_tokenizer(config: Config) -> None:
    """The labeled set must be tokenized by the model's tokenizer."""
    path = next(p for _, p in parse_data_path(config.data.path) if p.endswith(MANIFEST_SUFFIX))
    recorded = json.loads(Path(path).read_text(encoding="utf-8")).get("tokenizer_sha256")
    tokenizer = config.data.tokenizer
    if recorded and tokenizer and file_sha256(tokenizer) != recorded:
        raise ConfigError(
            f"data.path {path} was tokenized with another tokenizer than data.tokenizer = "
            f"{tokenizer} (the model's); preprocess it again with --tokenizer {tokenizer}"
        )


def steps_for_epochs(config: Config, train_samples: int) -> int:
    t = config.train
    return max(1, math.ceil(t.epochs * train_samples / t.global_batch_size))


def init_checkpoint(config: Config, is_main: bool) -> Path:
    """The megagpt checkpoint directory of finetune.init; a Hugging Face directory is
    converted first, by the main rank, into <output_dir>/init."""
    from megagpt.checkpoint.convert import import_hf

    source = Path(config.finetune.init)
    if not (source.is_dir() and is_hf_model_dir(source)):
        return layout.resolve_checkpoint_dir(source)
    target = Path(config.train.output_dir) / "init"
    if is_main:
        shutil.rmtree(target, ignore_errors=True)
        import_hf(source, target)
    if dist.is_initialized():
        dist.barrier()
    return layout.resolve_checkpoint_dir(target)
