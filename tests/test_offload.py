"""Native CPU offload (FSDP2's CPUOffloadPolicy) computes what one process computes,
really keeps parameters, gradients and optimizer state in host memory, resumes across
offload on and off, and says at start-up where each lives.

Layouts as in test_parallel.py: a tiny GPT, 5 steps, fp32, dropout off, against one
process without offload: losses within 1e-5 relative, final weights within 1e-5.
"""

from __future__ import annotations

import logging
import re

import pytest
import torch
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule

from megagpt.checkpoint import consolidated_state_dict
from megagpt.config import Config, apply_overrides
from megagpt.data import build_datasets
from megagpt.parallel import init_distributed
from megagpt.parallel.batches import step_batches
from megagpt.parallel.memory import memory_placement, memory_split
from megagpt.parallel.parallelize import parallelize
from megagpt.testing import run_distributed
from megagpt.training.trainer import train
from tests.test_parallel import GPT2, PP2, TP2, assert_trained_alike, base_config

OFFLOAD = "parallel.offload_optimizer=cpu"
OFFLOAD_PARAMS = "parallel.offload_params=cpu"  # the same on the native engine

# (world size, layout overrides), by name: offload at every ZeRO stage, on one process
# (FSDP2 over a mesh of size 1) and under tensor and pipeline parallelism.
LAYOUTS = [
    pytest.param(1, [], id="one-process"),
    pytest.param(2, ["parallel.zero_stage=0"], id="dp2-zero0"),
    pytest.param(2, ["parallel.zero_stage=1"], id="dp2-zero1"),
    pytest.param(2, ["parallel.zero_stage=3"], id="dp2-zero3"),
    pytest.param(2, [TP2], id="tp2"),
    pytest.param(2, [PP2], id="pp2"),
    pytest.param(
        4, [TP2, PP2, "parallel.zero_stage=1"], id="tp2-pp2-zero1", marks=pytest.mark.slow
    ),
]


@pytest.fixture(scope="module")
def reference(dataset_prefix, tokenizer, tmp_path_factory):
    """One process without offload: its config, result and final weights."""
    out = tmp_path_factory.mktemp("reference")
    config = base_config(dataset_prefix, tokenizer, out, GPT2)
    result = train(config)
    return config, result, consolidated_state_dict(out)[0]


def run(config: Config, world: int):
    return train(config) if world == 1 else run_distributed(train, world, args=(config,))[0]


@pytest.mark.parametrize("world, layout", LAYOUTS)
def test_offload_trains_like_one_process(world, layout, reference, tmp_path):
    reference_config, reference_result, reference_weights = reference
    config = apply_overrides(
        reference_config, [*layout, OFFLOAD, f"train.output_dir={tmp_path}"], "offload"
    )
    result = run(config, world)
    torch.testing.assert_close(
        torch.tensor(result.losses), torch.tensor(reference_result.losses), rtol=1e-5, atol=0
    )
    assert_trained_alike(consolidated_state_dict(tmp_path)[0], reference_weights, config.optim.lr)


def placements_after_a_step(configs: list[Config]):
    """For each config: every FSDP2 module's offload policy, and memory accounting
    after one step."""
    env = init_distributed("cpu")
    found = []
    for config in configs:
        module = parallelize(config, env)
        datasets = build_datasets(config.data, config.train.seed)
        module.train_step(step_batches(datasets.train, 0, module, config))
        module.optimizer_step(config.optim.lr)
        # No public getter: FSDP2 keeps the policy on each module's parameter group.
        policies = [
            m._get_fsdp_state()._fsdp_param_group.offload_policy
            for part in module.parts
            for m in part.modules()
            if isinstance(m, FSDPModule)
        ]
        found.append((policies, memory_placement(module), memory_split(module)))
    return found


@pytest.mark.parametrize(
    "world, setting", [(1, OFFLOAD), (2, OFFLOAD_PARAMS)], ids=["one-process", "dp2-zero3"]
)
def test_parameters_gradients_and_optimizer_state_are_offloaded(world, setting, reference):
    """Either setting offloads all three (FSDP2 moves them together)."""
    without = apply_overrides(reference[0], ["parallel.zero_stage=3"], "no offload")
    offloaded = apply_overrides(without, [setting], "offload")
    for ranks_view in run_distributed(placements_after_a_step, world, args=([offloaded, without],)):
        (policies, placement, split), (plain_policies, plain_placement, _) = ranks_view
        # Every block and the root, in host memory, unpinned (there is no CUDA here).
        assert len(policies) == offloaded.model.n_layers + 1
        assert all(isinstance(p, CPUOffloadPolicy) and not p.pin_memory for p in policies)
        assert placement == dict.fromkeys(split, "host, offloaded")
        for kind, where in split.items():
            assert where["device"] == 0 and where["host"] > 0, kind
        # Without offload: no FSDP2 on one process, FSDP2 without offload on two.
        assert len(plain_policies) == (0 if world == 1 else len(policies))
        assert not any(isinstance(p, CPUOffloadPolicy) for p in plain_policies)
        assert set(plain_placement.values()) == {"device, cpu"}


@pytest.mark.parametrize(
    "saved_with, resumed_with", [([OFFLOAD], []), ([], [OFFLOAD])], ids=["on-off", "off-on"]
)
def test_resume_across_offload(saved_with, resumed_with, reference, tmp_path):
    """A checkpoint saved with offload resumes without it, and the reverse: the losses
    after resuming are the uninterrupted run's."""
    config, reference_result, _ = reference
    # The reference's learning-rate schedule, whatever max_steps the first part has.
    config = apply_overrides(
        config, [f"optim.decay_steps={config.train.max_steps - config.optim.warmup_steps}"], "lr"
    )
    first = apply_overrides(
        config,
        [*saved_with, "train.max_steps=3", "checkpoint.interval=3", f"train.output_dir={tmp_path}"],
        "first",
    )
    train(first)
    second = apply_overrides(
        config, [*resumed_with, "checkpoint.resume=auto", f"train.output_dir={tmp_path}"], "second"
    )
    resumed = train(second)
    assert resumed.start_step == 3
    torch.testing.assert_close(
        torch.tensor(resumed.losses), torch.tensor(reference_result.losses[3:]), rtol=1e-5, atol=0
    )


def test_start_up_log_says_where_each_lives(reference, tmp_path, caplog):
    config = apply_overrides(
        reference[0], [OFFLOAD, "train.max_steps=1", f"train.output_dir={tmp_path}"], "log"
    )
    with caplog.at_level(logging.INFO):
        train(config)
    start_up = [r.getMessage() for r in caplog.records if "at start-up" in r.getMessage()]
    assert len(start_up) == 1
    line = start_up[0]
    for kind in ("parameters", "gradients", "optimizer_state"):
        assert re.search(rf"{kind} [0-9.]+ MiB \(host, offloaded\)", line), kind
    assert "in device memory 0.0 MiB, in host memory" in line
    assert any("CPU offload" in r.getMessage() for r in caplog.records)
