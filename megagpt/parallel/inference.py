"""Forward passes for evaluation and generation on any layout, sequences of any length.

Training runs a pipeline through torch's schedules, which split a batch into
microbatches of one fixed shape; evaluation requests and generation steps come in
every length. So here a forward goes from stage to stage with plain point-to-point
messages: the rank of each stage receives the hidden states (after a small header with
their shape and dtype), runs its layers, and sends the result to the next stage's rank
with the same data- and tensor-parallel coordinates. The last stage keeps only the
positions the caller selected, gathers their logits' vocabulary shards over its
tensor-parallel ranks, reduces them to what the caller needs (log-likelihoods of
targets, next tokens) and broadcasts that small result to every stage, so every rank
of a data-parallel replica returns the same answer and can take the same next step.

The stages of one forward run one after another (no overlap of microbatches, which
would need every stage to hold several batches in flight): a pipeline evaluates at
1/pp of its ranks' throughput, and data parallelism is the faster way to spread an
evaluation. Pipelines are supported so that a model too large for one device can be
evaluated at all, on the layout it was trained with.

The model must be built without sequence parallelism or torch.compile and with plain
replicated data parallelism (ZeRO stage 0): replicas answer different requests, so no
collective may span them inside a forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from megagpt.config.schema import ModelConfig
from megagpt.model.kv_cache import KVCache
from megagpt.parallel.precision import autocast_dtype
from megagpt.parallel.train_module import TrainModule

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
"""The dtypes a stage's hidden states may have, by the code its header sends."""


@dataclass
class InferenceLayout:
    """Where this rank sits: its model parts (pipeline stages) and the groups it talks to.

    Attributes:
        parts: This rank's stages of the model, in stage order.
        stages: Their stage indices.
        n_stages: Stages in the whole pipeline.
        pp_group: The ranks holding the other stages of this replica (None: no pipeline).
        dp_group: The ranks holding the other replicas at this position (None: one).
        tensor_parallel_size: Ranks that split each stage's heads and vocabulary.
    """

    parts: list[nn.Module]
    stages: list[int]
    n_stages: int
    pp_group: dist.ProcessGroup | None = None
    dp_group: dist.ProcessGroup | None = None
    tensor_parallel_size: int = 1


