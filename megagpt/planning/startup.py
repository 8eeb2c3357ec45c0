"""The plan at `megagpt train` start-up: logged, and a refusal before anything is
allocated when the layout cannot fit, naming layouts that would."""

from __future__ import annotations

import dataclasses
import logging
import os

import torch

from megagpt.config import Config, ConfigError
from megagpt.planning.calibrate import calibrate
from megagpt.planning.hardware import Accelerator
from megagpt.planning.layouts import Layout
from megagpt.planning.memory import Calibration
from megagpt.planning.plan import CONTEXT_BYTES, OFF, Plan, plan_layout, search

log = logging.getLogger(__name__)
GIB = 2**30


_CALIBRATIONS: dict[tuple[str, str, bool], dict[str, Calibration]] = {}


def _calibration(model, precision: str, autocast: bool) -> dict[str, Calibration]:
    key = (repr(model), precision, autocast)
    if key not in _CALIBRATIONS:
        _CALIBRATIONS[key] = calibrate(model, precision, autocast)
    return _CALIBRATIONS[key]


def _this_machine(device: torch.device, local_ranks: int) -> tuple[Accelerator, int]:
    """The device as the planner's accelerator (memory only), and the fixed overhead."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        memory = props.total_memory / GIB
        return Accelerator(props.name, memory, 1, 0, 1000, 100, 10), CONTEXT_BYTES
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    return Accelerator("cpu", ram / local_ranks, 1, 0, 10, 2, 2), 0


def startup_plan(config: Config, world_size: int, device: torch.device) -> Plan | None:
    """The plan of this run's layout on this machine; a ConfigError if it cannot fit
    (unless train.memory_check is off). None where the planner does not model the run
    (LoRA: frozen weights have no gradients or optimizer state)."""
    if config.finetune.lora.rank:
        log.info("plan: not made for LoRA runs (the planner counts every weight as trained)")
        return None
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    gpu, context = _this_machine(device, local_ranks)
    precision = config.train.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    config = dataclasses.replace(
        config, train=dataclasses.replace(config.train, precision=precision)
    )
    calibrations = _calibration(config.model, precision, config.parallel.engine == "native")
    layout = Layout.from_config(config, world_size)
    plan = plan_layout(config, layout, gpu, local_ranks, calibrations, context_bytes=context)
    worst = max(plan.memory, key=lambda rank: rank["total"])
    log.info(
        "plan: %.2f GiB per rank of %.2f available on %s (parameters %.2f, gradients %.2f, "
        "optimizer state %.2f, activations %.2f, step buffers %.2f, margin %.2f GiB)",
        worst["total"] / GIB,
        plan.capacity / GIB,
        gpu.name,
        *(worst[k] / GIB for k in ("parameters", "gradients", "optimizer_state")),
        *(worst[k] / GIB for k in ("activations", "buffers", "margin")),
    )
    for where, name in OFF.items():
        if worst[where]:
            log.info(
                "plan: %s offloaded: %.2f GiB per rank in %s",
                plan.kinds_in(where),
                worst[where] / GIB,
                name,
            )
    if plan.fits or not config.train.memory_check:
        return plan
    others = search(config, world_size, gpu, local_ranks, context_bytes=context)[:3]
    hint = (
        "layouts of the same ranks that fit: " + "; ".join(str(p.layout) for p in others)
        if others
        else "no layout of these ranks fits: add ranks, shorten data.seq_len or use a smaller model"
    )
    raise ConfigError(
        f"layout {layout} needs about {plan.peak / GIB:.1f} GiB per rank (megagpt plan), "
        f"more than the {plan.capacity / GIB:.1f} GiB of {gpu.name}; {hint} "
        "(train.memory_check=false starts anyway)"
    )
