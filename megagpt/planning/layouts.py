"""Layouts: how a run spreads over GPUs, written as `tp=2,pp=4,vp=2,dp=8,zero=1,ac=selective`.

A Layout is the planner's view of parallel.* and train.micro_batch_size; `apply_layout`
turns it into a validated Config (the same checks `megagpt train` runs, so a layout the
planner proposes is one megagpt accepts), and `candidate_layouts` lists every valid one
for a number of GPUs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

from megagpt.config import Config, ConfigError, validate_config, validate_world_size
from megagpt.parallel.dims import native_cpu_offload

AC_MODES = ("none", "selective", "full")


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    vp: int = 1
    zero: int = 0
    sp: bool = False
    ac: str = "none"
    mbs: int = 1
    schedule: str = "1f1b"
    offload: bool = False  # the native engine's CPU offload (FSDP2): states in host memory

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def __str__(self) -> str:
        text = (
            f"tp={self.tp},pp={self.pp},dp={self.dp},zero={self.zero},ac={self.ac},mbs={self.mbs}"
        )
        if self.sp:
            text += ",sp=1"
        if self.pp > 1:
            text += f",schedule={self.schedule}" + (f",vp={self.vp}" if self.vp > 1 else "")
        if self.offload:
            text += ",offload=cpu"
        return text

    @classmethod
    def from_config(cls, config: Config, world_size: int) -> Layout:
        p = config.parallel
        dp = validate_world_size(config, world_size)
        return cls(
            tp=p.tensor_parallel_size,
            pp=p.pipeline_parallel_size,
            dp=dp,
            vp=p.virtual_stages,
            zero=p.zero_stage,
            sp=p.sequence_parallel,
            ac=p.activation_checkpointing,
            mbs=config.train.micro_batch_size,
            schedule=p.pipeline_schedule,
            offload=native_cpu_offload(config),
        )


_INT_KEYS = {"tp", "pp", "dp", "vp", "zero", "mbs", "cp", "ep"}
_KEYS = _INT_KEYS | {"ac", "sp", "schedule", "offload"}


def parse_layout(text: str, world_size: int, base: Layout | None = None) -> Layout:
    """`tp=2,pp=4,...` over `base` (defaults otherwise); dp defaults to what the GPUs leave."""
    values: dict = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in _KEYS:
            raise ConfigError(
                f"--layout item {item!r}: expected key=value with keys {', '.join(sorted(_KEYS))}"
            )
        if key in _INT_KEYS:
            try:
                values[key] = int(value)
            except ValueError:
                raise ConfigError(f"--layout {key}={value!r}: must be an integer") from None
        elif key == "sp":
            values[key] = value.lower() in ("1", "true", "yes", "on")
        elif key == "offload":
            if value not in ("cpu", "none"):
                raise ConfigError(f"--layout offload={value!r}: use cpu or none")
            values[key] = value == "cpu"
        else:
            values[key] = value
    for key in ("cp", "ep"):
        if values.pop(key, 1) != 1:
            raise ConfigError(
                f"--layout {key}: megagpt has no {'context' if key == 'cp' else 'expert'} "
                "parallelism yet, so the planner cannot place it; use 1"
            )
    if values.get("ac", "none") not in AC_MODES:
        raise ConfigError(f"--layout ac={values['ac']!r}: use one of {', '.join(AC_MODES)}")
    layout = dataclasses.replace(base or Layout(), **values)
    if "dp" not in values:
        model_ranks = layout.tp * layout.pp
        if world_size % model_ranks:
            raise ConfigError(
                f"--layout tp x pp = {model_ranks} does not divide --gpus {world_size}"
            )
        layout = dataclasses.replace(layout, dp=world_size // model_ranks)
    if "vp" in values and "schedule" not in values and layout.vp > 1:
        layout = dataclasses.replace(layout, schedule="interleaved_1f1b")
    if layout.world_size != world_size:
        raise ConfigError(
            f"--layout {layout} uses {layout.world_size} GPUs, but --gpus is {world_size}"
        )
    return layout


def apply_layout(config: Config, layout: Layout) -> Config:
    """`config` with the layout's settings, checked as `megagpt train` checks them."""
    parallel = dataclasses.replace(
        config.parallel,
        tensor_parallel_size=layout.tp,
        pipeline_parallel_size=layout.pp,
        data_parallel_size=layout.dp,
        virtual_stages=layout.vp,
        zero_stage=layout.zero,
        sequence_parallel=layout.sp,
        activation_checkpointing=layout.ac,
        pipeline_schedule=layout.schedule if layout.pp > 1 else "1f1b",
        offload_optimizer="cpu" if layout.offload else "none",
        offload_params="none",
    )
    train = dataclasses.replace(config.train, micro_batch_size=layout.mbs)
    new = dataclasses.replace(config, parallel=parallel, train=train)
    validate_config(new)
    validate_world_size(new, layout.world_size)
    return new


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(config: Config, world_size: int, gpus_per_node: int) -> Iterator[Layout]:
    """Every layout of `world_size` GPUs that megagpt accepts for this model and batch:
    tensor parallelism within a node (with sequence parallelism, as Megatron runs it),
    pipelines of 1F1B or, at two virtual stages, interleaved 1F1B, ZeRO 0-3, each
    activation-checkpointing mode, micro-batches of powers of two."""
    for tp in _divisors(world_size):
        if tp > gpus_per_node:
            continue
        for pp in _divisors(world_size // tp):
            dp = world_size // (tp * pp)
            schedules = [("1f1b", 1)] if pp == 1 else [("1f1b", 1), ("interleaved_1f1b", 2)]
            for schedule, vp in schedules:
                for zero in (0, 1, 2, 3) if dp > 1 else (0,):
                    for ac in AC_MODES:
                        mbs = 1
                        while mbs * dp <= config.train.global_batch_size:
                            layout = Layout(tp, pp, dp, vp, zero, tp > 1, ac, mbs, schedule)
                            try:
                                apply_layout(config, layout)
                            except ConfigError:
                                pass
                            else:
                                yield layout
                            mbs *= 2
