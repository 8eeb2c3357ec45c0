"""Peak throughput of the device, the denominator of MFU."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch

# Dense half-precision tensor-core peak (TFLOP/s) from the vendors' data sheets, SXM
# parts: bf16's, which equals fp16's on every part that has bf16; fp16's on V100 and T4.
_GPU_HALF_TFLOPS = {
    "H200": 989.4,
    "H100": 989.4,
    "A100": 312.0,
    "L40S": 362.1,
    "A10G": 70.0,
    "L4": 121.0,
    "V100": 125.0,
    "T4": 65.0,
}

# fp32 peak of parts without TF32 tensor cores (the others run fp32 at half the
# half-precision rate).
_GPU_FP32_TFLOPS = {"V100": 15.7, "T4": 8.1}

_MATMUL_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

MEASURE_SECONDS = 0.5
"""How long the matmul peak is measured for; its best moment counts."""


@dataclass(frozen=True)
class Peak:
    tflops: float
    """Dense TFLOP/s of one device at the training precision."""
    source: str
    """Where the number comes from: configured, data sheet, or measured."""

    @property
    def measured(self) -> bool:
        """Measured here (CPU, an unknown GPU): MFU against it is approximate."""
        return self.source.startswith("measured")


def device_peak(device: torch.device, precision: str, configured: float | None) -> Peak:
    """The configured value, else a known GPU's data-sheet peak, else the measured
    throughput of a large matmul in the training dtype on the threads training uses."""
    if configured is not None:
        return Peak(configured, "logging.peak_tflops")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in _GPU_HALF_TFLOPS.items():
            if key in name:
                if precision in _MATMUL_DTYPES:
                    return Peak(tflops, f"{key} data sheet")
                return Peak(_GPU_FP32_TFLOPS.get(key, tflops / 2), f"{key} data sheet")
    threads = torch.get_num_threads()
    tflops = measured_matmul_tflops(device, precision, threads)
    return Peak(tflops, f"measured {precision} matmul peak on {threads} threads, approximate")


@functools.cache
def measured_matmul_tflops(device: torch.device, precision: str, threads: int) -> float:
    """The best rate of single 1024 x 1024 matmuls over MEASURE_SECONDS. The best, not
    the mean: on a shared machine other work slows some of them down, and a peak that
    comes out low makes MFU come out high. `threads` keys the cache: it is the number
    torch uses now, which the measurement runs on."""
    dtype = _MATMUL_DTYPES.get(precision, torch.float32)
    n = 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):  # warm up: thread pool, caches, GPU clocks
        a @ b
    best, samples = float("inf"), 0
    started = time.perf_counter()
    while samples < 8 or time.perf_counter() - started < MEASURE_SECONDS:
        begin = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - begin)
        samples += 1
    return 2 * n**3 / best / 1e12
