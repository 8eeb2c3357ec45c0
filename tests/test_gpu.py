"""CUDA paths: bf16 autocast training and generation. Skipped without a GPU."""

import pytest
import torch

from megagpt.checkpoint import load_model_for_inference
from megagpt.config import apply_overrides
from megagpt.generate import generate
from megagpt.parallel.precision import resolve_precision
from megagpt.training.trainer import train

pytestmark = pytest.mark.gpu


def test_bf16_training_on_cuda(tiny_config):
    config = apply_overrides(
        tiny_config,
        [
            "train.device=cuda",
            "train.max_steps=30",
            "train.eval_interval=10",
            "optim.lr=3e-3",
            "logging.peak_tflops=null",
        ],
        "gpu test",
    )
    assert resolve_precision(config, torch.device("cuda")) == "bf16"
    result = train(config)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert result.val_losses[30] < result.val_losses[10]
    model, _, _ = load_model_for_inference(config.train.output_dir, "cuda")
    prompt = torch.zeros(2, 3, dtype=torch.long, device="cuda")
    cached = generate(model, prompt, 20, temperature=0.0)
    assert torch.equal(cached, generate(model, prompt, 20, temperature=0.0, use_cache=False))


def test_checkpoint_resume_on_cuda_is_exact(tiny_config, tmp_path):
    """On GPUs an async save copies the state to host memory first (not the CPU's live
    writer); resuming from a mid-run checkpoint repeats the later steps exactly."""
    base = [
        "train.device=cuda",
        "train.precision=bf16",
        "train.eval_interval=0",
        "optim.decay_steps=6",
        "logging.peak_tflops=null",
    ]
    whole = train(
        apply_overrides(
            tiny_config,
            [
                *base,
                "train.max_steps=6",
                "checkpoint.interval=3",
                f"train.output_dir={tmp_path}/whole",
            ],
            "gpu",
        )
    )
    middle = tmp_path / "whole" / "checkpoints" / "step_00000003"
    resumed = train(
        apply_overrides(
            tiny_config,
            [
                *base,
                "train.max_steps=6",
                f"checkpoint.resume={middle}",
                f"train.output_dir={tmp_path}/resumed",
            ],
            "gpu",
        )
    )
    assert resumed.losses == whole.losses[3:]
