"""The training loop: `train(config)` runs a whole job on this process's rank.

One optimizer step = global_batch_size sequences: each data-parallel rank runs
global_batch_size / (micro_batch_size x dp) forward/backward passes on its slice of
the global batch (see `global_sample_indices`), gradients are averaged, clipped by
the global norm and applied. The logged loss is the mean over the global batch, so
it is the same number whatever the layout.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from megagpt.checkpoint import save_checkpoint
from megagpt.config import Config, ConfigError, save_config, validate_world_size
from megagpt.data import build_datasets, global_sample_indices
from megagpt.model import build_model
from megagpt.model.flops import flops_per_token, parameter_counts
from megagpt.parallel import init_distributed, shutdown_distributed
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


def evaluate(model, dataset, config: Config, device, dp_rank: int, dp_size: int, autocast) -> float:
    """Mean loss over the first eval_iters global batches of `dataset`."""
    t = config.train
    micro_steps = t.global_batch_size // (t.micro_batch_size * dp_size)
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device)
    with torch.no_grad():
        for step in range(t.eval_iters):
            for micro in range(micro_steps):
                indices = global_sample_indices(
                    step, micro, dp_rank, dp_size, t.micro_batch_size, t.global_batch_size
                )
                inputs, targets = load_microbatch(dataset, indices, config.model.vocab_size, device)
                with autocast():
                    total += model(inputs, targets)
    model.train(was_training)
    return _mean_over_ranks(total / (t.eval_iters * micro_steps))


def _mean_over_ranks(value: torch.Tensor) -> float:
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return float(value)


def train(config: Config) -> TrainResult:
    """Train as configured; call it on every rank (torchrun sets the environment)."""
    env = init_distributed(config.train.device)
    setup_logging(env.rank, config.logging.level, config.logging.all_ranks)
    try:
        return _train(config, env)
    finally:
        shutdown_distributed(env)


def _train(config: Config, env) -> TrainResult:
    t, device = config.train, env.device
    dp_size = validate_world_size(config, env.world_size)
    dp_rank = env.rank
    micro_steps = t.global_batch_size // (t.micro_batch_size * dp_size)
    output_dir = Path(t.output_dir)
    checkpoint_dir = Path(config.checkpoint.dir or output_dir / "checkpoints")
    if env.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, output_dir / "config.yaml")
    if config.data.tokenizer:
        vocab = Tokenizer(config.data.tokenizer).vocab_size
        if vocab > config.model.vocab_size:
            raise ConfigError(
                f"model.vocab_size = {config.model.vocab_size} is smaller than "
                f"the tokenizer's {vocab} ids ({config.data.tokenizer})"
            )

    if device.type == "cpu":
        keep_freed_memory()  # 1.4-1.7x faster CPU steps; see megagpt/utils/allocator.py
    datasets = build_datasets(config.data, t.seed)
    precision = resolve_precision(config, device)
    model = build_model(config.model, device, seed=t.seed)
    counts = parameter_counts(config.model)
    log.info(
        "model: %s parameters (%s in blocks), %d layers, hidden %d, %d heads",
        f"{counts['total']:,}",
        f"{counts['blocks']:,}",
        config.model.n_layers,
        config.model.hidden_size,
        config.model.n_heads,
    )
    log.info(
        "data: %s train samples/epoch, %s valid; %d ranks x %d micro steps x %d seqs of %d tokens",
        f"{len(datasets.train):,}",
        f"{len(datasets.valid):,}" if datasets.valid else "no",
        dp_size,
        micro_steps,
        t.micro_batch_size,
        config.data.seq_len,
    )
    model = parallelize(model, config, env)
    optimizer = build_optimizer(model, config.optim)
    torch.manual_seed(t.seed + env.rank)  # dropout differs per rank, like its data

    use_bf16 = precision == "bf16"

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

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
    params = [p for p in model.parameters() if p.requires_grad]
    started = window_start = time.perf_counter()
    window_steps = 0
    try:
        for step in range(t.max_steps):
            lr = learning_rate(step, config.optim, t.max_steps)
            set_learning_rate(optimizer, lr)
            loss_sum = torch.zeros((), device=device)
            for micro in range(micro_steps):
                indices = global_sample_indices(
                    step, micro, dp_rank, dp_size, t.micro_batch_size, t.global_batch_size
                )
                inputs, targets = load_microbatch(
                    datasets.train, indices, config.model.vocab_size, device
                )
                sync = micro == micro_steps - 1 or not hasattr(model, "no_sync")
                with contextlib.nullcontext() if sync else model.no_sync(), autocast():
                    loss = model(inputs, targets) / micro_steps
                loss.backward()
                loss_sum += loss.detach()
            max_norm = config.optim.grad_clip if config.optim.grad_clip > 0 else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            loss_value = _mean_over_ranks(loss_sum)
            grad_norm_value = float(grad_norm)
            done = step + 1
            if not (math.isfinite(loss_value) and math.isfinite(grad_norm_value)):
                raise NonFiniteLossError(
                    f"step {done}: loss is {loss_value}, gradient norm {grad_norm_value}; "
                    "stopped before the update, and nothing from this step was saved. "
                    "Lower optim.lr, raise optim.warmup_steps, or check the data."
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            result.losses.append(loss_value)
            window_steps += 1

            is_last = done == t.max_steps
            metrics = {}
            if t.eval_interval and datasets.valid and (done % t.eval_interval == 0 or is_last):
                val_loss = evaluate(
                    model, datasets.valid, config, device, dp_rank, dp_size, autocast
                )
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
                result.checkpoint = save_checkpoint(
                    checkpoint_dir,
                    done,
                    model,
                    optimizer,
                    config,
                    {
                        "loss": loss_value,
                        "world_size": env.world_size,
                        "consumed_samples": done * t.global_batch_size,
                    },
                    keep_last=config.checkpoint.keep_last,
                )
                log.info("step %d | saved checkpoint %s", done, result.checkpoint)
    finally:
        sink.close()
    return result
