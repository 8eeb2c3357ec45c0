"""Hugging Face export and import, checked through transformers itself."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from megagpt.checkpoint import consolidated_state_dict, load_model_for_inference
from megagpt.checkpoint.convert import export_hf, export_torch, import_hf
from megagpt.config import ConfigError, apply_overrides, load_config
from megagpt.config.schema import ModelConfig
from megagpt.data import build_datasets, global_sample_indices
from megagpt.model.hf import architecture
from megagpt.training.trainer import train
from tests.conftest import LLAMA_BLOCKS

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402 (needs transformers' deps)

SHAPES = {
    "gpt2": [],
    "gpt2-untied-separate-qkv": ["model.tie_embeddings=false", "model.fused_qkv=false"],
    "llama-gqa-fused": [
        *LLAMA_BLOCKS,
        "model.bias=false",
        "model.tie_embeddings=false",
        "model.n_kv_heads=2",
        "model.rope_theta=5000",
    ],
    "llama-tied-bias": [*LLAMA_BLOCKS, "model.n_kv_heads=1"],
}


def trained_checkpoint(tiny_config, tmp_path, shape):
    config = apply_overrides(
        tiny_config,
        [
            *SHAPES[shape],
            "train.max_steps=2",
            "model.pad_vocab_size_to_multiple_of=128",
            "logging.tensorboard=false",
            f"train.output_dir={tmp_path / 'run'}",
        ],
        shape,
    )
    return train(config).checkpoint


@pytest.mark.parametrize("shape", SHAPES)
def test_exported_model_gives_megagpt_logits(tiny_config, tmp_path, shape):
    checkpoint = trained_checkpoint(tiny_config, tmp_path, shape)
    out = export_hf(checkpoint, tmp_path / "hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours, config, _ = load_model_for_inference(checkpoint)
    expected = "gpt2" if shape.startswith("gpt2") else "llama"
    assert theirs.config.model_type == expected
    tokens = torch.randint(
        0, config.model.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, ours(tokens), rtol=1e-4, atol=1e-4)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    from megagpt.tokenizer import Tokenizer

    text = "The for statement iterates over the items of a sequence."
    assert tokenizer(text).input_ids == Tokenizer(config.data.tokenizer).encode(text)


def hf_model(kind: str, directory, vocab_size: int = 300):
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(
            n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=vocab_size
        )
    else:
        config = transformers.LlamaConfig(
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=vocab_size,
            max_position_embeddings=64,
        )
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    return model.eval()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_import_then_export_round_trips_exactly(tmp_path, kind):
    original = hf_model(kind, tmp_path / "original")
    imported = import_hf(tmp_path / "original", tmp_path / "run")
    ours, _, metadata = load_model_for_inference(imported)
    assert metadata["step"] == 0 and metadata["optimizer_state"] is False
    tokens = torch.randint(0, 300, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), original(tokens).logits, rtol=1e-4, atol=1e-4)
    export_hf(imported, tmp_path / "again")
    before = load_file(tmp_path / "original" / "model.safetensors")
    after = load_file(tmp_path / "again" / "model.safetensors")
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


def test_training_continues_from_an_imported_model(tmp_path, dataset_prefix, tokenizer):
    """The first step of training from an imported model has the original model's loss."""
    original = hf_model("llama", tmp_path / "original", vocab_size=512)
    data = [
        f"data.path={dataset_prefix}",
        f"data.tokenizer={tokenizer.path}",
        "data.seq_len=32",
        "data.split=90,10,0",
        "train.max_steps=2",
        "train.global_batch_size=4",
        "train.micro_batch_size=4",
        "optim.warmup_steps=1",
        "logging.tensorboard=false",
        "train.eval_interval=0",
    ]
    imported = import_hf(tmp_path / "original", tmp_path / "run", data)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "megagpt",
            "train",
            "--config",
            str(imported / "config.yaml"),
            f"checkpoint.resume={imported}",
            f"train.output_dir={tmp_path / 'continued'}",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout
    first = json.loads((tmp_path / "continued" / "metrics.jsonl").read_text().splitlines()[0])
    config = load_config(imported / "config.yaml")
    batch = torch.from_numpy(
        build_datasets(config.data, config.train.seed).train.samples(
            global_sample_indices(0, 0, 0, 1, 4, 4)
        )
    )
    with torch.no_grad():
        logits = original(batch[:, :-1]).logits
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
    assert first["step"] == 1 and first["loss"] == pytest.approx(float(expected), rel=1e-5)


def test_torch_export_loads_with_weights_only(tiny_config, tmp_path):
    checkpoint = trained_checkpoint(tiny_config, tmp_path, "gpt2")
    path = export_torch(checkpoint, tmp_path / "model.pt")
    state = torch.load(path, weights_only=True)
    expected, _ = consolidated_state_dict(checkpoint)
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in state)
    assert path.with_suffix(".yaml").is_file()


def test_architectures_without_a_transformers_twin_are_refused():
    with pytest.raises(ConfigError, match="no Hugging Face architecture matches"):
        architecture(ModelConfig(norm="rmsnorm"))
    with pytest.raises(ConfigError, match="GPT-2 exports need model.bias=true"):
        architecture(ModelConfig(bias=False))
