"""Timing on the JAX backend (whatever `jax.devices()` is: CPU here, GPU/TPU when lent)."""

import sys
import time
from typing import Any

import jax

# Measurements taken so far by this process (numbers the progress lines on stderr).
_count = [0]


def timed(fn, *args, repeats: int = 1) -> float:
  """Best wall time of `fn(*args)` over `repeats` runs after one warm-up (compile).

  Prints one line to stderr once measured, so a long benchmark shows that it moves.
  """
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  warm = time.perf_counter() - t0
  best = float('inf')
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t)
  _count[0] += 1
  print(
    f'[benchmark] measurement {_count[0]}: best {best * 1e3:.3f} ms of {repeats} '
    f'(warm-up with compile {warm:.2f} s)',
    file=sys.stderr,
    flush=True,
  )
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
