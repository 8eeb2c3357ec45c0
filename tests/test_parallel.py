"""Every layout computes what one process computes.

Each layout trains a tiny GPT for 5 optimizer steps on real gloo ranks, from the same
initial weights and data as a single-process run, with dropout off and fp32: the loss
of every step must agree within 1e-5 relative and the final weights within 1e-5 (see
below for the few that Adam may move further). The first step's gradients are compared
directly as well.

The learning rate is 3e-4. Adam divides each update by the running RMS of its
gradient, so a component whose gradient is near zero or cancels from step to step turns
fp32 noise (gradients agree to 5e-7 of their scale) into visible weight differences, in
proportion to the learning rate: 1.06e-5 at lr 1e-3 and 3.2e-6 at 3e-4 for the
Llama-shaped model under tensor parallelism on this machine, and 1.46e-5 at 3e-4 in one
element of 32,768 under context parallelism on a CI host (2.5e-6 here). Hence
`assert_trained_alike`: every weight within 1e-5 (+ 1e-5 relative), except at most one
in a thousand, which may be off by a fifth of a step (lr / 5); a wrong gradient moves
most of a tensor.
"""

from __future__ import annotations

import pytest
import torch

from megagpt.checkpoint import consolidated_state_dict
from megagpt.config import Config, ConfigError, apply_overrides, load_config
from megagpt.model.flops import parameter_counts
from megagpt.parallel.dims import ParallelDims
from megagpt.testing import run_distributed
from megagpt.training.trainer import train
from tests.conftest import LLAMA_BLOCKS, tiny_overrides
from tests.parallel_workers import first_step_gradients

GPT2 = []
LLAMA = [
    *LLAMA_BLOCKS,
    "model.bias=false",
    "model.tie_embeddings=false",
    "model.n_kv_heads=2",
    "model.fused_qkv=false",
]
TP2, PP2 = "parallel.tensor_parallel_size=2", "parallel.pipeline_parallel_size=2"

# (name, model family, world size, layout overrides)
LAYOUTS = [
    ("tp2", GPT2, 2, [TP2]),
    ("tp2-sp", GPT2, 2, [TP2, "parallel.sequence_parallel=true"]),
    ("pp2-gpipe", GPT2, 2, [PP2, "parallel.pipeline_schedule=gpipe"]),
    ("pp2-1f1b", GPT2, 2, [PP2, "parallel.pipeline_schedule=1f1b"]),
    (
        "pp2-interleaved-v2",
        GPT2,
        2,
        [PP2, "parallel.pipeline_schedule=interleaved_1f1b", "parallel.virtual_stages=2"],
    ),
    (
        "pp2-zero-bubble-v2",
        GPT2,
        2,
        [PP2, "parallel.pipeline_schedule=zero_bubble", "parallel.virtual_stages=2"],
    ),
    ("dp2-zero0", GPT2, 2, ["parallel.zero_stage=0"]),
    ("dp2-zero1", GPT2, 2, ["parallel.zero_stage=1"]),
    ("dp2-zero2", GPT2, 2, ["parallel.zero_stage=2"]),
    ("dp2-zero3", GPT2, 2, ["parallel.zero_stage=3"]),
    (
        "tp2-dp2-zero3-full-ac",
        GPT2,
        4,
        [TP2, "parallel.zero_stage=3", "parallel.activation_checkpointing=full"],
    ),
    ("tp2-pp2-dp2-zero1", GPT2, 8, [TP2, PP2, "parallel.zero_stage=1"]),
    (
        "llama-tp2-sp-selective-ac",
        LLAMA,
        2,
        [TP2, "parallel.sequence_parallel=true", "parallel.activation_checkpointing=selective"],
    ),
    (
        "llama-tp2-pp2-zero2-sp",
        LLAMA,
        4,
        [TP2, PP2, "parallel.zero_stage=2", "parallel.sequence_parallel=true"],
    ),
]


def base_config(dataset_prefix, tokenizer, output_dir, family) -> Config:
    overrides = tiny_overrides(dataset_prefix, tokenizer, output_dir) + [
        "model.n_layers=4",
        "train.max_steps=5",
        "train.eval_interval=5",
        "train.eval_iters=1",
        "train.micro_batch_size=2",
        "optim.lr=3e-4",
        "logging.tensorboard=false",
    ]
    return load_config(None, overrides + family)


