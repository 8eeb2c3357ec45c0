"""DeepSpeed as the second engine (parallel.engine=deepspeed), on gloo CPU ranks.

Every DeepSpeed run is held to the native engine on one process: the same losses and
final weights within 1e-5 (fp32), for ZeRO 1, 2 and 3 with and without optimizer
offload to the host; and checkpoints cross between the engines at other
data-parallel sizes. Several runs share one group of spawned ranks, since importing
DeepSpeed costs seconds per process.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from megagpt.checkpoint import CheckpointError
from megagpt.checkpoint.inference import consolidated_state_dict
from megagpt.config import ConfigError, apply_overrides
from megagpt.parallel.deepspeed_ops import op_built
from megagpt.testing import run_distributed
from megagpt.training.trainer import train

pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")

SCHEDULE = [
    "optim.decay_steps=6",
    "train.eval_interval=0",
    "logging.tensorboard=false",
    "train.micro_batch_size=2",
    "model.dropout=0.0",
]
DS = ["parallel.engine=deepspeed"]
TOLERANCE = dict(rtol=1e-5, atol=1e-5)
# (Weights: the key projection's bias gets no gradient but float noise, which AdamW
# normalizes into updates of ~lr: across reduction orders those entries differ by ~2e-6.)


def config_for(tiny_config, out, *extra):
    return apply_overrides(tiny_config, [*SCHEDULE, f"train.output_dir={out}", *extra], "test")


def train_each(configs) -> list[list[float]]:
    """Train each config in turn on this group of ranks; the losses of each run."""
    return [train(config).losses for config in configs]


def run_all(configs, world: int) -> list[list[float]]:
    if world == 1:
        return train_each(configs)
    return run_distributed(train_each, world, args=(configs,), timeout_s=900)[0]


def final_weights(out) -> dict[str, torch.Tensor]:
    return consolidated_state_dict(out)[0]


def validation_loss(out) -> float:
    """The run's (last) evaluation, as metrics.jsonl has it."""
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return [m["val_loss"] for m in metrics if "val_loss" in m][-1]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(
            a[key], b[key], **TOLERANCE, msg=lambda m, key=key: f"{key}: {m}"
        )


ZERO_MODES = [(stage, offload) for stage in (1, 2, 3) for offload in ("none", "cpu")]


@pytest.mark.slow
def test_zero_stages_with_and_without_offload_match_one_process(tiny_config, tmp_path):
    """DeepSpeed ZeRO-1/2/3, each with the optimizer in host memory or not (and ZeRO-3
    with the parameters there too), on 2 ranks: 5 steps with the losses, weights and
    validation loss of the native engine on one process. (The offloaded optimizer is
    DeepSpeed's CPU Adam where `megagpt setup deepspeed` built it, else torch's AdamW.)"""
    evaluate = ["train.max_steps=5", "train.eval_interval=5"]
    reference = config_for(tiny_config, tmp_path / "reference", *evaluate)
    expected = train(reference).losses
    configs, names = [], []
    for stage, offload in ZERO_MODES:
        extra = [f"parallel.zero_stage={stage}", f"parallel.offload_optimizer={offload}"]
        if stage == 3 and offload == "cpu":
            extra.append("parallel.offload_params=cpu")
        name = f"zero{stage}-{offload}"
        names.append(name)
        configs.append(config_for(tiny_config, tmp_path / name, *evaluate, *DS, *extra))
    # Activation checkpointing recomputes each block, ZeRO-3 gathering it again. The
    # selective run goes first: run after the ZeRO-3 engines in the same processes, it
    # did not match one process (DeepSpeed leaves ZeRO-3's patches in a process).
    selective = config_for(
        tiny_config, tmp_path / "selective-ac", *evaluate, *DS, "parallel.zero_stage=2",
        "parallel.activation_checkpointing=selective",
    )  # fmt: skip
    full = config_for(
        tiny_config, tmp_path / "zero3-full-ac", *evaluate, *DS, "parallel.zero_stage=3",
        "parallel.activation_checkpointing=full",
    )  # fmt: skip
    configs, names = [selective, *configs, full], ["selective-ac", *names, "zero3-full-ac"]
    results = run_all(configs, world=2)
    weights = final_weights(tmp_path / "reference")
    val_loss = validation_loss(tmp_path / "reference")
    for name, losses in zip(names, results):
        torch.testing.assert_close(
            torch.tensor(losses), torch.tensor(expected), **TOLERANCE, msg=name
        )
        assert_same_weights(final_weights(tmp_path / name), weights)
        assert validation_loss(tmp_path / name) == pytest.approx(val_loss, rel=1e-5)


