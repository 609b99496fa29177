"""Model FLOPs from XLA's cost analysis, and the measured peak to divide them by."""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp


def compiled_flops(compiled) -> float:
  """FLOPs of one call of a compiled function per XLA's cost analysis: for an SPMD
  program, one device's share (multiply by the device count for the total)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", 0.0))


def measure_matmul_peak(n: int = 2048, repeats: int = 5, dtype=jnp.float32) -> float:
  """FLOP/s of a large jitted matmul on the first device: the peak an MFU is measured against."""
  device = jax.devices()[0]
  a = jax.device_put(jnp.ones((n, n), dtype), device)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a, a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 / best


# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets (no sparsity).
# Matched against `device.device_kind` by substring, most specific first.
ACCELERATOR_PEAK_BF16 = (
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("GH200", 989e12),
    ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10G", 125e12),
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v5", 459e12), ("TPU v4", 275e12), ("TPU v3", 123e12), ("TPU v2", 46e12),
)


def device_peak(dtype: str = "bfloat16") -> tuple[float, str]:
  """(peak FLOP/s of one device, where the number comes from).

  Accelerators in bf16: the table above. On CPU, or a device or dtype the
  table does not cover: a large jitted matmul measured now, in that dtype
  (emulated CPU devices share the machine's cores, so the machine's rate is
  divided among them).
  """
  device = jax.devices()[0]
  if device.platform != "cpu" and dtype == "bfloat16":
    for name, peak in ACCELERATOR_PEAK_BF16:
      if name.lower() in device.device_kind.lower():
        return peak, f"{name} bf16 data sheet"
  measured = measure_matmul_peak(dtype=jnp.dtype(dtype))
  if device.platform == "cpu":
    return measured / jax.local_device_count(), (
        f"measured {dtype} matmul {measured / 1e9:.0f} GFLOP/s / {jax.local_device_count()} "
        "emulated devices")
  return measured, f"measured {dtype} matmul on {device.device_kind}"
