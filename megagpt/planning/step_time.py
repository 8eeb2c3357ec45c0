"""Predicted step time of a layout, part by part.

compute      model FLOPs (PaLM's accounting, megagpt.model.flops) per GPU, plus the
             forward recomputed under full activation checkpointing, over the
             achievable matmul rate (peak x `achievable`, or a rate measured here).
tensor       Megatron's four all-reduces per block per microbatch (two forward, two
             backward; all-gather + reduce-scatter with sequence parallelism move the
             same bytes), ring cost 2 (t-1)/t x bytes / bandwidth; six with full
             recomputation. Not overlapped.
pipeline     activations sent forward and gradients back at each stage boundary.
data         gradient reduction and ZeRO's parameter gathers in fp32 (FSDP2 without
             mixed-precision communication): stage 0 one all-reduce per step, 1 a
             reduce-scatter per step and a gather per microbatch, 2 a reduce-scatter and
             a gather per microbatch, 3 two gathers. Overlapped with compute by FSDP2's
             prefetching except the first gather and last reduction (two blocks' worth),
             and whatever exceeds the compute.
bubble       (p - 1) / (v m) of the pipelined work; a third of it for zero_bubble.
optimizer    AdamW reads parameter, gradient and two moments and writes three back:
             28 bytes per local parameter over memory bandwidth.
"""

from __future__ import annotations

from megagpt.config import Config
from megagpt.model.flops import flops_per_token
from megagpt.planning.hardware import Accelerator
from megagpt.planning.layouts import Layout
from megagpt.planning.memory import unsharded_stage_bytes

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
    if layout.ac == "full":
        flops *= 4 / 3  # the forward again, in backward
    compute = flops / rate

    layers_here = L / layout.pp
    hidden_bytes = layout.mbs * seq * m.hidden_size * act
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

    grads = unsharded_stage_bytes(config, layout, 0)  # fp32, this tensor-parallel rank's
    dp_bw = gpu.intra_node_gbps if layout.tp * layout.dp <= gpus_per_node else gpu.inter_node_gbps
    d = layout.dp
    # FSDP2 communicates block by block: one collective per block (and one for the rest).
    calls = layers_here + 1
    if layout.zero == 0:
        data = _ring(grads, d, dp_bw, 2) + 2 * calls * _ring(0, d, dp_bw, 1, gpu.latency_us)
    else:
        passes = (1 if layout.zero == 1 else microbatches) + microbatches * (
            2 if layout.zero == 3 else 1
        )
        data = _ring(grads, d, dp_bw, passes) + passes * calls * _ring(
            0, d, dp_bw, 1, gpu.latency_us
        )
    exposed_data = 2 * data / max(layers_here, 1) + max(0.0, data - compute)

    pipelined = compute + tensor + pipeline
    bubble = 0.0
    if layout.pp > 1:
        bubble = (layout.pp - 1) / (layout.vp * microbatches) * pipelined
        if layout.schedule == "zero_bubble":
            bubble /= 3
    local_params = grads / 4 / (d if layout.zero > 0 else 1)
    optimizer = 28 * local_params / (gpu.memory_bandwidth_gbps * 1e9 * 0.8)
    offload = 0.0
    if layout.offload:  # FSDP2: shards copied in (each forward/backward pass), grads out
        copies = 4 * local_params * (1 + (2 if layout.zero == 3 else 1) * microbatches)
        offload = copies / (gpu.host_gbps * 1e9)
        optimizer = local_params / (gpu.host_adam_gparams * 1e9)  # AdamW on the host

    total = pipelined + exposed_data + bubble + optimizer + offload
    tokens_per_gpu = tokens_per_step / total / world
    mfu = flops_per_token(m, seq) * tokens_per_gpu / (gpu.bf16_tflops * 1e12)
    return {
        "compute_s": compute,
        "tensor_parallel_s": tensor,
        "pipeline_p2p_s": pipeline,
        "data_parallel_s": data,
        "data_parallel_exposed_s": exposed_data,
        "bubble_s": bubble,
        "optimizer_s": optimizer,
        "offload_s": offload,
        "step_s": total,
        "tokens_per_s_per_gpu": tokens_per_gpu,
        "mfu": mfu,
    }
