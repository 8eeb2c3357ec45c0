"""DeepSpeed as the second engine: ZeRO 1-3 with optimizer and parameter offload to
host memory or NVMe, behind the same train-module interface as the native engine.

The plain GPT is built and initialized exactly as one process builds it, then handed
to `deepspeed.initialize` with megagpt's AdamW (Megatron's parameter groups) and a
config written from megagpt's (see deepspeed_config.py). The loop is unchanged: the
train module's `train_step` runs the microbatches (DeepSpeed's backward, which scales
fp16 losses itself), `update` lets DeepSpeed reduce, clip, check for overflow and step.

Checkpoints are megagpt's, not DeepSpeed's: every parameter's fp32 master copy and
AdamW moments are gathered one parameter at a time and written by DCP under the
parameter's name, each rank writing a dim-0 chunk, exactly as the native engine's
FSDP2 shards are written. So a DeepSpeed run resumes on the native engine and the
other way round, at any data-parallel size (see DeepSpeedOptimizers).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from megagpt.config import Config, ConfigError
from megagpt.model.build import build_meta_model
from megagpt.parallel.activation_checkpoint import apply_activation_checkpointing
from megagpt.parallel.batches import Microbatch
from megagpt.parallel.deepspeed_config import deepspeed_config
from megagpt.parallel.deepspeed_ops import cpu_adam_built, op_built
from megagpt.parallel.dims import ParallelDims, device_type
from megagpt.parallel.env import DistributedEnv
from megagpt.parallel.init import materialize_shards
from megagpt.parallel.train_module import TrainModule

log = logging.getLogger(__name__)
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")
INSTALL_HINT = "pip install -e '.[deepspeed]' (or pip install deepspeed)"


def import_deepspeed(device: torch.device):
    """DeepSpeed, set up for `device`, or a ConfigError saying how to install it."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read once, at import
    try:
        import deepspeed
        import deepspeed.ops
    except ImportError as error:
        raise ConfigError(
            f"parallel.engine=deepspeed needs DeepSpeed, which is not installed ({error}); "
            f"install it with {INSTALL_HINT}, or use parallel.engine=native"
        ) from None
    # DeepSpeed's shared-memory all-reduce for CPU ranks is compiled on first use
    # (~25 s here): gloo does the same work, so it is not worth a compiler per run.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def check_deepspeed_settings(config: Config, device: torch.device) -> None:
    """What only the training machine can check, before anything is allocated: DeepSpeed
    is installed, and an NVMe offload directory exists and is writable."""
    p = config.parallel
    if p.engine != "deepspeed":
        return
    import_deepspeed(device)
    if "nvme" in (p.offload_optimizer, p.offload_params):
        path = Path(p.nvme_path or "")
        if not path.is_dir():
            raise ConfigError(
                f"parallel.nvme_path = {p.nvme_path!r} is not a directory on this machine; "
                "create it on a local NVMe drive, or offload to cpu"
            )
        try:  # a file written and removed: permissions, read-only mounts, quotas alike
            with tempfile.NamedTemporaryFile(dir=path, prefix=".megagpt-write-test-"):
                pass
        except OSError as error:
            raise ConfigError(
                f"parallel.nvme_path = {p.nvme_path!r} is not writable by this user "
                f"({error.strerror}); choose a directory you can write, or offload to cpu"
            ) from None
        if not op_built("async_io"):
            raise ConfigError(
                "nvme offload (parallel.offload_optimizer/offload_params) needs DeepSpeed's "
                "async_io extension, which is not built in this environment: run `megagpt "
                "setup deepspeed` once (with libaio-dev installed), or offload to cpu"
            )


def host_optimizer(optimizer: torch.optim.Optimizer, config: Config) -> torch.optim.Optimizer:
    """The optimizer DeepSpeed steps: DeepSpeed's CPU Adam for an offloaded optimizer
    when its extension is built, else megagpt's AdamW `optimizer` (torch's fused kernel
    runs on the host too). Both are AdamW with the same parameter groups."""
    if config.parallel.offload_optimizer == "none":
        return optimizer
    if not cpu_adam_built():
        log.info(
            "offloaded optimizer: torch's AdamW on the host (DeepSpeed's CPU Adam is not "
            "built; `megagpt setup deepspeed` builds it once for this environment)"
        )
        return optimizer
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    o = config.optim
    log.info("offloaded optimizer: DeepSpeed's CPU Adam")
    return DeepSpeedCPUAdam(
        optimizer.param_groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, adamw_mode=True
    )


