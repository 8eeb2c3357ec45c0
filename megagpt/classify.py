"""Classifying texts with a fine-tuned classifier checkpoint (`megagpt classify`).

A text is encoded as in training (its tokens, then EOD) and classified at that last
token; a text longer than the model's context keeps its last tokens. Texts go through
the model in batches of similar length, padded on the right (causal attention keeps
the padding from changing a text's own positions).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megagpt.config import Config
from megagpt.errors import MegagptError
from megagpt.model.gpt import GPT
from megagpt.tokenizer import Tokenizer


class ClassifyError(MegagptError):
    """Texts or a checkpoint that `megagpt classify` cannot work with."""


@dataclass
class Prediction:
    label: str
    probabilities: dict[str, float]  # every label, in id order


@torch.no_grad()
def classify_texts(
    model: GPT, tokenizer: Tokenizer, config: Config, texts: Sequence[str], batch_size: int = 16
) -> list[Prediction]:
    """The predicted label and the probability of every label, for each text."""
    names = config.finetune.labels or [str(i) for i in range(config.model.num_labels)]
    limit = config.model.max_seq_len
    encoded = [[*tokenizer.encode(text), tokenizer.eod_id][-limit:] for text in texts]
    device = next(model.parameters()).device
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
    predictions: list[Prediction | None] = [None] * len(texts)
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        longest = max(len(encoded[i]) for i in chosen)
        inputs = torch.zeros(len(chosen), longest, dtype=torch.long, device=device)
        for row, i in enumerate(chosen):
            inputs[row, : len(encoded[i])] = torch.tensor(encoded[i])
        ends = torch.tensor([len(encoded[i]) - 1 for i in chosen], device=device)
        _, classes = model(inputs, label_positions=ends)
        probabilities = classes.float().softmax(-1).cpu()
        for row, i in enumerate(chosen):
            values = probabilities[row].tolist()
            best = max(range(len(values)), key=values.__getitem__)
            predictions[i] = Prediction(names[best], dict(zip(names, values)))
    return predictions
