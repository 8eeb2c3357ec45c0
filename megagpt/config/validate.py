"""Checks that a Config's values fit together, with errors that say what would work.

`validate_config` runs one check per section, then the layout checks that need no
world size; `validate_world_size` adds those that do, once the number of processes is
known. The syntax of data.path and data.split belongs to the data layer
(`megagpt.data.check_data_config`), which reads them.
"""

from __future__ import annotations

import importlib.util
import math

from megagpt.config.errors import ConfigError
from megagpt.config.schema import (
    LORA_TARGETS,
    CheckpointConfig,
    Config,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
)


def _check(ok: bool, key: str, value: object, requirement: str) -> None:
    if not ok:
        raise ConfigError(f"{key} = {value!r}: {requirement}")


def _positive(section: object, prefix: str, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        _check(value >= 1, f"{prefix}.{name}", value, "must be at least 1")


def _at_least_zero(section: object, prefix: str, **meanings: str) -> None:
    """Each named field must be >= 0; the keyword's value says what 0 means."""
    for name, zero_means in meanings.items():
        value = getattr(section, name)
        note = f" ({zero_means})" if zero_means else ""
        _check(value >= 0, f"{prefix}.{name}", value, f"must be >= 0{note}")


def _divisors_near(n: int, target: int, count: int = 4) -> str:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    divisors.sort(key=lambda d: (abs(d - target), d))
    return ", ".join(str(d) for d in sorted(divisors[:count]))


def validate_config(config: Config) -> None:
    """Raise ConfigError for the first inconsistent value."""
    validate_model(config.model)
    # A fine-tune's model comes from finetune.init: its context is checked once known.
    validate_data(config.data, config.model, model_known=not config.finetune.init)
    validate_optim(config.optim)
    validate_train(config.train)
    validate_checkpoint(config.checkpoint)
    validate_logging(config.logging)
    validate_parallel(config)
    validate_lora(config)
    validate_overfitting_controls(config)


def validate_model(m: ModelConfig) -> None:
    _positive(m, "model", "vocab_size", "pad_vocab_size_to_multiple_of", "max_seq_len")
    _positive(m, "model", "n_layers", "hidden_size", "n_heads")
    _check(
        m.hidden_size % m.n_heads == 0,
        "model.n_heads",
        m.n_heads,
        f"must divide model.hidden_size ({m.hidden_size}); "
        f"head counts that do: {_divisors_near(m.hidden_size, m.n_heads)}",
    )
    if m.n_kv_heads is not None:
        _check(
            m.n_kv_heads >= 1 and m.n_heads % m.n_kv_heads == 0,
            "model.n_kv_heads",
            m.n_kv_heads,
            f"must divide model.n_heads ({m.n_heads}); "
            f"values that do: {_divisors_near(m.n_heads, m.n_kv_heads)}",
        )
    if m.position_embedding == "rope":
        _check(
            m.head_dim % 2 == 0,
            "model.position_embedding",
            "rope",
            f"needs an even head size, but hidden_size/n_heads = {m.head_dim}",
        )
    if m.ffn_hidden_size is not None:
        _check(m.ffn_hidden_size >= 1, "model.ffn_hidden_size", m.ffn_hidden_size, "must be >= 1")
    for name in ("dropout", "attention_dropout"):
        value = getattr(m, name)
        _check(0.0 <= value < 1.0, f"model.{name}", value, "must be in [0, 1)")
    _check(m.norm_eps > 0, "model.norm_eps", m.norm_eps, "must be positive")
    _check(m.init_std > 0, "model.init_std", m.init_std, "must be positive")
    validate_moe(m)


def validate_moe(m: ModelConfig) -> None:
    """The mixture-of-experts settings (nothing to check while num_experts is 0)."""
    e = m.moe
    _check(e.num_experts >= 0, "model.moe.num_experts", e.num_experts, "must be >= 0 (0: dense)")
    if e.num_experts == 0:
        return
    _check(
        1 <= e.top_k <= e.num_experts,
        "model.moe.top_k",
        e.top_k,
        f"must be between 1 and model.moe.num_experts ({e.num_experts})",
    )
    _at_least_zero(e, "model.moe", shared_experts="none", aux_loss_coeff="off", z_loss_coeff="off")
    _at_least_zero(e, "model.moe", bias_update_rate="no auxiliary-loss-free balancing")
    _check(
        1 <= e.every_n_layers <= m.n_layers,
        "model.moe.every_n_layers",
        e.every_n_layers,
        f"must be between 1 (every layer) and model.n_layers ({m.n_layers}), or no layer "
        "would have experts",
    )
    # torch._grouped_mm needs rows aligned to 16 bytes: 8 bf16 (or 4 fp32) values.
    if e.expert_width is not None:
        _check(e.expert_width >= 1, "model.moe.expert_width", e.expert_width, "must be >= 1")
    for key, width in (
        ("model.hidden_size", m.hidden_size),
        ("model.moe.expert_width", m.expert_width),
    ):
        _check(
            width % 8 == 0,
            key,
            width,
            f"must be a multiple of 8 with model.moe.num_experts > 0 (the grouped matmul of "
            f"the experts needs 16-byte aligned rows; an unset expert_width is the MLP's "
            f"width); e.g. {8 * -(-width // 8)}",
        )


def validate_data(d: DataConfig, m: ModelConfig, model_known: bool = True) -> None:
    _positive(d, "data", "seq_len")
    _check(
        not model_known or d.seq_len <= m.max_seq_len,
        "data.seq_len",
        d.seq_len,
        f"must not exceed model.max_seq_len ({m.max_seq_len})",
    )
    _check(
        d.max_epochs is None or d.max_epochs > 0,
        "data.max_epochs",
        d.max_epochs,
        "must be positive, or null to read the data any number of times without a warning",
    )


def validate_optim(o: OptimConfig) -> None:
    _check(o.lr > 0, "optim.lr", o.lr, "must be positive")
    _check(0 <= o.min_lr <= o.lr, "optim.min_lr", o.min_lr, f"must be in [0, optim.lr={o.lr}]")
    _at_least_zero(o, "optim", weight_decay="", grad_clip="0 disables", warmup_steps="")
    for name in ("beta1", "beta2"):
        value = getattr(o, name)
        _check(0 <= value < 1, f"optim.{name}", value, "must be in [0, 1)")
    _check(o.eps > 0, "optim.eps", o.eps, "must be positive")
    if o.decay_steps is not None:
        _check(o.decay_steps >= 1, "optim.decay_steps", o.decay_steps, "must be >= 1 or null")
    _check(
        0 < o.wsd_decay_fraction <= 1,
        "optim.wsd_decay_fraction",
        o.wsd_decay_fraction,
        "must be in (0, 1]",
    )


def validate_train(t: TrainConfig) -> None:
    _positive(t, "train", "max_steps", "global_batch_size", "micro_batch_size", "eval_iters")
    if t.epochs is not None:
        _check(t.epochs > 0, "train.epochs", t.epochs, "must be positive, or null for max_steps")
    _check(
        t.global_batch_size % t.micro_batch_size == 0,
        "train.global_batch_size",
        t.global_batch_size,
        f"must be a multiple of train.micro_batch_size ({t.micro_batch_size})",
    )
    _at_least_zero(
        t, "train", eval_interval="", max_nan_skips="", watchdog_multiple="0 disables the watchdog"
    )
    _check(
        t.watchdog_min_timeout_s > 0,
        "train.watchdog_min_timeout_s",
        t.watchdog_min_timeout_s,
        "must be positive",
    )
    scale = t.loss_scale
    _check(
        scale.initial_scale >= scale.min_scale > 0,
        "train.loss_scale.initial_scale",
        scale.initial_scale,
        f"must be at least train.loss_scale.min_scale ({scale.min_scale}), which must be > 0",
    )
    _check(
        0 < scale.backoff_factor < 1,
        "train.loss_scale.backoff_factor",
        scale.backoff_factor,
        "must be between 0 and 1 (0.5 halves the scale at an overflow)",
    )
    _positive(scale, "train.loss_scale", "growth_interval", "hysteresis")
    timeout = t.collective_timeout_s
    _check(
        timeout is None or timeout > 0,
        "train.collective_timeout_s",
        timeout,
        "must be a positive number of seconds, or null",
    )


def validate_checkpoint(c: CheckpointConfig) -> None:
    _at_least_zero(
        c,
        "checkpoint",
        interval="0 saves only at the end",
        keep_last="0 keeps all",
        keep_every="0 keeps no extra checkpoints",
    )
    _check(
        bool(c.resume.strip()),
        "checkpoint.resume",
        c.resume,
        "must be none, auto, or the path of a checkpoint directory",
    )


def validate_logging(log: LoggingConfig) -> None:
    _positive(log, "logging", "log_interval")
    peak = log.peak_tflops
    _check(peak is None or peak > 0, "logging.peak_tflops", peak, "must be positive or null")
    _check_wandb(log)


def _check_wandb(log: LoggingConfig) -> None:
    """W&B's package is optional: say so before a run starts, not at its first log."""
    if not log.wandb:
        return
    _check(bool(log.wandb_project.strip()), "logging.wandb_project", log.wandb_project, "is empty")
    if importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            "logging.wandb = true needs the wandb package: pip install 'megagpt[wandb]' "
            "(or set logging.wandb=false)"
        )


