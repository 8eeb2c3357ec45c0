"""DeepSpeed's C++ extensions: built once per environment, never inside a run.

DeepSpeed compiles an op the first time it is used (here, on 2 busy cores: CPU Adam
~6 minutes, async_io for NVMe offload ~5 minutes), which would hide minutes of
compilation in the first step of a training run and repeat them on every fresh
machine. megagpt uses an op only when it is already built, at install
(DS_BUILD_CPU_ADAM=1 / DS_BUILD_AIO=1 pip install deepspeed) or by `megagpt setup
deepspeed` into torch's extension cache (TORCH_EXTENSIONS_DIR): without CPU Adam an
offloaded optimizer steps with torch's fused AdamW on the host; without async_io NVMe
offload is refused at start-up, saying how to build it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)
BUILDERS = {"cpu_adam": "CPUAdamBuilder", "async_io": "AsyncIOBuilder"}


def op_built(name: str) -> bool:
    """Whether DeepSpeed's op `name` can be loaded without compiling: installed built,
    or in torch's extension cache built from this environment's sources (the cache is
    per user, shared by every environment: torch recompiles an op whose sources moved)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory

    if deepspeed.git_version_info.installed_ops.get(name):
        return True
    build = Path(_get_build_directory(name, verbose=False))
    ninja = build / "build.ninja"
    if not any(build.glob(f"{name}*.so")) or not ninja.is_file():
        return False
    builder = get_accelerator().create_op_builder(BUILDERS[name])
    if builder is None:
        return False
    recipe = ninja.read_text()
    return all(builder.deepspeed_src_path(src) in recipe for src in builder.sources())


def cpu_adam_built() -> bool:
    return op_built("cpu_adam")


def build_ops() -> dict[str, str]:
    """Compile CPU Adam, and async_io where libaio is installed, into torch's extension
    cache (ops already built are left alone); what happened to each."""
    from deepspeed.accelerator import get_accelerator

    from megagpt.parallel.deepspeed_engine import import_deepspeed

    import_deepspeed(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    outcome = {}
    for name, builder_name in BUILDERS.items():
        builder = get_accelerator().create_op_builder(builder_name)
        if op_built(name):
            outcome[name] = "already built"
        elif builder is None or not builder.is_compatible(verbose=False):
            hint = " (install libaio-dev for NVMe offload)" if name == "async_io" else ""
            outcome[name] = f"not buildable here{hint}"
        else:
            log.info("building DeepSpeed's %s (a few minutes, once)", name)
            started = time.perf_counter()
            builder.load(verbose=False)
            outcome[name] = f"built in {time.perf_counter() - started:.0f} s"
        log.info("%s: %s", name, outcome[name])
    return outcome
