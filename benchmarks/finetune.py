"""Fine-tuning throughput of megagpt against Hugging Face TRL's SFTTrainer (and peft).

Both systems fine-tune the same GPT-2-shaped model from the same weights on the same
examples, with the same global batch, micro-batch, optimizer and threads, in one process:

- data: a few hundred prompt/completion rows cut from Python's own documentation
  (`pydoc_topics()`, deterministic), written by `megagpt-preprocess --format sft`'s code
  with a sentencepiece tokenizer trained here; TRL gets those very token ids and loss
  masks (`input_ids` + `completion_mask`, `completion_only_loss=True`), so both train on
  the completion tokens only;
- model: megagpt's initial weights, written as a transformers directory (`save_hf`);
  megagpt fine-tunes them (imported once, `finetune.init`), TRL loads them as
  `GPT2LMHeadModel` (sdpa attention);
- packing: megagpt's best-fit decreasing windows of seq_len inputs (an example of n
  tokens fills n - 1), block-diagonal attention, positions restarting per example;
  TRL's `packing=True` with its default `bfd` strategy and max_length = seq_len + 1 (an
  example fills n), which switches on padding-free batches: the micro-batch's bins are
  concatenated into one row, positions restart per example, and transformers builds the
  block-diagonal causal mask of that whole row from them for sdpa (flash attention's
  varlen kernels, which skip the masked blocks, do not run on CPU);
- batch and optimizer: a global batch of --batch windows in micro-batches of
  --micro-batch, fp32, torch's fused AdamW, constant learning rate, no weight decay,
  gradient clipping 1.0, no activation checkpointing (SFTConfig's default is turned off);
- LoRA: megagpt `finetune.lora.rank=8` against peft `LoraConfig(r=8, lora_alpha=16)` on
  the same projections (every attention and MLP matmul: `c_attn`, `c_proj`, `c_fc`),
  131k trainable parameters on both sides at the default shape.

The two trainers run at once, each in its own thread, and take turns step by step
(megagpt, TRL, megagpt, ...), so load from other processes on the shared machine falls
on both alike. A step's time runs from taking the turn to the end of its optimizer step
(data loading, the step, logging: everything in the loop). Example tokens are counted
the same way for both: the tokens of the examples a step trains on (n for an example of
n tokens). After --warmup steps, the ratio megagpt / TRL of each pair of consecutive
steps is taken; a round reports their median, the summary the median over rounds.
Packing efficiency (the share of window positions holding example tokens) compares
megagpt's packing with padding each global batch of the same examples to its longest,
and with TRL's own bfd packing of them.

trl and peft are benchmark-only dependencies (not in setup.cfg):

    pip install trl peft          # keep the installed torch (pin torch==X if pip tries)
    python benchmarks/finetune.py
    python benchmarks/finetune.py --rounds 3 --trl-micro-batch 1   # TRL: one bin per forward
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import random
import shutil
import statistics
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from megagpt.config import ModelConfig, load_config
from megagpt.data.dataset import global_sample_indices
from megagpt.data.finetune import ExampleSource, build_finetune_datasets
from megagpt.data.labeled_format import read_labeled_manifest
from megagpt.demo_corpus import pydoc_topics
from megagpt.tokenizer import Tokenizer
from megagpt.training.metrics import MetricsSink
from megagpt.utils.allocator import keep_freed_memory

CHAT_MARKERS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


# ---------------------------------------------------------------- data and weights
def sft_rows(count: int, seed: int = 0) -> list[dict[str, str]]:
    """Prompt/completion rows of varied lengths: a prompt quoting part of a paragraph
    of the docs, a completion continuing with one to three paragraphs, cut at a random
    number of words (5-400), so examples run from a few dozen tokens to past seq_len."""
    paragraphs = [
        p.strip() for topic in pydoc_topics() for p in topic.split("\n\n") if len(p.strip()) > 80
    ]
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        start = rng.randrange(len(paragraphs) - 4)
        question = " ".join(paragraphs[start].split()[: rng.randint(5, 40)])
        answer = "\n\n".join(paragraphs[start + 1 : start + 1 + rng.randint(1, 3)]).split(" ")
        answer = " ".join(answer[: rng.choice([rng.randint(5, 60), rng.randint(20, 400)])])
        rows.append({"prompt": f"What follows this? {question}", "completion": answer})
    return rows


def prepare(workdir: Path, args) -> tuple[Path, Path, Path, Path]:
    """Tokenizer, SFT set and initial weights; returns (tokenizer, manifest, hf dir,
    megagpt checkpoint of the same weights)."""
    from data_tools.labeled import LabeledOptions, run_labeled
    from megagpt.checkpoint.convert import import_hf, save_hf
    from megagpt.model import build_model

    texts = [p for topic in pydoc_topics() for p in topic.split("\n\n") if p.strip()]
    tok_path = workdir / "tok.model"
    Tokenizer.train(texts, tok_path, vocab_size=args.vocab, user_defined_symbols=CHAT_MARKERS)
    rows = workdir / "sft.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in sft_rows(args.examples)))
    options = LabeledOptions(
        format="sft",
        inputs=[rows],
        output_prefix=str(workdir / "sft"),
        tokenizer=str(tok_path),
        max_tokens=args.seq_len + 1,  # megagpt's window: seq_len inputs of n - 1 pairs
        progress_bar=False,
    )
    manifest = Path(run_labeled(options)["manifest"])
    cfg = ModelConfig(
        vocab_size=Tokenizer(tok_path).vocab_size,
        max_seq_len=args.seq_len + 1,
        n_layers=args.layers,
        hidden_size=args.hidden,
        n_heads=args.heads,
    )
    state = build_model(cfg, "cpu", seed=0).state_dict()
    hf_dir = save_hf(state, cfg, workdir / "hf_init", tok_path)
    import_hf(hf_dir, workdir / "init")
    return tok_path, manifest, hf_dir, workdir / "init"


def examples(manifest: Path) -> tuple[list[list[int]], list[list[int]]]:
    """Every example's token ids and loss mask, as megagpt-preprocess wrote them."""
    source = ExampleSource(read_labeled_manifest(manifest))
    pairs = [source.example(i) for i in range(len(source))]
    return [t.tolist() for t, _ in pairs], [m.tolist() for _, m in pairs]


