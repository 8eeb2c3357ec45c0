"""The training loop: `train(config)` runs a whole job on this process's rank.

One optimizer step = global_batch_size sequences: each data-parallel replica runs
global_batch_size / (micro_batch_size x dp) microbatches of its slice of the global
batch (see `global_sample_indices`), as gradient accumulation or as the pipeline's
microbatches; gradients are averaged, clipped by the global norm and applied. The
logged loss is the mean over the global batch, the same number whatever the layout.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megagpt.checkpoint import save_checkpoint
from megagpt.config import Config, ConfigError, save_config
from megagpt.data import build_datasets, global_sample_indices
from megagpt.model.flops import flops_per_token, parameter_counts
from megagpt.parallel import init_distributed, shutdown_distributed
from megagpt.parallel.memory import log_memory, memory_bytes
from megagpt.parallel.model import ParallelModel
from megagpt.parallel.parallelize import parallelize
from megagpt.tokenizer import Tokenizer
from megagpt.training.metrics import MetricsSink, format_duration, format_rate
from megagpt.training.optimizer import build_optimizer, learning_rate, set_learning_rate
from megagpt.utils.allocator import keep_freed_memory
from megagpt.utils.hardware import peak_tflops
from megagpt.utils.logging import setup_logging

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became NaN or infinite; nothing was saved from it."""


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    """Global-batch loss of every step, in order."""
    val_losses: dict[int, float] = field(default_factory=dict)
    """Validation loss by step."""
    checkpoint: Path | None = None
    """Directory of the final checkpoint."""
    memory: dict[str, int] = field(default_factory=dict)
    """This rank's parameter, gradient and optimizer-state bytes after the first step."""


def resolve_precision(config: Config, device: torch.device) -> str:
    precision = config.train.precision
    if precision == "auto":
        bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return "bf16" if bf16_ok else "fp32"
    return precision


def load_microbatch(dataset, indices, vocab_size: int, device: torch.device):
    """(inputs, targets) of shape (B, T) for the given global sample indices."""
    tokens = dataset.samples(indices)
    top = int(tokens.max())
    if top >= vocab_size:
        raise ConfigError(
            f"{dataset.name} holds token id {top}, but model.vocab_size = "
            f"{vocab_size}; set model.vocab_size to the tokenizer's size"
        )
    batch = torch.from_numpy(tokens).to(device, non_blocking=True)
    return batch[:, :-1], batch[:, 1:]


def microbatch_indices(step: int, model: ParallelModel, config: Config) -> list:
    """Global sample indices of each of this replica's microbatches of step `step`."""
    t = config.train
    microbatches = t.global_batch_size // (t.micro_batch_size * model.dp_size)
    return [
        global_sample_indices(
            step, m, model.dp_rank, model.dp_size, t.micro_batch_size, t.global_batch_size
        )
        for m in range(microbatches)
    ]


def step_batches(dataset, step: int, model: ParallelModel, config: Config):
    """This replica's microbatches of global batch `step`."""
    return [
        load_microbatch(dataset, indices, config.model.vocab_size, model.env.device)
        for indices in microbatch_indices(step, model, config)
    ]


def dropout_seed(seed: int, first_sample: int) -> int:
    """The random seed of the microbatch that starts at global sample `first_sample`.

    A microbatch holds the same samples in every layout with the same
    micro_batch_size, so data-parallel and ZeRO runs draw the dropout masks a single
    process draws, and so does tensor parallelism without sequence parallelism and
    with attention_dropout 0 (its dropouts act on whole, replicated tensors). Sequence
    parallelism, attention dropout over head shards, and pipelines (seeded once per
    step) draw different, equally distributed masks. Resuming needs no RNG state.
    """
    return (seed * 1_000_003 + first_sample) % 2**63


def evaluate(model: ParallelModel, dataset, config: Config) -> float:
    """Mean loss over the first eval_iters global batches of `dataset`."""
    model.train(False)
    total = sum(
        model.global_mean(model.eval_step(step_batches(dataset, step, model, config)))
        for step in range(config.train.eval_iters)
    )
    model.train(True)
    return total / config.train.eval_iters


def autocast_for(precision: str, device: torch.device):
    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    return autocast


def train(config: Config) -> TrainResult:
    """Train as configured; call it on every rank (torchrun sets the environment)."""
    env = init_distributed(config.train.device)
    setup_logging(env.rank, config.logging.level, config.logging.all_ranks)
    try:
        return _train(config, env)
    finally:
        shutdown_distributed(env)


def _check_tokenizer(config: Config) -> None:
    if config.data.tokenizer:
        vocab = Tokenizer(config.data.tokenizer).vocab_size
        if vocab > config.model.vocab_size:
            raise ConfigError(
                f"model.vocab_size = {config.model.vocab_size} is smaller than "
                f"the tokenizer's {vocab} ids ({config.data.tokenizer})"
            )


