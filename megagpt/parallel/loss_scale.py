"""Dynamic loss scaling for fp16 training.

fp16 keeps 5 exponent bits: gradients below ~6e-8 flush to zero, above 65504 they
overflow. Multiplying the loss by a large scale before backward lifts small gradients
into range; the update divides it out again. The scale rides just under overflow: it
backs off when a step's gradients overflow (that step is skipped) and grows again after
a run of good steps.

The rules are DeepSpeed's (deepspeed/runtime/fp16/loss_scaler.py, DynamicLossScaler,
without consecutive hysteresis, its default): an overflow first spends the hysteresis
budget, and once it is used up every overflow backs off, until the scale grows again,
which refills the budget. Two differences: the scale grows after exactly
growth_interval good steps in a row (as torch's GradScaler does), where DeepSpeed's
first growth after an overflow (or the start) waits one step more; and an overflow at
min_scale is no error here: the trainer holds it against train.max_nan_skips.
"""

from __future__ import annotations

from megagpt.config.schema import LossScaleConfig


class DynamicLossScaler:
    """The current loss scale and the counters that move it (see the module docstring).

    Every rank keeps its own copy and updates it from the same global decision (the
    gradient norm is all-reduced), so the copies stay equal without communication.
    """

    def __init__(self, cfg: LossScaleConfig):
        self.cfg = cfg
        self.scale = float(cfg.initial_scale)
        self.good_steps = 0
        """Steps without an overflow since the last overflow or growth."""
        self.hysteresis_left = cfg.hysteresis
        """Overflows until one backs the scale off, that one included."""

    def update(self, overflow: bool) -> None:
        """Move the scale after a step: `overflow` says its gradients were not finite."""
        cfg = self.cfg
        if overflow:
            self.good_steps = 0
            if self.hysteresis_left > 1:
                self.hysteresis_left -= 1
            else:  # stays at 1: every further overflow backs off until the scale grows
                self.scale = max(self.scale * cfg.backoff_factor, cfg.min_scale)
            return
        self.good_steps += 1
        if self.good_steps >= cfg.growth_interval:
            self.scale *= 2.0
            self.good_steps = 0
            self.hysteresis_left = cfg.hysteresis

    def state_dict(self) -> dict[str, float | int]:
        """Plain numbers, for the checkpoint's metadata.json."""
        return {
            "scale": self.scale,
            "good_steps": self.good_steps,
            "hysteresis_left": self.hysteresis_left,
        }

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.good_steps = int(state["good_steps"])
        self.hysteresis_left = int(state["hysteresis_left"])
