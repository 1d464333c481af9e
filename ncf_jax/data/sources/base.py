"""The interface every dataset source implements, and the config values they all share.

`prepare` (ncf_jax.data.prepare) uses a source in this order, with no per-source branch:

  source = sources.select(config.dataset)  # `from_config`: config checks only, no I/O
  source.cache_params()                    # its part of the cache key (no I/O)
  source.identity()                        # finds the data (downloads if asked): cache header
  raw = source.read(validation)            # on a cache miss: Interactions, or a split Dataset
  dataset = preprocess(raw) if raw is Interactions else raw
  source.check(dataset, where)             # published sizes and the like

A source that reads interactions (GroupLens, TFDS, synthetic, fractal) leaves the split to
the MLPerf preprocessing; one whose data comes split (ml-20mx16x32) builds the `Dataset`
itself and ignores min_ratings (`applies_min_ratings = False`).
"""

import abc
from collections.abc import Callable
import dataclasses
import math
import os
from typing import Any, ClassVar

import numpy as np

from ncf_jax.data.dataset import Dataset, Interactions
from ncf_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class DownloadLimits:
  """When a download is abandoned (config.dataset.download_* fields; 0 disables one)."""

  timeout_s: float = 3600.0  # overall deadline
  min_rate: float = 1024.0  # bytes/s, averaged over each window
  min_rate_window_s: float = 60.0

  def socket_timeout(self, most: float = 60.0) -> float:
    """Bound of one socket read: a stalled server cannot block longer than this."""
    bounds = [most]
    if self.timeout_s > 0:
      bounds.append(self.timeout_s)
    if self.min_rate > 0:
      bounds.append(self.min_rate_window_s)
    return min(bounds)


# (config field, DownloadLimits attribute, whether 0 (off) is allowed, what it must be).
_LIMIT_FIELDS = (
  ('download_timeout_s', 'timeout_s', True, 'a number of seconds > 0, or 0 for no deadline'),
  ('download_min_rate', 'min_rate', True, 'a number of bytes/s > 0, or 0 for no minimum rate'),
  ('download_min_rate_window_s', 'min_rate_window_s', False, 'a number of seconds > 0'),
)


def download_limits(cfg) -> DownloadLimits:
  """Checks the download_* fields of a `config.dataset` block; an absent field (a block
  built by hand) takes its default."""
  values = {}
  for field, attr, zero_ok, what in _LIMIT_FIELDS:
    value = getattr(cfg, field, getattr(DownloadLimits, attr))
    number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
      value, bool
    )
    if not (number and math.isfinite(value) and (value > 0 or (zero_ok and value == 0))):
      raise UserError(f'config.dataset.{field}={value!r} is invalid: it must be {what}.')
    values[attr] = float(value)
  return DownloadLimits(**values)


@dataclasses.dataclass(frozen=True)
class Settings:
  """The `config.dataset` values every source shares, checked."""

  name: str  # config.dataset.name
  source: str  # config.dataset.source (what a source does with it is its own business)
  data_dir: str  # absolute, user folder expanded
  download: bool
  min_ratings: int
  download_limits: DownloadLimits = DownloadLimits()


def settings(cfg) -> Settings:
  """Checks a `config.dataset` block's shared fields (min_ratings, data_dir, download_*).

  Returns the shared values.
  """
  if (
    not isinstance(cfg.min_ratings, (int, np.integer))
    or isinstance(cfg.min_ratings, bool)
    or cfg.min_ratings < 1
  ):
    raise UserError(
      f'config.dataset.min_ratings is {cfg.min_ratings!r}; it must be an integer >= 1 (MLPerf: 20).'
    )
  if not cfg.data_dir:
    raise UserError(
      'config.dataset.data_dir is empty; set it to a folder for the raw files '
      'and the processed cache.'
    )
  return Settings(
    name=cfg.name,
    source=cfg.source,
    data_dir=os.path.abspath(os.path.expanduser(cfg.data_dir)),
    download=bool(cfg.download),
    min_ratings=int(cfg.min_ratings),
    download_limits=download_limits(cfg),
  )


class Source(abc.ABC):
  """One way to get a dataset: a module of ncf_jax.data.sources, listed in its REGISTRY.

  `select` picks the source whose `names` hold config.dataset.name and whose `kinds` hold
  config.dataset.source (a source with no kinds does not use that field), then calls its
  `from_config`.
  """

  # The config.dataset.name values it serves.
  names: ClassVar[tuple[str, ...]] = ()
  # The config.dataset.source values it serves; () when it does not use the field.
  kinds: ClassVar[tuple[str, ...]] = ()
  # Whether config.dataset.min_ratings filters its users (and so is part of the cache key).
  applies_min_ratings: ClassVar[bool] = True
  # After `read`: the original ids of the raw users and items it returned (a source that
  # relabels arbitrary ids, `file`); `prepare` keeps those of the kept ids and writes them
  # next to the cache. None: the ids are the data's own.
  labels: tuple[list, list] | None = None

  def __init__(self, settings: Settings):
    self.settings = settings

  @property
  def name(self) -> str:
    return self.settings.name

  @property
  def data_dir(self) -> str:
    return self.settings.data_dir

  @property
  def min_ratings(self) -> int:
    return self.settings.min_ratings

  @classmethod
  def from_config(cls, cfg, settings: Settings, select: Callable[[Any], 'Source']) -> 'Source':
    """The source of `config.dataset` block `cfg`, its own fields checked (no I/O).

    Args:
      cfg: the `config.dataset` block.
      settings: its shared values, already checked.
      select: `sources.select`, for a source built on another one (fractal).

    Raises:
      UserError: a field of this source is invalid.
    """
    del cfg, select
    return cls(settings)

  @abc.abstractmethod
  def cache_params(self) -> dict[str, Any]:
    """Its part of the cache parameters (JSON values; hashed into the cache file name)."""

  @abc.abstractmethod
  def identity(self) -> str:
    """Finds the data (downloading it when config.dataset.download) and identifies its content.

    The string goes into the cache header: a cache of other content is rebuilt.
    """

  @abc.abstractmethod
  def read(self, validation: str) -> Interactions | Dataset:
    """The raw interactions, or the finished `Dataset` of a source whose data comes split.

    Also checks what can be checked before preprocessing (published row counts).
    """

  def check(self, dataset: Dataset, where: str) -> None:
    """Checks the preprocessed dataset against what is known of the source (default: none)."""
    del dataset, where
