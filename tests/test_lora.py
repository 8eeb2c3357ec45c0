"""LoRA fine-tuning: adapters on a frozen base, in every layout, in checkpoints and exports.

A tiny model is pretrained for 3 steps (the base); LoRA fine-tunes start from it
(finetune.init) on the same corpus with a high learning rate, so that the adapters
move far enough for the comparisons to mean something.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from torch.distributed.tensor import Replicate, Shard

from megagpt.checkpoint import CheckpointError, consolidated_state_dict, load_model_for_inference
from megagpt.checkpoint.convert import export_hf
from megagpt.checkpoint.safe_dcp import read_index
from megagpt.config import ConfigError, apply_overrides, load_config
from megagpt.config.schema import LoraConfig, ModelConfig
from megagpt.evaluate import evaluate_checkpoint
from megagpt.model.build import build_meta_model, build_model
from megagpt.model.lora import apply_lora, is_adapter
from megagpt.testing import run_distributed
from megagpt.training.trainer import train
from tests.conftest import LLAMA_BLOCKS, tiny_overrides
from tests.lora_workers import adapter_gradients, adapter_layouts, forward_collectives

LLAMA = [*LLAMA_BLOCKS, "model.bias=false", "model.fused_qkv=false", "model.n_kv_heads=2"]
FAMILIES = {"gpt2": [], "llama": LLAMA}
LORA = ["finetune.lora.rank=4", "finetune.lora.alpha=8", "optim.lr=1e-2"]


def pretrain(dataset_prefix, tokenizer, out, family, seed=1234):
    overrides = tiny_overrides(dataset_prefix, tokenizer, out) + [
        *FAMILIES[family],
        "train.max_steps=3",
        "logging.tensorboard=false",
        f"train.seed={seed}",
    ]
    return train(load_config(None, overrides)).checkpoint


@pytest.fixture(scope="module")
def bases(dataset_prefix, tokenizer, tmp_path_factory):
    """A pretrained checkpoint per model family."""
    return {
        family: pretrain(dataset_prefix, tokenizer, tmp_path_factory.mktemp(family), family)
        for family in FAMILIES
    }


def finetune_config(dataset_prefix, tokenizer, base, out, *extra):
    overrides = tiny_overrides(dataset_prefix, tokenizer, out) + [
        f"finetune.init={base}",
        "logging.tensorboard=false",
        *LORA,
        *extra,
    ]
    return load_config(None, overrides)


@pytest.fixture(scope="module")
def lora_run(dataset_prefix, tokenizer, bases, tmp_path_factory):
    """6 steps of LoRA on the GPT-2-shaped base, checkpointed every 3."""
    out = tmp_path_factory.mktemp("lora")
    config = finetune_config(
        dataset_prefix,
        tokenizer,
        bases["gpt2"],
        out,
        "checkpoint.interval=3",
        "checkpoint.keep_last=0",
    )
    return config, train(config), out


def adapters_of(state: dict) -> dict:
    return {k: v for k, v in state.items() if is_adapter(k)}


# ---------------------------------------------------------------- settings
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["finetune.lora.targets=[qkv_proj,attn]"], "unknown projections attn; choose among"),
        (["finetune.lora.targets=[]"], "is empty"),
        (["finetune.lora.rank=-1"], "must be >= 0"),
        (["finetune.lora.alpha=0"], "finetune.lora.alpha = 0.0: must be positive"),
        (["finetune.lora.dropout=1"], "must be in [0, 1)"),
    ],
)
def test_bad_settings_say_what_would_work(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
        load_config(None, ["finetune.init=base", "finetune.lora.rank=4", *overrides])


def test_lora_needs_base_weights():
    with pytest.raises(ConfigError, match="needs finetune.init"):
        load_config(None, ["finetune.lora.rank=4"])


def test_targets_the_model_lacks_are_refused():
    model = build_meta_model(ModelConfig())  # GELU: no gate_proj
    with pytest.raises(ConfigError, match="matches no projection.*up_proj"):
        apply_lora(model, LoraConfig(rank=4, targets=["gate_proj"]))


# ---------------------------------------------------------------- the model
@pytest.mark.parametrize("family", FAMILIES)
def test_zero_b_equals_the_base_model_at_step_0(family):
    shape = {"gpt2": {}, "llama": dict(norm="rmsnorm", activation="swiglu", fused_qkv=False)}
    cfg = ModelConfig(vocab_size=128, n_layers=2, hidden_size=64, n_heads=4, **shape[family])
    base = build_model(cfg, seed=7).eval()
    adapted = build_meta_model(cfg)
    names = apply_lora(adapted, LoraConfig(rank=4))
    adapted.to_empty(device="cpu")
    adapted.tie_weights()
    adapted.init_weights(7)  # per-name seeds: the base weights are the same values
    adapted.eval()
    per_layer = 4 if family == "gpt2" else 7  # qkv|q,k,v + out + up|gate,up + down
    assert len(names) == per_layer * cfg.n_layers
    tokens = torch.randint(0, 128, (2, 16))
    assert torch.equal(adapted(tokens), base(tokens))
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert trainable and all(is_adapter(n) for n in trainable)
    a = dict(adapted.named_parameters())["layers.0.attn.out_proj.lora_A"]
    assert a.abs().sum() > 0  # A is random, B zero


def test_first_step_equals_a_full_finetune_and_only_adapters_use_memory(
    dataset_prefix, tokenizer, bases, lora_run, tmp_path
):
    config, lora, _ = lora_run
    full_config = apply_overrides(
        config, ["finetune.lora.rank=0", f"train.output_dir={tmp_path}"], "test"
    )
    full = train(full_config)
    assert lora.losses[0] == full.losses[0]  # before any update: exactly the base model
    meta = build_meta_model(config.model)
    weights = sum(p.numel() for p in meta.parameters())
    apply_lora(meta, config.finetune.lora)
    adapters = sum(p.numel() for n, p in meta.named_parameters() if is_adapter(n))
    assert lora.memory == {
        "parameters": 4 * (weights + adapters),
        "gradients": 4 * adapters,
        "optimizer_state": 2 * 4 * adapters,
    }
    assert full.memory["optimizer_state"] == 2 * 4 * weights


def test_only_adapters_train_and_have_optimizer_state(lora_run):
    from megagpt.parallel import init_distributed, shutdown_distributed
    from megagpt.parallel.batches import step_batches
    from megagpt.parallel.parallelize import parallelize
    from megagpt.training.finetune import build_run_datasets

    config = lora_run[0]
    env = init_distributed("cpu")
    try:
        module = parallelize(config, env)
        batches = step_batches(build_run_datasets(config).train, 0, module, config)
        module.train_step(batches)
        module.optimizer_step(1e-3)
        names = {id(p): n for n, p in module.named_parameters()}
        with_state = sorted(names[id(p)] for p in module.optimizers.state)
        with_grad = sorted(n for n, p in module.named_parameters() if p.grad is not None)
    finally:
        shutdown_distributed(env)
    assert with_state == with_grad
    assert with_state and all(is_adapter(n) for n in with_state)
    assert len(with_state) == 2 * 4 * config.model.n_layers  # A and B on 4 projections


# ---------------------------------------------------------------- checkpoints
def test_checkpoint_holds_the_adapters_and_names_its_base(lora_run, bases):
    config, result, out = lora_run
    metadata = json.loads((result.checkpoint / "metadata.json").read_text())
    record = metadata["lora"]
    assert record["base"] == str(bases["gpt2"].resolve())
    assert len(record["base_weights_hash"]) == 64 and record["rank"] == 4
    index = read_index(result.checkpoint / "state").state_dict_metadata
    stored = [k for k in index if not k.startswith("rng.")]
    assert stored and all(is_adapter(k) for k in stored)
    assert {k.split(".")[0] for k in stored} == {"model", "optimizer"}
    # The base is untouched; the adapters moved (B is no longer zero).
    base = consolidated_state_dict(bases["gpt2"])[0]
    tuned = consolidated_state_dict(out)[0]
    assert all(torch.equal(tuned[k], v) for k, v in base.items())
    assert all(tuned[k].abs().max() > 0 for k in tuned if k.endswith("lora_B"))


def test_resume_auto_equals_an_uninterrupted_run(
    dataset_prefix, tokenizer, bases, lora_run, tmp_path
):
    _, whole, whole_dir = lora_run
    args = (dataset_prefix, tokenizer, bases["gpt2"], tmp_path)
    first = train(finetune_config(*args, "train.max_steps=3"))
    second = train(finetune_config(*args, "train.max_steps=6", "checkpoint.resume=auto"))
    assert second.start_step == 3
    assert first.losses + second.losses == whole.losses  # exact float equality
    a, b = consolidated_state_dict(whole_dir)[0], consolidated_state_dict(tmp_path)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_eval_loads_base_and_adapters(lora_run):
    config, result, out = lora_run
    evaluated = evaluate_checkpoint(str(out), "valid", config.train.eval_iters)
    assert evaluated["loss"] == pytest.approx(result.val_losses[6], rel=1e-6)


def test_a_changed_or_missing_base_is_refused(dataset_prefix, tokenizer, tmp_path):
    base_run = tmp_path / "base"
    base = pretrain(dataset_prefix, tokenizer, base_run, "gpt2")
    tuned = tmp_path / "tuned"
    train(finetune_config(dataset_prefix, tokenizer, base, tuned, "train.max_steps=2"))
    pretrain(dataset_prefix, tokenizer, base_run, "gpt2", seed=99)  # rewrites step_3
    resume = finetune_config(
        dataset_prefix, tokenizer, base, tuned, "train.max_steps=4", "checkpoint.resume=auto"
    )
    named = re.escape(f"holds LoRA adapters trained on the base checkpoint {base.resolve()}")
    both = f"step_00000002 {named}.*have changed since"
    with pytest.raises(CheckpointError, match=both):
        train(resume)
    with pytest.raises(CheckpointError, match=both):
        load_model_for_inference(tuned)
    shutil.rmtree(base_run)
    with pytest.raises(CheckpointError, match="which is gone"):
        export_hf(tuned, tmp_path / "hf", merge_lora=True)


def test_a_lora_checkpoint_is_no_base_and_a_plain_one_no_lora_resume(lora_run, tmp_path):
    config, result, _ = lora_run
    as_init = apply_overrides(
        config, [f"finetune.init={result.checkpoint}", f"train.output_dir={tmp_path / 'a'}"], "t"
    )
    with pytest.raises(CheckpointError, match="holds only LoRA adapters.*--merge-lora"):
        train(as_init)
    without = apply_overrides(
        config,
        ["finetune.lora.rank=0", f"checkpoint.resume={result.checkpoint}"]
        + [f"train.output_dir={tmp_path / 'b'}"],
        "t",
    )
    with pytest.raises(CheckpointError, match="resume it with finetune.lora.rank=4"):
        train(without)


# ---------------------------------------------------------------- export
@pytest.mark.parametrize("family", FAMILIES)
def test_merged_export_gives_the_adapted_logits_in_transformers(
    dataset_prefix, tokenizer, bases, tmp_path, family
):
    transformers = pytest.importorskip("transformers")
    from megagpt.cli import main

    out = tmp_path / "run"
    train(finetune_config(dataset_prefix, tokenizer, bases[family], out, "train.max_steps=4"))
    with pytest.raises(CheckpointError, match="add --merge-lora"):
        export_hf(out, tmp_path / "refused")
    hf_dir = tmp_path / "hf"
    assert (
        main(["export", "hf", "--checkpoint", str(out), "--out", str(hf_dir), "--merge-lora"]) == 0
    )
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ours = load_model_for_inference(out)[0]
    base = load_model_for_inference(bases[family])[0]
    tokens = torch.randint(0, tokenizer.vocab_size, (2, 32))
    with torch.no_grad():
        expected, got = ours(tokens), theirs(tokens).logits
    vocab = got.shape[-1]
    assert (expected[..., :vocab] - got).abs().max() <= 1e-4
    with torch.no_grad():  # and the adapters do change the model
        assert (base(tokens) - expected).abs().max() > 1e-2


# ---------------------------------------------------------------- parallel layouts
PARALLEL = [
    ("dp2-zero1", 2, ["parallel.zero_stage=1"]),
    ("dp2-zero3", 2, ["parallel.zero_stage=3"]),
    ("tp2", 2, ["parallel.tensor_parallel_size=2"]),
    ("pp2-1f1b", 2, ["parallel.pipeline_parallel_size=2"]),
    ("tp2-dp2-zero3", 4, ["parallel.tensor_parallel_size=2", "parallel.zero_stage=3"]),
]


@pytest.fixture(scope="module")
def parity_run(dataset_prefix, tokenizer, bases, tmp_path_factory):
    """The one-process reference of the layout tests, at a learning rate of 3e-4: Adam
    divides each update by its gradient's running RMS, which turns the fp32 noise of a
    nearly cancelling adapter gradient into weight differences in proportion to the
    learning rate (see tests/test_parallel.py); at 1e-2 they reached 1e-5 in some runs."""
    out = tmp_path_factory.mktemp("lora_parity")
    config = finetune_config(dataset_prefix, tokenizer, bases["gpt2"], out, "optim.lr=3e-4")
    return config, train(config), out


@pytest.mark.slow
@pytest.mark.parametrize("name, world, layout", PARALLEL, ids=[p[0] for p in PARALLEL])
def test_layout_finetunes_like_one_process(parity_run, tmp_path, name, world, layout):
    config, reference, reference_dir = parity_run
    parallel = apply_overrides(
        config, [*layout, f"train.output_dir={tmp_path}", "checkpoint.interval=0"], name
    )
    result = run_distributed(train, world, args=(parallel,))[0]
    torch.testing.assert_close(
        torch.tensor(result.losses), torch.tensor(reference.losses), rtol=1e-5, atol=0
    )
    expected = adapters_of(consolidated_state_dict(reference_dir)[0])
    got = adapters_of(consolidated_state_dict(tmp_path)[0])
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(
            got[key], value, rtol=1e-5, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}"
        )


@pytest.mark.slow
def test_tensor_parallel_shards_adapters_like_their_projections(lora_run):
    config = apply_overrides(lora_run[0], ["parallel.tensor_parallel_size=2"], "tp2")
    layouts = run_distributed(adapter_layouts, 2, args=(config,))[0]
    shard0, shard1, whole = Shard(0), Shard(1), Replicate()
    for proj in ("attn.qkv_proj", "mlp.up_proj"):  # column-parallel
        assert layouts[f"layers.0.{proj}.weight"] == (shard0, False)
        assert layouts[f"layers.0.{proj}.lora_A"] == (whole, True)
        assert layouts[f"layers.0.{proj}.lora_B"] == (shard0, True)
    for proj in ("attn.out_proj", "mlp.down_proj"):  # row-parallel
        assert layouts[f"layers.0.{proj}.weight"] == (shard1, False)
        assert layouts[f"layers.0.{proj}.lora_A"] == (shard1, True)
        assert layouts[f"layers.0.{proj}.lora_B"] == (whole, True)


@pytest.mark.slow
def test_sequence_parallel_adapter_gradients_match_one_process(lora_run):
    """With B random (so A gets gradients too) the first step's adapter gradients under
    tensor 2 with sequence parallelism equal one process's, and nothing else (the norms
    that torch's SequenceParallel re-creates included) gets a gradient."""
    config = lora_run[0]
    reference_loss, reference = adapter_gradients(config)
    layout = ["parallel.tensor_parallel_size=2", "parallel.sequence_parallel=true"]
    loss, grads = run_distributed(
        adapter_gradients, 2, args=(apply_overrides(config, layout, "sp"),)
    )[0]
    assert loss == pytest.approx(reference_loss, rel=1e-6)
    assert grads.keys() == reference.keys() and all(is_adapter(k) for k in grads)
    for key, grad in reference.items():
        assert (grads[key] - grad).abs().max() <= 1e-5 * grad.abs().max(), key


@pytest.mark.slow
def test_row_parallel_adapters_add_no_collective_to_the_forward(lora_run):
    """The adapters' partial sums are reduced with the base projection's, by the same
    all-reduce: a tensor-parallel forward has exactly the collectives it has without
    LoRA."""
    config = apply_overrides(lora_run[0], ["parallel.tensor_parallel_size=2"], "tp2")
    plain = apply_overrides(config, ["finetune.lora.rank=0"], "tp2")
    with_lora = run_distributed(forward_collectives, 2, args=(config,))[0]
    without = run_distributed(forward_collectives, 2, args=(plain,))[0]
    assert with_lora == without and sum(without.values()) > 0
