"""Per-GPU memory of a layout, predicted from the model's own structure.

Model states (parameters, gradients, AdamW's two moments) are counted tensor by tensor
from the real GPT built on the meta device (nothing allocated), placed as megagpt places
them: pipeline stages by `layer_ranges`, Megatron's tensor-parallel partitioning (column
projections and the vocabulary split on rows, row projections on columns, the rest
replicated), then FSDP2's row chunks over the data-parallel shard group. Weights,
gradients and optimizer state are fp32 (bf16 runs autocast), so these are exact.

Activations are the bytes saved for backward, per token per layer from a calibration
on the real model (planning/calibrate.py), scaled for tensor and sequence parallelism
by what each part of a block is (see ROLE_SCALE), times the tokens of the microbatches
a pipeline rank holds at once under its schedule (`in_flight`). Context parallelism
gives each rank seq_len / cp tokens of every sequence, and its ring attention one more
copy per layer (`ring_output_bytes`). Routed experts process a rank's own token copies
(the calibration's, routing dropless); under expert parallelism they are computed on
the experts' ranks, the same number per rank on average (balanced routing), so the
activations per token do not change.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from types import SimpleNamespace

from megagpt.config import Config, ModelConfig
from megagpt.model.build import build_meta_model
from megagpt.parallel.pipeline import layer_ranges
from megagpt.planning.layouts import Layout

FP32 = 4
COLUMN = ("qkv_proj", "q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW = ("out_proj", "down_proj")


def tensor_parallel_dim(name: str) -> int | None:
    """The dimension tensor parallelism splits parameter `name` on (None: replicated)."""
    module, leaf = name.rsplit(".", 2)[-2:]
    if module in COLUMN or module in ("embed_tokens", "lm_head"):
        return 0
    if module in ROW and leaf == "weight":
        return 1
    return None


def stage_of(name: str, stage_layers: list[range]) -> list[int]:
    """The pipeline stages holding parameter `name` (a tied embedding: first and last)."""
    last = len(stage_layers) - 1
    if name.startswith("layers."):
        index = int(name.split(".")[1])
        return [s for s, layers in enumerate(stage_layers) if index in layers]
    if name.startswith("embed_"):
        return [0]
    return [last]


def _chunk(rows: int, parts: int, index: int) -> int:
    """Rows of chunk `index` when torch.chunk splits `rows` into `parts` (FSDP2's split)."""
    size = math.ceil(rows / parts)
    return max(0, min(size, rows - index * size))


_MODELS: dict[str, ModelConfig] = {}


def _remember(cfg: ModelConfig) -> str:
    key = repr(cfg)
    _MODELS.setdefault(key, cfg)
    return key


@functools.cache
def parameter_shapes(key: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Name and shape of every parameter of the GPT, from the model built on meta."""
    meta = build_meta_model(_MODELS[key])
    return tuple((name, tuple(p.shape)) for name, p in meta.named_parameters())


def is_routed_expert(name: str) -> bool:
    """Whether parameter `name` is an MoE layer's stacked (E, in, out) expert weights."""
    return ".mlp.experts." in name


@functools.cache
def _local_elements(
    key: str,
    tp: int,
    pp: int,
    vp: int,
    ep: int,
    pp_rank: int,
    shards: tuple[int, int] = (1, 1),
    shard_rank: int = 0,
):
    """Elements of the parameters this rank holds: its pipeline stages, its
    tensor-parallel slices, its experts (E / ep of them), then FSDP2's dim-0 chunk
    `shard_rank` of `shards` = (dense, expert) chunk counts: the dense parameters over
    the whole shard group, the experts over the ranks holding the same experts (efsdp,
    index shard_rank // ep, see parallel/dims.py)."""
    cfg = _MODELS[key]
    n_stages = pp * vp
    stage_layers = layer_ranges(cfg.n_layers, n_stages)
    mine = {pp_rank + k * pp for k in range(vp)}
    shapes = dict(parameter_shapes(key))
    if cfg.tie_embeddings and n_stages > 1:
        # A pipeline's last stage holds its own copy of the tied matrix.
        shapes["lm_head.weight"] = shapes["embed_tokens.weight"]
    dense, expert = shards
    elements = 0
    for name, shape in shapes.items():
        if not mine.intersection(stage_of(name, stage_layers)):
            continue
        local = list(shape)
        dim = tensor_parallel_dim(name)
        if dim is not None and tp > 1:
            local[dim] //= tp
        if is_routed_expert(name):
            local[0] //= ep
            local[0] = _chunk(local[0], expert, shard_rank // ep)
        else:
            local[0] = _chunk(local[0], dense, shard_rank)
        elements += math.prod(local)
    return elements


def model_state_bytes(
    config: Config, layout: Layout, pp_rank: int, shard_rank: int = 0
) -> dict[str, int]:
    """This rank's parameter, gradient and optimizer-state bytes, tensor by tensor;
    `shard_rank` is the rank's index in FSDP2's shard group (data x context ranks:
    dp_rank x cp + cp_rank at ZeRO >= 1, cp_rank at 0); FSDP2's last chunks can be
    smaller, and index 0 holds the most."""
    shards = (layout.shard, max(1, layout.shard // layout.ep))
    elements = _local_elements(
        _remember(config.model),
        layout.tp,
        layout.pp,
        layout.vp,
        layout.ep,
        pp_rank,
        shards,
        shard_rank,
    )
    return {
        "parameters": FP32 * elements,
        "gradients": FP32 * elements,
        "optimizer_state": 2 * FP32 * elements,
    }


def unsharded_stage_bytes(config: Config, layout: Layout, pp_rank: int) -> int:
    """This rank's parameters gathered whole (what FSDP2 holds while computing): its
    experts stay E / ep of them."""
    key = _remember(config.model)
    elements = _local_elements(key, layout.tp, layout.pp, layout.vp, layout.ep, pp_rank)
    return FP32 * elements


# How each part of a block's saved activations divides under tensor parallelism:
# (factor without sequence parallelism, factor with it), as multiples of 1/tp.
# "whole" parts are computed identically on every tensor-parallel rank.
ROLE_SCALE = {
    "norm": ("whole", "split"),  # layer norms' inputs: the residual stream
    "dropout": ("whole", "split"),  # residual dropout masks
    "block": ("whole", "split"),  # a checkpointed block's input
    "residual": ("whole", "split"),  # outputs of the row projections, reduced
    "column_input": ("whole", "whole"),  # gathered before the column projections
    "column_output": ("split", "split"),
    "row_input": ("split", "split"),
    "core": ("split", "split"),  # attention (per head), rotary, the MLP activation
    "experts": ("whole", "whole"),  # an MoE layer's router and routed experts
    "embedding": ("whole", "whole"),
    "head_input": ("whole", "whole"),
    "loss": ("split", "split"),  # vocabulary-parallel logits and their log-softmax
}


def role_factor(role: str, layout: Layout) -> float:
    if role == "residual" and layout.tp > 1:
        # Selective checkpointing keeps both the row projection's partial sums (whole)
        # and the reduced result: all-reduced (whole) or reduce-scattered (a 1/tp slice).
        return 1.0 + (1.0 / layout.tp if layout.sp else 1.0)
    kind = ROLE_SCALE[role][1 if layout.sp else 0]
    return 1.0 / layout.tp if kind == "split" else 1.0


def pipeline_order(layout: Layout, pp_rank: int, microbatches: int) -> list[tuple[str, int]]:
    """The forwards ("F") and backwards ("B") a pipeline rank runs, in order, as
    (kind, stage). No pipeline: forward and backward of one microbatch, then the next.
    gpipe: every forward, then every backward. 1F1B: p - 1 - r warm-up
    forwards, then a forward and a backward in turn. The interleaved schedules: the
    order torch.distributed.pipelining computes for them (its own planning function,
    so the plan follows the schedule megagpt runs); zero-bubble splits the backward
    into an input-gradient step "I" and a deferred weight-gradient step "W", and the
    microbatch's activations stay until its "W"."""
    p, v, m, r = layout.pp, layout.vp, microbatches, pp_rank
    if p == 1:  # gradient accumulation: each microbatch's backward before the next
        return [("F", 0), ("B", 0)] * m
    if layout.schedule == "gpipe":
        return [("F", r)] * m + [("B", r)] * m
    if v == 1:
        warmup = min(m, p - 1 - r)
        steady = [op for _ in range(m - warmup) for op in (("F", r), ("B", r))]
        return [("F", r)] * warmup + steady + [("B", r)] * warmup
    from torch.distributed.pipelining import schedules

    cls = (
        schedules.ScheduleInterleavedZeroBubble
        if layout.schedule == "zero_bubble"
        else schedules.ScheduleInterleaved1F1B
    )
    rounds = max(1, m // p)
    plan = SimpleNamespace(
        n_local_stages=v,
        pp_group_size=p,
        _n_microbatches=m,
        number_of_rounds=rounds,
        microbatches_per_round=m // rounds,
    )
    order = []
    for action in cls._calculate_single_rank_operations(plan, r):
        kind = None if action is None else action.computation_type.value
        if kind in ("F", "B", "I", "W"):
            order.append((kind, action.stage_index))
    return order


def in_flight(layout: Layout, pp_rank: int, microbatches: int) -> int:
    """The most stage-microbatches a pipeline rank holds activations of at once."""
    held = most = 0
    for kind, _ in pipeline_order(layout, pp_rank, microbatches):
        held += {"F": 1, "B": -1, "W": -1}.get(kind, 0)
        most = max(most, held)
    return most


@dataclass(frozen=True)
class Calibration:
    """Activation bytes per token, by role, for one activation-checkpointing mode:
    `layer` per block; `first` / `last` for what only the first / last stage saves
    (embedding; final norm, output layer and loss); `transient` per token of one
    block recomputed in backward (checkpointing keeps less, then rebuilds one block)."""

    mode: str
    layer: dict[str, float]
    first: dict[str, float]
    last: dict[str, float]
    transient: dict[str, float]


def _scaled(parts: dict[str, float], layout: Layout) -> float:
    return sum(bytes_ * role_factor(role, layout) for role, bytes_ in parts.items())


def weight_copy_bytes(config: Config, layout: Layout) -> tuple[int, int]:
    """Bytes of the bf16 copies autocast makes of one block's matmul weights (the
    largest block's: an MoE block's copies are of its E / ep routed experts) and of
    the output layer's, which backward keeps. None on the DeepSpeed engine: it computes
    with bf16/fp16 weights themselves, without autocast."""
    if config.train.precision == "fp32" or layout.engine == "deepspeed":
        return 0, 0
    blocks: dict[str, int] = {}
    head = 0
    for name, shape in parameter_shapes(_remember(config.model)):
        local = list(shape)
        dim = tensor_parallel_dim(name)
        if dim is not None:
            local[dim] //= layout.tp
        if is_routed_expert(name):
            local[0] //= layout.ep
        if name.startswith("layers.") and (name.endswith("proj.weight") or is_routed_expert(name)):
            layer = name.split(".")[1]
            blocks[layer] = blocks.get(layer, 0) + 2 * math.prod(local)
        elif name == "embed_tokens.weight":  # the output layer's matrix, tied or not
            head = 2 * math.prod(local)
    return max(blocks.values(), default=0), head


def ring_output_bytes(config: Config, layout: Layout) -> float:
    """Bytes per token per layer that ring attention (context parallelism) saves beyond
    what the calibration's SDPA does: the ring returns its output (B, H, T, D)
    contiguous, so the output projection's input (B, T, H x D) is a copy of it, where
    SDPA's output is already laid out so and shared (measured: tests/test_plan.py's cp2
    layouts). Split by tensor parallelism, as the heads are."""
    if layout.cp == 1:
        return 0.0
    width = 4 if config.train.precision == "fp32" else 2
    return config.model.hidden_size * width / layout.tp


def activation_bytes(config: Config, layout: Layout, calibration: Calibration, pp_rank: int) -> int:
    """Peak bytes saved for backward on a rank of pipeline rank `pp_rank`: its schedule
    played forward, each forward adding what its stage keeps per microbatch, each
    backward first rebuilding one checkpointed block (by then the stage's own output
    layer and loss have been freed), then freeing the microbatch. Under bf16 autocast
    the weight copies count too (in checkpointed blocks only while rebuilt)."""
    tokens = layout.mbs * config.data.seq_len // layout.cp  # this rank's share of each sequence
    microbatches = config.train.global_batch_size // (layout.mbs * layout.dp)
    n_stages = layout.pp * layout.vp
    stage_layers = layer_ranges(config.model.n_layers, n_stages)
    block_copies, head_copy = weight_copy_bytes(config, layout)
    checkpointed = calibration.mode != "none"
    ring = tokens * ring_output_bytes(config, layout)
    rebuilt = tokens * _scaled(calibration.transient, layout) + (ring if checkpointed else 0)
    if checkpointed:
        rebuilt += block_copies
    kept, extra, copies = {}, {}, {}
    for stage in range(pp_rank, n_stages, layout.pp):
        layers = len(stage_layers[stage])
        per_layer = tokens * _scaled(calibration.layer, layout) + (0 if checkpointed else ring)
        kept[stage] = layers * per_layer
        copies[stage] = 0 if checkpointed else layers * block_copies
        extra[stage] = rebuilt
        if stage == 0:
            kept[stage] += tokens * _scaled(calibration.first, layout)
        if stage == n_stages - 1:
            head = tokens * _scaled(calibration.last, layout)
            kept[stage] += head
            copies[stage] += head_copy
            extra[stage] = max(0.0, rebuilt - head - head_copy)
    # A stage's weight copies are shared by its microbatches in flight (one autocast
    # cache per step), so they count once while any of them is held.
    held = dict.fromkeys(kept, 0)
    live = peak = 0.0

    def now() -> float:
        return live + sum(copies[s] for s, count in held.items() if count)

    for kind, stage in pipeline_order(layout, pp_rank, microbatches):
        if kind == "F":
            live += kept[stage]
            held[stage] += 1
            peak = max(peak, now())
        elif kind in ("B", "I"):
            peak = max(peak, now() + extra[stage])
        if kind in ("B", "W"):
            live -= kept[stage]
            held[stage] -= 1
    return int(peak)
