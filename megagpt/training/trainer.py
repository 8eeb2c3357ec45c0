"""The training loop: `train(config)` runs a whole job on this process's rank.

One optimizer step = global_batch_size sequences: each data-parallel replica runs
global_batch_size / (micro_batch_size x dp) microbatches of its slice of the global
batch (see `microbatch_indices`), as gradient accumulation or as the pipeline's
microbatches; gradients are averaged, clipped by the global norm and applied. The
logged loss is the mean over the global batch, the same number whatever the layout.

The train module (megagpt.parallel) owns the model, its optimizers and precision; the
loop here owns the schedule, data order, evaluation, logging, checkpoints and stops.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from megagpt.checkpoint import Checkpointer
from megagpt.config import Config, ConfigError, save_config
from megagpt.contract import REQUEUE_EXIT_CODE, STOP_SIGNALS
from megagpt.data import check_data_config
from megagpt.errors import INTERRUPTED_EXIT_CODE, MegagptError
from megagpt.model.flops import flops_per_token, parameter_counts
from megagpt.parallel import init_distributed, shutdown_distributed
from megagpt.parallel.batches import dropout_seed, microbatch_indices, step_batches
from megagpt.parallel.deepspeed_engine import check_deepspeed_settings
from megagpt.parallel.dims import native_cpu_offload
from megagpt.parallel.env import collective_timeout_s
from megagpt.parallel.memory import log_memory, log_module_memory, memory_bytes
from megagpt.parallel.parallelize import parallelize
from megagpt.planning.startup import startup_plan
from megagpt.tokenizer import Tokenizer
from megagpt.training.evaluation import EvaluationHook, Evaluations, TrainResult
from megagpt.training.finetune import (
    apply_init,
    build_run_datasets,
    init_checkpoint,
    steps_for_epochs,
)
from megagpt.training.metrics import MetricsSink
from megagpt.training.outputs import locked_outputs
from megagpt.training.overfitting import OverfittingControls, saves_as_best
from megagpt.training.preemption import PreemptionHandler
from megagpt.training.schedule import learning_rate
from megagpt.training.wandb_logger import wandb_options
from megagpt.training.watchdog import Watchdog
from megagpt.utils.allocator import keep_freed_memory
from megagpt.utils.formatting import format_duration, format_rate
from megagpt.utils.hardware import device_peak
from megagpt.utils.logging import setup_logging

log = logging.getLogger(__name__)


class NonFiniteLossError(MegagptError):
    """The loss or gradient norm became NaN or infinite; nothing was saved from it."""


def train(config: Config, hooks: Sequence[EvaluationHook] = ()) -> TrainResult:
    """Train as configured; call it on every rank (torchrun sets the environment)."""
    check_data_config(config.data)  # settings and tokenizer: before anything is written
    if config.finetune.init:
        apply_init(config)  # the model's shape and tokenizer come from the weights
    _check_tokenizer(config)
    timeout = config.train.collective_timeout_s or collective_timeout_s()
    env = init_distributed(
        config.train.device, timeout_s=timeout, cpu_collectives=native_cpu_offload(config)
    )
    setup_logging(env.rank, config.logging.level, config.logging.all_ranks)
    try:
        with locked_outputs(config, env):  # one run per output directory
            return Trainer(config, env, hooks).run()
    finally:
        shutdown_distributed(env)


def exit_code(result: TrainResult) -> int:
    """The exit status a finished run reports: REQUEUE_EXIT_CODE after a stop on request
    (checkpointed; the launcher requeues), 130 after Ctrl-C (checkpointed too; as a
    shell reports an interrupted command), else 0."""
    if not result.preempted:
        return 0
    return INTERRUPTED_EXIT_CODE if result.stop_signal == "SIGINT" else REQUEUE_EXIT_CODE


class Trainer:
    def __init__(self, config: Config, env, hooks: Sequence[EvaluationHook] = ()):
        self.config, self.env = config, env
        t, device = config.train, env.device
        self.output_dir = Path(t.output_dir)  # created and locked by locked_outputs
        if device.type == "cpu":
            keep_freed_memory()  # 1.4-1.7x faster CPU steps; see megagpt/utils/allocator.py
        self.datasets = build_run_datasets(config)
        if t.epochs is not None:
            t.max_steps = steps_for_epochs(config, len(self.datasets.train))
            log.info(
                "train.epochs = %g: %d steps of %d samples over %s training samples",
                t.epochs,
                t.max_steps,
                t.global_batch_size,
                f"{len(self.datasets.train):,}",
            )
        # Epochs per dataset, watched metrics: checked before the model is built.
        self.overfitting = OverfittingControls(config, self.datasets)
        # Task files are read and encoded before the model is built: bad ones fail first.
        self.evaluations = Evaluations(
            config, env, self.datasets, [*self.overfitting.hooks(), *hooks], self.overfitting
        )
        counts = parameter_counts(config.model)
        log.info(
            "model: %s parameters (%s in blocks), %d layers, hidden %d, %d heads",
            f"{counts['total']:,}",
            f"{counts['blocks']:,}",
            config.model.n_layers,
            config.model.hidden_size,
            config.model.n_heads,
        )
        check_deepspeed_settings(config, env.device)  # installed, NVMe directory usable
        self.plan = startup_plan(config, env.world_size, env.device)
        self.module = parallelize(config, env)
        log_module_memory(
            "at start-up (gradients and optimizer state as they will be)",
            self.module,
            expected=True,
        )
        root = Path(config.checkpoint.dir or self.output_dir / "checkpoints")
        self.checkpointer = Checkpointer(config, self.module, root, env.is_main)
        self.nan_skips = 0
        self.overflow_skips = 0  # fp16 steps skipped as the loss scale backed off
        self.start_step, self.sample_offset = self._resume()
        microbatches = t.global_batch_size // (t.micro_batch_size * self.module.dp_size)
        log.info(
            "data: %s train samples/epoch, %s valid; %d replica(s) x %d microbatches x "
            "%d sequences of %d tokens",
            f"{len(self.datasets.train):,}",
            f"{len(self.datasets.valid):,}" if self.datasets.valid else "no",
            self.module.dp_size,
            microbatches,
            t.micro_batch_size,
            config.data.seq_len,
        )
        self.tokens_per_step = t.global_batch_size * config.data.seq_len
        precision = self.module.precision
        self.peak = device_peak(device, precision, config.logging.peak_tflops)
        log.info(
            "precision %s on %s; MFU against %s TFLOP/s per device (%s)",
            precision,
            device,
            f"{self.peak.tflops:.3g}",
            self.peak.source,
        )
        self.peak_flops = self.peak.tflops * 1e12 * env.world_size
        self.step_flops = flops_per_token(config.model, config.data.seq_len) * (
            self.tokens_per_step
        )
        if config.finetune.lora.rank:  # a frozen base computes no weight gradients
            self.step_flops *= 4 / 6
        if env.is_main:  # only now: a run refused above must not replace its config
            save_config(config, self.output_dir / "config.yaml")
        resumed = self.start_step if self.start_step else None
        self.sink = MetricsSink(
            self.output_dir,
            env.is_main,
            config.logging.tensorboard,
            resume_step=resumed,
            wandb=wandb_options(config) if env.is_main else None,
        )

    def _resume(self) -> tuple[int, int]:
        """Load the checkpoint that checkpoint.resume selects; return the step to start
        from and the offset that puts the data at the checkpoint's consumed samples."""
        point = self.checkpointer.resume_point()
        if point is None:
            if self.config.checkpoint.resume not in ("none", "auto"):
                raise ConfigError(
                    f"checkpoint.resume = {self.config.checkpoint.resume!r} names no checkpoint"
                )
            if self.config.finetune.init:
                directory = init_checkpoint(self.config, self.env.is_main)
                self.checkpointer.load_weights(directory)
                log.info(
                    "fine-tuning from %s: weights only, the optimizer and schedule start at step 0",
                    directory,
                )
            return 0, 0
        metadata = self.checkpointer.load(point)
        self.nan_skips = int(metadata.get("nan_skips", 0))
        self.overflow_skips = int(metadata.get("overflow_skips", 0))
        self.module.load_loss_scale_state(metadata.get("loss_scale"))
        self.overfitting.restore(metadata)
        step = int(metadata["step"])
        consumed = int(metadata["consumed_samples"])
        log.info(
            "resumed from %s: step %d, %s samples consumed (saved by %s on %d processes)",
            point,
            step,
            f"{consumed:,}",
            metadata.get("layout", "?"),
            metadata.get("world_size", 0),
        )
        return step, consumed - step * self.config.train.global_batch_size

    # ------------------------------------------------------------------ loop
    def run(self) -> TrainResult:
        t = self.config.train
        result = TrainResult(start_step=self.start_step)
        # A stop request (SLURM's time-limit warning, scancel, preemption, Ctrl-C) ends
        # the run after the current step with a checkpoint; every rank decides together.
        preemption = PreemptionHandler(
            (*STOP_SIGNALS, signal.SIGINT), device=self.env.device.type
        ).install()
        watchdog = (
            Watchdog(multiple=t.watchdog_multiple, min_timeout_s=t.watchdog_min_timeout_s)
            if t.watchdog_multiple > 0
            else None
        )
        self.started = self.window_start = time.perf_counter()
        self.window_steps = 0
        try:
            for step in range(self.start_step, t.max_steps):
                lr = learning_rate(step, self.config.optim, t.max_steps)
                done = step + 1
                with watchdog.step() if watchdog else contextlib.nullcontext():
                    outcome = self._step(step, lr)
                    stop = preemption.should_stop(done)
                if outcome is None:
                    result.skipped_steps.append(done)
                else:
                    self._after_step(done, *outcome, lr, result)
                if result.stop_reason is not None:
                    break
                if stop:
                    if self.checkpointer.last_step != done:
                        self._save(done, result.losses[-1] if result.losses else math.nan, lr)
                    result.preempted = True
                    result.stop_signal = preemption.decided.name
                    if result.stop_signal == "SIGINT":
                        log.warning(
                            "step %d | interrupted (Ctrl-C): checkpoint saved; continue with "
                            "checkpoint.resume=auto",
                            done,
                        )
                    else:
                        log.warning(
                            "step %d | stopped on request after saving a checkpoint; "
                            "exit code %d asks the launcher to requeue",
                            done,
                            REQUEUE_EXIT_CODE,
                        )
                    break
            result.checkpoint = self.checkpointer.wait()
        except NonFiniteLossError:
            self.checkpointer.wait()  # the save in flight is the last good state
            raise
        finally:
            if watchdog is not None:
                watchdog.close()
            if not result.preempted:  # keep ignoring late copies of the stop signal
                preemption.uninstall()
            self.sink.close()
        return result

    def _after_step(
        self, done: int, loss: float, grad_norm: float, lr: float, result: TrainResult
    ) -> None:
        t = self.config.train
        if not result.memory:
            result.memory = memory_bytes(self.module)
            log_module_memory("after the first step", self.module)
            if self.plan is not None:
                pp_rank = self.module.mesh.get_local_rank("pp")
                planned = self.plan.memory[pp_rank]
                log_memory("as planned", {k: planned[k] for k in result.memory})
        self.module.zero_grad()
        result.losses.append(loss)
        self.overfitting.add_train_loss(loss)
        self.window_steps += 1
        is_last = done == t.max_steps
        metrics = self.evaluations.at_step(self.module, done, is_last, result)
        if (
            metrics
            or done % self.config.logging.log_interval == 0
            or (len(result.losses) == 1 or is_last)
        ):
            self._log(done, loss, lr, grad_norm, metrics)
        if metrics:
            self.overfitting.check_metrics(metrics)
        if metrics:
            result.stop_reason = self.evaluations.ask_hooks(done, metrics)
        interval = self.config.checkpoint.interval
        stopping = result.stop_reason is not None
        best = saves_as_best(self.checkpointer, self.env, metrics)
        if is_last or stopping or best or (interval and done % interval == 0):
            self._save(done, loss, lr, metrics)
        if stopping:
            log.warning("step %d | stopping: %s", done, result.stop_reason)

    def _step(self, step: int, lr: float) -> tuple[float, float] | None:
        """One optimizer step; (loss, grad norm), or None if it was skipped as non-finite."""
        t, module = self.config.train, self.module
        indices = microbatch_indices(step, module, self.config, self.sample_offset)
        seeds = [dropout_seed(t.seed, int(i[0])) for i in indices]
        batches = step_batches(self.datasets.train, step, module, self.config, self.sample_offset)
        loss = module.global_mean(module.train_step(batches, seeds))
        scale = module.loss_scale  # the scale this step ran at (None: not fp16)
        self.checkpointer.before_update()  # a save may still be reading the weights
        grad_norm = module.update(lr, self.config.optim.grad_clip)
        if math.isfinite(loss) and math.isfinite(grad_norm):
            return loss, grad_norm
        # Loss and norm are global, so every rank takes the same branch. A non-finite
        # norm means `update` applied nothing; a non-finite loss alone does not stop it.
        applied = math.isfinite(grad_norm)
        if self._is_overflow(loss, grad_norm, scale):
            self.overflow_skips += 1
            log.info(
                "step %d: fp16 gradients overflowed at loss scale %g; step skipped, scale "
                "now %g (%d overflow skips so far)",
                step + 1,
                scale,
                module.loss_scale,
                self.overflow_skips,
            )
            return None
        if self.nan_skips < t.max_nan_skips:
            self.nan_skips += 1
            module.zero_grad()
            log.warning(
                "step %d: loss %s, gradient norm %s; %s (%d of train.max_nan_skips = %d)",
                step + 1,
                loss,
                grad_norm,
                "update applied, loss not counted" if applied else "skipped without an update",
                self.nan_skips,
                t.max_nan_skips,
            )
            return None
        raise NonFiniteLossError(
            f"step {step + 1}: loss is {loss}, gradient norm {grad_norm}; stopped "
            f"{'after' if applied else 'before'} the update, and nothing from this step was "
            "saved. Lower optim.lr, raise optim.warmup_steps, or check the data"
            + (
                f" ({self.nan_skips} earlier steps were skipped, train.max_nan_skips)."
                if t.max_nan_skips
                else "; train.max_nan_skips lets a few steps be skipped."
            )
        )

    def _is_overflow(self, loss: float, grad_norm: float, scale: float | None) -> bool:
        """A non-finite step that fp16 loss scaling explains, and handles by backing off:
        the gradients overflowed (their norm is infinite, or NaN from a finite loss),
        at a scale above train.loss_scale.min_scale. At the floor, or with a NaN loss,
        the run itself has gone wrong and train.max_nan_skips applies."""
        if scale is None or scale <= self.config.train.loss_scale.min_scale:
            return False
        return math.isfinite(loss) or math.isinf(grad_norm)

    def _log(self, done: int, loss: float, lr: float, grad_norm: float, metrics: dict) -> None:
        t, device = self.config.train, self.env.device
        now = time.perf_counter()
        elapsed = now - self.window_start
        tokens_per_s = self.window_steps * self.tokens_per_step / elapsed
        mfu = self._mfu(self.window_steps * self.step_flops / elapsed)
        eta = (now - self.started) / (done - self.start_step) * (t.max_steps - done)
        # Written beside the evaluation's `metrics`, not into them: the caller hands
        # those to evaluation hooks and checkpoint.keep_best afterwards.
        extra = {}
        if device.type == "cuda":
            extra["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        load = self.module.expert_load()  # mixture-of-experts balance, per layer
        extra.update(load)
        loads = [v for k, v in load.items() if k.endswith("/max_load")]
        balance = f" | expert load max/mean {max(loads):.2f}" if loads else ""
        scaling = balance
        if self.module.loss_scale is not None:
            extra.update(loss_scale=self.module.loss_scale, overflow_skips=self.overflow_skips)
            scaling += f" | loss scale {self.module.loss_scale:g} ({self.overflow_skips} overflows)"
        log.info(
            "step %d/%d | loss %.4f | lr %.2e | grad_norm %.3f%s | %s tok/s | MFU %s%.1f%% | "
            "elapsed %s | ETA %s",
            done,
            t.max_steps,
            loss,
            lr,
            grad_norm,
            scaling,
            format_rate(tokens_per_s),
            "~" if self.peak.measured else "",
            100 * mfu,
            format_duration(now - self.started),
            format_duration(eta),
        )
        self.sink.write(
            done,
            {
                "loss": loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_s": tokens_per_s,
                "mfu": mfu,
                **extra,
                **metrics,
            },
        )
        self.window_start, self.window_steps = time.perf_counter(), 0

    def _mfu(self, achieved_flops: float) -> float:
        """Model FLOPs utilization of all ranks, at most 1. A peak measured at start-up
        (CPU) can come out low, on a machine busy at that moment; a rate above it shows
        the true peak is at least that rate, which is then used from here on."""
        if achieved_flops > self.peak_flops:
            log.warning(
                "achieved %s TFLOP/s per device, above the %s peak of %s; MFU is measured "
                "against the achieved rate from now on (set logging.peak_tflops to fix it)",
                f"{achieved_flops / self.env.world_size / 1e12:.3g}",
                self.peak.source,
                f"{self.peak_flops / self.env.world_size / 1e12:.3g}",
            )
            self.peak_flops = achieved_flops
        return achieved_flops / self.peak_flops

    def _save(self, done: int, loss: float, lr: float, metrics: dict | None = None) -> None:
        t, p, dims = self.config.train, self.config.parallel, self.module.dims
        consumed = self.sample_offset + done * t.global_batch_size
        layout = {
            "tensor": dims.tp,
            "pipeline": dims.pp,
            "data": dims.dp,
            "context": dims.cp,
            "zero_stage": dims.zero_stage,
            "virtual_stages": p.virtual_stages,
        }
        self.checkpointer.save(
            done,
            {
                "consumed_samples": consumed,
                "consumed_tokens": consumed * self.config.data.seq_len,
                "loss": loss,
                "lr": lr,
                "world_size": self.env.world_size,
                "layout": layout,
                "nan_skips": self.nan_skips,
                "overflow_skips": self.overflow_skips,
                "loss_scale": self.module.loss_scale_state(),  # None: not fp16
                **({"metrics": dict(metrics)} if metrics else {}),  # for checkpoint.keep_best
                **self.overfitting.state(),  # the gap's window, early stopping's record
            },
        )


def _check_tokenizer(config: Config) -> None:
    if config.data.tokenizer:
        vocab = Tokenizer(config.data.tokenizer).vocab_size
        if vocab > config.model.vocab_size:
            raise ConfigError(
                f"model.vocab_size = {config.model.vocab_size} is smaller than "
                f"the tokenizer's {vocab} ids ({config.data.tokenizer})"
            )
