"""Peak throughput of the device, the denominator of MFU."""

from __future__ import annotations

import functools
import time

import torch

# Dense bf16 tensor-core peak (TFLOP/s) from the vendors' data sheets, SXM parts.
_GPU_BF16_TFLOPS = {
    "H200": 989.4,
    "H100": 989.4,
    "A100": 312.0,
    "L40S": 362.1,
    "A10G": 70.0,
    "L4": 121.0,
}


def peak_tflops(device: torch.device, precision: str, configured: float | None) -> float:
    """The configured value, else a known GPU's data-sheet peak, else (CPU) the
    measured throughput of a large matmul in the training dtype."""
    if configured is not None:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in _GPU_BF16_TFLOPS.items():
            if key in name:
                # fp32 runs on TF32 tensor cores at half the bf16 rate.
                return tflops if precision == "bf16" else tflops / 2
    return measured_matmul_tflops(device, precision)


@functools.cache
def measured_matmul_tflops(device: torch.device, precision: str) -> float:
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    n = 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm up
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, (time.perf_counter() - start) / 4)
    return 2 * n**3 / best / 1e12