def validate_parallel(config: Config) -> None:
    """Layout checks that need no world size (see validate_world_size for those)."""
    p, m = config.parallel, config.model
    _positive(p, "parallel", "tensor_parallel_size", "pipeline_parallel_size", "virtual_stages")
    dp = p.data_parallel_size
    _check(dp is None or dp >= 1, "parallel.data_parallel_size", dp, "must be >= 1 or null")
    _check(
        p.zero_stage in (0, 1, 2, 3),
        "parallel.zero_stage",
        p.zero_stage,
        "must be 0 (plain data parallel), 1, 2 or 3",
    )
    _check_engine(config)
    _check_context_parallel(config)
    _check_expert_parallel(config)
    _check_fp8(config)
    tp = p.tensor_parallel_size
    for count, what in (
        (m.n_heads, f"model.n_heads ({m.n_heads})"),
        (m.kv_heads, f"the key/value heads ({m.kv_heads})"),
        (m.mlp_width, f"the MLP width ({m.mlp_width})"),
    ):
        if count % tp == 0:
            continue  # (the hint below lists divisors: only worth computing on failure)
        _check(
            False,
            "parallel.tensor_parallel_size",
            tp,
            f"must divide {what}; sizes that do: {_divisors_near(count, tp)}",
        )
    _check(
        m.padded_vocab_size % tp == 0,
        "parallel.tensor_parallel_size",
        tp,
        f"must divide the vocabulary ({m.padded_vocab_size}); set "
        f"model.pad_vocab_size_to_multiple_of to a multiple of {tp} (e.g. {128 * tp}, "
        "which is also fast on GPUs)",
    )
    if p.sequence_parallel:
        _check(
            tp > 1, "parallel.sequence_parallel", True, "needs parallel.tensor_parallel_size > 1"
        )
        _check(
            config.data.seq_len % tp == 0,
            "data.seq_len",
            config.data.seq_len,
            f"must be divisible by parallel.tensor_parallel_size ({tp}) with "
            "parallel.sequence_parallel",
        )
    stages = p.pipeline_parallel_size * p.virtual_stages
    _check(
        stages <= m.n_layers,
        "parallel.pipeline_parallel_size",
        p.pipeline_parallel_size,
        f"with parallel.virtual_stages = {p.virtual_stages} makes {stages} pipeline stages, "
        f"more than the model's {m.n_layers} layers (model.n_layers); every stage needs "
        "at least one layer",
    )
    if p.pipeline_schedule in ("interleaved_1f1b", "zero_bubble"):
        _check(
            p.virtual_stages >= 2,
            "parallel.virtual_stages",
            p.virtual_stages,
            f"must be at least 2 with parallel.pipeline_schedule={p.pipeline_schedule!r}",
        )
    else:
        _check(
            p.virtual_stages == 1,
            "parallel.virtual_stages",
            p.virtual_stages,
            f"must be 1 with parallel.pipeline_schedule={p.pipeline_schedule!r}; "
            "use interleaved_1f1b or zero_bubble for several stages per rank",
        )


