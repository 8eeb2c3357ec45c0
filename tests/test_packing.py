"""Packed fine-tuning examples: attention never crosses an example, positions restart,
and the loss is the mean over the trained tokens of the whole global batch."""

from __future__ import annotations

import pytest
import torch

from megagpt.config import ModelConfig
from megagpt.model import build_model
from megagpt.model.gpt import IGNORE_INDEX, cross_entropy
from tests.conftest import LLAMA_SHAPE

SHAPES = {"gpt2": {}, "llama": {**LLAMA_SHAPE, "n_kv_heads": 2}}


def tiny_model(shape: str):
    cfg = ModelConfig(vocab_size=97, max_seq_len=64, n_layers=2, hidden_size=32, n_heads=4,
                      dropout=0.0, **SHAPES[shape])  # fmt: skip
    return build_model(cfg, "cpu", seed=3)


def pack(examples: list[tuple[torch.Tensor, torch.Tensor]], length: int):
    """One row holding `examples` (inputs, targets) back to back, then padding."""
    inputs = torch.zeros(1, length, dtype=torch.long)
    targets = torch.full((1, length), IGNORE_INDEX)
    positions = torch.zeros(1, length, dtype=torch.long)
    segments = torch.full((1, length), len(examples))  # the padding's own segment
    start = 0
    for number, (x, y) in enumerate(examples):
        end = start + len(x)
        inputs[0, start:end], targets[0, start:end] = x, y
        positions[0, start:end] = torch.arange(len(x))
        segments[0, start:end] = number
        start = end
    return inputs, targets, positions, segments


@pytest.mark.parametrize("shape", SHAPES)
def test_every_example_gets_the_loss_and_gradients_it_gets_alone(shape):
    model = tiny_model(shape)
    torch.manual_seed(0)
    examples = []
    for length in (9, 17, 5):
        x = torch.randint(0, 97, (length,))
        y = torch.randint(0, 97, (length,))
        y[: length // 2] = IGNORE_INDEX  # a prompt: not trained on
        examples.append((x, y))
    inputs, targets, positions, segments = pack(examples, 40)
    logits = model(inputs, positions=positions, segments=segments)
    start = 0
    for x, _ in examples:
        alone = model(x[None])
        packed = logits[:, start : start + len(x)]
        torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
        start += len(x)
    # Gradients: the packed row's summed loss is the sum of the examples' summed losses.
    model.zero_grad()
    model(inputs, targets, positions=positions, segments=segments, reduction="sum").backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for x, y in examples:
        model(x[None], y[None], reduction="sum").backward()
    for packed, alone in zip(packed_grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-6)


def test_a_loss_with_nothing_ignored_is_the_plain_mean():
    logits = torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    mean = cross_entropy(logits, targets)
    assert torch.allclose(cross_entropy(logits, targets, reduction="sum") / 10, mean)
    targets[0, :3] = IGNORE_INDEX
    kept = targets != IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(logits[kept], targets[kept])
    assert torch.allclose(cross_entropy(logits, targets), expected)
