"""prepare / load: config.dataset -> its source -> the cached, checksummed `Dataset`.

No per-source logic here: `sources.select` picks the source once, and every source has
the same interface (ncf_jax.data.sources.base): its cache parameters and content identity
make the cache key and header; on a miss it is read, preprocessed unless it comes split,
checked, and the result cached.
"""

import dataclasses
import hashlib
import json
import os
from typing import Any

from absl import logging
import numpy as np

import ncf_jax
from ncf_jax.data import cache, sources
from ncf_jax.data.dataset import Dataset, Interactions
from ncf_jax.data.preprocess import PREPROCESS_VERSION, VALIDATIONS, preprocess
from ncf_jax.data.sources import file as file_source
from ncf_jax.data.synthetic import SyntheticOracle
from ncf_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Prepared:
  """What `prepare` did."""

  dataset: Dataset
  cache_path: str | None  # None when the cache could not be written (a warning says why)
  built: bool  # False when loaded from a valid cache


def check_config(dataset_config) -> None:
  """Checks a `config.dataset` block without reading any data (what `prepare` checks first).

  Raises:
    UserError: unknown name or source, or an invalid field.
  """
  sources.select(dataset_config)


def build(source: sources.Source, validation: str = 'none') -> Dataset:
  """Reads `source` and makes its `Dataset` (no cache): preprocessed unless it comes split."""
  raw = source.read(validation)
  if isinstance(raw, Dataset):
    dataset, where = raw, source.name
  else:
    dataset, where = _preprocess(raw, source, validation), raw.where
  source.check(dataset, where)
  return dataset


def _preprocess(raw: Interactions, source: sources.Source, validation: str) -> Dataset:
  dataset, kept = preprocess(
    raw.users,
    raw.items,
    raw.timestamps,
    name=source.name,
    min_ratings=source.min_ratings,
    where=raw.where,
    num_items=raw.num_items,
    validation=validation,
  )
  if raw.oracle is not None:  # the planted model of the kept users
    oracle = SyntheticOracle(
      theta=np.ascontiguousarray(raw.oracle.theta[kept]),
      item_topic=raw.oracle.item_topic,
      within_topic=raw.oracle.within_topic,
    )
    dataset = dataclasses.replace(dataset, oracle=oracle)
  labels = source.labels
  if labels is not None and raw.num_items is None:  # the original ids of the kept ids
    items = np.unique(raw.items[np.isin(raw.users, kept)])
    source.labels = ([labels[0][u] for u in kept], [labels[1][i] for i in items])
  if raw.test_negatives is not None:  # fixed negatives of the kept users
    negatives = np.ascontiguousarray(raw.test_negatives[kept], np.int32)
    dataset = dataclasses.replace(dataset, test_negatives=negatives)
  return dataset


def _to_arrays(dataset: Dataset) -> dict[str, np.ndarray]:
  arrays = {
    'train_items': dataset.train_items,
    'user_offsets': dataset.user_offsets,
    'test_items': dataset.test_items,
  }
  if dataset.valid_items is not None:
    arrays['valid_items'] = dataset.valid_items
  if dataset.test_negatives is not None:
    arrays['test_negatives'] = dataset.test_negatives
  if dataset.oracle is not None:
    arrays.update(
      oracle_theta=dataset.oracle.theta,
      oracle_item_topic=dataset.oracle.item_topic,
      oracle_within_topic=dataset.oracle.within_topic,
    )
  return arrays