def _check_context_parallel(config: Config) -> None:
    """What context parallelism supports: plain causal text, split in 2 x cp chunks
    (packed fine-tuning examples are refused when their batches arrive, see
    megagpt.parallel.batches)."""
    p, m = config.parallel, config.model
    cp, key = p.context_parallel_size, "parallel.context_parallel_size"
    _check(cp >= 1, key, cp, "must be >= 1 (1: no context parallelism)")
    if cp == 1:
        return
    _check(
        config.data.seq_len % (2 * cp) == 0,
        "data.seq_len",
        config.data.seq_len,
        f"must be a multiple of 2 x parallel.context_parallel_size = {2 * cp} (each "
        "context-parallel rank holds a head and a tail chunk of every sequence)",
    )
    for ok, requirement in (
        (p.engine == "native", "needs parallel.engine=native (DeepSpeed has no ring attention)"),
        (
            m.attention_dropout == 0,
            f"needs model.attention_dropout = 0 (it is {m.attention_dropout}): the ring "
            "computes attention block by block",
        ),
        (
            not m.num_labels,
            "does not train classifiers (model.num_labels > 0); use "
            "parallel.context_parallel_size=1 for fine-tuning",
        ),
        (
            p.activation_checkpointing != "selective",
            "does not work with parallel.activation_checkpointing=selective (its cached "
            "attention outputs are merged in place by the ring); use full or none",
        ),
        (
            not config.eval.tasks,
            "does not score eval.tasks during training; score the checkpoint afterwards "
            "(megagpt eval) or set parallel.context_parallel_size=1",
        ),
    ):
        _check(ok, key, cp, requirement)


