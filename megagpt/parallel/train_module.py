"""The train module: the parallelized model with its optimizers and precision.

One object hides the layout from the training loop, as OLMo-core's TrainModule does:
`train_step` runs a step's microbatches (gradient accumulation, or the pipeline
schedule), `clip_grad_norm_` clips by the norm over every shard and stage, and
`optimizer_step` applies the update. Losses come back as this rank's mean over its
microbatches (zero on ranks without the last pipeline stage); `global_mean` turns that
into the number a single process would report. Checkpoints read and write the state
through `parts` and `optimizers` and need nothing from the loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from megagpt.config import Config
from megagpt.parallel.batches import step_batches
from megagpt.parallel.data_parallel import sync_every_microbatch
from megagpt.parallel.dims import ParallelDims
from megagpt.parallel.env import DistributedEnv
from megagpt.parallel.optimizer import Optimizers, build_optimizer
from megagpt.parallel.precision import autocast_for, resolve_precision

Batch = tuple[torch.Tensor, torch.Tensor]


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class TrainModule:
    def __init__(
        self,
        parts: list[nn.Module],
        config: Config,
        env: DistributedEnv,
        dims: ParallelDims,
        mesh: DeviceMesh,
        schedule=None,
        stages: Sequence[int] = (0,),
        n_stages: int = 1,
    ):
        self.parts, self.config, self.env = parts, config, env
        self.dims, self.mesh, self.schedule = dims, mesh, schedule
        self.stages, self.n_stages = list(stages), n_stages
        self.precision = resolve_precision(config, env.device)
        self.autocast = autocast_for(self.precision, env.device)
        # One optimizer per part (pipeline stage), so checkpoints key its state by name.
        self.optimizers = Optimizers(
            [build_optimizer(p, config.optim, config.model.tie_embeddings) for p in parts]
        )
        self.has_first_stage = 0 in self.stages
        self.has_last_stage = n_stages - 1 in self.stages
        self._tied_group, self._tied_param = self._tied_embedding_group()

    # ------------------------------------------------------------------ layout
    @property
    def dp_rank(self) -> int:
        return self.dims.dp_rank(self.env.rank)

    @property
    def dp_size(self) -> int:
        return self.dims.dp

    def parameters(self) -> list[nn.Parameter]:
        seen, params = set(), []
        for part in self.parts:
            for param in part.parameters():
                if id(param) not in seen:
                    seen.add(id(param))
                    params.append(param)
        return params

    def named_parameters(self):
        for part in self.parts:
            yield from part.named_parameters()

    def train(self, mode: bool = True) -> None:
        for part in self.parts:
            part.train(mode)

    def _loss_context(self):
        return loss_parallel() if self.dims.tensor_enabled else contextlib.nullcontext()

    # ------------------------------------------------------------------ steps
    def train_step(self, batches: list[Batch], seeds: Sequence[int] | None = None) -> torch.Tensor:
        """Forward and backward over one step's microbatches; returns the local loss.

        `seeds` (one per microbatch) reseed the random generators before each
        microbatch, so dropout masks depend on which samples are in it, not on the
        layout (see dropout_seed). A pipeline draws them inside the schedule and is
        seeded once per step.
        """
        if self.schedule is not None:
            if seeds:
                torch.manual_seed(seeds[0])
            return self._pipeline(batches, train=True)
        total = torch.zeros((), device=self.env.device)
        part = self.parts[0]
        every = sync_every_microbatch(self.dims.zero_stage)
        for i, (inputs, targets) in enumerate(batches):
            if seeds:
                torch.manual_seed(seeds[i])
            if isinstance(part, FSDPModule):  # reduce gradients now, or once per step
                part.set_requires_gradient_sync(every or i == len(batches) - 1)
            with self._loss_context():
                with self.autocast():
                    loss = part(inputs, targets)
                (loss / len(batches)).backward()
            total += local(loss.detach())
        return total / len(batches)

    @torch.no_grad()
    def eval_step(self, batches: list[Batch]) -> torch.Tensor:
        if self.schedule is not None:
            return self._pipeline(batches, train=False)
        total = torch.zeros((), device=self.env.device)
        for inputs, targets in batches:
            with self._loss_context(), self.autocast():
                total += local(self.parts[0](inputs, targets))
        return total / len(batches)

    def evaluate(self, dataset, iters: int | None = None) -> float:
        """Mean loss over the first `iters` (default train.eval_iters) global batches of
        `dataset`, as one process would compute it."""
        iters = iters or self.config.train.eval_iters
        self.train(False)
        total = sum(
            self.global_mean(self.eval_step(step_batches(dataset, step, self, self.config)))
            for step in range(iters)
        )
        self.train(True)
        return total / iters

    def _pipeline(self, batches: list[Batch], train: bool) -> torch.Tensor:
        inputs = torch.cat([b[0] for b in batches]) if self.has_first_stage else None
        targets = torch.cat([b[1] for b in batches]) if self.has_last_stage else None
        args = (inputs,) if inputs is not None else ()
        losses: list[torch.Tensor] = []
        kwargs = {"target": targets, "losses": losses} if self.has_last_stage else {}
        with self._loss_context(), self.autocast():
            if train:
                self.schedule.step(*args, return_outputs=False, **kwargs)
            else:
                self.schedule.eval(*args, **kwargs)
        if not self.has_last_stage:
            return torch.zeros((), device=self.env.device)
        return torch.stack([local(loss.detach()) for loss in losses]).mean()

    def global_mean(self, value: torch.Tensor) -> float:
        """A loss as one process would compute it: the mean over data-parallel ranks of
        the last pipeline stage's value (tensor-parallel ranks hold equal copies)."""
        if self.dims.world_size == 1:
            return float(value)
        value = value.detach().clone()
        dist.all_reduce(value)
        return float(value) / (self.dims.dp * self.dims.tp)

    # ------------------------------------------------------------------ updates
    def optimizer_step(self, lr: float) -> None:
        self.optimizers.set_lr(lr)
        self.optimizers.step()

    def zero_grad(self) -> None:
        self.optimizers.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ gradients
    def _tied_embedding_group(self):
        """With tied embeddings split across the pipeline, the first stage's embedding
        and the last stage's output layer are copies; their gradients are summed
        between the two ranks after every backward so the copies stay equal."""
        if not self.dims.pipeline_enabled or not self.config.model.tie_embeddings:
            return None, None
        grid = self.mesh.mesh  # (pp, dp_replicate, dp_shard, tp) ranks
        mine = None
        for index in torch.cartesian_prod(*(torch.arange(n) for n in grid.shape[1:])):
            pair = [int(grid[(0, *index)]), int(grid[(-1, *index)])]
            group = dist.new_group(pair)  # every rank creates every group, in order
            if self.env.rank in pair:
                mine = group
        param = None
        if self.has_first_stage:
            param = self.parts[self.stages.index(0)].embed_tokens.weight
        elif self.has_last_stage:
            param = self.parts[self.stages.index(self.n_stages - 1)].lm_head.weight
        return mine, param

    def sync_tied_gradients(self) -> None:
        param = self._tied_param
        if self._tied_group is not None and param is not None and param.grad is not None:
            dist.all_reduce(local(param.grad), group=self._tied_group)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip by the norm of all gradients of the whole model; return that norm."""
        self.sync_tied_gradients()
        params = [p for p in self.parameters() if p.grad is not None]
        # The last stage's copy of a tied embedding is counted once, on the first stage.
        counted = [p for p in params if not (self._tied_param is p and not self.has_first_stage)]
        norm = torch.nn.utils.get_total_norm([p.grad for p in counted], 2.0, foreach=True)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()  # sums squares over data and tensor shards
        if self.dims.pipeline_enabled:
            squared = norm.pow(2)
            dist.all_reduce(squared, group=self.mesh.get_group("pp"))
            norm = squared.sqrt()
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
        return norm