def _from_arrays(arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Dataset:
  num_users, num_items = int(meta['num_users']), int(meta['num_items'])
  offsets, items = arrays['user_offsets'], arrays['train_items']
  test, valid = arrays['test_items'], arrays.get('valid_items')
  negs = arrays.get('test_negatives')
  if (
    offsets.dtype != np.int32
    or items.dtype != np.int32
    or test.dtype != np.int32
    or offsets.shape != (num_users + 1,)
    or test.shape != (num_users,)
    or int(offsets[-1]) != items.shape[0]
    or (valid is not None and (valid.dtype != np.int32 or valid.shape != (num_users,)))
    or (negs is not None and (negs.dtype != np.int32 or negs.shape[:1] != (num_users,)))
  ):
    raise cache.CacheError('arrays do not match the header counts')
  degrees = np.diff(offsets)
  oracle = None
  if 'oracle_theta' in arrays:
    oracle = SyntheticOracle(
      theta=arrays['oracle_theta'],
      item_topic=arrays['oracle_item_topic'],
      within_topic=arrays['oracle_within_topic'],
    )
  return Dataset(
    name=meta['name'],
    num_users=num_users,
    num_items=num_items,
    train_users=np.repeat(np.arange(num_users, dtype=np.int32), degrees),
    train_items=items,
    user_offsets=offsets,
    test_items=test,
    valid_items=valid,
    oracle=oracle,
    test_negatives=negs,
  )


def _try_cache(path: str, params: dict[str, Any], source_id: str) -> Dataset | None:
  try:
    arrays, meta = cache.read(path)
    if meta.get('params') != params:
      raise cache.CacheError('built with other parameters')
    if meta.get('source') != source_id:
      raise cache.CacheError(f'built from another source ({meta.get("source")}, now {source_id})')
    return _from_arrays(arrays, meta)
  except FileNotFoundError:
    return None
  except (cache.CacheError, OSError, KeyError, TypeError, ValueError) as e:
    logging.warning('Processed cache %s is not valid (%s); rebuilding it.', path, e)
    return None


def cache_params(source: sources.Source, validation: str) -> dict[str, Any]:
  """What the cache key hashes: the preprocessing parameters and the source's own part."""
  params: dict[str, Any] = {
    'name': source.name,
    'min_ratings': source.min_ratings,
    'preprocess_version': PREPROCESS_VERSION,
  }
  if not source.applies_min_ratings:
    del params['min_ratings']
  if validation != 'none':
    params['validation'] = validation
  params.update(source.cache_params())
  return params


def prepare(dataset_config, *, force: bool = False, validation: str = 'none') -> Prepared:
  """Loads the processed dataset from its cache under data_dir, building it if needed.

  The cache file is `<data_dir>/processed/<name>-<key>.ncfcache`, key = hash of
  `cache_params` (name, min_ratings, PREPROCESS_VERSION, the validation split unless it is
  'none', so that caches built before the split existed keep their key, and the source's
  own part: its kind, synthetic generator parameters and version, ...). Its header also
  records `source.identity()` (content SHA-256 of the GroupLens file or zip, memoised by
  (path, size, mtime_ns) in processed/source_hashes.json; the TFDS name, version and size;
  the generator version); a cache from another source, of another format version, truncated or failing its
  checksum is rebuilt (one warning line). Writes are atomic, so concurrent prepares are
  safe and a failed build never touches an existing cache.

  Args:
    dataset_config: the `config.dataset` block (see configs/default.py).
    force: rebuild even when a valid cache exists.
    validation: `config.validation`, one of VALIDATIONS.

  Raises:
    UserError: bad config, missing or malformed data (one message saying what to do).
  """
  source = sources.select(dataset_config)
  if validation not in VALIDATIONS:
    raise UserError(
      f'config.validation={validation!r} is invalid: use one of {", ".join(VALIDATIONS)}.'
    )
  name = source.name
  source_id = source.identity()
  params = cache_params(source, validation)
  key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
  path = os.path.join(cache.cache_dir(source.data_dir), f'{name}-{key}.ncfcache')

  if not force:
    dataset = _try_cache(path, params, source_id)
    if dataset is not None:
      logging.info('Loaded %s from %s', name, path)
      return Prepared(dataset, path, built=False)
  logging.info('Building %s (%s)', name, source_id)
  dataset = build(source, validation)
  meta = {
    'name': name,
    'num_users': dataset.num_users,
    'num_items': dataset.num_items,
    'num_train': dataset.num_train,
    'params': params,
    'source': source_id,
    'ncf_jax_version': ncf_jax.__version__,
  }
  try:
    if source.labels is not None:  # before the cache: a cache never lacks its id maps
      file_source.write_labels(path, source.labels)
    cache.write(path, _to_arrays(dataset), meta)
  except OSError as e:
    logging.warning('Could not write the processed cache %s (%s); continuing without it.', path, e)
    return Prepared(dataset, None, built=True)
  logging.info('Wrote %s', path)
  return Prepared(dataset, path, built=True)


def load(dataset_config, validation: str = 'none') -> Dataset:
  """The processed dataset of `config.dataset`: from its cache, or built (and cached).

  This is what training calls, with `validation=config.validation`. See `prepare` for the
  cache and `Dataset` for the fields.
  """
  return prepare(dataset_config, validation=validation).dataset
