"""What every benchmark section shares: its arguments, ml-20m's sizes, the scaled dataset.

No JAX here: the data section's measurement processes import this module.
"""

import dataclasses
import os
import resource
from typing import Any

from configs import default
from ncf_jax import data

# ml-20m: users, rated movies, ratings / users.
ML20M_USERS, ML20M_ITEMS, ML20M_MEAN = 138_493, 26_744, 20_000_263 / 138_493
GB = 1e9
# The train section's PyTorch peer variants (ncf_jax.benchmark.peers.torch_neumf).
TORCH_VARIANTS = ('eager', 'fused_adam', 'compiled', 'sparse_adam')


@dataclasses.dataclass(frozen=True)
class Args:
  """What every section gets."""

  scale: float  # problem size relative to ml-20m
  workdir: str  # scratch folder the section may fill
  config: Any = None  # train section: model, dtype and optimizer (mlperf.py default)
  batch_sizes: tuple = (65536, 1048576)  # train section: global batch sizes to time
  torch_variants: tuple = TORCH_VARIANTS  # train section: the PyTorch peer's variants


def peak_rss_gb() -> float:
  """Peak resident memory of this process so far, in GB (10**9 bytes)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB


def scaled_dataset(args: Args) -> data.Dataset:
  """ml-20m-sized synthetic data (scaled), built once into the scratch folder's cache."""
  cfg = default.get_dataset_config()
  cfg.name = 'synthetic'
  cfg.data_dir = os.path.join(args.workdir, 'synthetic')
  cfg.synthetic_num_users = max(100, round(ML20M_USERS * args.scale))
  cfg.synthetic_num_items = max(1000, round(ML20M_ITEMS * args.scale))
  cfg.synthetic_mean_interactions = round(ML20M_MEAN, 1)
  return data.load(cfg)
