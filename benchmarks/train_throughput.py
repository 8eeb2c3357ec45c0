"""Training-step throughput of megagpt against Hugging Face's GPT2LMHeadModel.

Both models get the same GPT-2 shape, batch, precision and optimizer (torch's fused
AdamW, which megagpt's trainer uses),
and run one full training step (forward, loss, backward, optimizer step) at a time,
alternating between the two so that load from other processes hits both equally.
Prints tokens/s of each, MFU, and the ratio megagpt / transformers.

    python benchmarks/train_throughput.py                      # small GPT-2 shape on CPU
    python benchmarks/train_throughput.py --shape gpt2-124m --device cuda --precision bf16 \
        --batch 8 --seq-len 1024
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from megagpt.config import load_config
from megagpt.config.schema import ModelConfig, OptimConfig
from megagpt.model import build_model
from megagpt.model.flops import flops_per_token
from megagpt.parallel.optimizer import build_optimizer
from megagpt.utils.allocator import keep_freed_memory
from megagpt.utils.hardware import device_peak

SHAPES = {
    # A GPT-2 with fewer, narrower layers, so a CPU step takes about a second.
    "gpt2-mini": dict(n_layers=4, hidden_size=384, n_heads=6),
}


def model_config(shape: str) -> ModelConfig:
    base = load_config("gpt2-124m").model
    if shape in SHAPES:
        for key, value in SHAPES[shape].items():
            setattr(base, key, value)
        return base
    return load_config(shape).model


def hf_model(cfg: ModelConfig, device):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.max_seq_len,
        n_embd=cfg.hidden_size,
        n_layer=cfg.n_layers,
        n_head=cfg.n_heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=cfg.norm_eps,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).to(device)


def make_steps(cfg, device, precision, compile_models):
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    ours = build_model(cfg, device, seed=0)
    theirs = hf_model(cfg, device)
    if compile_models:
        ours, theirs = torch.compile(ours), torch.compile(theirs)
    opt_ours = build_optimizer(ours, OptimConfig(lr=1e-4))
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-4, fused=True)

    def step_ours(batch):
        with autocast:
            loss = ours(batch[:, :-1], batch[:, 1:])
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def step_theirs(batch):
        # The model's own loss path: it shifts labels by one position internally.
        with autocast:
            loss = theirs(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        loss.backward()
        opt_theirs.step()
        opt_theirs.zero_grad(set_to_none=True)

    return step_ours, step_theirs


def timed(step, batch, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="gpt2-mini", help="gpt2-mini or a preset name")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    args = parser.parse_args()

    device = torch.device(args.device)
    # `megagpt train` tunes malloc on CPU; do it here for both models alike, so the
    # ratio compares the models (benchmarks/cpu_allocator.py measures the tuning).
    tuned = device.type == "cpu" and keep_freed_memory()
    cfg = model_config(args.shape)
    step_ours, step_theirs = make_steps(cfg, device, args.precision, args.compile)
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(
        0, cfg.vocab_size, (args.batch, args.seq_len + 1), generator=generator
    ).to(device)
    for _ in range(args.warmup):
        step_ours(batch)
        step_theirs(batch)
    ours, theirs = [], []
    for i in range(args.steps):  # alternate which goes first, so neither is favoured
        pair = [(step_ours, ours), (step_theirs, theirs)]
        for step, times in pair if i % 2 == 0 else pair[::-1]:
            times.append(timed(step, batch, device))

    tokens = args.batch * args.seq_len
    peak = device_peak(device, args.precision, None).tflops * 1e12
    per_token = flops_per_token(cfg, args.seq_len)
    print(
        f"shape {args.shape}: {cfg.n_layers} layers, hidden {cfg.hidden_size}, "
        f"{cfg.n_heads} heads, vocab {cfg.vocab_size}; batch {args.batch} x {args.seq_len}; "
        f"{args.precision} on {device}{' (compiled)' if args.compile else ''}"
        f"{', malloc tuned for both' if tuned else ''}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    rates = {}
    for name, times in (("megagpt", ours), ("transformers GPT2LMHeadModel", theirs)):
        median = statistics.median(times)
        rates[name] = tokens / median
        print(
            f"{name:>30}: {rates[name]:10.0f} tokens/s  (median step {median * 1e3:.1f} ms, "
            f"MFU {100 * rates[name] * per_token / peak:.1f}% of {peak / 1e12:.3g} TFLOP/s)"
        )
    ratio = rates["megagpt"] / rates["transformers GPT2LMHeadModel"]
    print(f"ratio megagpt / transformers: {ratio:.3f}x")


if __name__ == "__main__":
    main()
