"""Source `fractal`: the fractal expansion (ncf_jax.data.fractal) of another source's data.

config.dataset.fractal_base names the base, read as its own source would read it (with
the same config.dataset.source, data_dir and min_ratings); fractal_rows, fractal_cols and
fractal_seed set the expansion. The expanded rows then go through the MLPerf
preprocessing like any source's.
"""

from collections.abc import Callable
from typing import Any

from absl import logging
import numpy as np

from ncf_jax.data import fractal
from ncf_jax.data.dataset import Dataset, Interactions
from ncf_jax.data.preprocess import factorize
from ncf_jax.data.sources import base, grouplens, ml20mx16x32, synthetic
from ncf_jax.errors import UserError

NAME = 'fractal'
# Datasets an expansion can start from: the ones with timestamps, read raw.
BASES = (synthetic.NAME,) + grouplens.NAMES


def _values(cfg) -> dict[str, Any]:
  """Checks config.dataset.fractal_*; returns base name, multipliers and seed."""
  base_name = cfg.get('fractal_base', 'synthetic')
  if base_name not in BASES:
    why = {
      NAME: 'an expansion cannot start from another expansion',
      ml20mx16x32.NAME: f'{base_name} is already expanded and has no timestamps',
    }.get(base_name, 'it is no dataset name')
    raise UserError(
      f'config.dataset.fractal_base={base_name!r} is invalid ({why}); use one of '
      f'{", ".join(BASES)}.'
    )
  values = {'base': base_name}
  for field, what in (('fractal_rows', 'users'), ('fractal_cols', 'items')):
    value = cfg.get(field)
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
      raise UserError(
        f'config.dataset.{field}={value!r} is invalid: it must be an integer '
        f'>= 1, the factor by which the base\'s {what} are multiplied (MLPerf\'s '
        'ml-20mx16x32: fractal_rows=16, fractal_cols=32).'
      )
    values[field[len('fractal_') :]] = int(value)
  seed = cfg.get('fractal_seed', 0)
  if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
    raise UserError(f'config.dataset.fractal_seed={seed!r} is invalid: it must be an integer >= 0.')
  values['seed'] = int(seed)
  return values


class FractalSource(base.Source):
  """The expansion of a base source's interactions (users kept by min_ratings, dense ids).

  The base is what `load` gives for its name: its users with >= min_ratings ratings, dense
  ids in ascending raw order (synthetic: every item of the catalogue). Expanded rows
  inherit their base row's timestamp, so the leave-one-out split (and validation) runs on
  them as on any dataset; expanded users with fewer than min_ratings rows are dropped, and
  every expanded item stays in the catalogue (num_items = cols x base items).

  Identity: the expansion's version and the base's identity.
  """

  names = (NAME,)
  kinds = ('grouplens', 'tfds')  # the base's source

  def __init__(self, settings: base.Settings, params: dict[str, Any], base_source: base.Source):
    super().__init__(settings)
    self.params = params  # base (name), rows, cols, seed
    self.base = base_source
    self._expanded_users = 0

  @classmethod
  def from_config(
    cls, cfg, settings: base.Settings, select: Callable[[Any], base.Source]
  ) -> 'FractalSource':
    params = _values(cfg)
    base_cfg = cfg.copy_and_resolve_references()
    base_cfg.name = params['base']
    return cls(settings, params, select(base_cfg))

  def cache_params(self) -> dict[str, Any]:
    base_part = dict(
      self.base.cache_params(), name=self.base.name, min_ratings=self.base.min_ratings
    )
    return {'source': NAME, 'fractal': dict(self.params, version=fractal.VERSION, base=base_part)}

  def identity(self) -> str:
    return f'fractal-v{fractal.VERSION}:{self.base.identity()}'

  def read(self, validation: str) -> Interactions:
    raw = self.base.read(validation)
    if not isinstance(raw, Interactions):  # BASES read raw interactions
      raise TypeError(f'fractal base {self.base.name} gave no raw interactions')
    where, min_ratings, num_items = raw.where, self.base.min_ratings, raw.num_items
    ucode, _ = factorize(raw.users)
    counts = np.bincount(ucode)
    keep = counts >= min_ratings
    if not keep.any():
      raise UserError(
        f'{where}: no user has at least min_ratings={min_ratings} '
        f'ratings (the most is {int(counts.max())}); lower '
        'config.dataset.min_ratings.'
      )
    rows = keep[ucode]
    ucode = (np.cumsum(keep, dtype=np.int32) - 1)[ucode[rows]]
    items, timestamps = raw.items[rows], raw.timestamps[rows]
    del raw
    if num_items is None:
      items, iraw = factorize(items)
      num_items = int(iraw.shape[0])
    num_users = int(np.count_nonzero(keep))
    p = self.params
    logging.info(
      'Expanding %s (%d users, %d items, %d rows) by %d x %d, seed %d',
      where,
      num_users,
      num_items,
      items.shape[0],
      p['rows'],
      p['cols'],
      p['seed'],
    )
    try:
      exp = fractal.expand(
        ucode, items, timestamps, num_users, num_items, p['rows'], p['cols'], p['seed']
      )
    except ValueError as e:
      raise UserError(f'fractal expansion of {where}: {e}.') from None
    del ucode, items, timestamps
    logging.info(
      'Keep probabilities: mean %.4f, min %.4f, max %.4f; %d expanded rows',
      exp.probabilities.mean(),
      exp.probabilities.min(),
      exp.probabilities.max(),
      exp.users.shape[0],
    )
    self._expanded_users = exp.num_users
    return Interactions(
      exp.users,
      exp.items,
      exp.timestamps,
      where=f'the {p["rows"]}x{p["cols"]} fractal expansion of {where}',
      num_items=exp.num_items,
    )

  def check(self, dataset: Dataset, where: str) -> None:
    del where
    dropped = self._expanded_users - dataset.num_users
    if dropped:
      logging.info(
        '%d of %d expanded users have fewer than min_ratings=%d rows: dropped',
        dropped,
        self._expanded_users,
        self.min_ratings,
      )
