"""`megagpt demo`: raw text to a GPT that writes, on a laptop CPU, with no network.

1. corpus: Python's own documentation (see demo_corpus), as jsonl
2. tokenizer: a 4,096-piece sentencepiece BPE trained on it
3. data: tokenized into Megatron .bin/.idx files, EOD after every document
4. training: the tiny default GPT, on 1 process or N data-parallel ranks (torchrun)
5. generation: samples from the final checkpoint
"""

from __future__ import annotations

import json
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from megagpt.config import Config, apply_overrides, load_config, save_config
from megagpt.config.errors import ConfigError
from megagpt.data.indexed import IndexedDatasetWriter, token_dtype
from megagpt.demo_corpus import python_documentation
from megagpt.launch.errors import LaunchError
from megagpt.tokenizer import Tokenizer
from megagpt.utils.formatting import format_duration, format_rate

MARKER = ".megagpt-demo"
TRAIN_SECONDS = 150
"""About how long training takes on any machine (README: the demo takes about three
minutes on two cores, with data preparation and generation)."""
CALIBRATION_STEPS = 12
MIN_STEPS = 60
"""Fewest steps the demo shortens to: the validation loss still falls visibly."""
DEMO_VOCAB = 4096
PROMPTS = ("The list", "A module")


def say(message: str) -> None:
    print(message, flush=True)


def prepare_output_dir(output_dir: Path) -> None:
    """Create the demo directory; replace it only if an earlier demo made it."""
    if output_dir.exists() and any(output_dir.iterdir()):
        if not (output_dir / MARKER).exists():
            raise ConfigError(
                f"--output-dir {output_dir} exists and was not made by the demo; "
                "choose another directory (the demo replaces only its own runs)"
            )
        say(f"replacing the previous demo run in {output_dir}")
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True)
    (output_dir / MARKER).write_text("made by megagpt demo; replaced by the next demo run\n")


def build_data(data_dir: Path, prefix: Path, tokenizer_path: Path, seed: int) -> Tokenizer:
    """Write corpus.jsonl, train the tokenizer, and tokenize into `prefix`.bin/.idx."""
    start = time.perf_counter()
    documents = python_documentation()
    random.Random(seed).shuffle(documents)  # so the validation split is a fair sample
    corpus = data_dir / "corpus.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for text in documents:
            f.write(json.dumps({"text": text}) + "\n")
    megabytes = corpus.stat().st_size / 1e6
    say(
        f"[1/5] corpus: {len(documents):,} documents from Python's documentation, "
        f"{megabytes:.1f} MB -> {corpus} ({time.perf_counter() - start:.1f}s)"
    )

    start = time.perf_counter()
    tokenizer = Tokenizer.train(documents, tokenizer_path, vocab_size=DEMO_VOCAB)
    say(
        f"[2/5] tokenizer: sentencepiece BPE, {tokenizer.vocab_size:,} pieces -> "
        f"{tokenizer.path} ({time.perf_counter() - start:.1f}s)"
    )

    start = time.perf_counter()
    with IndexedDatasetWriter(prefix, token_dtype(tokenizer.vocab_size)) as writer:
        for ids in tokenizer.encode_batch(documents):
            writer.add_document(np.asarray(ids + [tokenizer.eod_id]))
    say(
        f"[3/5] data: {writer.token_count:,} tokens in {writer.document_count:,} documents -> "
        f"{prefix}.bin/.idx ({time.perf_counter() - start:.1f}s)"
    )
    return tokenizer


def demo_config(output_dir: Path, overrides: Sequence[str]) -> Config:
    data_dir = output_dir / "data"
    base = [
        f"data.path={data_dir / 'python_docs_text_document'}",
        f"data.tokenizer={data_dir / 'tokenizer.model'}",
        "data.split=95,5,0",
        f"model.vocab_size={DEMO_VOCAB}",
        f"train.output_dir={output_dir / 'train'}",
        "train.eval_interval=50",
    ]
    return load_config(None, [*base, *overrides])


def run_training(config_path: Path, config: Config, nproc: int, announce: bool = True) -> None:
    """Train in this process, or on `nproc` ranks through `megagpt launch local` (the
    torchrun agent every launch uses)."""
    if nproc == 1:
        from megagpt.training.trainer import train

        train(config)
        return
    command = ["launch", "local", "--nproc", str(nproc), "--config", str(config_path)]
    if announce:
        say(f"      launching: megagpt {' '.join(command)}")
    done = subprocess.run([sys.executable, "-m", "megagpt", *command])
    if done.returncode != 0:
        raise LaunchError(
            f"training on {nproc} processes failed (exit code {done.returncode}); its log is above"
        )