def _check_engine(config: Config) -> None:
    """Offload and engine settings that fit together (the NVMe directory itself is
    checked when the engine starts, on the machine that trains)."""
    p = config.parallel
    if p.engine == "deepspeed":
        for name, size in (
            ("tensor_parallel_size", p.tensor_parallel_size),
            ("pipeline_parallel_size", p.pipeline_parallel_size),
        ):
            _check(
                size == 1,
                f"parallel.{name}",
                size,
                "must be 1 with parallel.engine=deepspeed (data parallel and ZeRO only); "
                "use parallel.engine=native for tensor and pipeline parallelism, which "
                "offloads to CPU too (parallel.offload_optimizer=cpu)",
            )
        _check(
            p.zero_stage >= 1,
            "parallel.zero_stage",
            p.zero_stage,
            "must be 1, 2 or 3 with parallel.engine=deepspeed (plain data parallelism is "
            "the native engine's: parallel.engine=native)",
        )
        _check(
            not config.finetune.lora.rank,
            "finetune.lora.rank",
            config.finetune.lora.rank,
            "LoRA fine-tunes on the native engine (parallel.engine=native)",
        )
        _check(
            p.offload_optimizer == "none" or p.zero_stage >= 1,
            "parallel.offload_optimizer",
            p.offload_optimizer,
            "needs parallel.zero_stage 1, 2 or 3 on the deepspeed engine",
        )
        _check(
            p.offload_optimizer != "nvme" or p.zero_stage == 3,
            "parallel.offload_optimizer",
            p.offload_optimizer,
            "nvme needs parallel.zero_stage=3 (DeepSpeed's ZeRO-1/2 would keep the optimizer "
            "in host memory instead); use cpu at stages 1-2",
        )
        _check(
            p.offload_params == "none" or p.zero_stage == 3,
            "parallel.offload_params",
            p.offload_params,
            "needs parallel.zero_stage = 3 on the deepspeed engine (only ZeRO-3 partitions "
            "the parameters); or offload the optimizer alone (parallel.offload_optimizer)",
        )
        _check(
            "nvme" not in (p.offload_optimizer, p.offload_params) or bool(p.nvme_path),
            "parallel.nvme_path",
            p.nvme_path,
            "must name a directory on a local NVMe drive for nvme offload",
        )
        scale = config.train.loss_scale
        if config.train.precision == "fp16":
            _check(
                scale.backoff_factor == 0.5,
                "train.loss_scale.backoff_factor",
                scale.backoff_factor,
                "must be 0.5 with parallel.engine=deepspeed (DeepSpeed halves its scale)",
            )
            power = round(math.log2(scale.initial_scale))
            _check(
                2.0**power == scale.initial_scale,
                "train.loss_scale.initial_scale",
                scale.initial_scale,
                f"must be a power of two with parallel.engine=deepspeed (e.g. {2.0**power:g})",
            )
        _check(
            not config.train.compile,
            "train.compile",
            True,
            "is not supported with parallel.engine=deepspeed; use the native engine",
        )
    else:
        for name in ("offload_optimizer", "offload_params"):
            value = getattr(p, name)
            _check(
                value != "nvme",
                f"parallel.{name}",
                value,
                "nvme offload needs parallel.engine=deepspeed (with the deepspeed extra); "
                "the native engine offloads to cpu",
            )


