"""DeepSpeed's config dict, written from megagpt's config (no DeepSpeed import here).

Everything DeepSpeed would otherwise default is written out, so a DeepSpeed upgrade
cannot change a run silently: since 0.19.3 it clips gradients at 1.0 unless told, so
`gradient_clipping` is always optim.grad_clip (0 turns clipping off). The training
loop owns gradient accumulation (DeepSpeed's "unmanaged" mode: backward only
accumulates, `step()` reduces and updates once per global batch), learning rate and
logging, so DeepSpeed's own scheduler and progress prints are off.
"""

from __future__ import annotations

import math
from typing import Any

from megagpt.config import Config

NEVER = 2**31 - 1  # steps_per_print: megagpt logs progress itself


def offload_section(device: str, nvme_path: str | None, pin_memory: bool) -> dict[str, Any]:
    section: dict[str, Any] = {"device": device, "pin_memory": pin_memory}
    if device == "nvme":
        section["nvme_path"] = nvme_path
    return section


def deepspeed_config(config: Config, dp: int, on_cuda: bool, precision: str) -> dict[str, Any]:
    """The `config` argument of deepspeed.initialize for `dp` data-parallel ranks.

    `precision` is the resolved train.precision (fp32, bf16 or fp16): DeepSpeed keeps
    bf16 or fp16 weights for compute and fp32 master weights in its optimizer.
    """
    p, t, scale = config.parallel, config.train, config.train.loss_scale
    zero: dict[str, Any] = {"stage": p.zero_stage}
    if p.zero_stage > 0:
        zero.update(contiguous_gradients=True, overlap_comm=False)
    if p.offload_optimizer != "none":
        zero["offload_optimizer"] = offload_section(p.offload_optimizer, p.nvme_path, on_cuda)
    if p.offload_params != "none":
        zero["offload_param"] = offload_section(p.offload_params, p.nvme_path, on_cuda)
    ds: dict[str, Any] = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.global_batch_size // (t.micro_batch_size * dp),
        "managed_gradient_accumulation": False,
        "gradient_clipping": float(config.optim.grad_clip),
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": NEVER,
        "wall_clock_breakdown": False,
        # megagpt's AdamW (Megatron's parameter groups) is handed to DeepSpeed; with
        # offload it steps on the host, unless DeepSpeed's CPU Adam is built (see
        # deepspeed_engine.host_optimizer).
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
    }
    if precision == "fp16":
        ds["fp16"].update(
            # loss_scale 0 is DeepSpeed's "dynamic"; it only takes powers of two.
            loss_scale=0,
            initial_scale_power=int(round(math.log2(scale.initial_scale))),
            loss_scale_window=scale.growth_interval,
            hysteresis=scale.hysteresis,
            min_loss_scale=scale.min_scale,
        )
    return ds