def size_to_machine(out: Path, config: Config, nproc: int, overrides: Sequence[str]) -> Config:
    """The demo's config, its run shortened to take about TRAIN_SECONDS here.

    The throughput comes from a few calibration steps of the same model and layout;
    max_steps, warmup and the evaluation interval shrink in proportion, so the run has
    the same schedule shape, only fewer steps. An explicit train.max_steps is kept.
    """
    t = config.train
    if any(o.startswith("train.max_steps=") for o in overrides):
        return config
    scratch = out / "calibration"
    calibration = apply_overrides(
        config,
        [
            f"train.output_dir={scratch}",
            f"train.max_steps={CALIBRATION_STEPS}",
            "train.eval_interval=0",
            "logging.log_interval=1",
            "logging.tensorboard=false",
            "logging.level=WARNING",
        ],
        "demo calibration",
    )
    save_config(calibration, out / "calibration.yaml")
    run_training(out / "calibration.yaml", calibration, nproc, announce=False)
    metrics = [json.loads(line) for line in open(scratch / "metrics.jsonl")]
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in metrics[2:])  # warm steps
    shutil.rmtree(scratch)
    (out / "calibration.yaml").unlink()
    seconds_per_step = t.global_batch_size * config.data.seq_len / tokens_per_s
    steps = max(MIN_STEPS, min(t.max_steps, int(TRAIN_SECONDS / seconds_per_step)))
    if steps == t.max_steps:
        return config
    scale = steps / t.max_steps
    say(
        f"      this machine trains {format_rate(tokens_per_s)} tokens/s: {steps} of "
        f"{t.max_steps} steps (warmup and evaluations scaled alike) to finish in about "
        f"{format_duration(steps * seconds_per_step)}; add train.max_steps={t.max_steps} "
        "for them all"
    )
    return apply_overrides(
        config,
        [
            f"train.max_steps={steps}",
            f"optim.warmup_steps={max(1, round(config.optim.warmup_steps * scale))}",
            f"train.eval_interval={max(1, round(t.eval_interval * scale))}",
        ],
        "demo, sized to this machine",
    )


def run_demo(
    output_dir: str = "runs/demo", nproc: int = 1, overrides: Sequence[str] = (), seed: int = 1234
) -> dict:
    """Run all five steps; return the validation losses and the generated samples."""
    started = time.perf_counter()
    out = Path(output_dir)
    say("megagpt demo: Python's documentation -> tokenizer -> .bin/.idx -> GPT -> text")
    config = demo_config(out, overrides)  # bad overrides fail before any work is done
    prepare_output_dir(out)
    (out / "data").mkdir()
    prefix, tokenizer_path = Path(config.data.path[0]), Path(config.data.tokenizer)
    tokenizer = build_data(out / "data", prefix, tokenizer_path, seed)
    config = size_to_machine(out, config, nproc, overrides)
    config_path = out / "demo.yaml"
    save_config(config, config_path)
    m, t = config.model, config.train
    say(
        f"[4/5] training: {m.n_layers} layers x {m.hidden_size} hidden, {t.max_steps} steps of "
        f"{t.global_batch_size} x {config.data.seq_len} tokens on {nproc} process(es); "
        f"config {config_path}"
    )
    run_training(config_path, config, nproc)

    metrics = [json.loads(line) for line in open(Path(t.output_dir) / "metrics.jsonl")]
    val = [(r["step"], r["val_loss"]) for r in metrics if "val_loss" in r]
    say("      validation loss: " + "  ".join(f"{s}: {v:.3f}" for s, v in val))

    from megagpt.checkpoint import load_model_for_inference
    from megagpt.generate import generate_text

    model, _, _ = load_model_for_inference(t.output_dir)
    samples = []
    say("[5/5] generation (temperature 0.8, top-k 50) from the final checkpoint:")
    for i, prompt in enumerate(PROMPTS):
        (text,) = generate_text(
            model, tokenizer, prompt, max_new_tokens=60, temperature=0.8, top_k=50, seed=seed + i
        )
        samples.append(text)
        say(f"  >>> {text}")
    say(
        f"done in {time.perf_counter() - started:.0f}s; everything is in {out}/ "
        f'(try: megagpt generate --checkpoint {t.output_dir} --prompt "A tuple")'
    )
    return {"val_losses": val, "samples": samples, "output_dir": str(out)}
