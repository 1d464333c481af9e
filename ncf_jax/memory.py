"""Per-device byte accounting of pytrees of jax.Arrays (summary.json's `bytes_per_device`).

A device's bytes are the sum, over the tree's arrays, of the shards that device holds: a
replicated array counts its full size on every device, an array split over n devices
about 1/n. Abstract arrays (`jax.ShapeDtypeStruct` with a sharding) count the shards they
would have, so a figure can be given for something not built yet (an epoch's items).
"""
import collections
from typing import Dict

import jax
import numpy as np


def device_bytes(tree) -> Dict[jax.Device, int]:
  """{local device: bytes of `tree`'s shards on it}; leaves that are not arrays count 0."""
  out = collections.Counter()
  for leaf in jax.tree.leaves(tree):
    if isinstance(leaf, jax.Array):
      for shard in leaf.addressable_shards:
        out[shard.device] += int(shard.data.nbytes)
    elif isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is not None:
      nbytes = int(np.prod(leaf.sharding.shard_shape(leaf.shape))) * leaf.dtype.itemsize
      for device in leaf.sharding.addressable_devices:
        out[device] += nbytes
  return dict(out)


def bytes_per_device(**trees) -> Dict[str, int]:
  """{name: the largest bytes any device holds of that tree}, over every process.

  Each process measures its own devices; with several processes one small all-gather
  (collective: every process must call it) gives each the global maximum.
  """
  names = sorted(trees)
  local = np.array([max(device_bytes(trees[n]).values(), default=0) for n in names],
                   np.int64)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    local = np.asarray(multihost_utils.process_allgather(local)).reshape(
        jax.process_count(), len(names)).max(axis=0)
  return {n: int(v) for n, v in zip(names, local)}