@pytest.fixture(scope="module")
def references(dataset_prefix, tokenizer, tmp_path_factory):
    """One single-process run per model family: its result and final weights."""
    runs = {}
    for name, family in (("gpt2", GPT2), ("llama", LLAMA)):
        out = tmp_path_factory.mktemp(f"reference-{name}")
        config = base_config(dataset_prefix, tokenizer, out, family)
        result = train(config)
        runs[id(family)] = (config, result, consolidated_state_dict(out)[0])
    return runs


@pytest.mark.parametrize("name, family, world, layout", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_layout_trains_like_one_process(name, family, world, layout, references, tmp_path):
    reference_config, reference, reference_weights = references[id(family)]
    config = apply_overrides(reference_config, [*layout, f"train.output_dir={tmp_path}"], name)
    results = run_distributed(train, world, args=(config,))
    torch.testing.assert_close(
        torch.tensor(results[0].losses), torch.tensor(reference.losses), rtol=1e-5, atol=0
    )
    assert results[0].val_losses[5] == pytest.approx(reference.val_losses[5], rel=1e-5)
    assert all(r.losses == results[0].losses for r in results)  # every rank logs the same
    if name.startswith("dp2-zero"):
        assert_zero_memory(config, config.parallel.zero_stage, results[0].memory)
    assert_trained_alike(consolidated_state_dict(tmp_path)[0], reference_weights, config.optim.lr)


def assert_trained_alike(weights: dict, reference: dict, lr: float) -> None:
    """Final weights of a layout against the single-process ones (module docstring: Adam
    may amplify fp32 noise in a few components up to a fraction of one step)."""
    assert weights.keys() == reference.keys()
    for key, value in reference.items():
        difference = (weights[key] - value).abs()
        outliers = int((difference > 1e-5 + 1e-5 * value.abs()).sum())
        assert outliers <= value.numel() // 1000, (
            f"{key}: {outliers} of {value.numel()} weights differ by more than 1e-5 "
            f"(largest {difference.max():.3g})"
        )
        assert difference.max() <= lr / 5, f"{key}: a weight differs by {difference.max():.3g}"


GRADIENT_LAYOUTS = [
    x for x in LAYOUTS if x[0] in ("tp2-sp", "pp2-1f1b", "dp2-zero2", "llama-tp2-pp2-zero2-sp")
]


@pytest.mark.parametrize(
    "name, family, world, layout", GRADIENT_LAYOUTS, ids=[x[0] for x in GRADIENT_LAYOUTS]
)
def test_first_step_gradients_match_one_process(name, family, world, layout, references):
    config = references[id(family)][0]
    reference_loss, reference = first_step_gradients(config)
    parallel = apply_overrides(config, layout, name)
    per_rank = run_distributed(first_step_gradients, world, args=(parallel,))
    assert per_rank[0][0] == pytest.approx(reference_loss, rel=1e-6)
    gathered = {}
    for _, grads in per_rank:  # pipeline stages each hold their own parameters
        gathered.update(grads)
    if config.model.tie_embeddings and "lm_head.weight" in gathered:
        # The last stage's copy of the tied matrix gets the summed gradient too.
        tied_copy = gathered.pop("lm_head.weight")
        torch.testing.assert_close(tied_copy, gathered["embed_tokens.weight"], rtol=0, atol=0)
    assert gathered.keys() == reference.keys()
    for key, grad in reference.items():
        scale = grad.abs().max()
        assert (gathered[key] - grad).abs().max() <= 1e-5 * scale, key


def assert_zero_memory(config: Config, zero_stage: int, memory: dict[str, int]) -> None:
    """Per-rank optimizer state is 1/dp of the unsharded size from stage 1 on, and
    parameters are 1/dp at stage 3 (FSDP2 also keeps them sharded between steps at
    stages 1-2, where DeepSpeed would keep them whole)."""
    from megagpt.model.build import build_meta_model

    full = parameter_counts(config.model)["total"] * 4  # fp32 bytes, tied matrix once
    # Each parameter is cut along dim 0; an uneven cut costs less than one row.
    shapes = [tuple(p.shape) for p in build_meta_model(config.model).parameters()]
    slack = 4 * sum(shape[1] if len(shape) > 1 else 1 for shape in shapes)
    shard = full / 2 if zero_stage >= 1 else full
    assert abs(memory["optimizer_state"] - 2 * shard) <= 2 * slack
    assert abs(memory["parameters"] - shard) <= slack
    if zero_stage == 3:
        assert memory["parameters"] < 0.55 * full