def _check_fp8(config: Config) -> None:
    """FP8 runs on bf16 autocast of the native engine (any layout: torchao scales a
    sharded weight by the amax of the whole DTensor)."""
    t, p = config.train, config.parallel
    if t.fp8 == "none":
        return
    _check(
        t.precision in ("bf16", "auto"),
        "train.precision",
        t.precision,
        f"must be bf16 (or auto on a GPU) with train.fp8={t.fp8}: fp8 replaces the "
        "blocks' bf16 matmuls and the rest computes in bf16; or set train.fp8=none",
    )
    _check(
        p.engine == "native",
        "train.fp8",
        t.fp8,
        "needs parallel.engine=native (the DeepSpeed engine builds its own modules); "
        "or set train.fp8=none",
    )


def _check_expert_parallel(config: Config) -> None:
    ep, experts = config.parallel.expert_parallel_size, config.model.moe.num_experts
    key = "parallel.expert_parallel_size"
    _check(ep >= 1, key, ep, "must be >= 1")
    if ep == 1:
        return
    _check(experts > 0, key, ep, "needs mixture-of-experts layers (model.moe.num_experts > 0)")
    _check(
        experts % ep == 0,
        key,
        ep,
        f"must divide model.moe.num_experts ({experts}); sizes that do: "
        f"{_divisors_near(experts, ep)}",
    )
    _check(
        config.parallel.engine == "native",
        key,
        ep,
        "needs parallel.engine=native (DeepSpeed's engine has no expert parallelism here)",
    )


def _check_expert_ranks(config: Config, dp: int) -> None:
    """Expert-parallel ranks come out of the ranks that shard parameters."""
    p = config.parallel
    ep, cp = p.expert_parallel_size, p.context_parallel_size
    sharding = (dp if p.zero_stage > 0 else 1) * cp
    if sharding % ep:
        raise ConfigError(
            f"parallel.expert_parallel_size = {ep} must divide the ranks that shard "
            f"parameters, {sharding} here (data-parallel ranks, {dp}, count only at "
            f"parallel.zero_stage >= 1; times parallel.context_parallel_size, {cp}); e.g. "
            f"parallel.zero_stage=1 with a data-parallel size that is a multiple of {ep}"
        )