def build_deepspeed_module(config: Config, env: DistributedEnv) -> DeepSpeedTrainModule:
    """The configured model under DeepSpeed's ZeRO on every rank (data parallel only)."""
    deepspeed = import_deepspeed(env.device)
    for name, value in (("RANK", env.rank), ("WORLD_SIZE", env.world_size)):
        os.environ.setdefault(name, str(value))
    os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
    deepspeed.init_distributed(dist_backend=dist.get_backend())  # joins the existing group
    dims = ParallelDims.from_config(config, env.world_size)
    mesh = dims.build_mesh(device_type(env.device))
    model = build_meta_model(config.model)
    # Built whole on the host, where ZeRO-3 partitions it; the others move it over.
    materialize_shards(model, torch.device("cpu"), config.train.seed)
    # As on the native engine: torch's non-reentrant checkpoint around each block (ZeRO-3
    # gathers the block's parameters again for the recomputation through its hooks).
    apply_activation_checkpointing(model, config.parallel.activation_checkpointing)
    module = DeepSpeedTrainModule([model], config, env, dims, mesh)
    ds_config = deepspeed_config(config, dims.dp, env.device.type == "cuda", module.precision)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=host_optimizer(module.optimizers.optimizers[0], config),
        config=ds_config,
    )
    module.attach(engine)
    p = config.parallel
    log.info(
        "engine: DeepSpeed %s, ZeRO-%d on %d data-parallel rank(s); optimizer state on %s, "
        "parameters on %s; activation checkpointing %s",
        deepspeed.__version__,
        p.zero_stage,
        dims.dp,
        p.offload_optimizer if p.offload_optimizer != "none" else env.device.type,
        p.offload_params if p.offload_params != "none" else env.device.type,
        p.activation_checkpointing,
    )
    dist.barrier()
    return module