class InferenceRunner:
    """Runs forward passes of a (possibly parallelized) GPT and returns, on every rank of
    a data-parallel replica, what the caller computes from the selected logits."""

    def __init__(
        self,
        layout: InferenceLayout,
        config: ModelConfig,
        device: torch.device,
        autocast: Callable | None = None,
        compute_dtype: torch.dtype = torch.float32,
    ):
        self.layout, self.config, self.device = layout, config, device
        self.autocast = autocast
        self.compute_dtype = compute_dtype
        for part in layout.parts:
            part.eval()

    @classmethod
    def from_module(cls, module: TrainModule) -> InferenceRunner:
        """The runner of a model that `parallelize` built (see the module docstring for
        the settings it needs)."""
        dims, mesh = module.dims, module.mesh
        dp_group = None
        if dims.dp > 1:
            dp_group = mesh.get_group("dp_shard" if dims.dp_shard > 1 else "dp_replicate")
        layout = InferenceLayout(
            parts=module.parts,
            stages=module.stages,
            n_stages=module.n_stages,
            pp_group=mesh.get_group("pp") if dims.pipeline_enabled else None,
            dp_group=dp_group,
            tensor_parallel_size=dims.tp,
        )
        dtype = autocast_dtype(module.precision)  # of the KV cache: what autocast computes
        return cls(layout, module.config.model, module.env.device, module.autocast, dtype)

    @classmethod
    def from_model(cls, model: nn.Module) -> InferenceRunner:
        """The runner of a whole model in this process (no process group needed)."""
        param = next(model.parameters())
        layout = InferenceLayout(parts=[model], stages=[0], n_stages=1)
        return cls(layout, model.config, param.device, None, param.dtype)

    # ------------------------------------------------------------------ layout
    @property
    def replica_rank(self) -> int:
        """This rank's data-parallel replica (requests are shared out by replica)."""
        group = self.layout.dp_group
        return 0 if group is None else dist.get_rank(group)

    @property
    def replicas(self) -> int:
        group = self.layout.dp_group
        return 1 if group is None else dist.get_world_size(group)

    def new_cache(self, batch: int, length: int) -> KVCache:
        """An empty KV cache for `batch` sequences of up to `length` positions, holding
        this rank's share of the heads (a tensor-parallel rank computes 1/tp of them)."""
        cfg = self.config
        heads = cfg.kv_heads // self.layout.tensor_parallel_size
        return KVCache(
            cfg.n_layers, batch, heads, length, cfg.head_dim, self.compute_dtype, self.device
        )

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def forward(
        self,
        tokens: torch.Tensor,
        select: torch.Tensor,
        reduce: Callable[[torch.Tensor], torch.Tensor],
        result_shape: tuple[int, ...],
        result_dtype: torch.dtype,
        **model_kwargs,
    ) -> torch.Tensor:
        """Run `tokens` (B, T) through every stage and return `reduce(logits)` on every
        rank of the replica.

        Args:
            select: (B, T) bool, the positions whose logits are wanted.
            reduce: Maps the selected logits (N, V), fp32 over the whole (padded)
                vocabulary, to the result; it runs on the last stage's ranks only.
            result_shape: The result's shape, known to every rank beforehand (the
                other stages receive it by broadcast).
            result_dtype: The result's dtype.
            **model_kwargs: Passed to every stage (positions, attention_mask, kv_cache).
        """
        layout = self.layout
        hidden, result = tokens, None
        for stage in range(layout.n_stages):
            if stage not in layout.stages:
                continue
            if stage > 0:
                hidden = self._receive(stage - 1)
            part = layout.parts[layout.stages.index(stage)]
            with self.autocast() if self.autocast else contextlib.nullcontext():
                out = part(hidden, select=select, **model_kwargs)
            if stage < layout.n_stages - 1:
                self._send(out, stage + 1)
            else:
                logits = out.full_tensor() if isinstance(out, DTensor) else out
                result = reduce(logits.float()).to(result_dtype)
        if layout.pp_group is None:
            return result
        if result is None:
            result = torch.empty(result_shape, dtype=result_dtype, device=self.device)
        last = (layout.n_stages - 1) % dist.get_world_size(layout.pp_group)
        dist.broadcast(result, group=layout.pp_group, group_src=last)
        return result

    def _peer(self, stage: int) -> int:
        group = self.layout.pp_group
        return dist.get_global_rank(group, stage % dist.get_world_size(group))

    def _send(self, hidden: torch.Tensor, stage: int) -> None:
        if isinstance(hidden, DTensor):
            hidden = hidden.to_local()
        header = torch.tensor(
            [*hidden.shape, _DTYPES.index(hidden.dtype)], dtype=torch.int64, device=self.device
        )
        peer = self._peer(stage)
        dist.send(header, peer)
        dist.send(hidden.contiguous(), peer)

    def _receive(self, stage: int) -> torch.Tensor:
        peer = self._peer(stage)
        header = torch.empty(4, dtype=torch.int64, device=self.device)
        dist.recv(header, peer)
        *shape, code = header.tolist()
        hidden = torch.empty(shape, dtype=_DTYPES[code], device=self.device)
        dist.recv(hidden, peer)
        return hidden

    # ------------------------------------------------------------------ replicas
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` of every replica, concatenated (0-d tensors stacked), replica order."""
        group = self.layout.dp_group
        if group is None:
            return tensor.unsqueeze(0) if tensor.dim() == 0 else tensor
        pieces = [torch.empty_like(tensor) for _ in range(self.replicas)]
        dist.all_gather(pieces, tensor.contiguous(), group=group)
        return torch.stack(pieces) if tensor.dim() == 0 else torch.cat(pieces)

    def gather_object(self, obj, dst: int = 0) -> list | None:
        """Every replica's `obj` on replica `dst` (None on the others)."""
        group = self.layout.dp_group
        if group is None:
            return [obj]
        gathered = [None] * self.replicas if self.replica_rank == dst else None
        dist.gather_object(obj, gathered, group=group, group_dst=dst)
        return gathered
