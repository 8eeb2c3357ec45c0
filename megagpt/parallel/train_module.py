"""The train module: the parallelized model with its optimizers and precision.

One object hides the layout from the training loop, as OLMo-core's TrainModule does:
`train_step` runs a step's microbatches (gradient accumulation, or the pipeline
schedule), and `update` clips by the norm over every shard and stage and applies the
update (or skips it when that norm is not finite). Checkpoints read and write the state
through `parts` and `optimizers` and need nothing from the loop.

Under fp16 the loss is multiplied by the loss scale before backward (see
loss_scale.py): `train_step` folds the scale into the factor every loss is multiplied
by and returns the unscaled loss; `update` divides it out of the gradients in the same
multiply that clips them, and moves the scale by whether they overflowed. The norm is
global, so every rank skips or steps, and moves its copy of the scale, alike.

The loss of a step is the mean over the trained tokens (targets that are not
IGNORE_INDEX) of the whole global batch: every microbatch contributes its sum of token
losses divided by the global count N of trained tokens, counted before the step over
all microbatches and data-parallel ranks. So an example with few completion tokens
weighs as much per token as one with many, whatever the gradient accumulation, number
of ranks or pipeline microbatches. Each rank scales its sums by dp / N because data
parallelism averages gradients over the dp ranks; under context parallelism each rank
sums the losses of its share of every sequence and FSDP2 averages over the dp x cp
ranks, so the factor is dp x cp / N (`ParallelDims.gradient_replicas`). Losses come
back as this rank's share (zero on ranks without the last pipeline stage);
`global_mean` adds the shares up into the number one process would report.

Classification batches (labels and the token each row is classified at) add GPT-1's
loss: the classification loss, a mean over the labeled rows of the global batch, plus
finetune.lm_loss_weight times the language-modelling loss of the texts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from megagpt.config import Config
from megagpt.model.gpt import IGNORE_INDEX, cross_entropy
from megagpt.parallel.batches import Microbatch, step_batches
from megagpt.parallel.data_parallel import sync_every_microbatch
from megagpt.parallel.dims import ParallelDims
from megagpt.parallel.env import DistributedEnv
from megagpt.parallel.loss_scale import DynamicLossScaler
from megagpt.parallel.optimizer import Optimizers, build_optimizer
from megagpt.parallel.precision import autocast_for, resolve_precision
from megagpt.parallel.scoring import row_statistics


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class ScaledLoss:
    """The pipeline schedule's loss: a microbatch's summed token loss times `scale`
    (dp x cp / N, times the fp16 loss scale, set by the train module before each step; see
    the module docstring). While `score_rows` is set (evaluation of downstream tasks,
    see scoring.py) it gives every row's log-likelihood statistics instead."""

    def __init__(self):
        self.scale = 1.0
        self.score_rows = False

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.score_rows:
            return row_statistics(logits, targets)
        return cross_entropy(logits, targets, reduction="sum") * self.scale