class DeepSpeedTrainModule(TrainModule):
    """A TrainModule whose data parallelism, mixed precision, clipping and optimizer
    step are DeepSpeed's; the loss, its scaling and evaluation are the native ones."""

    def attach(self, engine) -> None:
        self.engine = engine
        self.parts = [engine.module]
        # The engine is data parallel only: the mesh's shard dimension is every rank.
        self.optimizers = DeepSpeedOptimizers(engine, self.parts[0], self.mesh["dp_shard_cp"])
        # DeepSpeed keeps the model itself in bf16/fp16 and scales fp16 losses itself.
        self.autocast = contextlib.nullcontext
        self.loss_scaler = None

    def train_step(self, batches: list[Microbatch], seeds=None) -> torch.Tensor:
        tokens, rows = self.global_counts(batches)
        scale = self.dp_size / max(1, tokens)
        total = torch.zeros((), device=self.env.device)
        for i, batch in enumerate(batches):
            if seeds:
                torch.manual_seed(seeds[i])
            if batch.labels is not None:
                loss = self._classification_loss(batch, scale, self.dp_size / max(1, rows))
            else:
                loss = self.engine(
                    batch.inputs, batch.targets, reduction="sum", **batch.model_kwargs()
                )
                loss = loss * scale
            # Our loss is already the step's mean share; DeepSpeed must not divide it by
            # the accumulation steps again.
            self.engine.backward(loss.float(), scale_wrt_gas=False)
            total += loss.detach().float()
        return total

    def update(self, lr: float, max_norm: float) -> float:
        """Reduce, clip (at optim.grad_clip, written into DeepSpeed's config) and step;
        the gradient norm, or inf when DeepSpeed found an overflow and skipped."""
        self.optimizers.set_lr(lr)
        self.engine.step()
        if not self.engine.was_step_applied():
            return float("inf")
        self.optimizers.applied_steps += 1
        if self.optimizers.applied_steps == 1:
            self.optimizers.link_moments()
        return float(self.engine.get_global_grad_norm())

    def optimizer_step(self, lr: float) -> None:
        self.update(lr, self.config.optim.grad_clip)

    def zero_grad(self) -> None:
        """DeepSpeed zeroes gradients at every step(), applied or skipped."""

    def memory_tensors(self) -> dict[str, list[tuple[torch.Tensor, int]]]:
        """This rank's share of each kind as DeepSpeed holds it (see parallel/memory.py):
        the parameters' compute copies (ZeRO-3: their partitions), the fp32 master
        partitions and AdamW's moments as optimizer state (the moments before the first
        step: two per master element), and one gradient per master element in the
        compute precision (DeepSpeed frees its gradient partitions after each step)."""
        zero = self.engine.optimizer
        params = [getattr(p, "ds_tensor", p) for p in self.parts[0].parameters()]
        masters = list(
            getattr(zero, "single_partition_of_fp32_groups", None)
            or getattr(zero, "fp32_partitioned_groups_flat", [])
        )
        shared = {t.data_ptr() for t in params}  # ZeRO-3 fp32 without offload: aliases
        own_masters = [(m, 1) for m in masters if m.data_ptr() not in shared]
        base = getattr(zero, "optimizer", zero)
        moments = [
            (v, 1)
            for state in base.state.values()
            for v in state.values()
            if torch.is_tensor(v) and v.dim() > 0
        ] or [(m, 2) for m in masters]
        width = params[0].element_size() / 4 if params else 1.0
        gradients = [(m, width) for m in masters]
        return {
            "parameters": [(p, 1) for p in params],
            "gradients": gradients,
            "optimizer_state": own_masters + moments,
        }

    @property
    def loss_scale(self) -> float | None:
        if self.precision != "fp16":
            return None
        return float(self.engine.optimizer.loss_scale)

    def loss_scale_state(self) -> dict | None:
        """DeepSpeed's dynamic scaler in the native scaler's terms (loss_scale.py), so
        an fp16 checkpoint carries its scale across engines."""
        if self.precision != "fp16":
            return None
        scaler = self.engine.optimizer.loss_scaler
        return {
            "scale": float(scaler.cur_scale),
            "good_steps": max(0, scaler.cur_iter - scaler.last_overflow_iter - 1),
            "hysteresis_left": int(scaler.cur_hysteresis),
        }

    def load_loss_scale_state(self, state: dict | None) -> None:
        if not state or self.precision != "fp16":
            return
        scaler = self.engine.optimizer.loss_scaler
        scaler.cur_scale = float(state["scale"])
        scaler.cur_hysteresis = int(state["hysteresis_left"])
        scaler.last_overflow_iter = scaler.cur_iter - 1 - int(state["good_steps"])


