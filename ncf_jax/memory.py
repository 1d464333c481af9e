"""Per-device byte accounting of pytrees of jax.Arrays (summary.json's `bytes_per_device`).

A device's bytes are the sum, over the tree's arrays, of the shards that device holds: a
replicated array counts its full size on every device, an array split over n devices
about 1/n. Abstract arrays (`jax.ShapeDtypeStruct` with a sharding) count the shards they
would have, so a figure can be given for something not built yet (an epoch's items).
"""

import collections

import jax
import numpy as np

from ncf_jax.errors import UserError


def device_bytes(tree) -> dict[jax.Device, int]:
  """{local device: bytes of `tree`'s shards on it}; leaves that are not arrays count 0."""
  out: collections.Counter[jax.Device] = collections.Counter()
  for leaf in jax.tree.leaves(tree):
    if isinstance(leaf, jax.Array):
      for shard in leaf.addressable_shards:
        out[shard.device] += int(shard.data.nbytes)
    elif isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is not None:
      nbytes = int(np.prod(leaf.sharding.shard_shape(leaf.shape))) * leaf.dtype.itemsize
      for device in leaf.sharding.addressable_devices:
        out[device] += nbytes
  return dict(out)


def bytes_per_device(**trees) -> dict[str, int]:
  """{name: the largest bytes any device holds of that tree}, over every process.

  Each process measures its own devices; with several processes one small all-gather
  (collective: every process must call it) gives each the global maximum.
  """
  names = sorted(trees)
  local = np.array([max(device_bytes(trees[n]).values(), default=0) for n in names], np.int64)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    local = (
      np.asarray(multihost_utils.process_allgather(local))
      .reshape(jax.process_count(), len(names))
      .max(axis=0)
    )
  return {n: int(v) for n, v in zip(names, local)}


def available(devices) -> tuple[int | None, int]:
  """(bytes available to `devices` together, how many of them share it), or (None, 0).

  CPU devices of one process share the host's memory (MemAvailable); an accelerator's
  limit is its own (`memory_stats()['bytes_limit']`), so 1 device shares it.
  """
  devices = list(devices)
  if devices and devices[0].platform == 'cpu':
    try:
      with open('/proc/meminfo') as f:
        info = dict(line.split(':', 1) for line in f)
      return int(info['MemAvailable'].split()[0]) * 1024, len(devices)
    except (OSError, KeyError, ValueError):
      return None, 0
  limits = [(d.memory_stats() or {}).get('bytes_limit') for d in devices]
  known = [int(x) for x in limits if x is not None]
  if not limits or len(known) < len(limits):
    return None, 0
  return min(known), 1


def check_fits(need: dict[str, int], devices, alternative: str = '') -> None:
  """Raises UserError when `need` (bytes per device, before any step) cannot fit.

  `need` leaves out a step's temporaries, so a run that passes may still run out; one
  that fails this check certainly would, and it fails here before anything is allocated.
  """
  limit, sharing = available(devices)
  total = sum(need.values())
  if limit is None or total * sharing <= limit:
    return
  parts = ', '.join(f'{k} {v / 1e9:.2f}' for k, v in need.items())
  where = (
    f'{sharing} devices share this host\'s {limit / 1e9:.1f} GB of available memory'
    if sharing > 1
    else f'a device holds {limit / 1e9:.1f} GB'
  )
  hint = alternative or 'Use more devices or hosts, or a smaller model or dataset.'
  raise UserError(
    f'out of memory before the first step: this run needs at least {total / 1e9:.2f} GB '
    f'per device ({parts} GB), and {where}. {hint}'
  )
