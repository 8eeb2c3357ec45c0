"""Mixture-of-experts models to and from Hugging Face Mixtral, checked through
transformers itself; and the MoE presets."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from megagpt.checkpoint import load_model_for_inference
from megagpt.checkpoint.convert import export_hf, import_hf
from megagpt.config import ConfigError, apply_overrides, load_config
from megagpt.config.schema import ModelConfig, MoEConfig
from megagpt.data import build_datasets, global_sample_indices
from megagpt.model import hf
from megagpt.model.build import build_model
from megagpt.model.flops import parameter_counts
from megagpt.training.trainer import train
from tests.conftest import LLAMA_BLOCKS, LLAMA_SHAPE

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402 (needs transformers' deps)

MIXTRAL_LIKE = [
    *LLAMA_BLOCKS,
    "model.bias=false",
    "model.tie_embeddings=false",
    "model.n_kv_heads=2",
    "model.moe.num_experts=4",
    "model.moe.top_k=2",
    "model.moe.expert_width=48",
]


def test_exported_moe_model_gives_megagpt_logits(tiny_config, tmp_path):
    config = apply_overrides(
        tiny_config,
        [*MIXTRAL_LIKE, "train.max_steps=2", "train.eval_interval=0", "logging.tensorboard=false"],
        "moe",
    )
    checkpoint = train(config).checkpoint
    out = export_hf(checkpoint, tmp_path / "hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours, config, _ = load_model_for_inference(checkpoint)
    assert theirs.config.model_type == "mixtral"
    assert (theirs.config.num_local_experts, theirs.config.num_experts_per_tok) == (4, 2)
    assert theirs.config.intermediate_size == 48
    # Mistral's original per-expert files, which every Mixtral reader understands
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in load_file(
        out / "model.safetensors"
    )
    tokens = torch.randint(
        0, config.model.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, ours(tokens), rtol=1e-4, atol=1e-4)


def moe_model_config(**moe) -> ModelConfig:
    fields = dict(num_experts=4, top_k=2, expert_width=48) | moe
    return ModelConfig(
        **LLAMA_SHAPE, bias=False, n_layers=2, hidden_size=64, n_heads=4, moe=MoEConfig(**fields)
    )


@pytest.mark.parametrize(
    "model, moe, setting",
    [
        ({}, {"shared_experts": 1}, "model.moe.shared_experts=1"),
        ({}, {"router": "sigmoid"}, "model.moe.router='sigmoid'"),
        ({}, {"normalize_top_k": False}, "model.moe.normalize_top_k=False"),
        ({}, {"every_n_layers": 2}, "model.moe.every_n_layers=2"),
        ({"bias": True}, {}, "model.bias=True"),
        ({"activation": "gelu"}, {}, "model.activation='gelu'"),
        ({"norm": "layernorm"}, {}, "model.norm='layernorm'"),
    ],
)
def test_what_mixtral_cannot_express_is_refused(model, moe, setting):
    cfg = dataclasses.replace(moe_model_config(**moe), **model)
    with pytest.raises(ConfigError, match="MixtralForCausalLM, which cannot express") as error:
        hf.architecture(cfg)
    assert setting in str(error.value) and "works" in str(error.value)
    assert hf.architecture(moe_model_config()) == "mixtral"


def test_a_learned_expert_bias_is_refused_by_its_values():
    """The setting alone does not decide: a zero bias exports, a learned one does not."""
    cfg = moe_model_config(bias_update_rate=0.001)
    state = build_model(cfg).state_dict()
    assert "model.layers.1.mlp.experts.gate_up_proj" in hf.to_hf(state, cfg)
    state["layers.1.mlp.expert_bias"][2] = 0.001
    with pytest.raises(ConfigError, match="layer 1's expert_bias is not zero"):
        hf.to_hf(state, cfg)


def mixtral(directory, vocab_size: int = 300, layers: int = 2):
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        hidden_size=64,
        intermediate_size=40,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        router_aux_loss_coef=0.02,
        vocab_size=vocab_size,
        max_position_embeddings=64,
    )
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # decisive routing: the default init scores experts nearly alike
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(20)
    model.save_pretrained(directory)
    return model.eval()


def test_mixtral_import_then_export_round_trips_exactly(tmp_path):
    original = mixtral(tmp_path / "original", layers=3)
    imported = import_hf(tmp_path / "original", tmp_path / "run")
    ours, config, _ = load_model_for_inference(imported)
    moe = config.model.moe
    assert (moe.num_experts, moe.top_k, config.model.expert_width) == (4, 2, 40)
    assert (moe.router, moe.normalize_top_k, moe.shared_experts) == ("softmax", True, 0)
    tokens = torch.randint(0, 300, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), original(tokens).logits, rtol=1e-4, atol=1e-4)
    export_hf(imported, tmp_path / "again")
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert again["router_aux_loss_coef"] == pytest.approx(0.02)
    before = load_file(tmp_path / "original" / "model.safetensors")
    after = load_file(tmp_path / "again" / "model.safetensors")
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


def test_balance_loss_weighs_as_much_as_in_transformers(tmp_path):
    """One layer and one sequence, where both losses see the same statistics: the
    imported coefficient weighs megagpt's loss as router_aux_loss_coef weighs
    transformers' (whose assignment shares sum to top_k), and exports back to it."""
    original = mixtral(tmp_path / "one", layers=1)
    cfg = hf.model_config_from_hf(original.config)
    ours = build_model(cfg)
    ours.load_state_dict(hf.from_hf(original.state_dict(), cfg))
    tokens = torch.randint(0, 300, (1, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = original(tokens, output_router_logits=True).aux_loss
        ours.train()
        ours(tokens, tokens)
    (layer,) = ours.moe_layers
    torch.testing.assert_close(cfg.moe.aux_loss_coeff * layer.balance_loss[0], 0.02 * theirs)
    assert hf.hf_config(cfg).router_aux_loss_coef == pytest.approx(0.02)


def test_training_continues_from_an_imported_mixtral(tmp_path, dataset_prefix, tokenizer):
    """The first step of training from an imported model has the original model's loss."""
    original = mixtral(tmp_path / "original", vocab_size=512)
    data = [
        f"data.path={dataset_prefix}",
        f"data.tokenizer={tokenizer.path}",
        "data.seq_len=32",
        "data.split=90,10,0",
        "train.max_steps=1",
        "train.global_batch_size=4",
        "train.micro_batch_size=4",
        "optim.warmup_steps=1",
        "logging.tensorboard=false",
        "train.eval_interval=0",
    ]
    imported = import_hf(tmp_path / "original", tmp_path / "run", data)
    config = load_config(
        imported / "config.yaml",
        [f"checkpoint.resume={imported}", f"train.output_dir={tmp_path / 'continued'}"],
    )
    train(config)
    first = json.loads((tmp_path / "continued" / "metrics.jsonl").read_text().splitlines()[0])
    batch = torch.from_numpy(
        build_datasets(config.data, config.train.seed).train.samples(
            global_sample_indices(0, 0, 0, 1, 4, 4)
        )
    )
    with torch.no_grad():
        logits = original(batch[:, :-1]).logits
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
    assert first["step"] == 1 and first["loss"] == pytest.approx(float(expected), rel=1e-5)


def test_mixtral_preset_is_mixtral_8x7b():
    """Its Hugging Face config is transformers' MixtralConfig defaults, which are
    Mixtral 8x7B's; 46.7B parameters, 12.9B active (the paper's 47B and 13B)."""
    cfg = load_config("mixtral-8x7b").model
    ours, reference = hf.hf_config(cfg).to_dict(), transformers.MixtralConfig().to_dict()
    shape = [
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "num_local_experts",
        "num_experts_per_tok",
        "rms_norm_eps",
        "tie_word_embeddings",
        "sliding_window",
        "rope_parameters",
    ]
    assert {k: ours[k] for k in shape} == {k: reference[k] for k in shape}
    assert ours["max_position_embeddings"] == 32768  # config.json's (transformers: 128k)
    assert ours["router_aux_loss_coef"] == pytest.approx(0.02)  # config.json's
    counts = parameter_counts(cfg)
    assert counts["total"] == pytest.approx(46.7e9, rel=0.002)
    assert counts["active"] == pytest.approx(12.9e9, rel=0.002)
    assert hf.architecture(load_config("tiny-moe").model) == "mixtral"
