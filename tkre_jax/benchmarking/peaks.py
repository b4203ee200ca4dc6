"""Peak matmul throughput per device, the denominator of model FLOPs utilisation (MFU).

Accelerators: the vendor's dense bfloat16 peak per chip, keyed by a substring of
`jax.Device.device_kind` (the first match wins, so the more specific names come first). The same
peak is used whatever the compute dtype, as MaxText and PaLM report MFU; a float32 run on a GPU is
therefore far below 100% by construction.

CPUs have no such table: `measure_matmul_peak` times a square matmul on one device in the run itself.
"""

from __future__ import annotations

import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

# (device_kind substring, dense bf16 TFLOP/s per chip, source)
PEAK_BF16_TFLOPS: tuple[tuple[str, float, str], ...] = (
    ("H200", 989.0, "NVIDIA H200 SXM datasheet, dense BF16"),
    ("H100", 989.0, "NVIDIA H100 SXM datasheet, dense BF16"),
    ("A100", 312.0, "NVIDIA A100 datasheet, dense BF16"),
    ("TPU v4", 275.0, "Cloud TPU v4 documentation, per chip"),
    ("TPU v5 lite", 197.0, "Cloud TPU v5e documentation, per chip"),
    ("TPU v5e", 197.0, "Cloud TPU v5e documentation, per chip"),
    ("TPU v5p", 459.0, "Cloud TPU v5p documentation, per chip"),
    ("TPU v5", 459.0, "Cloud TPU v5p documentation, per chip"),
    ("TPU v6 lite", 918.0, "Cloud TPU v6e (Trillium) documentation, per chip"),
    ("TPU v6e", 918.0, "Cloud TPU v6e (Trillium) documentation, per chip"),
)


def table_peak(device_kind: str) -> Optional[tuple[float, str]]:
  """`(TFLOP/s, source)` of the first `PEAK_BF16_TFLOPS` entry whose name occurs in
  `device_kind` (e.g. "NVIDIA H100 80GB HBM3"), or None (CPUs, unknown accelerators)."""
  for name, tflops, source in PEAK_BF16_TFLOPS:
    if name.lower() in device_kind.lower():
      return tflops, source
  return None


def measure_matmul_peak(dtype: str = "float32", size: int = 2048, repeats: int = 10,
                        device: Optional[jax.Device] = None) -> float:
  """The best TFLOP/s of a jitted `[size, size] @ [size, size]` matmul in `dtype` on `device`
  (default: the first device), over `repeats` timed runs after one compiling run.

  `2 * size**3` FLOPs per run, timed across `block_until_ready`. On a CPU this is the peak the
  model's matmuls can reach through XLA with the threads it has, the CPU's MFU denominator.

  Returns:
    TFLOP/s (float).
  """
  device = device or jax.devices()[0]
  rng = np.random.default_rng(0)
  a = jax.device_put(jnp.asarray(rng.standard_normal((size, size)), dtype), device)
  b = jax.device_put(jnp.asarray(rng.standard_normal((size, size)), dtype), device)
  matmul = jax.jit(jnp.matmul)
  jax.block_until_ready(matmul(a, b))
  best = float("inf")
  for _ in range(max(1, repeats)):
    t0 = time.perf_counter()
    jax.block_until_ready(matmul(a, b))
    best = min(best, time.perf_counter() - t0)
  return 2.0 * size ** 3 / best / 1e12
