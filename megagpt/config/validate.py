"""Checks that a Config's values fit together, with errors that say what would work."""

from __future__ import annotations

from megagpt.config.errors import ConfigError
from megagpt.config.schema import Config


def _check(ok: bool, key: str, value: object, requirement: str) -> None:
    if not ok:
        raise ConfigError(f"{key} = {value!r}: {requirement}")


def _positive(section: object, prefix: str, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        _check(value >= 1, f"{prefix}.{name}", value, "must be at least 1")


def _divisors_near(n: int, target: int, count: int = 4) -> str:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    divisors.sort(key=lambda d: (abs(d - target), d))
    return ", ".join(str(d) for d in sorted(divisors[:count]))


def validate_config(config: Config) -> None:
    """Raise ConfigError for the first inconsistent value; layout checks that need the
    world size live in `validate_world_size`."""
    m, d, o, t = config.model, config.data, config.optim, config.train
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
        head_dim = m.hidden_size // m.n_heads
        _check(
            head_dim % 2 == 0,
            "model.position_embedding",
            "rope",
            f"needs an even head size, but hidden_size/n_heads = {head_dim}",
        )
    if m.ffn_hidden_size is not None:
        _check(m.ffn_hidden_size >= 1, "model.ffn_hidden_size", m.ffn_hidden_size, "must be >= 1")
    for name in ("dropout", "attention_dropout"):
        value = getattr(m, name)
        _check(0.0 <= value < 1.0, f"model.{name}", value, "must be in [0, 1)")
    _check(m.norm_eps > 0, "model.norm_eps", m.norm_eps, "must be positive")
    _check(m.init_std > 0, "model.init_std", m.init_std, "must be positive")

    _positive(d, "data", "seq_len")
    _check(
        d.seq_len <= m.max_seq_len,
        "data.seq_len",
        d.seq_len,
        f"must not exceed model.max_seq_len ({m.max_seq_len})",
    )
    parse_split(d.split)
    from megagpt.data.blend import parse_data_path  # data does not import config

    parse_data_path(d.path)

    _check(o.lr > 0, "optim.lr", o.lr, "must be positive")
    _check(0 <= o.min_lr <= o.lr, "optim.min_lr", o.min_lr, f"must be in [0, optim.lr={o.lr}]")
    _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    for name in ("beta1", "beta2"):
        value = getattr(o, name)
        _check(0 <= value < 1, f"optim.{name}", value, "must be in [0, 1)")
    _check(o.eps > 0, "optim.eps", o.eps, "must be positive")
    _check(o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, "must be >= 0 (0 disables)")
    _check(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "must be >= 0")
    if o.decay_steps is not None:
        _check(o.decay_steps >= 1, "optim.decay_steps", o.decay_steps, "must be >= 1 or null")
    _check(
        0 < o.wsd_decay_fraction <= 1,
        "optim.wsd_decay_fraction",
        o.wsd_decay_fraction,
        "must be in (0, 1]",
    )

    _positive(t, "train", "max_steps", "global_batch_size", "micro_batch_size", "eval_iters")
    _check(
        t.global_batch_size % t.micro_batch_size == 0,
        "train.global_batch_size",
        t.global_batch_size,
        f"must be a multiple of train.micro_batch_size ({t.micro_batch_size})",
    )
    _check(t.eval_interval >= 0, "train.eval_interval", t.eval_interval, "must be >= 0")
    _check(t.max_nan_skips >= 0, "train.max_nan_skips", t.max_nan_skips, "must be >= 0")
    _check(
        t.watchdog_multiple >= 0,
        "train.watchdog_multiple",
        t.watchdog_multiple,
        "must be >= 0 (0 disables the watchdog)",
    )
    _check(
        t.watchdog_min_timeout_s > 0,
        "train.watchdog_min_timeout_s",
        t.watchdog_min_timeout_s,
        "must be positive",
    )
    timeout = t.collective_timeout_s
    _check(
        timeout is None or timeout > 0,
        "train.collective_timeout_s",
        timeout,
        "must be a positive number of seconds, or null",
    )
    _check(
        config.checkpoint.interval >= 0,
        "checkpoint.interval",
        config.checkpoint.interval,
        "must be >= 0 (0 saves only at the end)",
    )
    _check(
        config.checkpoint.keep_last >= 0,
        "checkpoint.keep_last",
        config.checkpoint.keep_last,
        "must be >= 0 (0 keeps all)",
    )
    _check(
        config.checkpoint.keep_every >= 0,
        "checkpoint.keep_every",
        config.checkpoint.keep_every,
        "must be >= 0 (0 keeps no extra checkpoints)",
    )
    resume = config.checkpoint.resume
    _check(
        bool(resume.strip()),
        "checkpoint.resume",
        resume,
        "must be none, auto, or the path of a checkpoint directory",
    )
    _positive(config.logging, "logging", "log_interval")
    peak = config.logging.peak_tflops
    _check(peak is None or peak > 0, "logging.peak_tflops", peak, "must be positive or null")
    _validate_parallel(config)


def _validate_parallel(config: Config) -> None:
    """Layout checks that need no world size (see ParallelDims.from_config for those)."""
    from megagpt.model.gpt import ffn_hidden_size, padded_vocab_size

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
    tp = p.tensor_parallel_size
    kv_heads = m.n_kv_heads or m.n_heads
    vocab = padded_vocab_size(m)
    for count, what in (
        (m.n_heads, f"model.n_heads ({m.n_heads})"),
        (kv_heads, f"the key/value heads ({kv_heads})"),
        (ffn_hidden_size(m), f"the MLP width ({ffn_hidden_size(m)})"),
    ):
        _check(
            count % tp == 0,
            "parallel.tensor_parallel_size",
            tp,
            f"must divide {what}; sizes that do: {_divisors_near(count, tp)}",
        )
    _check(
        vocab % tp == 0,
        "parallel.tensor_parallel_size",
        tp,
        f"must divide the vocabulary ({vocab}); set model.pad_vocab_size_to_multiple_of "
        f"to a multiple of {tp} (e.g. {128 * tp}, which is also fast on GPUs)",
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


def parse_split(split: str) -> tuple[float, float, float]:
    """Parse "969,30,1" into normalized train/validation/test fractions."""
    parts = [p.strip() for p in split.replace("/", ",").split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) == 2:
        values.append(0.0)
    if len(values) != 3 or min(values) < 0 or values[0] <= 0:
        raise ConfigError(
            f"data.split = {split!r}: expected three non-negative weights for train, "
            "validation and test with a positive train weight, e.g. '969,30,1'"
        )
    total = sum(values)
    return values[0] / total, values[1] / total, values[2] / total
