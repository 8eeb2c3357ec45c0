"""Exporting a classifier (a model with model.num_labels > 0) to transformers.

GPT-2-shaped models become GPT2ForSequenceClassification, Llama-shaped ones
LlamaForSequenceClassification: the same backbone names as the causal-LM export,
`score.weight` for the head, and no language-model head. Those models classify at the
last token that is not padding, which is where megagpt classifies (the text's EOD), as
long as the padding id differs from EOD; where a tokenizer pads with EOD the export
has no padding id, and transformers then classifies at the last position (one text
at a time, or texts of equal length).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from megagpt.config import Config
from megagpt.model import hf

log = logging.getLogger(__name__)


def save_hf_classifier(
    state: dict[str, torch.Tensor], config: Config, out: Path, special: dict[str, int] | None
) -> Path:
    """Write the classifier as a transformers directory (weights and config)."""
    import transformers

    cfg = config.model
    special = dict(special or {})
    if special.get("pad") is not None and special.get("pad") == special.get("eos"):
        log.warning("the tokenizer pads with EOD: the export has no padding id (see module doc)")
        special["pad"] = None
    hf_config = hf.hf_config(cfg, special)
    names = config.finetune.labels or [str(i) for i in range(cfg.num_labels)]
    hf_config.num_labels = cfg.num_labels
    hf_config.id2label = dict(enumerate(names))
    hf_config.label2id = {name: i for i, name in enumerate(names)}
    backbone = {k: v for k, v in state.items() if not k.startswith("score.")}
    hf_state = hf.to_hf(backbone, cfg)
    hf_state.pop("lm_head.weight", None)
    hf_state["score.weight"] = state["score.proj.weight"].detach().contiguous().clone()
    with torch.device("meta"):
        model = transformers.AutoModelForSequenceClassification.from_config(
            hf_config, dtype=torch.float32
        )
    missing, unexpected = model.load_state_dict(hf_state, strict=False, assign=True)
    if missing or unexpected:
        from megagpt.checkpoint.layout import CheckpointError

        raise CheckpointError(
            f"classifier export mapping is incomplete: missing {missing}, unexpected {unexpected}"
        )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    return out