def validate_world_size(config: Config, world_size: int) -> int:
    """The data-parallel size for `world_size` processes, or a ConfigError saying what
    would work (the layout checks that need the number of processes)."""
    p, t = config.parallel, config.train
    tp, pp, cp = p.tensor_parallel_size, p.pipeline_parallel_size, p.context_parallel_size
    model_ranks = tp * pp * cp
    if world_size % model_ranks:
        with_cp = " x parallel.context_parallel_size" if cp > 1 else ""
        sizes = f"{tp} x {pp}" + (f" x {cp}" if cp > 1 else "")
        raise ConfigError(
            f"parallel.tensor_parallel_size x parallel.pipeline_parallel_size{with_cp} = "
            f"{sizes} = {model_ranks} does not divide the number of processes "
            f"({world_size}); choose sizes whose product divides {world_size}"
        )
    dp = world_size // model_ranks
    if p.data_parallel_size is not None and p.data_parallel_size != dp:
        context = f" x context {cp}" if cp > 1 else ""
        raise ConfigError(
            f"parallel.data_parallel_size = {p.data_parallel_size}: {world_size} processes "
            f"/ (tensor {tp} x pipeline {pp}{context}) leave {dp}; set it to {dp} or leave "
            "it null"
        )
    per_pass = t.micro_batch_size * dp
    if t.global_batch_size % per_pass:
        raise ConfigError(
            f"train.global_batch_size = {t.global_batch_size}: must be a multiple of "
            f"train.micro_batch_size x data-parallel size ({t.micro_batch_size} x {dp} = "
            f"{per_pass})"
        )
    _check_pipeline_microbatches(p.pipeline_schedule, pp, t.global_batch_size // per_pass, per_pass)
    if p.expert_parallel_size > 1:
        _check_expert_ranks(config, dp)
    return dp


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


def validate_lora(config: Config) -> None:
    """finetune.lora: adapters need base weights to adapt (finetune.init). The rank is
    never split by tensor parallelism (see megagpt.parallel.lora), so it need not
    divide anything."""
    lora = config.finetune.lora
    _check(lora.rank >= 0, "finetune.lora.rank", lora.rank, "must be >= 0 (0 turns LoRA off)")
    if lora.rank == 0:
        return
    _check(lora.alpha > 0, "finetune.lora.alpha", lora.alpha, "must be positive")
    _check(0.0 <= lora.dropout < 1.0, "finetune.lora.dropout", lora.dropout, "must be in [0, 1)")
    unknown = [t for t in lora.targets if t not in LORA_TARGETS]
    _check(
        not unknown and bool(lora.targets),
        "finetune.lora.targets",
        lora.targets,
        f"{'names unknown projections ' + ', '.join(unknown) if unknown else 'is empty'}; "
        f"choose among {', '.join(LORA_TARGETS)}",
    )
    _check(
        bool(config.finetune.init),
        "finetune.lora.rank",
        lora.rank,
        "needs finetune.init: LoRA adapts pretrained weights, which stay frozen "
        "(finetune.init=runs/pretrain), or set finetune.lora.rank=0 to train every weight",
    )


def validate_overfitting_controls(config: Config) -> None:
    """train.early_stopping and checkpoint.keep_best watch evaluation metrics, so they
    need evaluations (whether the metric exists is known once the data is: see
    megagpt.training.overfitting)."""
    stopping, t = config.train.early_stopping, config.train
    _check(
        stopping.patience >= 0,
        "train.early_stopping.patience",
        stopping.patience,
        "must be >= 0 (0 turns early stopping off)",
    )
    _check(
        stopping.min_delta >= 0,
        "train.early_stopping.min_delta",
        stopping.min_delta,
        "must be >= 0",
    )
    _check(
        bool(stopping.metric.strip()),
        "train.early_stopping.metric",
        stopping.metric,
        "must name an evaluation metric, e.g. val_loss",
    )
    keep_best = config.checkpoint.keep_best
    _check(
        keep_best is None or bool(keep_best.strip()),
        "checkpoint.keep_best",
        keep_best,
        "must name an evaluation metric (e.g. val_loss), or be null",
    )
    watched = (
        ("train.early_stopping.patience", stopping.patience, stopping.patience and stopping.metric),
        ("checkpoint.keep_best", keep_best, keep_best),
    )
    for key, value, metric in watched:
        if not metric:
            continue
        by_tasks = metric.startswith("eval/") and bool(config.eval.interval)  # own schedule
        _check(
            t.eval_interval > 0 or by_tasks,
            key,
            value,
            "needs evaluations: set train.eval_interval to a positive number of steps",
        )