def test_compile_per_block_matches_eager(references, tmp_path):
    config, reference, _ = references[id(GPT2)]
    compiled = train(
        apply_overrides(
            config,
            ["train.compile=true", "train.max_steps=2", f"train.output_dir={tmp_path}"],
            "compile",
        )
    )
    torch.testing.assert_close(
        torch.tensor(compiled.losses), torch.tensor(reference.losses[:2]), rtol=1e-5, atol=0
    )


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_in_one_process(mode, references, tmp_path):
    config, reference, _ = references[id(LLAMA)]
    config = apply_overrides(
        config, [f"parallel.activation_checkpointing={mode}", f"train.output_dir={tmp_path}"], "ac"
    )
    assert train(config).losses == pytest.approx(reference.losses, rel=1e-6)


# ---------------------------------------------------------------- misconfigurations
def layout_error(overrides, world_size):
    with pytest.raises(ConfigError) as error:
        config = load_config(None, overrides)
        ParallelDims.from_config(config, world_size)
    return str(error.value)


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        (
            [TP2, PP2],
            6,
            "tensor_parallel_size x parallel.pipeline_parallel_size = 2 x 2 = 4 does "
            "not divide the number of processes (6)",
        ),
        (
            [TP2, "parallel.data_parallel_size=3"],
            4,
            "parallel.data_parallel_size = 3: 4 processes / (tensor 2 x pipeline 1) leave 2",
        ),
        (
            ["parallel.tensor_parallel_size=4"],
            4,
            "must divide model.n_heads (6); sizes that do: 1, 2, 3, 6",
        ),
        ([TP2, "model.n_kv_heads=1"], 2, "must divide the key/value heads (1)"),
        (
            [TP2, "model.vocab_size=4097"],
            2,
            "must divide the vocabulary (4097); set model.pad_vocab_size_to_multiple_of",
        ),
        (
            ["parallel.pipeline_parallel_size=5"],
            5,
            "makes 5 pipeline stages, more than the model's 4 layers",
        ),
        (
            [PP2, "parallel.virtual_stages=3", "parallel.pipeline_schedule=interleaved_1f1b"],
            2,
            "makes 6 pipeline stages",
        ),
        (
            [
                "parallel.pipeline_parallel_size=4",
                "train.global_batch_size=16",
                "train.micro_batch_size=8",
            ],
            4,
            "'1f1b' needs at least as many microbatches as pipeline stages (4), but a step has 2",
        ),
        (
            [
                PP2,
                "parallel.pipeline_schedule=interleaved_1f1b",
                "parallel.virtual_stages=2",
                "train.global_batch_size=5",
                "train.micro_batch_size=1",
            ],
            2,
            "needs the number of microbatches (5) to be a multiple",
        ),
        ([PP2, "parallel.virtual_stages=2"], 2, "must be 1 with parallel.pipeline_schedule='1f1b'"),
        (
            [PP2, "parallel.pipeline_schedule=interleaved_1f1b"],
            2,
            "must be at least 2 with parallel.pipeline_schedule",
        ),
        (["parallel.sequence_parallel=true"], 1, "needs parallel.tensor_parallel_size > 1"),
        (
            [TP2, "parallel.sequence_parallel=true", "data.seq_len=127"],
            2,
            "data.seq_len = 127: must be divisible by parallel.tensor_parallel_size (2)",
        ),
        (["parallel.zero_stage=4"], 1, "parallel.zero_stage = 4: must be 0"),
        (
            ["train.global_batch_size=12", "train.micro_batch_size=4"],
            2,
            "must be a multiple of train.micro_batch_size x data-parallel size (4 x 2 = 8)",
        ),
    ],
)
def test_impossible_layouts_fail_with_what_would_work(overrides, world, message):
    assert message in layout_error(overrides, world)


@pytest.mark.parametrize(
    "world, layout", [(2, ["parallel.zero_stage=1"]), (2, [TP2])], ids=["dp2-zero1", "tp2"]
)
def test_dropout_masks_match_one_process(world, layout, references, tmp_path):
    """With dropout on, data parallelism and tensor parallelism (without sequence
    parallelism or attention dropout) still reproduce the single-process losses."""
    config, _, _ = references[id(GPT2)]
    dropout = apply_overrides(
        config,
        ["model.dropout=0.2", "train.max_steps=3", f"train.output_dir={tmp_path}/one"],
        "dropout",
    )
    reference = train(dropout)
    parallel = apply_overrides(dropout, [*layout, f"train.output_dir={tmp_path}/many"], "d")
    result = run_distributed(train, world, args=(parallel,))[0]
    no_dropout = references[id(GPT2)][1].losses[:3]
    assert reference.losses != pytest.approx(no_dropout, rel=1e-3)  # dropout is active
    torch.testing.assert_close(
        torch.tensor(result.losses), torch.tensor(reference.losses), rtol=1e-5, atol=0
    )
