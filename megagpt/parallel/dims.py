"""The parallel layout: how many ranks along each dimension, and the device mesh.

world = pipeline x data x tensor. The mesh's dimensions, outermost first, are
("pp", "dp_replicate", "dp_shard", "tp"): tensor-parallel ranks are neighbours (one
node), pipeline stages are furthest apart. Data parallelism is split into a replicate
and a shard dimension for FSDP2's HSDP mode; one of the two always has size 1: ZeRO
stage 0 replicates across all data-parallel ranks (plain data parallel), stages 1-3
shard across them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from megagpt.config import Config, ConfigError

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


@dataclass(frozen=True)
class ParallelDims:
    pp: int
    dp: int
    tp: int
    zero_stage: int

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.tp

    @property
    def dp_shard(self) -> int:
        return self.dp if self.zero_stage > 0 else 1

    @property
    def dp_replicate(self) -> int:
        return 1 if self.zero_stage > 0 else self.dp

    @classmethod
    def from_config(cls, config: Config, world_size: int) -> ParallelDims:
        """The layout for `world_size` processes, or a ConfigError saying what would work."""
        p, t = config.parallel, config.train
        tp, pp = p.tensor_parallel_size, p.pipeline_parallel_size
        model_ranks = tp * pp
        if world_size % model_ranks:
            raise ConfigError(
                f"parallel.tensor_parallel_size x parallel.pipeline_parallel_size = {tp} x {pp}"
                f" = {model_ranks} does not divide the number of processes ({world_size}); "
                f"choose sizes whose product divides {world_size}"
            )
        dp = world_size // model_ranks
        if p.data_parallel_size is not None and p.data_parallel_size != dp:
            raise ConfigError(
                f"parallel.data_parallel_size = {p.data_parallel_size}: {world_size} processes "
                f"/ (tensor {tp} x pipeline {pp}) leave {dp}; set it to {dp} or leave it null"
            )
        per_pass = t.micro_batch_size * dp
        if t.global_batch_size % per_pass:
            raise ConfigError(
                f"train.global_batch_size = {t.global_batch_size}: must be a multiple of "
                f"train.micro_batch_size x data-parallel size ({t.micro_batch_size} x {dp} = "
                f"{per_pass})"
            )
        microbatches = t.global_batch_size // per_pass
        _check_pipeline_microbatches(p.pipeline_schedule, pp, microbatches, per_pass)
        return cls(pp=pp, dp=dp, tp=tp, zero_stage=p.zero_stage)

    def build_mesh(self, device_type: str) -> DeviceMesh:
        shape = (self.pp, self.dp_replicate, self.dp_shard, self.tp)
        return init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)


def _check_pipeline_microbatches(schedule: str, pp: int, microbatches: int, per_pass: int) -> None:
    """Pipeline microbatches are the gradient-accumulation passes of one step."""
    if pp == 1:
        return
    hint = (
        f"raise train.global_batch_size or lower train.micro_batch_size (each "
        f"microbatch is train.micro_batch_size x data-parallel size = {per_pass} sequences)"
    )
    if schedule == "1f1b" and microbatches < pp:
        raise ConfigError(
            f"parallel.pipeline_schedule = '1f1b' needs at least as many microbatches as "
            f"pipeline stages ({pp}), but a step has {microbatches}; {hint}"
        )
    if schedule in ("interleaved_1f1b", "zero_bubble"):
        rounds = max(1, microbatches // pp)
        if microbatches % rounds:
            raise ConfigError(
                f"parallel.pipeline_schedule = {schedule!r} needs the number of microbatches "
                f"({microbatches}) to be a multiple of microbatches // pipeline_parallel_size "
                f"({rounds}); use a multiple of {pp}: {hint}"
            )


def device_type(device: torch.device) -> str:
    return "cuda" if device.type == "cuda" else "cpu"
