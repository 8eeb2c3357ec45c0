"""Predicted step time of a layout, part by part.

compute      model FLOPs (PaLM's accounting, megagpt.model.flops) per GPU, plus the
             blocks' forward recomputed under full activation checkpointing, over the
             achievable matmul rate (peak x `achievable`, or a rate measured here);
             plus the framework's host time per block (the accelerator's overheads:
             0 on GPUs, whose queues hide it; measured on a CPU).
tensor       Megatron's four all-reduces per block per microbatch (two forward, two
             backward; all-gather + reduce-scatter with sequence parallelism move the
             same bytes), ring cost 2 (t-1)/t x bytes / bandwidth; six with full
             recomputation. Not overlapped.
pipeline     activations sent forward and gradients back at each stage boundary.
context      ring attention: in each attention layer every rank passes its K/V block
             cp - 1 hops forward, and in backward the K/V again (cp - 1 hops) and their
             fp32 gradients (cp hops); again in the recomputed forward under full
             checkpointing. Counted in full, though each hop overlaps a block's compute.
experts      expert parallelism: in each MoE layer a rank's token copies (top_k per
             token) go to their experts' ranks and back (two all-to-alls, (ep-1)/ep of
             the rows leave the rank), and their gradients back the same way.
data         gradient reduction and ZeRO's parameter gathers in fp32 (FSDP2 without
             mixed-precision communication): stage 0 one all-reduce per step, 1 a
             reduce-scatter per step and a gather per microbatch, 2 a reduce-scatter and
             a gather per microbatch, 3 two gathers; over data x context ranks (context
             ranks shard parameters at stage 0 too, so stage 0 moves as 1 there).
             Overlapped with compute by FSDP2's prefetching except the first gather and
             last reduction (two blocks' worth), and whatever exceeds the compute; not
             at all where the accelerator says it cannot overlap (a CPU).
bubble       (p - 1) / (v m) of the pipelined work; a third of it for zero_bubble.
optimizer    AdamW reads parameter, gradient and two moments and writes three back:
             28 bytes per local parameter over memory bandwidth.
offload      (native offload=cpu) the shards copied in for each pass and the gradients
             out, at host_gbps, and AdamW on the host at host_adam_gparams.

The DeepSpeed engine (engine=deepspeed, data parallel only) is planned the same way
but for its own traffic (`_deepspeed_traffic`): megagpt's loop accumulates the
gradients and DeepSpeed reduces them once, at step(), in the compute precision;
ZeRO-1/2 then gathers the updated parameters, ZeRO-3 gathers them for every
microbatch's forward and backward instead. Its offloads copy the gradient partition to
the host and the updated parameters back (offload_optimizer), the parameter
partitions in at every gather (offload_params), and on NVMe read and write what they
keep there (at nvme_gbps).
"""

from __future__ import annotations

import math

from megagpt.config import Config
from megagpt.model.flops import flops_per_token
from megagpt.planning.deepspeed_memory import (
    REDUCE_BUCKET,
    compute_width,
    deepspeed_state_placement,
    master_elements,
    parameter_groups,
)
from megagpt.planning.hardware import Accelerator
from megagpt.planning.layouts import Layout
from megagpt.planning.memory import FP32, unsharded_stage_bytes

ACTIVATION_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "auto": 2}


def _ring(
    bytes_: float, ranks: int, bandwidth_gbps: float, passes: float, latency_us: float = 0.0
) -> float:
    """Seconds of a ring collective moving `passes` x (n-1)/n of `bytes_` per rank, plus
    a fixed latency per pass."""
    if ranks <= 1:
        return 0.0
    moved = passes * (ranks - 1) / ranks * bytes_ / (bandwidth_gbps * 1e9)
    return moved + passes * latency_us * 1e-6