# ---------------------------------------------------------------- interleaving
class Baton:
    """Whose turn it is to run a step: the two trainers, each in its own thread, run
    their optimizer steps strictly by turns (megagpt, TRL, megagpt, ...), so load from
    other processes on the shared machine falls on both alike. A system that has
    finished (or failed) gives up its turns for good."""

    def __init__(self, first: str, second: str):
        self.cond = threading.Condition()
        self.turn, self.other = first, {first: second, second: first}
        self.done: set[str] = set()

    def take(self, me: str) -> float:
        with self.cond:
            self.cond.wait_for(lambda: self.turn == me or self.other[me] in self.done)
        return time.perf_counter()

    def give(self, me: str, finished: bool = False) -> float:
        now = time.perf_counter()
        with self.cond:
            self.turn = self.other[me]
            if finished:
                self.done.add(me)
            self.cond.notify_all()
        return now


class StepClock:
    """One system's steps: when each began (took the turn) and ended, and its tokens."""

    def __init__(self, name: str, baton: Baton):
        self.name, self.baton = name, baton
        self.starts: list[float] = [math.nan]  # step 1 starts with the run's set-up
        self.ends: list[float] = []
        self.tokens: list[int] = []

    def step_ended(self, tokens: int) -> None:
        self.ends.append(self.baton.give(self.name))
        self.tokens.append(tokens)
        self.starts.append(self.baton.take(self.name))

    def seconds(self) -> list[float]:
        return [end - start for start, end in zip(self.starts, self.ends)]


@contextlib.contextmanager
def after_each_megagpt_step(hook):
    """Call hook() after every step of megagpt's loop: it logs every step
    (logging.log_interval=1) through MetricsSink.write, wrapped here."""
    original = MetricsSink.write

    def write(self, step, metrics):
        original(self, step, metrics)
        hook()

    MetricsSink.write = write
    try:
        yield
    finally:
        MetricsSink.write = original


