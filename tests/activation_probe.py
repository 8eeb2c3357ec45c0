"""Measure per-rank memory of a real training step of a tiny GPT, for any layout.

    per_rank = measure_layout({"parallel.tensor_parallel_size": 2}, world_size=2, tmp=...)

Each rank builds the layout with parallelize(), runs STEPS steps through
TrainModule.train_step and TrainModule.update (as the trainer does), and reports its
parameter, gradient and optimizer-state bytes (memory_bytes after the last step's
update) and the peak activation bytes of the last step (ActivationMeter). Functions
here are importable so that spawned ranks find them.
"""

from __future__ import annotations

from pathlib import Path

from megagpt.config import Config, load_config
from megagpt.data import build_datasets
from megagpt.demo_corpus import pydoc_topics
from megagpt.parallel import init_distributed
from megagpt.parallel.activation_meter import ActivationMeter
from megagpt.parallel.batches import dropout_seed, microbatch_indices, step_batches
from megagpt.parallel.memory import memory_bytes
from megagpt.parallel.parallelize import parallelize
from megagpt.testing import run_distributed
from megagpt.tokenizer import Tokenizer
from megagpt.training.schedule import learning_rate
from tests.conftest import TEST_VOCAB, tiny_overrides, write_documents

STEPS = 2


def tiny_data(tmp: str) -> tuple[str, Tokenizer]:
    """The test tokenizer and token files (as the fixtures build them), made once in tmp."""
    root = Path(tmp)
    model = root / "tokenizer" / "test.model"
    prefix = root / "data" / "docs_text_document"
    if model.exists() and prefix.with_suffix(".idx").exists():
        return str(prefix), Tokenizer(model)
    documents = [p.strip() for t in pydoc_topics() for p in t.split("\n\n") if len(p.strip()) > 80]
    model.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer.train(documents, model, vocab_size=TEST_VOCAB)
    (root / "data").mkdir(exist_ok=True)
    return write_documents(root / "data", documents, tokenizer), tokenizer


def probe_config(overrides: dict, tmp: str) -> Config:
    prefix, tokenizer = tiny_data(tmp)
    base = tiny_overrides(prefix, tokenizer, Path(tmp) / "run")
    extra = [f"{key}={value}" for key, value in overrides.items()]
    return load_config(None, [*base, "logging.tensorboard=false", *extra])


def measure_rank(config: Config) -> dict:
    """This rank's memory over STEPS training steps (run on every rank)."""
    env = init_distributed("cpu")
    module = parallelize(config, env)
    dims, t = module.dims, config.train
    dataset = build_datasets(config.data, t.seed).train
    meter = ActivationMeter(module.parts)
    for step in range(STEPS):
        seeds = [dropout_seed(t.seed, int(i[0])) for i in microbatch_indices(step, module, config)]
        batches = step_batches(dataset, step, module, config)
        with meter:
            module.train_step(batches, seeds)
        if meter.live_bytes:  # every saved tensor is freed by the end of a step
            raise RuntimeError(f"{meter.live_bytes} activation bytes still saved after a step")
        module.update(learning_rate(step, config.optim, t.max_steps), config.optim.grad_clip)
        sizes = memory_bytes(module)
        module.zero_grad()
    return {
        "rank": env.rank,
        "pp_rank": env.rank // (dims.dp * dims.cp * dims.tp),
        "tp_rank": dims.tp_rank(env.rank),
        "dp_rank": module.dp_rank,
        "cp_rank": dims.cp_rank(env.rank),
        **sizes,
        "activations": meter.peak_bytes,
    }


def measure_each(configs: list[Config]) -> list[dict]:
    """measure_rank of each config in turn on these ranks (one start-up for all)."""
    return [measure_rank(config) for config in configs]


def measure_layouts(layouts: list[dict], world_size: int, tmp: str) -> list[list[dict]]:
    """measure_layout of several `layouts` (override dicts) on the same `world_size`
    ranks, spawned once: per layout, the per-rank results."""
    configs = [probe_config(overrides, tmp) for overrides in layouts]
    by_rank = run_distributed(measure_each, world_size, args=(configs,))
    return [list(ranks) for ranks in zip(*by_rank)]


def measure_layout(overrides: dict, world_size: int, tmp: str) -> list[dict]:
    """Per-rank memory of the tiny test GPT with `overrides` (dotted config keys) on
    `world_size` gloo ranks; `tmp` holds the tokenizer and data (reused) and run files."""
    config = probe_config(overrides, tmp)
    return run_distributed(measure_rank, world_size, args=(config,))
