"""Which way an evaluation metric improves, for train.early_stopping and checkpoint.keep_best.

Both settings take a mode: min, max, or auto. Auto reads the metric's name, so that
val_loss, val_ppl, train_val_gap and eval/<task>/bpb count as better when lower, and
val_accuracy, val_macro_f1, eval/<task>/acc and acc_norm (and lm-eval's "acc,none")
when higher.
"""

from __future__ import annotations

import math
import re

HIGHER_IS_BETTER = ("acc", "accuracy", "f1", "exact_match", "mcc", "bleu")
"""Words that make auto mode read a metric as better when higher."""


def metric_mode(metric: str, mode: str = "auto") -> str:
    """ "min" or "max": `mode` itself unless it is auto, else what the name says (see
    the module docstring): max when the part after the last "/" has one of
    HIGHER_IS_BETTER as a word (words split at _ , - .), min otherwise."""
    if mode != "auto":
        return mode
    last = metric.rsplit("/", 1)[-1].lower()
    words = set(re.split(r"[_,.\-]", last))
    higher = any(w in words for w in HIGHER_IS_BETTER) or "exact_match" in last
    return "max" if higher else "min"


def improves(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """Whether `value` beats `best` (None: nothing yet) by more than `min_delta` in the
    direction of `mode` ("min" or "max"); a NaN or infinite value never does."""
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta
