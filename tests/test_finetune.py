"""Fine-tuning on chat data: from pretrained weights, packed examples, a loss that is
the mean over the trained tokens of the global batch whatever the layout, and an exact
resume. (The data is Python's own documentation and synthetic chats made from it.)"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from data_tools.preprocess import main as preprocess
from megagpt.checkpoint import consolidated_state_dict
from megagpt.config import apply_overrides, load_config
from megagpt.data.dataset import split_documents
from megagpt.data.finetune import ExampleSource, PackedExamples
from megagpt.data.labeled_format import read_labeled_manifest
from megagpt.model.gpt import IGNORE_INDEX
from megagpt.testing import run_distributed
from megagpt.tokenizer import Tokenizer
from megagpt.training.trainer import train
from tests.conftest import tiny_overrides, write_documents

MARKERS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
VOCAB = 512


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory, documents) -> Tokenizer:
    path = tmp_path_factory.mktemp("chat_tok") / "tok.model"
    return Tokenizer.train(documents, path, vocab_size=VOCAB, user_defined_symbols=MARKERS)


@pytest.fixture(scope="module")
def sft_manifest(tmp_path_factory, documents, chat_tokenizer) -> str:
    """Chats whose replies range from one word to a paragraph: very unequal numbers of
    trained tokens per example (and so per microbatch)."""
    rng = random.Random(5)
    directory = tmp_path_factory.mktemp("sft")
    rows = []
    for i in range(120):
        words = documents[i % len(documents)].split()
        prompt = " ".join(words[: rng.randint(2, 6)])
        reply = " ".join(words[-rng.choice([1, 2, 3, 10]) :])
        if i % 3:
            rows.append({"prompt": prompt, "completion": reply})
        else:
            rows.append({"messages": [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": reply},
            ]})  # fmt: skip
    (directory / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prefix = directory / "chats"
    code = preprocess([str(directory / "chats.jsonl"), "--format", "sft", "--tokenizer",
                       str(chat_tokenizer.path), "--output-prefix", str(prefix),
                       "--max-tokens", "65"])  # fmt: skip
    assert code == 0
    return f"{prefix}.manifest.json"


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, documents, chat_tokenizer):
    """A tiny GPT pretrained for a few steps on the documents (the weights to fine-tune)."""
    directory = tmp_path_factory.mktemp("pretrained")
    prefix = write_documents(directory, documents, chat_tokenizer)
    overrides = tiny_overrides(prefix, chat_tokenizer, directory / "run")
    train(load_config(None, [*overrides, "train.max_steps=3", "logging.tensorboard=false"]))
    return directory / "run"


def finetune_config(pretrained, sft_manifest, output_dir, *extra):
    return load_config(None, [
        f"finetune.init={pretrained}", f"data.path={sft_manifest}", "data.seq_len=64",
        "data.split=90,10,0", "train.global_batch_size=8", "train.micro_batch_size=8",
        "train.max_steps=4", "train.eval_interval=4", "train.eval_iters=1",
        "optim.lr=1e-3", "optim.warmup_steps=1", "logging.tensorboard=false",
        "logging.log_interval=1", "logging.peak_tflops=1.0", f"train.output_dir={output_dir}",
        *extra,
    ])  # fmt: skip


def test_packed_windows_hold_every_example_once_and_never_train_a_prompt(sft_manifest):
    manifest = read_labeled_manifest(sft_manifest)
    source = ExampleSource(manifest)
    packed = PackedExamples(source, np.arange(len(source)), 64, seed=1, name="x", pack=True)
    placed = sorted(int(e) for window in packed.windows for e in window)
    assert placed == list(range(len(source)))
    pairs = int((source.lengths - 1).sum())
    assert len(packed) <= 1.15 * pairs / 64  # within 15% of perfectly full windows
    batch = packed.microbatch(np.arange(len(packed)))
    for row in range(len(packed)):
        examples = packed.windows[int(packed.window_order(np.array([row]))[0])]
        start = 0
        for number, example in enumerate(examples.tolist()):
            tokens, mask = source.example(example)
            end = start + len(tokens) - 1
            assert (batch["segments"][row, start:end] == number).all()
            assert (batch["positions"][row, start:end] == np.arange(end - start)).all()
            trained = batch["targets"][row, start:end] != IGNORE_INDEX
            assert (trained == (mask[1:] == 1)).all()  # prompts and system turns: never
            start = end
        assert (batch["targets"][row, start:] == IGNORE_INDEX).all()  # padding


def test_fine_tuning_starts_from_the_pretrained_weights(pretrained, sft_manifest, tmp_path):
    config = finetune_config(pretrained, sft_manifest, tmp_path, "train.max_steps=1")
    result = train(config)
    assert result.start_step == 0 and len(result.losses) == 1
    assert config.model.n_layers == 2  # the shape comes from the pretrained checkpoint
    checkpoint = sorted((tmp_path / "checkpoints").glob("step_*"))[-1]
    assert (checkpoint / "chat_template.json").is_file()
    # Zero learning rate: the fine-tune's weights stay the pretrained ones exactly.
    frozen = train(finetune_config(pretrained, sft_manifest, tmp_path / "lr0", "optim.lr=1e-12",
                                   "optim.min_lr=0", "train.max_steps=1"))  # fmt: skip
    assert frozen.losses
    base, tuned = (
        consolidated_state_dict(pretrained)[0],
        consolidated_state_dict(tmp_path / "lr0")[0],
    )
    assert all(torch.allclose(base[k], tuned[k], atol=1e-9) for k in base)


LAYOUTS = [
    ("accumulate-4", 1, ["train.micro_batch_size=2"]),
    ("dp2", 2, ["train.micro_batch_size=4"]),
    ("tp2-sp", 2, ["parallel.tensor_parallel_size=2", "parallel.sequence_parallel=true"]),
    ("dp2-zero3-accumulate-2", 2, ["train.micro_batch_size=2", "parallel.zero_stage=3"]),
    (
        "tp2-pp2",
        4,
        [
            "train.micro_batch_size=2",
            "parallel.tensor_parallel_size=2",
            "parallel.pipeline_parallel_size=2",
        ],
    ),  # fmt: skip
]


@pytest.fixture(scope="module")
def reference(pretrained, sft_manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    return train(finetune_config(pretrained, sft_manifest, out))


@pytest.mark.parametrize("name, world, layout", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_the_global_loss_is_the_same_for_any_accumulation_and_layout(
    name, world, layout, pretrained, sft_manifest, reference, tmp_path
):
    config = finetune_config(pretrained, sft_manifest, tmp_path, *layout)
    results = run_distributed(train, world, args=(config,)) if world > 1 else [train(config)]
    torch.testing.assert_close(
        torch.tensor(results[0].losses), torch.tensor(reference.losses), rtol=1e-5, atol=0
    )
    assert results[0].val_losses[4] == pytest.approx(reference.val_losses[4], rel=1e-5)


def test_microbatches_really_hold_unequal_numbers_of_trained_tokens(sft_manifest):
    """The layout test above could not tell a per-microbatch mean from the global one
    if every microbatch had the same number of trained tokens: they do not."""
    source = ExampleSource(read_labeled_manifest(sft_manifest))
    packed = PackedExamples(source, np.arange(len(source)), 64, seed=1, name="x", pack=True)
    targets = packed.microbatch(np.arange(8))["targets"]
    per_pair = (targets != IGNORE_INDEX).reshape(4, 2, -1).sum(axis=(1, 2))
    assert per_pair.max() > 1.5 * per_pair.min()


def test_resuming_a_fine_tune_equals_the_uninterrupted_run(pretrained, sft_manifest, tmp_path):
    six = ["train.max_steps=6", "checkpoint.interval=3", "checkpoint.keep_last=0"]
    whole = train(finetune_config(pretrained, sft_manifest, tmp_path / "whole", *six))
    middle = tmp_path / "whole" / "checkpoints" / "step_00000003"
    resumed = train(finetune_config(pretrained, sft_manifest, tmp_path / "resumed", *six,
                                    f"checkpoint.resume={middle}"))  # fmt: skip
    assert resumed.start_step == 3
    assert resumed.losses == whole.losses[3:]  # exact
    a, b = (consolidated_state_dict(tmp_path / d)[0] for d in ("whole", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_epochs_set_the_number_of_steps(pretrained, sft_manifest, tmp_path):
    config = finetune_config(pretrained, sft_manifest, tmp_path, "train.epochs=2",
                             "train.eval_interval=0")  # fmt: skip
    result = train(config)
    source = ExampleSource(read_labeled_manifest(sft_manifest))
    first, last = split_documents(len(source), "90,10,0")[0]
    windows = len(PackedExamples(source, np.arange(first, last), 64, 1, "x", pack=True))
    assert len(result.losses) == -(-2 * windows // 8)


def test_unpacked_examples_pad_their_windows(pretrained, sft_manifest, tmp_path):
    config = finetune_config(pretrained, sft_manifest, tmp_path, "finetune.pack=false",
                             "train.max_steps=2")  # fmt: skip
    assert len(train(config).losses) == 2


def test_a_weighted_or_mixed_labeled_path_is_refused(pretrained, sft_manifest, tmp_path):
    from megagpt.config import ConfigError

    with pytest.raises(ConfigError, match="trained alone, without weights"):
        train(finetune_config(pretrained, sft_manifest, tmp_path, f"data.path=1.0 {sft_manifest}"))


def test_too_long_examples_say_how_to_fix_them(pretrained, sft_manifest, tmp_path):
    from megagpt.config import ConfigError

    config = finetune_config(pretrained, sft_manifest, tmp_path, "data.seq_len=16")
    with pytest.raises(ConfigError, match="--max-tokens 17"):
        train(config)


def test_apply_overrides_keeps_the_pretrained_shape(pretrained, sft_manifest, tmp_path):
    config = finetune_config(pretrained, sft_manifest, tmp_path, "model.dropout=0.1",
                             "model.n_layers=7", "train.max_steps=1")  # fmt: skip
    train(config)
    assert config.model.n_layers == 2 and config.model.dropout == 0.1
    assert apply_overrides(config, ["train.max_steps=2"], "test").model.n_layers == 2


def test_fine_tuning_starts_from_a_hugging_face_directory(pretrained, sft_manifest, tmp_path):
    """The same weights exported to transformers and given as finetune.init fine-tune
    exactly as the megagpt checkpoint does."""
    from megagpt.checkpoint.convert import export_hf

    export_hf(pretrained, tmp_path / "hf")
    ours = train(finetune_config(pretrained, sft_manifest, tmp_path / "a", "train.max_steps=2"))
    theirs = train(finetune_config(tmp_path / "hf", sft_manifest, tmp_path / "b",
                                   "train.max_steps=2"))  # fmt: skip
    assert theirs.losses == pytest.approx(ours.losses, rel=1e-6)
    assert (tmp_path / "b" / "init" / "checkpoints").is_dir()  # converted once, in the run


def test_fine_tuning_starts_from_weights_saved_on_another_layout(
    pretrained, sft_manifest, chat_tokenizer, tmp_path
):
    """Weights pretrained and saved by two tensor-parallel ranks start a one-process
    fine-tune (resharded on load) as the one-process pretraining's weights do."""
    prefix = str(pretrained.parent / "docs_text_document")  # the same data, in the same order
    overrides = tiny_overrides(prefix, chat_tokenizer, tmp_path / "tp2")
    tp2 = load_config(None, [*overrides, "train.max_steps=3", "logging.tensorboard=false",
                             "parallel.tensor_parallel_size=2"])  # fmt: skip
    run_distributed(train, 2, args=(tp2,))
    one = train(finetune_config(pretrained, sft_manifest, tmp_path / "a", "train.max_steps=2"))
    two = train(finetune_config(tmp_path / "tp2", sft_manifest, tmp_path / "b",
                                "train.max_steps=2"))  # fmt: skip
    assert two.losses == pytest.approx(one.losses, rel=1e-5)