# ---------------------------------------------------------------- megagpt
def megagpt_config(args, tok: Path, manifest: Path, init: Path, out: Path, lora: bool):
    return load_config(
        "sft",
        [
            f"finetune.init={init}",
            f"finetune.lora.rank={8 if lora else 0}",
            f"data.path={manifest}",
            f"data.tokenizer={tok}",
            f"data.seq_len={args.seq_len}",
            "data.split=100,0,0",
            "train.epochs=null",
            f"train.max_steps={args.warmup + args.steps}",
            f"train.global_batch_size={args.batch}",
            f"train.micro_batch_size={args.micro_batch}",
            f"train.output_dir={out}",
            "train.device=cpu",
            "train.precision=fp32",
            "train.eval_interval=0",
            f"optim.lr={args.lr}",
            "optim.min_lr=0",
            "optim.weight_decay=0",
            "optim.warmup_steps=0",
            "optim.decay_style=constant",
            "optim.grad_clip=1.0",
            "checkpoint.resume=none",
            "checkpoint.interval=0",
            "logging.log_interval=1",
            "logging.tensorboard=false",
            "logging.level=WARNING",
            "logging.peak_tflops=1",  # skips the start-up matmul timing; MFU is not used
        ],
    )


def megagpt_step_tokens(args, config, manifest: Path, lengths: np.ndarray) -> list[int]:
    """Example tokens of each step: the windows of its global sample indices, in the
    trainer's seeded window order (one replica: samples [step x G, (step + 1) x G))."""
    data = build_finetune_datasets(
        config.data, read_labeled_manifest(manifest), config.train.seed, pack=True
    ).train
    counts = []
    for step in range(args.warmup + args.steps):
        samples = np.concatenate(
            [
                global_sample_indices(step, m, 0, 1, args.micro_batch, args.batch)
                for m in range(args.batch // args.micro_batch)
            ]
        )
        counts.append(int(sum(lengths[data.windows[w]].sum() for w in data.window_order(samples))))
    return counts


def run_megagpt(args, paths, lengths: np.ndarray, lora: bool, clock: StepClock) -> None:
    from megagpt.training.trainer import train

    tok, manifest, _, init = paths
    out = Path(tempfile.mkdtemp(prefix="megagpt-ft-"))
    try:
        config = megagpt_config(args, tok, manifest, init, out, lora)
        counts = iter(megagpt_step_tokens(args, config, manifest, lengths))
        with after_each_megagpt_step(lambda: clock.step_ended(next(counts))):
            train(config)
    finally:
        clock.baton.give(clock.name, finished=True)
        shutil.rmtree(out, ignore_errors=True)


# ---------------------------------------------------------------- TRL
def trl_dataset(ids: list[list[int]], masks: list[list[int]]):
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": ids, "completion_mask": masks})


def trl_trainer(args, hf_dir: Path, dataset, lora: bool, out: Path, clock: StepClock):
    """An SFTTrainer set up as megagpt's run is, reporting its steps to `clock`."""
    from transformers import AutoTokenizer, GPT2LMHeadModel, PrinterCallback, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    seen = {"tokens": 0}

    class CountingSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, *rest, **kwargs):
            seen["tokens"] += int(inputs["input_ids"].numel())  # padding-free: no pad
            return super().compute_loss(model, inputs, *rest, **kwargs)

    class Turns(TrainerCallback):
        def on_train_begin(self, *_, **__):
            clock.baton.take(clock.name)

        def on_step_end(self, *_, **__):
            tokens, seen["tokens"] = seen["tokens"], 0
            clock.step_ended(tokens)

    model = GPT2LMHeadModel.from_pretrained(hf_dir, attn_implementation="sdpa", dtype=torch.float32)
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=8,
            lora_alpha=16,
            lora_dropout=0.0,
            target_modules=["c_attn", "c_proj", "c_fc"],  # megagpt's every projection
            fan_in_fan_out=True,  # GPT-2's Conv1D stores weights transposed
            bias="none",
            task_type="CAUSAL_LM",
        )
    sft = SFTConfig(
        output_dir=str(out),
        max_steps=args.warmup + args.steps,
        per_device_train_batch_size=args.trl_micro_batch,
        gradient_accumulation_steps=args.batch // args.trl_micro_batch,
        learning_rate=args.lr,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        optim="adamw_torch_fused",
        bf16=False,
        fp16=False,
        use_cpu=True,
        activation_checkpointing=False,  # SFTConfig's default is on; megagpt's is off
        packing=True,
        packing_strategy="bfd",
        max_length=args.seq_len + 1,  # megagpt's window: seq_len inputs, seq_len + 1 tokens
        completion_only_loss=True,
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=1234,
    )
    trainer = CountingSFTTrainer(
        model=model,
        args=sft,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(hf_dir),
        peft_config=peft_config,
        callbacks=[Turns()],
    )
    trainer.remove_callback(PrinterCallback)
    return trainer


