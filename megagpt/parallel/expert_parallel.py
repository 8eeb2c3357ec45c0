"""Expert parallelism: each rank of an "ep" group holds E / ep of every MoE layer's
routed experts, and token copies travel to their expert's rank and back.

The router, the top-k choice and the auxiliary losses stay local (each rank routes
its own tokens, as on one process). The copies, already sorted by expert, go out in
one all-to-all: copies for experts 0..E/ep-1 to ep rank 0, and so on. A rank
receives them grouped by sender, then by expert; it regroups them by expert, runs
its experts' grouped matmul, restores the order and sends every row back with the
reverse all-to-all. The all-to-alls are autograd functions, so backward sends the
rows' gradients the same way in reverse.

Gradients. A rank's expert weights receive the gradients of the losses of every rank
of its ep group (their rows came through it). ZeRO then averages them over "efsdp",
the ranks holding the same experts, which is dp x cp / ep ranks: the 1/ep left over
is applied in backward on the local weights (FSDP2's own gradient divide factor is a
PREMUL_SUM reduction that gloo lacks). So every weight's gradient is the mean over
all dp x cp ranks, as a dense weight's is.

Weights are DTensors sharded on dim 0 over "ep" (the expert dimension of the stacked
(E, in, out) matrices), so checkpoints hold whole experts and load on any layout.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from megagpt.model.moe import GroupedExperts, MoE, expert_mlp

EXPERT_WEIGHTS = ("gate_proj", "up_proj", "down_proj")


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; multiplies the gradient by `factor` in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


class ExpertParallelExperts(GroupedExperts):
    """GroupedExperts whose forward dispatches rows to the rank holding their expert.
    (apply_expert_parallel turns a GroupedExperts into one; its weights are DTensors.)"""

    group: dist.ProcessGroup

    # Data-dependent split sizes and collectives: torch.compile (train.compile) runs
    # this eagerly between the compiled parts of its block.
    @torch.compiler.disable
    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (N, C): this rank's token copies sorted by (global) expert, counts (E,)."""
        ep = dist.get_world_size(self.group)
        local_experts = counts.numel() // ep
        # received[s, e]: the copies sender s routes to this rank's expert e.
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts, group=self.group)
        received = received.view(ep, local_experts)
        sent_splits = counts.view(ep, local_experts).sum(1).tolist()
        received_splits = received.sum(1).tolist()
        rows = all_to_all_single_autograd(x, received_splits, sent_splits, self.group)
        # Received rows are grouped by sender, then expert: sort them by expert.
        segment = torch.arange(local_experts, device=x.device) * ep
        segment = segment + torch.arange(ep, device=x.device)[:, None]  # (ep, E/ep)
        order = segment.flatten().repeat_interleave(received.flatten()).argsort(stable=True)
        gate = self._local("gate_proj") if self.swiglu else None
        up, down = self._local("up_proj"), self._local("down_proj")
        out = expert_mlp(rows[order], received.sum(0), up, down, gate)
        out = out[order.argsort()]  # back to sender order
        return all_to_all_single_autograd(out, sent_splits, received_splits, self.group)

    def _local(self, name: str) -> torch.Tensor:
        """This rank's experts of weight `name`, whose gradient is divided by ep (see
        the module docstring)."""
        weight = getattr(self, name)
        local = weight.to_local() if isinstance(weight, DTensor) else weight
        return _ScaleGradient.apply(local, 1.0 / dist.get_world_size(self.group))


def apply_expert_parallel(part: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Shard each MoE layer's routed experts on dim 0 over `ep_mesh` (on the meta
    device, before ZeRO) and make their forward dispatch rows by all-to-all."""
    # (any module: a GPT part, or one MoE layer on its own as the dispatch test has it)
    for moe in (m for m in part.modules() if isinstance(m, MoE)):
        experts = moe.experts
        for name in EXPERT_WEIGHTS:
            if hasattr(experts, name):
                full = getattr(experts, name)
                sharded = distribute_tensor(full, ep_mesh, [Shard(0)], src_data_rank=None)
                setattr(experts, name, nn.Parameter(sharded, requires_grad=full.requires_grad))
        experts.__class__ = ExpertParallelExperts
        experts.group = ep_mesh.get_group()
