"""Timing on the JAX backend (whatever `jax.devices()` is: CPU here, GPU/TPU when lent)."""

import time
from typing import Any

import jax


def timed(fn, *args, repeats: int = 1) -> float:
  """Best wall time of `fn(*args)` over `repeats` runs after one warm-up (compile)."""
  jax.block_until_ready(fn(*args))
  best = float('inf')
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t)
  return best


def backend() -> dict[str, Any]:
  """What the figures were measured on: platform, device kind and count, JAX version."""
  dev = jax.devices()[0]
  return {
    'backend': dev.platform,
    'device': getattr(dev, 'device_kind', str(dev)),
    'num_devices': jax.device_count(),
    'jax_version': jax.__version__,
  }
