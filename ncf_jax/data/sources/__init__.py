"""Dataset sources: one module each, all with the `base.Source` interface, picked by `select`.

  grouplens    MovieLens files from GroupLens (folder or zip, downloaded on request)
  tfds         MovieLens through TensorFlow Datasets
  ml20mx16x32  GroupLens's published ml-20mx16x32 shards (already split)
  synthetic    the seeded generator
  fractal      the fractal expansion of another source's data
  file         your own interactions file (CSV/TSV/Parquet) or the NCF paper's splits

A new source is a new module with a `base.Source` subclass, listed in REGISTRY.
"""

from typing import Any

from ncf_jax.data.sources import base, file, fractal, grouplens, ml20mx16x32, synthetic, tfds
from ncf_jax.data.sources.base import Settings, Source
from ncf_jax.errors import UserError

# Every source; their names, in this order, are the valid config.dataset.name values.
REGISTRY: tuple[type[Source], ...] = (
  synthetic.SyntheticSource,
  grouplens.GroupLensSource,
  tfds.TfdsSource,
  ml20mx16x32.ShardsSource,
  fractal.FractalSource,
  file.FileSource,
)
NAMES = tuple(dict.fromkeys(n for s in REGISTRY for n in s.names))
# The config.dataset.source values (for the names whose sources use the field).
SOURCES = tuple(dict.fromkeys(k for s in REGISTRY for k in s.kinds))

__all__ = ['NAMES', 'REGISTRY', 'SOURCES', 'Settings', 'Source', 'select']


def select(cfg: Any) -> Source:
  """The source of a `config.dataset` block, with the whole block checked (no I/O).

  Raises:
    UserError: unknown name or source, or an invalid field (one message saying what to do).
  """
  name = cfg.name
  if name not in NAMES:
    raise UserError(
      f'unknown dataset name {name!r} (config.dataset.name); valid names: {", ".join(NAMES)}.'
    )
  candidates = [s for s in REGISTRY if name in s.names]
  if any(s.kinds for s in candidates) and cfg.source not in SOURCES:
    raise UserError(
      f'unknown config.dataset.source {cfg.source!r}; valid sources: {", ".join(SOURCES)}.'
    )
  shared = base.settings(cfg)
  chosen = [s for s in candidates if not s.kinds or cfg.source in s.kinds]
  if not chosen:
    kinds = sorted({k for s in candidates for k in s.kinds})
    raise UserError(
      f'config.dataset.source={cfg.source!r} does not provide {name}; use one of '
      f'{", ".join(kinds)}.'
    )
  return chosen[0].from_config(cfg, shared, select)