@pytest.mark.slow
def test_checkpoints_cross_engines_and_resume_exactly(tiny_config, tmp_path, caplog):
    """DeepSpeed dp2 ZeRO-3 -> native dp1, and native dp2 ZeRO-1 -> DeepSpeed dp1 with
    an offloaded optimizer, each within 1e-5 of an uninterrupted native run; and a
    DeepSpeed run resumed on its own layout is bit for bit the uninterrupted one."""
    six = ["train.max_steps=6", "checkpoint.interval=3", "checkpoint.keep_last=0"]
    whole = train(config_for(tiny_config, tmp_path / "native", *six)).losses
    ds_layout = [*DS, "parallel.zero_stage=3"]
    ds_whole, ds_first, ds_second, native_dp2 = run_all(
        [
            config_for(tiny_config, tmp_path / "ds", *six, *ds_layout),
            config_for(tiny_config, tmp_path / "ds-split", "train.max_steps=3", *ds_layout),
            config_for(
                tiny_config,
                tmp_path / "ds-split",
                "train.max_steps=6",
                "checkpoint.resume=auto",
                *ds_layout,
            ),
            config_for(tiny_config, tmp_path / "native-dp2", *six, "parallel.zero_stage=1"),
        ],
        world=2,
    )
    assert ds_first + ds_second == ds_whole  # same layout: exact
    step3 = "checkpoints/step_00000003"
    native_from_ds = train(
        config_for(
            tiny_config,
            tmp_path / "native-from-ds",
            "train.max_steps=6",
            f"checkpoint.resume={tmp_path / 'ds' / step3}",
        )
    ).losses
    ds_from_native = train(
        config_for(
            tiny_config,
            tmp_path / "ds-from-native",
            "train.max_steps=6",
            f"checkpoint.resume={tmp_path / 'native-dp2' / step3}",
            *DS,
            "parallel.zero_stage=1",
            "parallel.offload_optimizer=cpu",
        )
    ).losses
    # Where DeepSpeed keeps each kind, at start-up (one process: logged here).
    assert re.search(r"at start-up.* optimizer_state [\d.]+ MiB \(host, offloaded\)", caplog.text)
    for losses in (native_from_ds, ds_from_native):
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(whole[3:]), **TOLERANCE)
    torch.testing.assert_close(torch.tensor(native_dp2), torch.tensor(whole), **TOLERANCE)
    assert_same_weights(
        final_weights(tmp_path / "ds-from-native"), final_weights(tmp_path / "native")
    )


