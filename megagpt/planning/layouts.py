"""Layouts: how a run spreads over GPUs, written as `tp=2,pp=4,vp=2,dp=8,zero=1,ac=selective`
(and `cp=2` for context parallelism, `ep=2` for expert parallelism of an MoE model,
`offload=cpu` for the native engine's CPU offload). `engine=deepspeed` plans DeepSpeed's
ZeRO (data parallel only), whose offloads are set apart as in the config:
`offload_optimizer=cpu|nvme` (fp32 master weights, moments, gradient partitions) and,
at ZeRO-3, `offload_params=cpu|nvme`.

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
ENGINES = ("native", "deepspeed")
OFFLOAD_DEVICES = ("none", "cpu", "nvme")


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
    cp: int = 1  # context-parallel ranks: each holds seq_len / cp tokens of every sequence
    ep: int = 1  # expert-parallel ranks, taken from the dp_shard x cp ranks (dims.py)
    engine: str = "native"  # or deepspeed: DeepSpeed's ZeRO 1-3, data parallel only
    offload_optimizer: str = "none"  # deepspeed: where its optimizer side lives
    offload_params: str = "none"  # deepspeed at ZeRO-3: where parameter partitions live

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    @property
    def shard(self) -> int:
        """FSDP2's shard group: data-parallel ranks at ZeRO >= 1, times the context
        ranks (which shard parameters at every stage, see parallel/dims.py)."""
        return (self.dp if self.zero > 0 else 1) * self.cp

    def __str__(self) -> str:
        text = (
            f"tp={self.tp},pp={self.pp},dp={self.dp},zero={self.zero},ac={self.ac},mbs={self.mbs}"
        )
        if self.sp:
            text += ",sp=1"
        if self.cp > 1:
            text += f",cp={self.cp}"
        if self.ep > 1:
            text += f",ep={self.ep}"
        if self.pp > 1:
            text += f",schedule={self.schedule}" + (f",vp={self.vp}" if self.vp > 1 else "")
        if self.offload:
            text += ",offload=cpu"
        if self.engine != "native":
            text += f",engine={self.engine}"
        for key in ("offload_optimizer", "offload_params"):
            if getattr(self, key) != "none":
                text += f",{key}={getattr(self, key)}"
        return text

    @classmethod
    def from_config(cls, config: Config, world_size: int) -> Layout:
        p = config.parallel
        dp = validate_world_size(config, world_size)
        deepspeed = p.engine == "deepspeed"
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
            cp=p.context_parallel_size,
            ep=p.expert_parallel_size,
            engine=p.engine,
            offload_optimizer=p.offload_optimizer if deepspeed else "none",
            offload_params=p.offload_params if deepspeed else "none",
        )


_INT_KEYS = {"tp", "pp", "dp", "vp", "zero", "mbs", "cp", "ep"}
_CHOICES = {
    "ac": AC_MODES,
    "engine": ENGINES,
    "offload_optimizer": OFFLOAD_DEVICES,
    "offload_params": OFFLOAD_DEVICES,
}
_KEYS = _INT_KEYS | set(_CHOICES) | {"sp", "schedule", "offload"}


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
        elif key in _CHOICES and value not in _CHOICES[key]:
            raise ConfigError(f"--layout {key}={value!r}: use one of {', '.join(_CHOICES[key])}")
        else:
            values[key] = value
    layout = dataclasses.replace(base or Layout(), **values)
    if "dp" not in values:
        model_ranks = layout.tp * layout.pp * layout.cp
        if world_size % model_ranks:
            raise ConfigError(
                f"--layout tp x pp x cp = {model_ranks} does not divide --gpus {world_size}"
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
    """`config` with the layout's settings, checked as `megagpt train` checks them (the
    DeepSpeed engine's refusals too: tp, pp or cp above 1, ZeRO 0, offload_params below
    ZeRO-3, nvme without parallel.nvme_path)."""
    _check_offload_keys(layout)
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
        offload_optimizer="cpu" if layout.offload else layout.offload_optimizer,
        offload_params=layout.offload_params,
        context_parallel_size=layout.cp,
        expert_parallel_size=layout.ep,
        engine=layout.engine,
    )
    train = dataclasses.replace(config.train, micro_batch_size=layout.mbs)
    new = dataclasses.replace(config, parallel=parallel, train=train)
    validate_config(new)
    validate_world_size(new, layout.world_size)
    return new


def _check_offload_keys(layout: Layout) -> None:
    """Each engine's offload is written its own way: FSDP2 moves all three kinds
    together (offload=cpu), DeepSpeed sets the optimizer and parameters apart."""
    if layout.engine == "deepspeed" and layout.offload:
        raise ConfigError(
            "--layout offload=cpu is the native engine's (FSDP2 offloads all states "
            "together); with engine=deepspeed use offload_optimizer=cpu and, at zero=3, "
            "offload_params=cpu"
        )
    deepspeed_offload = {layout.offload_optimizer, layout.offload_params} != {"none"}
    if layout.engine != "deepspeed" and deepspeed_offload:
        raise ConfigError(
            f"--layout offload_optimizer={layout.offload_optimizer}, offload_params="
            f"{layout.offload_params} are the deepspeed engine's: add engine=deepspeed, or "
            "use offload=cpu on the native engine"
        )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _expert_sizes(config: Config, shard: int) -> list[int]:
    """Expert-parallel sizes to try: divisors of the routed experts that divide the
    shard group (1 alone for a dense model)."""
    experts = config.model.moe.num_experts
    return [e for e in _divisors(experts) if shard % e == 0] if experts else [1]


def candidate_layouts(config: Config, world_size: int, gpus_per_node: int) -> Iterator[Layout]:
    """Every layout of `world_size` GPUs that megagpt accepts for this model and batch:
    tensor parallelism within a node (with sequence parallelism, as Megatron runs it),
    context parallelism where data.seq_len splits into its 2 x cp chunks, pipelines of
    1F1B or, at two virtual stages, interleaved 1F1B, ZeRO 0-3, expert parallelism
    for an MoE model, each activation-checkpointing mode, micro-batches of powers of
    two. Context parallelism is tried at micro-batch 1 only: it is for sequences too
    long for one rank even one at a time, and otherwise a smaller micro-batch saves the
    same activations without the ring (this keeps the search a few times smaller).

    A config on the deepspeed engine gets DeepSpeed layouts alone (the engine is the
    user's choice): all ranks data parallel, ZeRO 1-3, each with its optimizer kept on
    the GPU or offloaded, at ZeRO-3 the parameters too (to NVMe as well where
    parallel.nvme_path names a drive), in each activation-checkpointing mode."""
    if config.parallel.engine == "deepspeed":
        yield from _deepspeed_layouts(config, world_size)
        return
    for tp, cp, pp, dp in _grids(world_size, gpus_per_node, config.data.seq_len):
        schedules = [("1f1b", 1)] if pp == 1 else [("1f1b", 1), ("interleaved_1f1b", 2)]
        for schedule, vp in schedules:
            for zero in (0, 1, 2, 3) if dp > 1 else (0,):
                for ep in _expert_sizes(config, (dp if zero else 1) * cp):
                    for ac in AC_MODES:
                        layout = Layout(tp, pp, dp, vp, zero, tp > 1, ac, 1, schedule, cp=cp, ep=ep)
                        yield from _fitting_micro_batches(config, layout)


def _deepspeed_layouts(config: Config, world_size: int) -> Iterator[Layout]:
    devices = OFFLOAD_DEVICES if config.parallel.nvme_path else OFFLOAD_DEVICES[:2]
    for zero in (1, 2, 3):
        for optimizer in devices if zero == 3 else ("none", "cpu"):  # nvme: ZeRO-3 only
            for params in devices if zero == 3 and optimizer != "none" else ("none",):
                for ac in AC_MODES:
                    layout = Layout(
                        dp=world_size,
                        zero=zero,
                        ac=ac,
                        engine="deepspeed",
                        offload_optimizer=optimizer,
                        offload_params=params,
                    )
                    yield from _fitting_micro_batches(config, layout)


def _grids(world_size: int, gpus_per_node: int, seq_len: int) -> Iterator[tuple[int, ...]]:
    """(tp, cp, pp, dp) of `world_size` GPUs: tp within a node, cp splitting seq_len."""
    for tp in _divisors(world_size):
        if tp > gpus_per_node:
            continue
        for cp in _divisors(world_size // tp):
            if seq_len % (2 * cp) == 0 or cp == 1:
                for pp in _divisors(world_size // (tp * cp)):
                    yield tp, cp, pp, world_size // (tp * cp * pp)


def _fitting_micro_batches(config: Config, layout: Layout) -> Iterator[Layout]:
    """`layout` at each micro-batch size megagpt accepts (1 only with context parallelism)."""
    mbs = 1
    while mbs * layout.dp <= config.train.global_batch_size and (mbs == 1 or layout.cp == 1):
        candidate = dataclasses.replace(layout, mbs=mbs)
        try:
            apply_layout(config, candidate)
        except ConfigError:
            pass
        else:
            yield candidate
        mbs *= 2
