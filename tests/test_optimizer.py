import math

import pytest

from megagpt.config.schema import ModelConfig, OptimConfig
from megagpt.model import build_model
from megagpt.parallel.optimizer import build_optimizer
from megagpt.training.schedule import learning_rate


def lrs(cfg, max_steps):
    return [learning_rate(s, cfg, max_steps) for s in range(max_steps)]


def test_warmup_then_cosine_to_min_lr():
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, decay_style="cosine")
    values = lrs(cfg, 110)
    assert values[0] == pytest.approx(0.1)
    assert values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0)
    assert values[60] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert learning_rate(110, cfg, 110) == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))


def test_linear_constant_and_wsd():
    linear = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=0, decay_style="linear")
    assert learning_rate(50, linear, 100) == pytest.approx(0.5)
    constant = OptimConfig(lr=0.3, warmup_steps=0, decay_style="constant")
    assert set(lrs(constant, 20)) == {0.3}
    wsd = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=0, decay_style="wsd", wsd_decay_fraction=0.2)
    values = lrs(wsd, 100)
    assert values[:81] == [1.0] * 81  # stable for the first 80% of the steps
    assert values[90] == pytest.approx(0.5)
    assert learning_rate(100, wsd, 100) == pytest.approx(0.0)


def test_decay_steps_ends_the_decay_early():
    cfg = OptimConfig(lr=1.0, min_lr=0.2, warmup_steps=0, decay_steps=10)
    assert learning_rate(10, cfg, 100) == pytest.approx(0.2)
    assert learning_rate(99, cfg, 100) == pytest.approx(0.2)


def test_no_weight_decay_on_norms_biases_and_embeddings():
    model = build_model(
        ModelConfig(vocab_size=100, n_layers=2, hidden_size=32, n_heads=2, max_seq_len=16), seed=0
    )
    optimizer = build_optimizer(model, OptimConfig(weight_decay=0.1))
    decay, no_decay = optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decayed == {
        n for n, p in model.named_parameters() if p.ndim == 2 and not n.startswith("embed_")
    }
    assert "layers.0.attn.qkv_proj.weight" in decayed
    assert not any(n.endswith("bias") or "norm" in n for n in decayed)
    total = sum(len(g["params"]) for g in optimizer.param_groups)
    assert total == len(list(model.parameters()))  # tied head counted once
