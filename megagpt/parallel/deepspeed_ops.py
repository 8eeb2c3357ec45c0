"""DeepSpeed's CPU Adam extension: built once per environment, never inside a run.

DeepSpeed compiles its C++ ops the first time they are used (CPU Adam: ~6 minutes on
2 busy cores), which would hide minutes of compilation in the first step of a
training run and repeat them on every fresh machine. megagpt uses the extension only
when it is already built, at install (DS_BUILD_CPU_ADAM=1 pip install deepspeed) or
by `megagpt setup deepspeed` into torch's extension cache (TORCH_EXTENSIONS_DIR);
otherwise an offloaded optimizer steps with torch's fused AdamW on the host.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def cpu_adam_built() -> bool:
    """Whether DeepSpeed's CPU Adam extension can be loaded without compiling."""
    import deepspeed
    from torch.utils.cpp_extension import _get_build_directory

    if deepspeed.git_version_info.installed_ops.get("cpu_adam"):
        return True
    build = Path(_get_build_directory("cpu_adam", verbose=False))
    return any(build.glob("cpu_adam*.so"))


def build_cpu_adam() -> Path:
    """Compile DeepSpeed's CPU Adam into torch's extension cache (once; later calls
    find it built); the directory it is in."""
    from torch.utils.cpp_extension import _get_build_directory

    from megagpt.parallel.deepspeed_engine import import_deepspeed

    import_deepspeed(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    from deepspeed.ops.op_builder import CPUAdamBuilder

    where = Path(_get_build_directory("cpu_adam", verbose=False))
    if cpu_adam_built():
        log.info("DeepSpeed's CPU Adam is already built (%s)", where)
        return where
    log.info("building DeepSpeed's CPU Adam into %s (a few minutes, once)", where)
    started = time.perf_counter()
    CPUAdamBuilder().load(verbose=False)
    log.info("built in %.0f s", time.perf_counter() - started)
    return where
