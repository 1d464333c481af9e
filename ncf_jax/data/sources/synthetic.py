"""Source `synthetic`: the seeded generator (ncf_jax.data.synthetic), nothing to download.

The generator parameters come from config.dataset.synthetic_*; the planted model travels
with the interactions and ends up as `Dataset.oracle`. config.dataset.source is not used.
"""

from typing import Any

from ncf_jax.data import synthetic
from ncf_jax.data.dataset import Interactions
from ncf_jax.data.sources import base

NAME = 'synthetic'


class SyntheticSource(base.Source):
  """Interactions drawn by `synthetic.generate` (checked by it, when the cache is built).

  Identity: the generator version.
  """

  names = (NAME,)

  def __init__(self, settings: base.Settings, params: dict[str, Any]):
    super().__init__(settings)
    self.params = params  # keyword arguments of synthetic.generate

  @classmethod
  def from_config(cls, cfg, settings: base.Settings, select) -> 'SyntheticSource':
    del select
    params = {
      'num_users': int(cfg.synthetic_num_users),
      'num_items': int(cfg.synthetic_num_items),
      'mean_interactions': float(cfg.synthetic_mean_interactions),
      'num_topics': int(cfg.synthetic_num_topics),
      'seed': int(cfg.synthetic_seed),
    }
    noise = float(cfg.get('synthetic_noise', 0.0))
    if noise:  # absent when 0: the caches made before the option keep their key
      params['noise'] = noise
    return cls(settings, params)

  def cache_params(self) -> dict[str, Any]:
    return {
      'source': 'synthetic',
      'generator': self.params,
      'generator_version': synthetic.GENERATOR_VERSION,
    }

  def identity(self) -> str:
    return f'synthetic-generator-v{synthetic.GENERATOR_VERSION}'

  def read(self, validation: str) -> Interactions:
    del validation  # the preprocessing splits
    gen = synthetic.generate(**self.params)
    return Interactions(
      gen.users,
      gen.items,
      gen.timestamps,
      where='synthetic data',
      num_items=gen.num_items,
      oracle=gen.oracle,
    )
