"""Expert parallelism (parallel.expert_parallel_size): routed experts split over ranks,
tokens sent to them by all-to-all. Each layout trains as one process does (losses,
the auxiliary losses' effect on the router, the balancing bias and every weight within
1e-5 in fp32), checkpoints move between expert-parallel and single-process runs, and
layouts it cannot run are refused with what would work."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from megagpt.checkpoint import consolidated_state_dict
from megagpt.config import Config, ConfigError, apply_overrides
from megagpt.parallel.dims import ParallelDims
from megagpt.parallel.expert_parallel import apply_expert_parallel
from megagpt.testing import run_distributed
from megagpt.training.trainer import train
from tests.test_moe import MOE_TRAINING, moe_config, moe_layer
from tests.test_parallel import assert_trained_alike

SETTINGS = [
    *MOE_TRAINING,  # 4 experts, top 2, a shared expert, auxiliary and z-losses
    "model.moe.bias_update_rate=0.01",  # the balancing bias moves with the summed counts
    "train.micro_batch_size=2",  # 4 microbatches: up to 4 data-parallel ranks
    "train.max_steps=5",
    "train.eval_interval=5",
    "train.eval_iters=1",
    "logging.tensorboard=false",
]
LLAMA = ["model.norm=rmsnorm", "model.position_embedding=rope", "model.activation=swiglu"]
EP2 = "parallel.expert_parallel_size=2"
CP2 = "parallel.context_parallel_size=2"
TP2 = "parallel.tensor_parallel_size=2"
PP2_INTERLEAVED = [
    "parallel.pipeline_parallel_size=2",
    "parallel.pipeline_schedule=interleaved_1f1b",
    "parallel.virtual_stages=2",
    "model.n_layers=4",
]

LAYOUTS = [  # (name, processes, settings)
    ("ep2-zero1", 2, [EP2, "parallel.zero_stage=1"]),
    ("ep2-zero3-swiglu", 2, [EP2, "parallel.zero_stage=3", *LLAMA]),
    ("ep2-dp4-zero1", 4, [EP2, "parallel.zero_stage=1"]),  # experts also sharded by ZeRO
    # recomputation in backward repeats the all-to-alls, in the same order on every rank
    (
        "ep2-zero2-full-ac",
        2,
        [EP2, "parallel.zero_stage=2", "parallel.activation_checkpointing=full"],
    ),
    ("cp2", 2, [CP2]),  # the balance loss counts each sequence over both halves
    ("cp2-ep2", 2, [CP2, EP2]),  # the context ranks hold half of the experts each
    ("tp2", 2, [TP2]),  # router and experts whole on both tensor ranks
    ("tp2-sp-swiglu", 2, [TP2, "parallel.sequence_parallel=true", *LLAMA]),
    ("ep2-tp2", 4, [EP2, TP2, "parallel.zero_stage=1"]),
    # stage 0's auxiliary losses reach backward through the hidden states it sends
    ("pp2", 2, ["parallel.pipeline_parallel_size=2"]),
    ("pp2-interleaved-ep2-swiglu", 4, [*PP2_INTERLEAVED, EP2, "parallel.zero_stage=1", *LLAMA]),
]


def with_moe(tiny_config: Config, *overrides: str) -> Config:
    return apply_overrides(tiny_config, [*SETTINGS, *overrides], "test")


def inputs(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank `rank`'s tokens and the gradient its output receives."""
    generator = torch.Generator().manual_seed(rank)
    return torch.randn(2, 5, 32, generator=generator), torch.randn(2, 5, 32, generator=generator)


def dispatch_on_this_rank():
    """One MoE layer with its experts split over the ranks: output, input gradient,
    and this rank's expert weights and their gradients."""
    layer = moe_layer(moe_config(num_experts=4, top_k=2))
    with torch.no_grad():  # expert 3 is never chosen: an empty group on its rank
        layer.expert_bias[3] = -100.0
    apply_expert_parallel(layer, init_device_mesh("cpu", (dist.get_world_size(),)))
    x, upstream = inputs(dist.get_rank())
    x.requires_grad_(True)
    out = layer(x)
    out.backward(upstream)
    weight = layer.experts.up_proj
    return out.detach(), x.grad, weight.to_local().detach(), weight.grad.to_local()