@pytest.mark.parametrize(
    "extra, message",
    [
        (["parallel.tensor_parallel_size=2"], "use parallel.engine=native"),
        (["parallel.pipeline_parallel_size=2"], "use parallel.engine=native"),
        (["parallel.zero_stage=0"], "plain data parallelism is the native engine"),
        (["parallel.zero_stage=2", "parallel.offload_params=cpu"], "zero_stage = 3"),
        (["parallel.zero_stage=3", "parallel.offload_params=nvme"], "nvme_path"),
        (["parallel.offload_optimizer=nvme"], "nvme needs parallel.zero_stage=3"),
    ],
)
def test_settings_the_deepspeed_engine_cannot_run_are_refused(tiny_config, extra, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(tiny_config, [*DS, "parallel.zero_stage=1", *extra], "test")


@pytest.mark.parametrize(
    "problem, message",
    [
        ("missing", "is not a directory"),
        ("a file", "is not a directory"),
        # procfs takes no new files, even from root (whom permission bits do not stop)
        ("not writable", "is not writable by this user"),
    ],
)
def test_an_unusable_nvme_path_fails_at_start_up(tiny_config, tmp_path, problem, message):
    path = Path("/proc") if problem == "not writable" else tmp_path / "nvme"
    if problem == "a file":
        path.write_text("not a directory")
    config = config_for(
        tiny_config,
        tmp_path / "run",
        *DS,
        "parallel.zero_stage=3",
        "parallel.offload_optimizer=nvme",
        f"parallel.nvme_path={path}",
    )
    with pytest.raises(ConfigError, match=f"parallel.nvme_path .* {message}"):
        train(config)
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before anything


def test_the_deepspeed_engine_without_deepspeed_says_how_to_install(
    tiny_config, tmp_path, monkeypatch
):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as if it were not installed
    config = config_for(tiny_config, tmp_path / "run", *DS, "parallel.zero_stage=1")
    with pytest.raises(ConfigError, match=r"needs DeepSpeed.*\[deepspeed\]"):
        train(config)


def deepspeed_saves_its_own_checkpoint(config, directory: str, steps: int) -> dict:
    """Train `steps` steps on the DeepSpeed engine and save with DeepSpeed's own
    engine.save_checkpoint (as another tool would), then take two more steps: their
    losses and the weights at the save come back."""
    from megagpt.data import build_datasets
    from megagpt.parallel import init_distributed
    from megagpt.parallel.batches import step_batches
    from megagpt.parallel.parallelize import parallelize
    from megagpt.training.schedule import learning_rate

    env = init_distributed("cpu")
    module = parallelize(config, env)
    datasets = build_datasets(config.data, config.train.seed)
    t, o = config.train, config.optim

    def step(s: int) -> float:
        loss = module.global_mean(
            module.train_step(step_batches(datasets.train, s, module, config))
        )
        module.update(learning_rate(s, o, t.max_steps), o.grad_clip)
        return loss

    for s in range(steps):
        step(s)
    state = module.optimizers.collect_state(module.parts)
    weights = {k: v.full_tensor() for k, v in state["model"].items()}
    module.engine.save_checkpoint(directory)
    return {"weights": weights, "next_losses": [step(steps), step(steps + 1)]}


@pytest.mark.slow
def test_import_of_a_checkpoint_deepspeed_wrote_itself(tiny_config, tmp_path):
    """A DeepSpeed dp2 ZeRO-2 checkpoint from engine.save_checkpoint becomes a megagpt
    checkpoint with the same weights; resumed on the native engine on one process, its
    next two losses are the DeepSpeed run's (the second depends on the AdamW moments
    and step count the import carried over)."""
    from megagpt.checkpoint.deepspeed_import import import_deepspeed

    config = config_for(
        tiny_config, tmp_path / "ds", "train.max_steps=4", *DS, "parallel.zero_stage=2"
    )
    saved = run_distributed(
        deepspeed_saves_its_own_checkpoint, 2, args=(config, str(tmp_path / "dsck"), 2)
    )[0]
    native = config_for(tiny_config, tmp_path / "imported", "train.max_steps=4")
    with pytest.raises(CheckpointError, match="--trust-pickles"):
        import_deepspeed(tmp_path / "dsck", tmp_path / "imported", native)
    written = import_deepspeed(tmp_path / "dsck", tmp_path / "imported", native, trust_pickles=True)
    assert written.name == "step_00000002"
    assert_same_weights(final_weights(written), saved["weights"])
    resumed = train(apply_overrides(native, [f"checkpoint.resume={written}"], "test"))
    assert resumed.start_step == 2
    torch.testing.assert_close(
        torch.tensor(resumed.losses), torch.tensor(saved["next_losses"]), rtol=1e-5, atol=0
    )
    wider = apply_overrides(native, ["model.hidden_size=128"], "test")
    with pytest.raises(CheckpointError, match="does not fit the configured model"):
        import_deepspeed(tmp_path / "dsck", tmp_path / "wider", wider, trust_pickles=True)


@pytest.mark.slow
def test_fp16_with_dynamic_loss_scaling_on_deepspeed(tiny_config, tmp_path):
    """train.precision=fp16 on the deepspeed engine: DeepSpeed's dynamic loss scaler,
    configured from train.loss_scale. At 2**12 nothing overflows and the losses follow
    fp32's within fp16's precision (2e-3 relative: fp16 weights and activations keep
    ~3 decimal digits). At 2**20 the first steps overflow: each is skipped, counted,
    and halves the scale (hysteresis 1)."""
    common = ["train.max_steps=6", *DS, "parallel.zero_stage=2", "train.precision"]
    fp16 = ["train.loss_scale.hysteresis=1"]
    fp32_losses, fitting, overflowing = run_all(
        [
            config_for(tiny_config, tmp_path / "fp32", *common[:-1]),
            config_for(
                tiny_config,
                tmp_path / "fits",
                *common[:-1],
                "train.precision=fp16",
                "train.loss_scale.initial_scale=4096",
                *fp16,
            ),
            config_for(
                tiny_config,
                tmp_path / "overflows",
                *common[:-1],
                "train.precision=fp16",
                "train.loss_scale.initial_scale=1048576",
                *fp16,
            ),
        ],
        world=2,
    )
    torch.testing.assert_close(torch.tensor(fitting), torch.tensor(fp32_losses), rtol=2e-3, atol=0)
    metrics = [json.loads(line) for line in open(tmp_path / "overflows" / "metrics.jsonl")]
    skipped = 6 - len(overflowing)
    assert skipped >= 1
    assert metrics[-1]["overflow_skips"] == skipped
    assert metrics[-1]["loss_scale"] == 2.0 ** (20 - skipped)


@pytest.mark.slow
def test_nvme_offload_matches_one_process_or_says_how_to_build_it(tiny_config, tmp_path):
    """ZeRO-3 with parameters and optimizer state offloaded to NVMe (a directory here)
    trains as one process does, where DeepSpeed's async_io op is built (`megagpt setup
    deepspeed`, with libaio-dev). Where it is not (CI: building it costs ~5 minutes),
    the run is refused at start-up saying how to build it, before anything is written."""
    nvme = tmp_path / "nvme"
    nvme.mkdir()
    config = config_for(
        tiny_config,
        tmp_path / "nvme-run",
        "train.max_steps=5",
        *DS,
        "parallel.zero_stage=3",
        "parallel.offload_optimizer=nvme",
        "parallel.offload_params=nvme",
        f"parallel.nvme_path={nvme}",
    )
    if not op_built("async_io"):
        with pytest.raises(ConfigError, match="async_io extension.*megagpt setup deepspeed"):
            train(config)
        assert not (tmp_path / "nvme-run" / "checkpoints").exists()
        return
    expected = train(config_for(tiny_config, tmp_path / "reference", "train.max_steps=5")).losses
    losses = run_all([config], world=2)[0]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), **TOLERANCE)
    assert_same_weights(final_weights(tmp_path / "nvme-run"), final_weights(tmp_path / "reference"))
    # DeepSpeed's swap folders for parameters and optimizer state (files go at exit).
    assert {p.name for p in (nvme / "zero_stage_3").iterdir()} >= {"optimizer", "float32params"}
