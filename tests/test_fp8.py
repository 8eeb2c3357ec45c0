"""FP8 block matmuls through torchao (train.fp8), emulated on CPU (MEGAGPT_FP8_EMULATE=1).

Emulation casts inputs, weights and output gradients to float8 with the recipe's scales
exactly as the GPU path does and runs the matmul on the dequantized values, so the
numerics (not the speed) are proven without an SM89+ GPU.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from megagpt.checkpoint import consolidated_state_dict
from megagpt.config import Config, ConfigError, apply_overrides
from megagpt.model.build import build_meta_model
from megagpt.parallel import init_distributed, shutdown_distributed
from megagpt.parallel.float8 import EMULATE_ENV, apply_float8
from megagpt.testing import run_distributed
from megagpt.training.trainer import train
from tests.conftest import LLAMA_BLOCKS
from tests.test_fp16 import first_step, gradients, train_on_this_rank

pytest.importorskip("torchao.float8")
from torchao.float8.float8_linear import Float8Linear  # noqa: E402

RECIPES = ["tensorwise", "rowwise"]

TOLERANCE = 2e-3
"""Relative distance allowed between an fp8 run's losses and bf16's. Each cast to
e4m3 rounds to 3 mantissa bits (up to 6% per element), but at this size the blocks add
a small share to a residual stream that the embedding and the LM head dominate, and
the loss averages 256 tokens: over 20 steps both recipes stayed within 1.2e-4 when
written, 17x below this. The loss is blind to most of what the blocks compute at
initialization, though: the gradient test below is the sharp one."""

GRADIENT_TOLERANCE = 0.2
"""Relative distance (in norm) allowed between each parameter's first-step gradient
with fp8 and with bf16. The backward pass rounds output gradients to e5m2 (tensorwise:
2 mantissa bits, up to 12.5% per element) or e4m3 (rowwise): when written the worst
parameter was 9.0% off with tensorwise and 6.5% with rowwise, while rowwise casts
with their scales patched to 1 lost the signal of every block gradient (100% off)."""


@pytest.fixture(autouse=True)
def emulate(monkeypatch):
    monkeypatch.setenv(EMULATE_ENV, "1")


def bf16(config: Config, *overrides: str) -> Config:
    return apply_overrides(config, ["train.precision=bf16", *overrides], "test")


# ---------------------------------------------------------------- what is converted
def converted(config: Config) -> tuple[nn.Module, set[str]]:
    model = build_meta_model(config.model)
    count = apply_float8(model, config.train.fp8, torch.device("cpu"), "bf16")
    names = {n for n, m in model.named_modules() if isinstance(m, Float8Linear)}
    assert count == len(names)
    return model, names


def test_exactly_the_block_linears_are_converted(tiny_config):
    config = bf16(tiny_config, *LLAMA_BLOCKS, "train.fp8=rowwise")
    model, names = converted(config)
    per_block = ["attn.qkv_proj", "attn.out_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert names == {f"layers.{i}.{leaf}" for i in range(2) for leaf in per_block}
    assert type(model.lm_head) is nn.Linear
    # The parameters keep their names: checkpoints do not change.
    assert set(model.state_dict()) == set(build_meta_model(config.model).state_dict())


def test_router_and_layers_of_unaligned_width_stay_in_bf16(tiny_config):
    """The MoE router is never converted; the shared expert's 24-wide MLP is not a
    multiple of 16 (the fp8 GEMMs' requirement), so it stays too."""
    moe = ["model.moe.num_experts=4", "model.moe.shared_experts=1", "model.moe.expert_width=24"]
    model, names = converted(bf16(tiny_config, *moe, "train.fp8=tensorwise"))
    assert names == {
        f"layers.{i}.attn.{leaf}" for i in range(2) for leaf in ("qkv_proj", "out_proj")
    }
    block = model.layers["0"].mlp
    assert type(block.router) is nn.Linear and type(block.shared.up_proj) is nn.Linear


# ---------------------------------------------------------------- training
@pytest.mark.parametrize("recipe", RECIPES)
def test_first_step_gradients_are_bf16s_within_fp8_rounding(tiny_config, recipe):
    env = init_distributed("cpu")
    try:
        reference = gradients(first_step(bf16(tiny_config))[0])
        fp8 = gradients(first_step(bf16(tiny_config, f"train.fp8={recipe}"))[0])
    finally:
        shutdown_distributed(env)
    assert set(fp8) == set(reference)
    for name, grad in reference.items():
        distance = float((fp8[name] - grad).norm() / grad.norm())
        assert distance <= GRADIENT_TOLERANCE, (name, distance)
    # The block matmuls did round to fp8.
    assert not torch.equal(
        fp8["layers.0.mlp.up_proj.weight"], reference["layers.0.mlp.up_proj.weight"]
    )


def test_fp8_trains_like_bf16(tiny_config):
    """20 steps at lr 1e-3 in bf16 autocast: each recipe within TOLERANCE of bf16."""
    steps = ["train.max_steps=20", "train.eval_interval=20", "optim.lr=1e-3"]
    reference = torch.tensor(train_on_this_rank(bf16(tiny_config, *steps))[0].losses)
    for recipe in RECIPES:
        out = f"train.output_dir={tiny_config.train.output_dir}-{recipe}"
        result = train_on_this_rank(bf16(tiny_config, *steps, out, f"train.fp8={recipe}"))[0]
        losses = torch.tensor(result.losses)
        assert not torch.equal(losses, reference), f"{recipe} did not compute in fp8"
        torch.testing.assert_close(losses, reference, rtol=TOLERANCE, atol=0)
        assert losses[-1] < losses[0] - 0.3  # it learns


PARALLEL_TOLERANCE = 2e-4
"""Relative distance allowed between a parallel layout's fp8 losses and one process's.
FSDP2 gathers each weight in bf16 (its param dtype), so a tensorwise scale comes from
the bf16-rounded amax rather than the fp32 master's, and tensor parallelism adds up
bf16 partial sums in another order: a few e4m3 roundings land on the other side (CI
saw 3.6e-5 at ZeRO-3's fourth step; tp2 stayed within 4e-5 when written). A rank that
lost its Float8Linears would compute plain bf16, which the test tells apart below."""

FP8_LAYOUTS = {  # name: (recipe, processes, settings)
    "zero3-tensorwise": ("tensorwise", 2, ["parallel.zero_stage=3"]),
    "pp2-tensorwise": ("tensorwise", 2, ["parallel.pipeline_parallel_size=2"]),
    # torchao's scales of sharded weights reduce over the shards (DTensor amax)
    "tp2-sp-rowwise": (
        "rowwise",
        2,
        ["parallel.tensor_parallel_size=2", "parallel.sequence_parallel=true"],
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", FP8_LAYOUTS)
def test_parallel_layouts_equal_one_process(tiny_config, layout):
    """ZeRO-3 shards Float8Linear's weights and gathers them whole for the forward; a
    pipeline stage holds whole Float8Linears; tensor parallelism computes each matmul's
    shards in fp8 with the whole tensor's scales: either way each rank computes the
    single process's fp8 matmuls. (The ranks inherit MEGAGPT_FP8_EMULATE from this
    process's environment.)"""
    recipe, world, settings = FP8_LAYOUTS[layout]
    steps = ["train.max_steps=4", "train.eval_interval=0"]
    one = train_on_this_rank(bf16(tiny_config, *steps, f"train.fp8={recipe}"))[0]
    plain = f"train.output_dir={tiny_config.train.output_dir}-bf16"
    without_fp8 = torch.tensor(train_on_this_rank(bf16(tiny_config, *steps, plain))[0].losses)
    out = f"train.output_dir={tiny_config.train.output_dir}-{layout}"
    config = bf16(tiny_config, *steps, out, f"train.fp8={recipe}", *settings)
    losses = torch.tensor(run_distributed(train_on_this_rank, world, args=(config,))[0][0].losses)
    torch.testing.assert_close(losses, torch.tensor(one.losses), rtol=PARALLEL_TOLERANCE, atol=0)
    assert not torch.allclose(losses, without_fp8, rtol=1e-6, atol=0), "the ranks ran bf16"


# ---------------------------------------------------------------- checkpoints
SCHEDULE = ["optim.decay_steps=6", "train.eval_interval=0", "logging.tensorboard=false"]


@pytest.mark.parametrize("saved_with, resumed_with", [("tensorwise", "none"), ("none", "rowwise")])
def test_checkpoints_interchange_with_and_without_fp8(
    tiny_config, tmp_path, saved_with, resumed_with
):
    """A checkpoint saved with one setting resumes (strictly: every name and shape must
    match) with the other and continues where the saving run did; fresh weights would
    start near the first step's loss instead."""
    common = [*SCHEDULE, "optim.lr=3e-3", "train.max_steps=6"]
    original = train(
        bf16(
            tiny_config,
            *common,
            f"train.output_dir={tmp_path / 'original'}",
            "checkpoint.interval=3",
            "checkpoint.keep_last=0",
            f"train.fp8={saved_with}",
        )
    )
    middle = tmp_path / "original" / "checkpoints" / "step_00000003"
    resumed = train(
        bf16(
            tiny_config,
            *common,
            f"train.output_dir={tmp_path / 'resumed'}",
            f"checkpoint.resume={middle}",
            f"train.fp8={resumed_with}",
        )
    )
    assert resumed.start_step == 3
    assert resumed.losses[0] < original.losses[0] - 0.1
    torch.testing.assert_close(
        torch.tensor(resumed.losses), torch.tensor(original.losses[3:]), rtol=TOLERANCE, atol=0
    )
    weights, _ = consolidated_state_dict(middle)
    assert set(weights) == set(build_meta_model(tiny_config.model).state_dict())


# ---------------------------------------------------------------- refusals
def test_refused_on_cpu_without_emulation(tiny_config, monkeypatch):
    monkeypatch.delenv(EMULATE_ENV)
    model = build_meta_model(tiny_config.model)
    with pytest.raises(ConfigError, match="SM89\\+ GPU .* MEGAGPT_FP8_EMULATE=1"):
        apply_float8(model, "tensorwise", torch.device("cpu"), "bf16")
    assert not any(isinstance(m, Float8Linear) for m in model.modules())


def test_refused_where_compute_is_not_bf16(tiny_config):
    """train.precision=auto passes validation (bf16 on GPUs) but is fp32 on CPU."""
    with pytest.raises(ConfigError, match="needs bf16 compute.*train.precision=bf16"):
        apply_float8(build_meta_model(tiny_config.model), "rowwise", torch.device("cpu"), "fp32")


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["train.precision=fp32"], "train.precision = 'fp32': must be bf16"),
        (["train.precision=fp16"], "train.precision = 'fp16': must be bf16"),
        (
            ["parallel.engine=deepspeed", "parallel.zero_stage=1"],
            "needs parallel.engine=native",
        ),
    ],
)
def test_validation_refusals(tiny_config, overrides, fragment):
    with pytest.raises(ConfigError) as error:
        apply_overrides(tiny_config, ["train.fp8=tensorwise", *overrides], "test")
    assert fragment in str(error.value)
    assert "train.fp8=none" in str(error.value)  # and says what works