def grads_by_mesh(grads: list[torch.Tensor]) -> dict[object, list[torch.Tensor]]:
    """Gradients grouped by device and device mesh: a foreach op takes one of each
    (routed experts under expert parallelism live on a mesh of their own)."""
    groups: dict[object, list[torch.Tensor]] = {}
    for grad in grads:
        groups.setdefault((grad.device, getattr(grad, "device_mesh", None)), []).append(grad)
    return groups


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
        pipeline_loss: ScaledLoss | None = None,
    ):
        self.parts, self.config, self.env = parts, config, env
        self.dims, self.mesh, self.schedule = dims, mesh, schedule
        self.pipeline_loss = pipeline_loss
        self._pipeline_shapes_known = False
        self.stages, self.n_stages = list(stages), n_stages
        self.precision = resolve_precision(config, env.device)
        self.autocast = autocast_for(self.precision, env.device)
        self.loss_scaler = (
            DynamicLossScaler(config.train.loss_scale) if self.precision == "fp16" else None
        )
        # One optimizer per part (pipeline stage), so checkpoints key its state by name.
        self.optimizers = Optimizers(
            [build_optimizer(p, config.optim, config.model.tie_embeddings) for p in parts]
        )
        self.has_first_stage = 0 in self.stages
        self.has_last_stage = n_stages - 1 in self.stages
        self._tied_group, self._tied_param = self._tied_embedding_group()
        self.expert_counts: dict[str, torch.Tensor] = {}  # MoE layer -> last step's load

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

    @property
    def loss_scale(self) -> float | None:
        """The fp16 loss scale now (None at other precisions)."""
        return self.loss_scaler.scale if self.loss_scaler is not None else None

    def loss_scale_state(self) -> dict | None:
        """The loss scaler's state for the checkpoint's metadata (None: no scaler)."""
        return self.loss_scaler.state_dict() if self.loss_scaler is not None else None

    def load_loss_scale_state(self, state: dict | None) -> None:
        """Restore what `loss_scale_state` returned; a checkpoint saved at another
        precision (None) leaves the scaler at train.loss_scale.initial_scale."""
        if self.loss_scaler is not None and state is not None:
            self.loss_scaler.load_state_dict(state)

    # ------------------------------------------------------------------ steps
    def supervised_tokens(self, batches: list[Microbatch]) -> int:
        """N: the trained tokens of the global batch, over every data-parallel rank."""
        return self.global_counts(batches)[0]

    def global_counts(self, batches: list[Microbatch]) -> tuple[int, int]:
        """Trained tokens and labeled rows of the global batch, over every data- and
        context-parallel rank (tensor- and pipeline-parallel ranks read the same
        batches: counted once)."""
        counts = [
            sum(b.supervised_tokens() for b in batches),
            sum(b.labeled_rows() for b in batches),
        ]
        if self.dims.world_size == 1:
            return counts[0], counts[1]
        total = torch.tensor(counts, dtype=torch.float64, device=self.env.device)
        dist.all_reduce(total)
        copies = self.dims.world_size // self.dims.gradient_replicas
        tokens, rows = (round(float(x) / copies) for x in total)
        return tokens, rows

    def train_step(
        self, batches: list[Microbatch], seeds: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Forward and backward over one step's microbatches; returns this rank's share
        of the step's loss (see the module docstring).

        `seeds` (one per microbatch) reseed the random generators before each
        microbatch, so dropout masks depend on which samples are in it, not on the
        layout (see dropout_seed). A pipeline draws them inside the schedule and is
        seeded once per step.
        """
        tokens, rows = self.global_counts(batches)
        loss_scale = self.loss_scale or 1.0  # divided out again below and in `update`
        replicas = self.dims.gradient_replicas
        scale = replicas / max(1, tokens) * loss_scale
        if self.schedule is not None:
            if seeds:
                torch.manual_seed(seeds[0])
            return self._pipeline(batches, scale, train=True) / loss_scale
        total = torch.zeros((), device=self.env.device)
        part = self.parts[0]
        every = sync_every_microbatch(self.dims.zero_stage)
        for i, batch in enumerate(batches):
            if seeds:
                torch.manual_seed(seeds[i])
            if isinstance(part, FSDPModule):  # reduce gradients now, or once per step
                part.set_requires_gradient_sync(every or i == len(batches) - 1)
            with self._loss_context():
                with self.autocast():
                    if batch.labels is not None:
                        row_scale = replicas / max(1, rows) * loss_scale
                        loss = self._classification_loss(batch, scale, row_scale)
                    else:
                        loss = part(
                            batch.inputs, batch.targets, reduction="sum", **batch.model_kwargs()
                        )
                        loss = loss * scale
                loss.backward()
            total += local(loss.detach())
        return total / loss_scale

    def _classification_loss(
        self, batch: Microbatch, token_scale: float, row_scale: float
    ) -> torch.Tensor:
        weight = self.config.finetune.lm_loss_weight
        lm, classes = self.parts[0](
            batch.inputs,
            batch.targets if weight else None,
            reduction="sum",
            label_positions=batch.label_positions,
        )
        loss = F.cross_entropy(
            classes.float(), batch.labels, ignore_index=IGNORE_INDEX, reduction="sum"
        )
        loss = loss * row_scale
        if weight:
            loss = loss + weight * local(lm) * token_scale
        return loss

    @torch.no_grad()
    def evaluate_classifier(self, dataset) -> dict[str, float]:
        """Classification loss, accuracy and macro-F1 over every example of `dataset`
        (an evaluation split, read once, in order), as one process computes them."""
        t = self.config.train
        labels = self.config.model.num_labels
        confusion = torch.zeros(labels, labels, dtype=torch.float64, device=self.env.device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.env.device)
        self.train(False)
        for step in range(-(-len(dataset) // t.global_batch_size)):
            for batch in step_batches(dataset, step, self, self.config):
                with self._loss_context(), self.autocast():
                    _, classes = self.parts[0](batch.inputs, label_positions=batch.label_positions)
                counted = batch.labels != IGNORE_INDEX
                truth, guess = batch.labels[counted], classes[counted].argmax(-1)
                loss_sum += F.cross_entropy(classes[counted].float(), truth, reduction="sum")
                confusion.index_put_(
                    (truth, guess), torch.ones_like(truth, dtype=confusion.dtype), accumulate=True
                )
        self.train(True)
        if self.dims.world_size > 1:  # tensor-parallel ranks hold copies: count once
            for value in (confusion, loss_sum):
                dist.all_reduce(value)
                value /= self.dims.world_size // self.dims.dp
        return classification_metrics(confusion, float(loss_sum))

    @torch.no_grad()
    def eval_step(self, batches: list[Microbatch], supervised: int | None = None) -> torch.Tensor:
        """This rank's share of the loss over `batches` (`supervised`: their N)."""
        if supervised is None:
            supervised = self.supervised_tokens(batches)
        scale = self.dims.gradient_replicas / max(1, supervised)
        if self.schedule is not None:
            return self._pipeline(batches, scale, train=False)
        total = torch.zeros((), device=self.env.device)
        for batch in batches:
            with self._loss_context(), self.autocast():
                loss = self.parts[0](
                    batch.inputs, batch.targets, reduction="sum", **batch.model_kwargs()
                )
            total += local(loss) * scale
        return total

    def evaluate(self, dataset, iters: int | None = None) -> float:
        """Mean loss over the trained tokens of the first `iters` (default
        train.eval_iters) global batches of `dataset`, as one process computes it."""
        iters = iters or self.config.train.eval_iters
        self.train(False)
        weighted = counted = 0.0
        for step in range(iters):
            batches = step_batches(dataset, step, self, self.config)
            supervised = self.supervised_tokens(batches)
            weighted += self.global_mean(self.eval_step(batches, supervised)) * supervised
            counted += supervised
        self.train(True)
        return weighted / max(1.0, counted)

    def _pipeline(self, batches: list[Microbatch], scale: float, train: bool) -> torch.Tensor:
        self.pipeline_loss.scale = scale
        inputs = torch.cat([b.inputs for b in batches]) if self.has_first_stage else None
        args = (inputs,) if inputs is not None else ()
        losses: list[torch.Tensor] = []
        kwargs: dict = {}
        if self.has_last_stage:
            kwargs = {"target": torch.cat([b.targets for b in batches]), "losses": losses}
        for name in batches[0].model_kwargs():  # every stage needs positions and segments
            kwargs[name] = torch.cat([getattr(b, name) for b in batches])
        if train and self.config.model.moe.num_experts:
            if not self._pipeline_shapes_known:
                # The first training step's schedule runs each stage's forward once
                # more to learn its shapes (on the first microbatch, or on empty
                # tensors): its expert counts would move the balancing bias.
                for part in self.parts:
                    for layer in part.moe_layers:
                        layer.ignore_next_forward = True
                self._pipeline_shapes_known = True
            # Each stage's MoE layers weigh their rows' losses as the loss does its
            # tokens (summed, times `scale`): what the model's own loss would add.
            trained = torch.cat([(b.targets != IGNORE_INDEX).sum(-1) for b in batches])
            kwargs["moe_row_weights"] = trained.float().to(self.env.device) * scale
        with self._loss_context(), self.autocast():
            if train:
                self.schedule.step(*args, return_outputs=False, **kwargs)
            else:
                self.schedule.eval(*args, **kwargs)
        if not self.has_last_stage:
            return torch.zeros((), device=self.env.device)
        return torch.stack([local(loss.detach()) for loss in losses]).sum()

    def global_mean(self, value: torch.Tensor) -> float:
        """A loss as one process would compute it, from every rank's share: the sum over
        data- and context-parallel ranks of the last pipeline stage's shares, each scaled
        by dp x cp / N (hence the division by dp x cp; tensor-parallel ranks hold equal
        copies)."""
        if self.dims.world_size == 1:
            return float(value)
        value = value.detach().clone()
        dist.all_reduce(value)
        return float(value) / (self.dims.gradient_replicas * self.dims.tp)

    # ------------------------------------------------------------------ updates
    def update(self, lr: float, max_norm: float) -> float:
        """Clip the gradients to `max_norm` (0: no clipping) by their global norm, unscale
        them (fp16) and step the optimizers at `lr`; return that norm, unscaled.

        A norm that is not finite (an fp16 overflow, or NaN) skips the step: the
        gradients are dropped and nothing is updated; under fp16 the scale backs off.
        """
        loss_scale = self.loss_scale or 1.0
        self.sync_tied_gradients()
        norm = self.grad_norm() / loss_scale
        finite = bool(torch.isfinite(norm))
        if finite:
            self._unscale_and_clip(norm, max_norm, loss_scale)
            self.optimizer_step(lr)
        else:
            self.zero_grad()
        self._balance_experts(apply=finite)
        if self.loss_scaler is not None:
            self.loss_scaler.update(overflow=not finite)
        return float(norm)

    def _balance_experts(self, apply: bool) -> None:
        """After a step, each mixture-of-experts layer's token copies per expert, summed
        over the data- and context-parallel ranks (so every replica moves its router
        bias alike; tensor-parallel ranks route the same tokens, pipeline stages hold
        other layers), move the DeepSeek-V3 bias (an applied step) and are kept for the
        log (`expert_load`)."""
        for part in self.parts:
            for name, layer in part.named_modules():
                if not hasattr(layer, "update_bias"):
                    continue
                counts = layer.step_tokens_per_expert.clone()
                for dim in ("dp_replicate", "dp_shard_cp"):
                    if self.mesh[dim].size() > 1:
                        dist.all_reduce(counts, group=self.mesh[dim].get_group())
                self.expert_counts[name] = counts.cpu()
                if apply:
                    layer.update_bias(counts)
                else:
                    layer.step_tokens_per_expert.zero_()

    def expert_load(self) -> dict[str, float]:
        """Per MoE layer, the busiest expert's token copies over the mean in the last step
        (1.0 is perfectly balanced), as metrics `moe/<layer>/max_load`, and each expert's
        token copies, `moe/<layer>/tokens/<expert>` (of the whole global batch)."""
        metrics = {}
        for name, counts in self.expert_counts.items():
            metrics[f"moe/{name}/max_load"] = float(counts.max() / counts.mean().clamp(min=1e-9))
            for expert, count in enumerate(counts.tolist()):
                metrics[f"moe/{name}/tokens/{expert}"] = count
        return metrics

    def _unscale_and_clip(self, norm: torch.Tensor, max_norm: float, loss_scale: float) -> None:
        """Multiply every gradient once by min(1, max_norm / norm) / loss_scale (the
        clip coefficient is torch's clip_grads_with_norm_'s)."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads or (max_norm <= 0 and loss_scale == 1.0):
            return
        factor = torch.full((), 1.0 / loss_scale, device=norm.device)
        if max_norm > 0:
            factor = torch.clamp(max_norm / (norm + 1e-6), max=1.0) / loss_scale
        for group in grads_by_mesh(grads).values():
            torch._foreach_mul_(group, factor.to(group[0].device))

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
        grid = self.mesh.mesh  # (pp, dp_replicate, dp_shard, cp, tp) ranks
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

    def grad_norm(self) -> torch.Tensor:
        """The norm of all gradients of the whole model, as they are (scaled under fp16),
        the same on every rank; after sync_tied_gradients."""
        params = [p for p in self.parameters() if p.grad is not None]
        # The last stage's copy of a tied embedding is counted once, on the first stage.
        counted = [p for p in params if not (self._tied_param is p and not self.has_first_stage)]
        squares = []
        for grads in grads_by_mesh([p.grad for p in counted]).values():
            norm = torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)
            if isinstance(norm, DTensor):
                norm = norm.full_tensor()  # sums squares over data and tensor shards
            squares.append(norm.pow(2))
        norm = torch.stack(squares).sum().sqrt() if squares else torch.zeros(())
        if self.dims.pipeline_enabled:
            squared = norm.pow(2)
            dist.all_reduce(squared, group=self.mesh.get_group("pp"))
            norm = squared.sqrt()
        return norm

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip by the norm of all gradients of the whole model; return that norm (of
        the gradients as they are: under fp16 `update` unscales them too)."""
        self.sync_tied_gradients()
        norm = self.grad_norm()
        self._unscale_and_clip(norm, max_norm, loss_scale=1.0)
        return norm


def classification_metrics(confusion: torch.Tensor, loss_sum: float) -> dict[str, float]:
    """val_loss (mean cross-entropy), val_accuracy and val_macro_f1 from a confusion
    matrix (rows: true labels, columns: predictions). Macro-F1 averages the classes
    that occur as a label or a prediction (as scikit-learn does)."""
    total = float(confusion.sum())
    correct = confusion.diagonal()
    support, predicted = confusion.sum(1), confusion.sum(0)
    present = (support + predicted) > 0
    f1 = 2 * correct / (support + predicted).clamp(min=1)
    return {
        "val_loss": loss_sum / max(1.0, total),
        "val_accuracy": float(correct.sum()) / max(1.0, total),
        "val_macro_f1": float(f1[present].mean()) if present.any() else 0.0,
    }
