"""The learning-rate schedules: warmup, then cosine, linear, WSD or constant."""

from __future__ import annotations

import math

from megagpt.config.schema import OptimConfig


def learning_rate(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based). A pure function of the step,
    so resuming needs no scheduler state."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.decay_style == "constant":
        return cfg.lr
    decay_steps = cfg.decay_steps or max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    if cfg.decay_style == "wsd":
        stable = 1.0 - cfg.wsd_decay_fraction
        if progress <= stable:
            return cfg.lr
        progress = (progress - stable) / cfg.wsd_decay_fraction
        return cfg.lr - (cfg.lr - cfg.min_lr) * progress
    if cfg.decay_style == "linear":
        return cfg.lr - (cfg.lr - cfg.min_lr) * progress
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))