def step_time(
    config: Config,
    layout: Layout,
    gpu: Accelerator,
    gpus_per_node: int,
    matmul_tflops: float | None = None,
) -> dict[str, float]:
    """Seconds per optimizer step by part, with the total, tokens/s per GPU and MFU."""
    m, L = config.model, config.model.n_layers
    seq, world = config.data.seq_len, layout.world_size
    microbatches = config.train.global_batch_size // (layout.mbs * layout.dp)
    tokens_per_step = config.train.global_batch_size * seq
    act = ACTIVATION_BYTES[config.train.precision]
    rate = (matmul_tflops or gpu.bf16_tflops * gpu.achievable) * 1e12

    flops = flops_per_token(m, seq) * tokens_per_step / world
    if layout.ac == "full":  # the blocks' forward again, in backward (not the output layer)
        head = 6 * m.padded_vocab_size * m.hidden_size * tokens_per_step / world
        flops += (flops - head) / 3
    compute = flops / rate + _framework_time(config, layout, gpu, microbatches)

    layers_here = L / layout.pp
    local_seq = seq // layout.cp  # this rank's tokens of each sequence
    hidden_bytes = layout.mbs * local_seq * m.hidden_size * act
    tp_bw = gpu.intra_node_gbps if layout.tp <= gpus_per_node else gpu.inter_node_gbps
    reductions = 6 if layout.ac == "full" else 4
    all_reduce = _ring(hidden_bytes, layout.tp, tp_bw, 2, gpu.latency_us)
    tensor = microbatches * layers_here * reductions * all_reduce

    pipeline = 0.0
    if layout.pp > 1:
        pp_bw = (
            gpu.inter_node_gbps if layout.tp * layout.dp >= gpus_per_node else gpu.intra_node_gbps
        )
        sent = hidden_bytes / (layout.tp if layout.sp else 1)
        pipeline = microbatches * layout.vp * 2 * (sent / (pp_bw * 1e9) + gpu.latency_us * 1e-6)

    forwards = 2 if layout.ac == "full" else 1
    context = _context_ring(config, layout, gpu, gpus_per_node, forwards)
    experts = _expert_all_to_all(config, layout, gpu, gpus_per_node, forwards)
    context, experts = microbatches * context, microbatches * experts

    if layout.engine == "deepspeed":
        data, exposed_data, optimizer, offload = _deepspeed_traffic(
            config, layout, gpu, gpus_per_node, compute, microbatches
        )
    else:
        data, exposed_data, optimizer, offload = _native_traffic(
            config, layout, gpu, gpus_per_node, compute, microbatches
        )
    pipelined = compute + tensor + pipeline + context + experts
    bubble = 0.0
    if layout.pp > 1:
        bubble = (layout.pp - 1) / (layout.vp * microbatches) * pipelined
        if layout.schedule == "zero_bubble":
            bubble /= 3

    total = pipelined + exposed_data + bubble + optimizer + offload
    tokens_per_gpu = tokens_per_step / total / world
    mfu = flops_per_token(m, seq) * tokens_per_gpu / (gpu.bf16_tflops * 1e12)
    return {
        "compute_s": compute,
        "tensor_parallel_s": tensor,
        "pipeline_p2p_s": pipeline,
        "context_parallel_s": context,
        "expert_parallel_s": experts,
        "data_parallel_s": data,
        "data_parallel_exposed_s": exposed_data,
        "bubble_s": bubble,
        "optimizer_s": optimizer,
        "offload_s": offload,
        "step_s": total,
        "tokens_per_s_per_gpu": tokens_per_gpu,
        "mfu": mfu,
    }


