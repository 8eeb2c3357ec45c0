"""Shared fixtures: a real tokenizer and token files built from Python's own docs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from megagpt.config import Config, load_config
from megagpt.data import IndexedDatasetWriter, token_dtype
from megagpt.demo_corpus import pydoc_topics
from megagpt.tokenizer import Tokenizer

TEST_VOCAB = 512
LLAMA_SHAPE = dict(norm="rmsnorm", activation="swiglu", position_embedding="rope")
"""The ModelConfig fields that turn the GPT-2-shaped defaults into Llama-shaped blocks."""
LLAMA_BLOCKS = [f"model.{key}={value}" for key, value in LLAMA_SHAPE.items()]
"""The same, as command-line overrides."""


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def documents() -> list[str]:
    """Paragraphs of the Python reference manual's help topics."""
    paragraphs = []
    for topic in pydoc_topics():
        paragraphs.extend(p.strip() for p in topic.split("\n\n") if len(p.strip()) > 80)
    return paragraphs


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory, documents) -> Tokenizer:
    path = tmp_path_factory.mktemp("tokenizer") / "test.model"
    return Tokenizer.train(documents, path, vocab_size=TEST_VOCAB)


@pytest.fixture(scope="session")
def dataset_prefix(tmp_path_factory, documents, tokenizer) -> str:
    return write_documents(tmp_path_factory.mktemp("data"), documents, tokenizer)


def write_documents(directory: Path, documents: list[str], tokenizer: Tokenizer) -> str:
    """`documents` tokenized, each ending in EOD, as directory/docs_text_document.bin/.idx."""
    prefix = directory / "docs_text_document"
    with IndexedDatasetWriter(prefix, token_dtype(tokenizer.vocab_size)) as writer:
        for ids in tokenizer.encode_batch(documents):
            writer.add_document(np.asarray([*ids, tokenizer.eod_id]))
    return str(prefix)


def tiny_overrides(dataset_prefix: str, tokenizer: Tokenizer, output_dir: Path) -> list[str]:
    """A model small enough that a few steps take well under a second."""
    return [
        f"data.path={dataset_prefix}",
        f"data.tokenizer={tokenizer.path}",
        "data.split=90,10,0",
        "data.seq_len=32",
        f"model.vocab_size={TEST_VOCAB}",
        "model.max_seq_len=64",
        "model.n_layers=2",
        "model.hidden_size=64",
        "model.n_heads=4",
        "train.max_steps=6",
        "train.global_batch_size=8",
        "train.micro_batch_size=4",
        "train.eval_interval=3",
        "train.eval_iters=2",
        "optim.warmup_steps=2",
        "logging.log_interval=1",
        "logging.peak_tflops=1.0",
        f"train.output_dir={output_dir}",
    ]


@pytest.fixture
def tiny_config(dataset_prefix, tokenizer, tmp_path) -> Config:
    return load_config(None, tiny_overrides(dataset_prefix, tokenizer, tmp_path / "run"))
