"""The parallel layout: how many ranks along each dimension, and the device mesh.

world = pipeline x data x context x tensor; one process is the layout with every size
1, and goes through the same code (each parallelism is applied only where its size is
above 1). The mesh's dimensions, outermost first, are
("pp", "dp_replicate", "dp_shard", "cp", "tp"): tensor-parallel ranks are neighbours
(one node), pipeline stages are furthest apart. Data parallelism is split into a
replicate and a shard dimension for FSDP2's HSDP mode; one of the two always has size
1: ZeRO stage 0 replicates across all data-parallel ranks (plain data parallel), stages
1-3 shard across them. Context-parallel ranks (parallel.context_parallel_size) each hold
a share of every sequence and compute gradients of the same parameters from it, so
they join FSDP2's shard dimension (torchtitan's "dp_shard_cp"): parameters are sharded
over data x context ranks and gradients averaged over them, also at zero_stage 0.

Expert parallelism (parallel.expert_parallel_size) takes its ranks from that shard
dimension too: the data x context ranks are regrouped, on a second mesh over the same
processes, as ("efsdp", "ep") with expert-parallel ranks neighbours. Each "ep" group
holds every routed expert once (a share on each rank), and ZeRO shards those shares
over "efsdp" (torchtitan's dense and sparse meshes).

Native CPU offload (parallel.offload_optimizer or offload_params = cpu) is FSDP2's too,
so it puts every layout under FSDP2, one process included (a mesh of size 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from megagpt.config import Config, validate_world_size

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


@dataclass(frozen=True)
class ParallelDims:
    pp: int
    dp: int
    tp: int
    zero_stage: int
    cp: int = 1
    ep: int = 1
    cpu_offload: bool = False
    """FSDP2 keeps the sharded parameters, their gradients and the optimizer state in
    host memory and steps the optimizer there (see data_parallel.py)."""

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.cp * self.tp

    @property
    def dp_shard(self) -> int:
        return self.dp if self.zero_stage > 0 else 1

    @property
    def dp_replicate(self) -> int:
        return 1 if self.zero_stage > 0 else self.dp

    @property
    def pipeline_enabled(self) -> bool:
        return self.pp > 1

    @property
    def tensor_enabled(self) -> bool:
        return self.tp > 1

    @property
    def context_enabled(self) -> bool:
        return self.cp > 1

    @property
    def gradient_replicas(self) -> int:
        """Ranks whose gradients FSDP2 averages: every data-parallel rank and every
        context-parallel rank (each computes its share of the same sequences)."""
        return self.dp * self.cp

    @property
    def expert_enabled(self) -> bool:
        return self.ep > 1

    @property
    def data_enabled(self) -> bool:
        return self.dp > 1

    @property
    def fsdp_enabled(self) -> bool:
        """FSDP2 manages the parameters of every layout of more than one process, also
        at data-parallel size 1: it keeps every gradient's placement equal to its
        parameter's, which a pipeline's backward alone does not (on tensor 2 x pipeline
        2 the vocabulary-sharded embedding's gradient comes back replicated). CPU
        offload is FSDP2's, so it needs FSDP2 on one process too."""
        return self.world_size > 1 or self.cpu_offload

    def dp_rank(self, rank: int) -> int:
        """This rank's index among the data-parallel replicas (see MESH_DIMS: ranks run
        tensor-parallel fastest, then context-parallel, data-parallel, pipeline)."""
        return rank // (self.tp * self.cp) % self.dp

    def cp_rank(self, rank: int) -> int:
        """This rank's index among its context-parallel group (its share of a sequence)."""
        return rank // self.tp % self.cp

    def tp_rank(self, rank: int) -> int:
        """This rank's index among its tensor-parallel group."""
        return rank % self.tp

    @classmethod
    def from_config(cls, config: Config, world_size: int) -> ParallelDims:
        """The layout for `world_size` processes, or a ConfigError saying what would work."""
        p = config.parallel
        dp = validate_world_size(config, world_size)
        return cls(
            pp=p.pipeline_parallel_size,
            dp=dp,
            tp=p.tensor_parallel_size,
            cp=p.context_parallel_size,
            ep=p.expert_parallel_size,
            zero_stage=p.zero_stage,
            cpu_offload=native_cpu_offload(config),
        )

    def build_mesh(self, device_type: str) -> DeviceMesh:
        shape = (self.pp, self.dp_replicate, self.dp_shard, self.cp, self.tp)
        mesh = init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)
        mesh["dp_shard", "cp"]._flatten("dp_shard_cp")  # FSDP2's shard dimension
        return mesh

    def build_expert_mesh(self, mesh: DeviceMesh) -> DeviceMesh:
        """The same processes as `mesh`, with the shard dimension (data x context ranks)
        split into ("efsdp", "ep"): routed experts are sharded over "ep" and their
        shares by ZeRO over "efsdp"."""
        efsdp = self.dp_shard * self.cp // self.ep
        shape = (self.pp, self.dp_replicate, efsdp, self.ep, self.tp)
        names = ("pp", "dp_replicate", "efsdp", "ep", "tp")
        return mesh._flatten("world")._unflatten(0, shape, names)


def native_cpu_offload(config: Config) -> bool:
    """Whether the native engine offloads: on it the two settings mean the same (FSDP2
    offloads parameters, gradients and optimizer state together)."""
    p = config.parallel
    return p.engine == "native" and "cpu" in (p.offload_optimizer, p.offload_params)


def device_type(device: torch.device) -> str:
    return "cuda" if device.type == "cuda" else "cpu"