def _native_traffic(
    config: Config,
    layout: Layout,
    gpu: Accelerator,
    gpus_per_node: int,
    compute: float,
    microbatches: int,
) -> tuple[float, float, float, float]:
    """Seconds of FSDP2's data-parallel traffic, of it exposed, of the optimizer and
    of the host copies under offload=cpu."""
    layers_here = config.model.n_layers / layout.pp
    grads = unsharded_stage_bytes(config, layout, 0)  # fp32, this tensor-parallel rank's
    d = layout.dp * layout.cp  # FSDP2 reduces over data x context ranks
    dp_bw = gpu.intra_node_gbps if layout.tp * d <= gpus_per_node else gpu.inter_node_gbps
    # FSDP2 communicates block by block: one collective per block (and one for the rest).
    calls = layers_here + 1
    # Plain data parallelism all-reduces once per step: twice a reduce-scatter's passes.
    passes = _sharded_passes(layout, microbatches) or 2
    data = _ring(grads, d, dp_bw, passes) + passes * calls * _ring(0, d, dp_bw, 1, gpu.latency_us)
    unhidden = 2 * data / max(layers_here, 1) + max(0.0, data - compute)
    exposed_data = min(data, unhidden) if gpu.overlap else data

    local_params = grads / 4 / layout.shard
    optimizer = 28 * local_params / (gpu.memory_bandwidth_gbps * 1e9 * 0.8)
    offload = 0.0
    if layout.offload:  # FSDP2: shards copied in (each forward/backward pass), grads out
        copies = 4 * local_params * (1 + (2 if layout.zero == 3 else 1) * microbatches)
        offload = copies / (gpu.host_gbps * 1e9)
        optimizer = local_params / (gpu.host_adam_gparams * 1e9)  # AdamW on the host
    return data, exposed_data, optimizer, offload


def _sharded_passes(layout: Layout, microbatches: int) -> int:
    """FSDP2 collectives per block per step when parameters are sharded: the
    reduce-scatters (once at ZeRO 0-1, every microbatch at 2-3) and the gathers (one
    per microbatch, two at ZeRO-3); 0 for plain data parallelism."""
    if layout.engine == "deepspeed" or (layout.zero == 0 and layout.cp == 1):
        return 0
    reduce_once = layout.zero <= 1  # stage 0 here: sharded over context ranks
    gathers = 2 if layout.zero == 3 else 1
    return (1 if reduce_once else microbatches) + microbatches * gathers


def _framework_time(config: Config, layout: Layout, gpu: Accelerator, microbatches: int) -> float:
    """Seconds of framework work per step beyond the FLOPs: the accelerator's host
    overheads (0 for GPUs, measured on a CPU) for every block of the stage per
    microbatch, a third more for the forward recomputed under full checkpointing, and
    FSDP2's hooks per block per collective when parameters are sharded; and FSDP2's
    copy-in and copy-out of the gathered or reduced bytes at memory bandwidth."""
    passes = _sharded_passes(layout, microbatches)
    copies = 2 * passes * unsharded_stage_bytes(config, layout, 0)
    per_block = gpu.block_overhead_us
    if layout.tp > 1:
        per_block += gpu.tensor_parallel_overhead_us
        if layout.sp:
            per_block += gpu.sequence_parallel_overhead_us
    if layout.ac == "full":
        per_block *= 4 / 3
    layers_here = config.model.n_layers / layout.pp
    sharded = gpu.sharded_overhead_us * passes
    host = layers_here * (microbatches * per_block + sharded) * 1e-6
    return host + copies / (gpu.memory_bandwidth_gbps * 1e9)