class DeepSpeedOptimizers:
    """The optimizer side of a DeepSpeed module, as the checkpoint layer sees it:
    megagpt's state dict (model and AdamW state by parameter name) from DeepSpeed's
    partitions, and back."""

    def __init__(self, engine, model: nn.Module, mesh: DeviceMesh):
        self.engine, self.model, self.mesh = engine, model, mesh  # mesh: all ranks, 1-D
        self.applied_steps = 0  # AdamW's step count, the same for every parameter

    # The interface of parallel.optimizer.Optimizers the loop and logs use.
    @property
    def param_groups(self) -> list[dict]:
        return self.engine.optimizer.param_groups

    def set_lr(self, lr: float) -> None:
        for group in self.param_groups:
            group["lr"] = lr

    def zero_grad(self, set_to_none: bool = True) -> None:
        """DeepSpeed zeroes gradients itself."""

    @property
    def state(self) -> dict:
        return {}  # partitioned inside DeepSpeed; see memory accounting

    # ------------------------------------------------------------------ checkpoints
    def _chunk(self, full: torch.Tensor) -> DTensor:
        """This rank's dim-0 chunk of a tensor every rank holds whole (no communication):
        the layout FSDP2 writes, so DCP stores the same files for both engines."""
        return distribute_tensor(full.float().cpu(), self.mesh, [Shard(0)], src_data_rank=None)

    def _full(self, param: nn.Parameter, key: str | None) -> torch.Tensor:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        if key is None:
            return safe_get_full_fp32_param(param)
        if self.applied_steps == 0:  # AdamW creates its moments at the first step
            return torch.zeros(param.ds_shape if hasattr(param, "ds_shape") else param.shape)
        return safe_get_full_optimizer_state(param, key)

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def collect_state(self, parts: list[nn.Module]) -> dict:
        model_state, optimizer_state = {}, {}
        step = torch.tensor(float(self.applied_steps))
        for name, param in self.trainable():  # one full tensor at a time, in order
            model_state[name] = self._chunk(self._full(param, None))
            for key in ADAM_MOMENTS:
                optimizer_state[f"state.{name}.{key}"] = self._chunk(self._full(param, key))
            optimizer_state[f"state.{name}.step"] = step.clone()
        aliases = dict(self.model.named_parameters(remove_duplicate=False))
        first_name = {id(p): n for n, p in self.model.named_parameters()}  # once each
        for key in self.model.state_dict():
            if key not in model_state and key in aliases:  # a tied output layer
                model_state[key] = model_state[first_name[id(aliases[key])]]
        rank = dist.get_rank()
        return {
            "model": model_state,
            "optimizer": optimizer_state,
            "rng": {f"rank{rank}": torch.get_rng_state()},
        }

    def apply_state(self, parts: list[nn.Module], state: dict) -> None:
        """Put a loaded `collect_state` template into DeepSpeed's fp32 master weights,
        moments and compute weights."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        self._create_moments()
        optimizer = state.get("optimizer", {})
        steps = None
        for name, param in self.trainable():
            full = _whole(state["model"][name])
            safe_set_full_fp32_param(param, full)
            if _gathered(param):  # a ZeRO-3 parameter in use keeps its gathered copy
                param.data.copy_(full.view_as(param.data))
            for key in ADAM_MOMENTS:
                entry = optimizer.get(f"state.{name}.{key}")
                if entry is not None:
                    safe_set_full_optimizer_state(param, _whole(entry), key)
            if f"state.{name}.step" in optimizer:
                steps = int(float(optimizer[f"state.{name}.step"]))
        self._copy_master_to_model()
        if steps is not None:
            self._set_step(steps)
        rng = state.get("rng", {}).get(f"rank{dist.get_rank()}")
        if rng is not None:
            torch.set_rng_state(rng)

    def _create_moments(self) -> None:
        """AdamW creates its moments at its first step: take one with zero gradients
        and learning rate 0 (weights, with decoupled weight decay times lr, unchanged)."""
        if self.applied_steps > 0:
            return
        lrs = [group["lr"] for group in self.param_groups]
        self.set_lr(0.0)
        tokens = torch.zeros((1, 2), dtype=torch.long, device=self.engine.device)
        loss = self.engine(tokens, tokens, reduction="sum")
        self.engine.backward(loss.float() * 0.0, scale_wrt_gas=False)
        self.engine.step()
        for group, lr in zip(self.param_groups, lrs):
            group["lr"] = lr
        self.engine.global_steps = self.engine.global_samples = 0
        self.link_moments()

    def link_moments(self) -> None:
        """Point every parameter at its slice of AdamW's moments. ZeRO-1/2 (0.19.8) links
        them after stepping its first parameter group, before the other groups have
        moments: those (megagpt's no-decay group) would stay unlinked for good."""
        zero = self.engine.optimizer
        if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
            zero._hp_optimizer_states_linked = False
            zero._lazy_init_hp_params_optimizer_state()

    def _copy_master_to_model(self) -> None:
        """Copy the fp32 master weights into the weights the model computes with."""
        zero = self.engine.optimizer
        if hasattr(zero, "update_lp_params"):  # ZeRO 1-2
            zero.update_lp_params()
            return
        # ZeRO-3: each sub-group's partition, then its parameters' views (parameters
        # that are gathered at this moment got their new values in apply_state).
        for group in range(len(zero.fp16_groups)):
            zero._reassign_or_swap_out_partitioned_parameters(group)

    def _set_step(self, steps: int) -> None:
        self.applied_steps = steps
        base = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
        for moments in base.state.values():
            if "step" in moments:
                old = moments["step"]
                moments["step"] = (
                    torch.full_like(old, float(steps)) if torch.is_tensor(old) else steps
                )


def _gathered(param: nn.Parameter) -> bool:
    """A ZeRO-3 parameter whose whole value is in place (small ones stay gathered
    between steps, under stage3_param_persistence_threshold; others after a forward)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return getattr(param, "ds_status", None) == ZeroParamStatus.AVAILABLE


def _whole(value: torch.Tensor) -> torch.Tensor:
    return value.full_tensor() if isinstance(value, DTensor) else value