def run_pair(args, paths, dataset, lengths: np.ndarray, lora: bool, fill: dict) -> tuple:
    """megagpt and TRL fine-tuning side by side, steps by turns; their summaries."""
    baton = Baton("megagpt", "trl")
    ours, theirs = StepClock("megagpt", baton), StepClock("trl", baton)
    out = Path(tempfile.mkdtemp(prefix="trl-ft-"))
    failure: list[BaseException] = []
    try:
        trainer = trl_trainer(args, paths[2], dataset, lora, out, theirs)
        bins = trainer.train_dataset["input_ids"]
        fill["trl_bfd"] = sum(map(len, bins)) / (len(bins) * (args.seq_len + 1))
        fill["trl_bins"] = len(bins)

        def train_trl():
            try:
                trainer.train()
            except BaseException as error:  # re-raised below, in the main thread
                failure.append(error)
            finally:
                baton.give("trl", finished=True)

        thread = threading.Thread(target=train_trl, name="trl")
        thread.start()
        try:  # megagpt in the main thread: its stop-signal handlers need it
            run_megagpt(args, paths, lengths, lora, ours)
        finally:
            thread.join()
        if failure:
            raise failure[0]
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return summarize(args, ours), summarize(args, theirs)


# ---------------------------------------------------------------- measurement
def summarize(args, clock: StepClock) -> dict:
    """Per-step rates after the warm-up steps, and their medians."""
    seconds = clock.seconds()[args.warmup :]
    rates = [t / s for t, s in zip(clock.tokens[args.warmup :], seconds)]
    window = args.batch * args.seq_len
    return {
        "rates": rates,
        "example_tokens_per_s": statistics.median(rates),
        "window_tokens_per_s": statistics.median(window / s for s in seconds),
        "step_s": statistics.median(seconds),
    }