def _deepspeed_traffic(
    config: Config,
    layout: Layout,
    gpu: Accelerator,
    gpus_per_node: int,
    compute: float,
    microbatches: int,
) -> tuple[float, float, float, float]:
    """Seconds of DeepSpeed's data-parallel traffic, of it exposed, of the optimizer
    and of its offload copies. The reduction (buckets of 5e8 elements) and ZeRO-1/2's
    gather run inside step(), after the compute: all exposed. ZeRO-3 gathers block by
    block, prefetched under the compute but for each pass's first block and what
    exceeds the compute. AdamW steps the master partition: on the GPU at 28 bytes per
    element of memory traffic, on the host (also for NVMe, swapped in) at
    host_adam_gparams, DeepSpeed's CPU Adam or torch's alike."""
    d, width = layout.dp, compute_width(config)
    whole = sum(sum(group) for group in parameter_groups(config))
    masters = master_elements(config, layout)
    bw = gpu.intra_node_gbps if d <= gpus_per_node else gpu.inter_node_gbps
    buckets = math.ceil(whole / REDUCE_BUCKET)
    reduce = _ring(whole * width, d, bw, 1) + buckets * _ring(0, d, bw, 1, gpu.latency_us)
    if layout.zero == 3:
        passes, calls = 2 * microbatches, config.model.n_layers + 1
        gather = _ring(whole * width, d, bw, passes) + passes * calls * _ring(
            0, d, bw, 1, gpu.latency_us
        )
        unhidden = gather / calls + max(0.0, gather - compute)
        exposed = reduce + (min(gather, unhidden) if gpu.overlap else gather)
    else:
        gather = _ring(whole * width, d, bw, 1) + buckets * _ring(0, d, bw, 1, gpu.latency_us)
        exposed = reduce + gather

    where = deepspeed_state_placement(layout)
    host_bytes = nvme_bytes = 0.0
    if where["optimizer_state"] != "device":
        host_bytes += masters * width  # the gradient partition out
        if where["parameters"] == "device":
            host_bytes += masters * width  # the updated parameters back
    if where["parameters"] != "device":
        host_bytes += 2 * microbatches * masters * width  # partitions in at each gather
    if where["optimizer_state"] == "nvme":
        nvme_bytes += 2 * 3 * FP32 * masters  # masters and moments read, then written
    if where["parameters"] == "nvme":
        nvme_bytes += (2 * microbatches + 1) * masters * width
    offload = host_bytes / (gpu.host_gbps * 1e9) + nvme_bytes / (gpu.nvme_gbps * 1e9)
    if where["optimizer_state"] == "device":
        optimizer = 28 * masters / (gpu.memory_bandwidth_gbps * 1e9 * 0.8)
    else:
        optimizer = masters / (gpu.host_adam_gparams * 1e9)
    return reduce + gather, exposed, optimizer, offload


def _context_ring(
    config: Config, layout: Layout, gpu: Accelerator, gpus_per_node: int, forwards: int
) -> float:
    """Seconds of one microbatch's ring attention traffic on a rank (all its layers)."""
    cp = layout.cp
    if cp == 1:
        return 0.0
    m = config.model
    act = ACTIVATION_BYTES[config.train.precision]
    kv_elements = 2 * layout.mbs * (config.data.seq_len // cp) * m.kv_heads * m.head_dim / layout.tp
    # cp ranks are neighbours after the tensor-parallel ones (dims.py's mesh order).
    bw = gpu.intra_node_gbps if layout.tp * cp <= gpus_per_node else gpu.inter_node_gbps
    hops = (forwards + 1) * (cp - 1) * kv_elements * act + cp * kv_elements * 4
    messages = (forwards + 1) * (cp - 1) + cp
    per_layer = hops / (bw * 1e9) + messages * gpu.latency_us * 1e-6
    return m.n_layers / layout.pp * per_layer


def _expert_all_to_all(
    config: Config, layout: Layout, gpu: Accelerator, gpus_per_node: int, forwards: int
) -> float:
    """Seconds of one microbatch's expert all-to-alls on a rank (all its MoE layers)."""
    ep, m = layout.ep, config.model
    if ep == 1:
        return 0.0
    act = ACTIVATION_BYTES[config.train.precision]
    copies = layout.mbs * (config.data.seq_len // layout.cp) * m.moe.top_k
    # Dispatch and combine, in each forward and (as gradients) in backward.
    leaving = (ep - 1) / ep * copies * m.hidden_size * act * 2 * (forwards + 1)
    # ep ranks are neighbours after the tensor-parallel ones (dims.py's expert mesh).
    bw = gpu.intra_node_gbps if layout.tp * ep <= gpus_per_node else gpu.inter_node_gbps
    moe_layers = sum(m.is_moe_layer(i) for i in range(m.n_layers)) / layout.pp
    per_layer = leaving / (bw * 1e9) + 2 * (forwards + 1) * gpu.latency_us * 1e-6
    return moe_layers * per_layer