def test_all_to_all_dispatch_equals_one_process():
    """Each rank routes its own tokens, half of whose copies are computed on the other
    rank: outputs and input gradients are one process's on the same tokens, and each
    rank's expert gradient is 1/ep of one process's (ZeRO's average over the ranks
    holding the same experts supplies the rest in training)."""
    per_rank = run_distributed(dispatch_on_this_rank, 2)
    layer = moe_layer(moe_config(num_experts=4, top_k=2))
    with torch.no_grad():
        layer.expert_bias[3] = -100.0
    x = torch.cat([inputs(0)[0], inputs(1)[0]]).requires_grad_(True)
    out = layer(x)
    out.backward(torch.cat([inputs(0)[1], inputs(1)[1]]))
    for rank, (rank_out, rank_grad, weight, weight_grad) in enumerate(per_rank):
        rows = slice(2 * rank, 2 * rank + 2)
        torch.testing.assert_close(rank_out, out[rows].detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rank_grad, x.grad[rows], rtol=1e-5, atol=1e-6)
        experts = slice(2 * rank, 2 * rank + 2)  # the rank's half of the experts
        assert weight.shape == (2, 32, 16)
        torch.testing.assert_close(weight, layer.experts.up_proj[experts].detach())
        full_grad = layer.experts.up_proj.grad[experts]
        torch.testing.assert_close(2 * weight_grad, full_grad, rtol=1e-5, atol=1e-6)
    assert per_rank[1][3][1].abs().max() == 0  # expert 3 received nothing


@pytest.mark.parametrize("name, world, layout", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_layout_trains_like_one_process(tiny_config, tmp_path, name, world, layout):
    family = [s for s in layout if s.startswith("model.")]  # the reference's model too
    reference_config = with_moe(tiny_config, f"train.output_dir={tmp_path}/one", *family)
    reference = train(reference_config)
    config = apply_overrides(reference_config, [*layout, f"train.output_dir={tmp_path}/ep"], name)
    results = run_distributed(train, world, args=(config,))
    torch.testing.assert_close(
        torch.tensor(results[0].losses), torch.tensor(reference.losses), rtol=1e-5, atol=0
    )
    assert results[0].val_losses[5] == pytest.approx(reference.val_losses[5], rel=1e-5)
    weights = consolidated_state_dict(tmp_path / "ep")[0]
    reference_weights = consolidated_state_dict(tmp_path / "one")[0]
    assert_trained_alike(weights, reference_weights, config.optim.lr)
    # Not vacuous: the bias moved, and the experts were trained (not their initial values).
    assert reference_weights["layers.1.mlp.expert_bias"].abs().max() > 0


@pytest.mark.parametrize(
    "saved_on, resumed_on", [(2, 1), (1, 2)], ids=["cp2-ep2-to-1", "1-to-cp2-ep2"]
)
def test_checkpoints_move_between_expert_parallel_and_one_process(
    tiny_config, tmp_path, saved_on, resumed_on
):
    """Saved at step 3 of 6 on one layout, resumed on the other (context 2 x experts 2,
    or one process): the same losses as the original run's own last three steps."""

    def run(world: int, out: str, *overrides: str):
        layout = [CP2, EP2] if world > 1 else []
        config = with_moe(
            tiny_config, "train.max_steps=6", f"train.output_dir={tmp_path / out}", *layout
        )
        config = apply_overrides(config, list(overrides), out)
        if world == 1:
            return train(config)
        return run_distributed(train, world, args=(config,))[0]

    original = run(saved_on, "original", "checkpoint.interval=3", "checkpoint.keep_last=0")
    middle = tmp_path / "original" / "checkpoints" / "step_00000003"
    resumed = run(resumed_on, "resumed", f"checkpoint.resume={middle}")
    assert resumed.start_step == 3
    torch.testing.assert_close(
        torch.tensor(resumed.losses), torch.tensor(original.losses[3:]), rtol=1e-5, atol=0
    )


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        ([EP2, "parallel.zero_stage=1"], 1, "must divide the ranks that shard parameters, 1"),
        ([EP2, "parallel.zero_stage=0"], 2, "parallel.zero_stage=1"),
        (["parallel.expert_parallel_size=3", "parallel.zero_stage=1"], 6, "sizes that do: "),
        ([EP2, "model.moe.num_experts=0"], 2, "needs mixture-of-experts layers"),
        ([EP2, "parallel.engine=deepspeed", "parallel.zero_stage=1"], 2, "engine=native"),
    ],
    ids=["one-process", "zero0", "not-a-divisor", "dense", "deepspeed"],
)
def test_layouts_it_cannot_run_are_refused(tiny_config, overrides, world, message):
    with pytest.raises(ConfigError, match="parallel.expert_parallel_size") as error:
        config = with_moe(tiny_config, *overrides)
        ParallelDims.from_config(config, world)
    assert message in str(error.value)