def _train(config: Config, env) -> TrainResult:
    t, device = config.train, env.device
    output_dir = Path(t.output_dir)
    checkpoint_dir = Path(config.checkpoint.dir or output_dir / "checkpoints")
    if env.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, output_dir / "config.yaml")
    _check_tokenizer(config)
    if device.type == "cpu":
        keep_freed_memory()  # 1.4-1.7x faster CPU steps; see megagpt/utils/allocator.py
    datasets = build_datasets(config.data, t.seed)
    precision = resolve_precision(config, device)
    counts = parameter_counts(config.model)
    log.info(
        "model: %s parameters (%s in blocks), %d layers, hidden %d, %d heads",
        f"{counts['total']:,}",
        f"{counts['blocks']:,}",
        config.model.n_layers,
        config.model.hidden_size,
        config.model.n_heads,
    )
    model = parallelize(config, env)
    model.autocast = autocast_for(precision, device)
    microbatches = t.global_batch_size // (t.micro_batch_size * model.dp_size)
    log.info(
        "data: %s train samples/epoch, %s valid; %d replicas x %d microbatches x %d "
        "sequences of %d tokens",
        f"{len(datasets.train):,}",
        f"{len(datasets.valid):,}" if datasets.valid else "no",
        model.dp_size,
        microbatches,
        t.micro_batch_size,
        config.data.seq_len,
    )
    optimizer = build_optimizer(model, config.optim, config.model.tie_embeddings)
    log_memory(
        "at start-up (gradients and optimizer state as they will be)",
        memory_bytes(model, optimizer, expected=True),
    )

    tokens_per_step = t.global_batch_size * config.data.seq_len
    step_flops = flops_per_token(config.model, config.data.seq_len) * tokens_per_step
    peak = peak_tflops(device, precision, config.logging.peak_tflops) * 1e12 * env.world_size
    log.info(
        "precision %s on %s; MFU against %.1f TFLOP/s per device",
        precision,
        device,
        peak / env.world_size / 1e12,
    )
    sink = MetricsSink(output_dir, env.is_main, config.logging.tensorboard)
    result = TrainResult()
    started = window_start = time.perf_counter()
    window_steps = 0
    try:
        for step in range(t.max_steps):
            lr = learning_rate(step, config.optim, t.max_steps)
            set_learning_rate(optimizer, lr)
            seeds = [
                dropout_seed(t.seed, int(indices[0]))
                for indices in microbatch_indices(step, model, config)
            ]
            batches = step_batches(datasets.train, step, model, config)
            loss_value = model.global_mean(model.train_step(batches, seeds))
            grad_norm_value = float(model.clip_grad_norm_(config.optim.grad_clip))
            done = step + 1
            if not (math.isfinite(loss_value) and math.isfinite(grad_norm_value)):
                raise NonFiniteLossError(
                    f"step {done}: loss is {loss_value}, gradient norm {grad_norm_value}; "
                    "stopped before the update, and nothing from this step was saved. "
                    "Lower optim.lr, raise optim.warmup_steps, or check the data."
                )
            optimizer.step()
            if step == 0:
                result.memory = memory_bytes(model, optimizer)
                log_memory("after the first step", result.memory, device)
            optimizer.zero_grad(set_to_none=True)
            result.losses.append(loss_value)
            window_steps += 1

            is_last = done == t.max_steps
            metrics = {}
            if t.eval_interval and datasets.valid and (done % t.eval_interval == 0 or is_last):
                val_loss = evaluate(model, datasets.valid, config)
                result.val_losses[done] = val_loss
                metrics.update(val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50.0)))
                log.info(
                    "step %d | validation loss %.4f | perplexity %.2f",
                    done,
                    val_loss,
                    metrics["val_ppl"],
                )
            if metrics or done % config.logging.log_interval == 0 or done == 1 or is_last:
                now = time.perf_counter()
                elapsed = now - window_start
                tokens_per_s = window_steps * tokens_per_step / elapsed
                mfu = window_steps * step_flops / elapsed / peak
                eta = (now - started) / done * (t.max_steps - done)
                if device.type == "cuda":
                    metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                log.info(
                    "step %d/%d | loss %.4f | lr %.2e | grad_norm %.3f | %s tok/s | "
                    "MFU %.1f%% | elapsed %s | ETA %s",
                    done,
                    t.max_steps,
                    loss_value,
                    lr,
                    grad_norm_value,
                    format_rate(tokens_per_s),
                    100 * mfu,
                    format_duration(now - started),
                    format_duration(eta),
                )
                sink.write(
                    done,
                    {
                        "loss": loss_value,
                        "lr": lr,
                        "grad_norm": grad_norm_value,
                        "tokens_per_s": tokens_per_s,
                        "mfu": mfu,
                        **metrics,
                    },
                )
                window_start, window_steps = time.perf_counter(), 0
            interval = config.checkpoint.interval
            if is_last or (interval and done % interval == 0):
                result.checkpoint = _save(
                    checkpoint_dir, done, model, optimizer, config, loss_value, env
                )
                log.info("step %d | saved checkpoint %s", done, result.checkpoint)
    finally:
        sink.close()
    return result


def _save(
    root: Path, step: int, model: ParallelModel, optimizer, config: Config, loss: float, env
) -> Path:
    state = model.full_state_dict()  # collective: every rank takes part
    single = model.mesh is None
    return save_checkpoint(
        root,
        step,
        state,
        optimizer.state_dict() if single else None,
        config,
        {
            "loss": loss,
            "world_size": env.world_size,
            "consumed_samples": step * config.train.global_batch_size,
        },
        keep_last=config.checkpoint.keep_last,
    )
