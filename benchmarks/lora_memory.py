"""Parameter, gradient and optimizer-state memory of LoRA against a full fine-tune.

Builds the same model twice in this process, once training every weight and once
with LoRA adapters (finetune.lora.rank) on every projection, runs one training step
on random tokens and one AdamW update each, and reports the bytes that
megagpt.parallel.memory counts after the step (what `megagpt finetune` logs), with the
ratio LoRA / full. Activations are not counted: they are the same in both (the frozen
projections still keep their inputs for the adapters' backward).

    python benchmarks/lora_memory.py [--rank 8] [overrides ...]   # e.g. model.n_layers=12
"""

from __future__ import annotations

import argparse

import torch

from megagpt.config import load_config
from megagpt.parallel import init_distributed, shutdown_distributed
from megagpt.parallel.batches import Microbatch
from megagpt.parallel.memory import memory_bytes
from megagpt.parallel.parallelize import parallelize


def measure(overrides: list[str]) -> dict[str, int]:
    # finetune.init is only read by the trainer, which is not used here: any path passes.
    config = load_config(None, ["finetune.init=unused", *overrides])
    env = init_distributed("cpu")
    try:
        module = parallelize(config, env)
        m, t = config.train.micro_batch_size, config.data.seq_len
        tokens = torch.randint(0, config.model.vocab_size, (m, t + 1))
        module.train_step([Microbatch(tokens[:, :-1], tokens[:, 1:])])
        module.optimizer_step(config.optim.lr)
        return memory_bytes(module)
    finally:
        shutdown_distributed(env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("overrides", nargs="*", help="model.* and data.seq_len settings")
    args = parser.parse_args()
    full = measure(args.overrides)
    lora = measure([*args.overrides, f"finetune.lora.rank={args.rank}"])
    print(f"{'':16} {'full':>12} {'LoRA r' + str(args.rank):>12} {'LoRA / full':>12}")
    for name in (*full, "total"):
        a = sum(full.values()) if name == "total" else full[name]
        b = sum(lora.values()) if name == "total" else lora[name]
        print(f"{name:16} {a / 2**20:10.2f}Mi {b / 2**20:10.2f}Mi {b / a:12.3f}")


if __name__ == "__main__":
    main()