def packing_efficiency(args, config, manifest: Path, lengths: np.ndarray) -> dict:
    """Share of window positions holding example tokens: megagpt's packing, against
    global batches of the same examples in a random order (mean over 10 seeded
    shuffles), each padded to its longest example, and against one example per
    seq_len window (`finetune.pack=false`). An example of n tokens fills n - 1."""
    packed = build_finetune_datasets(config.data, read_labeled_manifest(manifest), 0, True)
    stats, pairs = packed.train.stats, lengths - 1
    fractions = []
    for seed in range(10):
        order = np.random.default_rng(seed).permutation(len(pairs))
        batches = [pairs[order[i : i + args.batch]] for i in range(0, len(order), args.batch)]
        fractions.append(pairs.sum() / sum(len(b) * b.max() for b in batches))
    return {
        "megagpt_packed": stats.tokens / (stats.windows * args.seq_len),
        "megagpt_windows": stats.windows,
        "pad_to_longest": float(np.mean(fractions)),
        "pad_to_seq_len": pairs.sum() / (len(pairs) * args.seq_len),
        "examples": len(pairs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=400, help="prompt/completion rows")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8, help="global batch, in windows")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument(
        "--trl-micro-batch",
        type=int,
        help="TRL's micro-batch, if not --micro-batch (1: attention over one bin at a time)",
    )
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    parser.add_argument("--rounds", type=int, default=2, help="megagpt/TRL run pairs per mode")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", default="full,lora", help="full, lora or both")
    args = parser.parse_args()
    args.trl_micro_batch = args.trl_micro_batch or args.micro_batch

    import datasets
    import peft
    import transformers
    import trl

    torch.set_num_threads(args.threads)
    # `megagpt train` tunes malloc on CPU; do it for both (benchmarks/cpu_allocator.py).
    tuned = keep_freed_memory()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' renames
    logging.getLogger("data_tools").setLevel(logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="finetune-bench-") as tmp:
        workdir = Path(tmp)
        paths = prepare(workdir, args)
        tok, manifest, _, init = paths
        ids, masks = examples(manifest)
        lengths = np.array([len(t) for t in ids])
        dataset = trl_dataset(ids, masks)
        config = megagpt_config(args, tok, manifest, init, workdir / "unused", False)
        fill = packing_efficiency(args, config, manifest, lengths)

        results = {mode: [] for mode in args.modes.split(",")}
        for r in range(args.rounds):
            for mode, rounds in results.items():
                ours, theirs = run_pair(args, paths, dataset, lengths, mode == "lora", fill)
                paired = [m / t for m, t in zip(ours["rates"], theirs["rates"])]
                rounds.append((ours, theirs, statistics.median(paired)))
                print(
                    f"round {r + 1} {mode:>4}: megagpt {ours['example_tokens_per_s']:6.0f}, "
                    f"TRL {theirs['example_tokens_per_s']:6.0f} example tokens/s; "
                    f"step pairs megagpt / TRL: {', '.join(f'{x:.2f}' for x in paired)}",
                    flush=True,
                )

    print()
    print(
        f"model: GPT-2 shape, {args.layers} layers, hidden {args.hidden}, {args.heads} heads, "
        f"vocab {args.vocab}; {len(ids)} examples ({lengths.min()}-{lengths.max()} tokens, "
        f"median {int(np.median(lengths))}); global batch {args.batch} x {args.seq_len}, "
        f"micro-batch {args.micro_batch} (accumulation {args.batch // args.micro_batch})"
        + (f", TRL's {args.trl_micro_batch}" if args.trl_micro_batch != args.micro_batch else "")
        + "; "
        f"fp32 on CPU, {args.threads} threads{', malloc tuned for both' if tuned else ''}; "
        f"{args.steps} timed steps each after {args.warmup}, steps by turns"
    )
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, trl "
        f"{trl.__version__}, peft {peft.__version__}, datasets {datasets.__version__}"
    )
    print(
        "attention: megagpt: SDPA per window of seq_len tokens with a block-diagonal mask "
        "(B, 1, T, T), positions restart per example; TRL bfd (padding-free): the "
        "micro-batch's bins concatenated into one row of L <= micro-batch x (seq_len + 1) "
        "tokens, "
        "positions restart per example, SDPA with the block-diagonal causal mask "
        "transformers builds from position_ids (1, 1, L, L); TRL's loss: its chunked fused "
        "LM head (log-probs, entropy, accuracy)"
    )
    print(f"{'mode':>5} {'system':>8} {'example tok/s':>14} {'window tok/s':>13} {'step s':>7}")
    for mode, rounds in results.items():
        for i, system in enumerate(("megagpt", "TRL")):
            rows = [r[i] for r in rounds]
            med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "rates"}
            print(
                f"{mode:>5} {system:>8} {med['example_tokens_per_s']:14.0f} "
                f"{med['window_tokens_per_s']:13.0f} {med['step_s']:7.3f}"
            )
    for mode, rounds in results.items():
        ratios = [r[2] for r in rounds]
        print(
            f"{mode}: megagpt / TRL example tokens/s (median of step pairs): median "
            f"{statistics.median(ratios):.3f}x (rounds: {', '.join(f'{x:.3f}' for x in ratios)})"
        )
    print(
        f"packing efficiency (share of window positions holding example tokens, "
        f"{fill['examples']} examples, batches of {args.batch}): megagpt packed "
        f"{fill['megagpt_packed']:.1%} ({fill['megagpt_windows']} windows); padding each "
        f"batch to its longest {fill['pad_to_longest']:.1%}; one example per {args.seq_len}-"
        f"token window {fill['pad_to_seq_len']:.1%}"
        + (
            f"; TRL bfd {fill['trl_bfd']:.1%} ({fill['trl_bins']} bins; padding-free, so the "
            "rest is never computed)"
            if "trl_bfd" in fill
            else ""
        )
    )
    print(
        f"packing gain over padding to the longest: "
        f"{fill['megagpt_packed'] / fill['pad_to_longest']:.2f}x fewer positions computed"
    )


if __name__ == "__main__":
    main()
