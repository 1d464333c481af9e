"""The processed dataset: what every other module consumes.

Raw MovieLens files / TFDS / the synthetic generator -> preprocessing (MLPerf rules,
docs/mlperf.md) -> a cached, checksummed binary -> `Dataset`.

  dataset = data.load(config.dataset)   # cache hit: about a second at ml-20m scale

No jax here: numpy and pyarrow only, so the data layer and its tests stay fast.
"""

import dataclasses
import hashlib
import json
import os
from typing import Any

from absl import logging
import numpy as np

import ncf_jax
from ncf_jax import cache, fractal, movielens, synthetic
from ncf_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Leave-one-out implicit-feedback dataset in CSR form.

  Users and items are dense 0-based ids. Training positives are de-duplicated and sorted
  by (user, item); `user_offsets[u]:user_offsets[u + 1]` is user u's slice, so a sampler
  can index a user's positives. `test_items[u]` is user u's held-out (latest) item and is
  never among u's training positives. With a validation split (`validation=
  'leave_one_out'`), `valid_items[u]` is u's latest interaction before the test one; it
  differs from the test item and is never among u's training positives. Otherwise it is
  None.
  """

  name: str
  num_users: int
  num_items: int
  train_users: np.ndarray  # int32 [num_train]
  train_items: np.ndarray  # int32 [num_train]
  user_offsets: np.ndarray  # int32 [num_users + 1]
  test_items: np.ndarray  # int32 [num_users]
  valid_items: np.ndarray | None = None  # int32 [num_users], or None: no validation
  oracle: synthetic.SyntheticOracle | None = None

  @property
  def num_train(self) -> int:
    return int(self.train_items.shape[0])

  @property
  def num_test(self) -> int:
    return int(self.test_items.shape[0])

  def user_degrees(self) -> np.ndarray:
    """Training positives per user, int32 [num_users]."""
    return np.diff(self.user_offsets).astype(np.int32)


# --------------------------------------------------------------------------------------
# Preprocessing (MLPerf NCF rules, docs/mlperf.md section 1, with the differences
# documented in docs/data.md: ascending-id relabelling and a deterministic tie rule).

# Bump when the preprocessing output changes for the same input: old caches are rebuilt.
PREPROCESS_VERSION = 1
FRACTAL = 'fractal'
# Datasets a fractal expansion can start from: the ones with timestamps, read raw.
FRACTAL_BASES = ('synthetic',) + movielens.NAMES
NAMES = FRACTAL_BASES + (movielens.EXPANDED_NAME, FRACTAL)
# ml-20mx16x32 has no timestamps: its validation item is a training positive per user
# drawn with this seed (numpy PCG64), the same for every run.
EXPANDED_VALIDATION_SEED = 0
SOURCES = ('grouplens', 'tfds')
# config.validation: no validation split (MLPerf), or the latest training interaction of
# each user held out as its validation item.
VALIDATIONS = ('none', 'leave_one_out')
# Raw ids up to this bound (or 4x the rows) use an O(n) presence table; larger ones sort.
_TABLE_IDS = 1 << 24


def _factorize(raw: np.ndarray):
  """Dense 0-based codes of raw non-negative ids in ascending raw order, and the raw ids."""
  bound = int(raw.max()) + 1
  if bound <= max(_TABLE_IDS, 4 * raw.size):
    present = np.zeros(bound, bool)
    present[raw] = True
    lookup = np.cumsum(present, dtype=np.int32) - 1
    return lookup[raw], np.flatnonzero(present)
  order = np.argsort(raw, kind='stable')
  ordered = raw[order]
  first = np.empty(raw.size, bool)
  first[:1] = True
  np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
  codes = np.empty(raw.size, np.int32)
  codes[order] = np.cumsum(first, dtype=np.int32) - 1
  return codes, ordered[first]


def _latest_rows(
  ucode: np.ndarray, timestamps: np.ndarray, num_users: int, eligible: np.ndarray | None = None
) -> np.ndarray:
  """Per user, the input position of its latest eligible row; -1 for a user without one.

  Among rows tied at the latest timestamp the last one in the input wins: the maximum of
  (timestamp, position) as one int64 key.
  """
  n = int(ucode.shape[0])
  tmin = int(timestamps.min())
  span = int(timestamps.max()) - tmin + 1
  if span * n < 2**62:
    key = timestamps.astype(np.int64, copy=False) - tmin  # then in place: one temporary
    key *= n
    key += np.arange(n, dtype=np.int64)
    if eligible is not None:
      key[~eligible] = -1
    best = np.full(num_users, -1, np.int64)
    np.maximum.at(best, ucode, key)
    del key
    return np.where(best >= 0, best % n, -1)
  # Huge timestamp range: a lexicographic sort instead.
  rows = np.arange(n) if eligible is None else np.flatnonzero(eligible)
  order = rows[np.lexsort((rows, timestamps[rows], ucode[rows]))]
  u = ucode[order]
  last = np.r_[u[1:] != u[:-1], True] if order.size else np.zeros(0, bool)
  out = np.full(num_users, -1, np.int64)
  out[u[last]] = order[last]
  return out


def preprocess(
  users: np.ndarray,
  items: np.ndarray,
  timestamps: np.ndarray,
  *,
  name: str,
  min_ratings: int,
  where: str,
  num_items: int | None = None,
  validation: str = 'none',
) -> tuple[Dataset, np.ndarray]:
  """MLPerf NCF preprocessing of raw interactions given in file order.

  Every row is a positive. Users with fewer than `min_ratings` rows are dropped; users and
  items get dense 0-based ids in ascending raw-id order. Per user the row with the latest
  timestamp is the test item; among rows tied at that timestamp the last one in the input
  wins. With `validation='leave_one_out'` the latest of the user's remaining rows whose
  item is not the test item (same tie rule) is its validation item. All other rows are
  training positives, de-duplicated, without the user's held-out pairs, sorted by
  (user, item) with CSR offsets. Vectorized, O(n) apart from one sort of int64
  (user, item) keys (linear when the input is already in that order, as ml-20m is).

  Args:
    users, items: raw non-negative ids, one per rating, in file order.
    timestamps: int64 seconds, same length.
    name: dataset name stored in the result.
    min_ratings: minimum ratings per kept user (>= 1).
    where: the source (file name) for error messages.
    num_items: when given, `items` are already dense ids in [0, num_items) and kept as is
      (the synthetic generator's catalogue, items without interactions included).
    validation: 'none' or 'leave_one_out' (VALIDATIONS).

  Returns:
    (dataset, kept_raw_users): the Dataset and, for dense user u, its raw id.

  Raises:
    UserError: no rating, no user left after the filter, or a user without a validation
      item or any training positive (names the raw user id).
  """
  n = int(users.shape[0])
  if n == 0:
    raise UserError(f'{where} has no ratings.')
  ucode, uraw = _factorize(users)
  counts = np.bincount(ucode)
  keep = counts >= min_ratings
  if not keep.all():
    if not keep.any():
      raise UserError(
        f'{where}: no user has at least min_ratings={min_ratings} ratings (the '
        f'most is {int(counts.max())}); lower config.dataset.min_ratings.'
      )
    rows = keep[ucode]
    ucode = (np.cumsum(keep, dtype=np.int32) - 1)[ucode[rows]]
    uraw, items, timestamps = uraw[keep], items[rows], timestamps[rows]
    n = int(ucode.shape[0])
  num_users = int(uraw.shape[0])
  if num_items is None:
    icode, iraw = _factorize(items)
    num_items = int(iraw.shape[0])
  else:
    icode = items.astype(np.int32, copy=False)

  held_out = 2 if validation == 'leave_one_out' else 1
  hint = f'Use --config.dataset.min_ratings={held_out + 1} or more (MLPerf: 20).'
  test_pos = _latest_rows(ucode, timestamps, num_users)
  test_items = icode[test_pos]
  held_rows = [test_pos]
  valid_items = None
  if validation == 'leave_one_out':
    eligible = icode != test_items[ucode]  # the test row, and repeats of its item, are out
    valid_pos = _latest_rows(ucode, timestamps, num_users, eligible)
    del eligible
    if (valid_pos < 0).any():
      u = int(np.argmax(valid_pos < 0))
      raise UserError(
        f'{where}: user {int(uraw[u])} has no rating left for validation after holding '
        f'out its latest one as the test item (config.validation=leave_one_out needs two '
        f'distinct items and a training positive per user). {hint}'
      )
    valid_items = icode[valid_pos]
    held_rows.append(valid_pos)

  # Training positives: all other rows, as sorted unique (user, item) keys.
  is_held = np.zeros(n, bool)
  for pos in held_rows:
    is_held[pos] = True
  train = ucode.astype(np.int64)
  train *= num_items
  train += icode
  train = train[~is_held]
  del is_held
  train.sort(kind='stable')  # timsort: linear on already ordered input
  train_users = train // num_items
  keep_row = np.empty(train.shape[0], bool)
  keep_row[:1] = True
  np.not_equal(train[1:], train[:-1], out=keep_row[1:])
  user_base = np.arange(num_users, dtype=np.int64) * num_items
  for held in (test_items, valid_items):  # a repeat of a held-out pair is not training
    if held is not None:
      keep_row &= train != (user_base + held)[train_users]
  train_items = (train - train_users * num_items)[keep_row].astype(np.int32)
  train_users = train_users[keep_row].astype(np.int32)
  del train, keep_row
  degrees = np.bincount(train_users, minlength=num_users)
  if not degrees.all():
    u = int(np.argmin(degrees))
    what = 'its latest rating' if held_out == 1 else 'its two latest items'
    raise UserError(
      f'{where}: user {int(uraw[u])} has no training positive left after holding out '
      f'{what} (it rated {int(np.count_nonzero(ucode == u))} time(s), '
      f'min_ratings={min_ratings}). {hint}'
    )
  offsets = np.zeros(num_users + 1, np.int64)
  np.cumsum(degrees, out=offsets[1:])
  if offsets[-1] >= 2**31:
    raise UserError(f'{where}: {offsets[-1]} training positives exceed int32 offsets.')
  dataset = Dataset(
    name=name,
    num_users=num_users,
    num_items=int(num_items),
    train_users=train_users,
    train_items=train_items,
    user_offsets=offsets.astype(np.int32),
    test_items=test_items.astype(np.int32),
    valid_items=None if valid_items is None else valid_items.astype(np.int32),
  )
  return dataset, uraw


# --------------------------------------------------------------------------------------
# Building, caching and loading.


@dataclasses.dataclass(frozen=True)
class Prepared:
  """What `prepare` did."""

  dataset: Dataset
  cache_path: str | None  # None when the cache could not be written (a warning says why)
  built: bool  # False when loaded from a valid cache


def _config_values(cfg) -> dict[str, Any]:
  """Checks the dataset config block; returns its values as a plain dict."""
  name = cfg.name
  if name not in NAMES:
    raise UserError(
      f'unknown dataset name {name!r} (config.dataset.name); valid names: {", ".join(NAMES)}.'
    )
  values = {
    'name': name,
    'source': cfg.source,
    'data_dir': cfg.data_dir,
    'download': bool(cfg.download),
    'min_ratings': cfg.min_ratings,
  }
  if name != 'synthetic' and cfg.source not in SOURCES:
    raise UserError(
      f'unknown config.dataset.source {cfg.source!r}; valid sources: {", ".join(SOURCES)}.'
    )
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
  values['data_dir'] = os.path.abspath(os.path.expanduser(cfg.data_dir))
  if name == 'synthetic':
    values['synthetic'] = {
      'num_users': int(cfg.synthetic_num_users),
      'num_items': int(cfg.synthetic_num_items),
      'mean_interactions': float(cfg.synthetic_mean_interactions),
      'num_topics': int(cfg.synthetic_num_topics),
      'seed': int(cfg.synthetic_seed),
    }
    noise = float(cfg.get('synthetic_noise', 0.0))
    if noise:  # absent when 0: the caches made before the option keep their key
      values['synthetic']['noise'] = noise
  elif name == movielens.EXPANDED_NAME and cfg.source != 'grouplens':
    raise UserError(
      f'config.dataset.source={cfg.source!r}: {name} exists only as the '
      "GroupLens .npz shards; use config.dataset.source='grouplens'."
    )
  elif name == FRACTAL:
    values['fractal'] = _fractal_values(cfg)
    base = cfg.copy_and_resolve_references()
    base.name = values['fractal']['base']
    values['base'] = _config_values(base)
  return values


def _fractal_values(cfg) -> dict[str, Any]:
  """Checks config.dataset.fractal_*; returns base name, multipliers and seed."""
  base = cfg.get('fractal_base', 'synthetic')
  if base not in FRACTAL_BASES:
    why = {
      FRACTAL: 'an expansion cannot start from another expansion',
      movielens.EXPANDED_NAME: f'{base} is already expanded and has no timestamps',
    }.get(base, 'it is no dataset name')
    raise UserError(
      f'config.dataset.fractal_base={base!r} is invalid ({why}); use one of '
      f'{", ".join(FRACTAL_BASES)}.'
    )
  values = {'base': base}
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


def cache_dir(data_dir: str) -> str:
  """Folder of the processed caches (and the source-hash memo) under data_dir."""
  return os.path.join(os.path.abspath(os.path.expanduser(data_dir)), 'processed')


def _build_synthetic(params: dict[str, Any], min_ratings: int, validation: str) -> Dataset:
  gen = synthetic.generate(**params)
  dataset, kept = preprocess(
    gen.users,
    gen.items,
    gen.timestamps,
    name='synthetic',
    min_ratings=min_ratings,
    where='synthetic data',
    num_items=gen.num_items,
    validation=validation,
  )
  oracle = synthetic.SyntheticOracle(
    theta=np.ascontiguousarray(gen.oracle.theta[kept]),
    item_topic=gen.oracle.item_topic,
    within_topic=gen.oracle.within_topic,
  )
  return dataclasses.replace(dataset, oracle=oracle)


def _build_movielens(
  ratings: 'movielens.Ratings', name: str, min_ratings: int, validation: str
) -> Dataset:
  movielens.check_known_sizes(name, ratings.where, num_ratings=len(ratings))
  dataset, _ = preprocess(
    ratings.users,
    ratings.items,
    ratings.timestamps,
    name=name,
    min_ratings=min_ratings,
    where=ratings.where,
    validation=validation,
  )
  if min_ratings <= 20:  # the published counts are after the (no-op) MLPerf filter
    movielens.check_known_sizes(
      name, ratings.where, num_users=dataset.num_users, num_items=dataset.num_items
    )
  return dataset


def build_grouplens(
  source: 'movielens.Source', min_ratings: int, validation: str = 'none'
) -> Dataset:
  """Parses and preprocesses a located GroupLens file (no cache)."""
  return _build_movielens(movielens.read_ratings(source), source.name, min_ratings, validation)


def _base_interactions(base: dict[str, Any], handle) -> tuple[np.ndarray, ...]:
  """Raw (users, items, timestamps, num_items or None, where) of a fractal base."""
  name = base['name']
  if name == 'synthetic':
    gen = synthetic.generate(**base['synthetic'])
    return gen.users, gen.items, gen.timestamps, gen.num_items, 'synthetic data'
  if isinstance(handle, movielens.Source):
    ratings = movielens.read_ratings(handle)
  else:
    ratings = movielens.read_tfds(handle, name)
  movielens.check_known_sizes(name, ratings.where, num_ratings=len(ratings))
  return ratings.users, ratings.items, ratings.timestamps, None, ratings.where


def build_fractal(
  base: dict[str, Any], handle, params: dict[str, Any], min_ratings: int, validation: str = 'none'
) -> Dataset:
  """The fractal expansion (ncf_jax.fractal) of a base dataset, then MLPerf preprocessing.

  The base is what `load` gives for its name: its users with >= min_ratings ratings, dense
  ids in ascending raw order (synthetic: every item of the catalogue). Expanded rows
  inherit their base row's timestamp, so the leave-one-out split (and validation) runs on
  them as on any dataset; expanded users with fewer than min_ratings rows are dropped, and
  every expanded item stays in the catalogue (num_items = cols x base items).

  Args:
    base: `_config_values` of the base name.
    handle: from `_source_part(base)`.
    params: `_fractal_values` (base, rows, cols, seed).
    min_ratings, validation: as for every dataset.
  """
  users, items, timestamps, num_items, where = _base_interactions(base, handle)
  ucode, _ = _factorize(users)
  counts = np.bincount(ucode)
  keep = counts >= base['min_ratings']
  if not keep.any():
    raise UserError(
      f'{where}: no user has at least min_ratings={base["min_ratings"]} '
      f'ratings (the most is {int(counts.max())}); lower '
      'config.dataset.min_ratings.'
    )
  rows = keep[ucode]
  ucode = (np.cumsum(keep, dtype=np.int32) - 1)[ucode[rows]]
  items, timestamps = items[rows], timestamps[rows]
  if num_items is None:
    items, iraw = _factorize(items)
    num_items = int(iraw.shape[0])
  num_users = int(np.count_nonzero(keep))
  logging.info(
    'Expanding %s (%d users, %d items, %d rows) by %d x %d, seed %d',
    where,
    num_users,
    num_items,
    items.shape[0],
    params['rows'],
    params['cols'],
    params['seed'],
  )
  try:
    exp = fractal.expand(
      ucode, items, timestamps, num_users, num_items, params['rows'], params['cols'], params['seed']
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
  dataset, _ = preprocess(
    exp.users,
    exp.items,
    exp.timestamps,
    name=FRACTAL,
    min_ratings=min_ratings,
    where=f'the {params["rows"]}x{params["cols"]} fractal expansion of {where}',
    num_items=exp.num_items,
    validation=validation,
  )
  dropped = exp.num_users - dataset.num_users
  if dropped:
    logging.info(
      '%d of %d expanded users have fewer than min_ratings=%d rows: dropped',
      dropped,
      exp.num_users,
      min_ratings,
    )
  return dataset


def _strictly_increasing(users: np.ndarray, items: np.ndarray) -> bool:
  """Whether (user, item) rows are strictly increasing (sorted, no repeat), in chunks."""
  step = 1 << 24
  n = int(users.shape[0])
  for lo in range(0, n - 1, step):
    hi = min(n, lo + step + 1)
    du = np.diff(users[lo:hi].astype(np.int64))
    if (du < 0).any() or ((du == 0) & (np.diff(items[lo:hi].astype(np.int64)) <= 0)).any():
      return False
  return True


def build_ml20mx16x32(source: 'movielens.ShardSource', validation: str = 'none') -> Dataset:
  """ml-20mx16x32 from its published shards: train rows and one test item per user.

  Users get dense ids in ascending raw-id order (the published ids may have gaps); items
  keep their published ids (0-based, num_items = largest id + 1). Training positives are
  the train rows, sorted by (user, item) and de-duplicated (the published shards already
  are, which costs one pass to check; otherwise one int64 sort); a train row equal to the
  user's test pair is dropped. min_ratings is not applied: the split is used as published,
  as the MLPerf reference does. With validation='leave_one_out' the validation item is one
  training positive per user drawn with EXPANDED_VALIDATION_SEED (there are no timestamps).

  Raises:
    UserError: missing or malformed shards, a user without a train row or without exactly
      one test row, or too few positives for the validation split.
  """
  raw = movielens.read_shards(source)
  where = raw.where
  movielens.check_expanded_sizes(where, num_rows=raw.train_users.shape[0])
  users, items = raw.train_users, raw.train_items
  bound = int(users.max()) + 1
  present = np.zeros(bound, bool)
  present[users] = True
  num_users = int(np.count_nonzero(present))
  lookup = np.cumsum(present, dtype=np.int32) - 1
  if num_users != bound:  # ids with gaps: relabel in place, chunk by chunk
    for lo in range(0, users.shape[0], 1 << 24):
      users[lo : lo + (1 << 24)] = lookup[users[lo : lo + (1 << 24)]]
  num_items = int(max(int(items.max()), int(raw.test_items.max(initial=-1)))) + 1
  if not _strictly_increasing(users, items):
    logging.warning(
      '%s: train rows are not sorted by (user, item) without repeats; '
      'sorting them (one int64 key per row in memory).',
      where,
    )
    key = users.astype(np.int64) * num_items + items
    key = np.unique(key)
    users = (key // num_items).astype(np.int32)
    items = (key - users.astype(np.int64) * num_items).astype(np.int32)
    del key
  test_raw = raw.test_users
  unknown = (test_raw >= bound) | ~present[np.minimum(test_raw, bound - 1)]
  if unknown.any():
    raise UserError(
      f'{where}: user {int(test_raw[np.argmax(unknown)])} has a test row but no '
      'train row; the published split gives every user both. '
      f'{movielens.expanded_how_to_get(os.path.dirname(where))}'
    )
  test_users = lookup[test_raw]
  per_user = np.bincount(test_users, minlength=num_users)
  if (per_user != 1).any():
    u = int(np.argmax(per_user != 1))
    raw_u = int(np.flatnonzero(present)[u])
    raise UserError(
      f'{where}: user {raw_u} has {int(per_user[u])} test rows; the published '
      'ml-20mx16x32 split has exactly one test item per user (the test shards '
      'hold one row per user).'
    )
  test_items = np.empty(num_users, np.int32)
  test_items[test_users] = raw.test_items
  del raw, present, lookup, test_raw, test_users
  keep = np.ones(users.shape[0], bool)
  for lo in range(0, users.shape[0], 1 << 24):
    sl = slice(lo, lo + (1 << 24))
    keep[sl] = items[sl] != test_items[users[sl]]
  valid_items = None
  if validation == 'leave_one_out':
    degrees = np.bincount(users[keep], minlength=num_users)
    if (degrees < 2).any():
      u = int(np.argmax(degrees < 2))
      raise UserError(
        f'{where}: user {u} (dense id) has {int(degrees[u])} training '
        'positive(s): config.validation=leave_one_out needs two per user '
        '(one held out for validation); use validation=none.'
      )
    kept = np.flatnonzero(keep)
    starts = np.zeros(num_users + 1, np.int64)
    np.cumsum(degrees, out=starts[1:])
    rng = np.random.Generator(np.random.PCG64(EXPANDED_VALIDATION_SEED))
    pick = starts[:-1] + (rng.random(num_users) * degrees).astype(np.int64)
    valid_items = items[kept[pick]]
    keep[kept[pick]] = False
    del kept
  if not keep.all():
    users, items = users[keep], items[keep]
  del keep
  degrees = np.bincount(users, minlength=num_users)
  if not degrees.all():
    u = int(np.argmin(degrees))
    raise UserError(f'{where}: user {u} (dense id) has no training positive besides its test item.')
  offsets = np.zeros(num_users + 1, np.int64)
  np.cumsum(degrees, out=offsets[1:])
  if offsets[-1] >= 2**31:
    raise UserError(f'{where}: {offsets[-1]} training positives exceed int32 offsets.')
  movielens.check_expanded_sizes(where, num_items=num_items)
  logging.info(
    '%s: %d users, %d items, %d training positives', where, num_users, num_items, int(offsets[-1])
  )
  return Dataset(
    name=movielens.EXPANDED_NAME,
    num_users=num_users,
    num_items=num_items,
    train_users=users,
    train_items=items,
    user_offsets=offsets.astype(np.int32),
    test_items=test_items,
    valid_items=valid_items,
  )


def _to_arrays(dataset: Dataset) -> dict[str, np.ndarray]:
  arrays = {
    'train_items': dataset.train_items,
    'user_offsets': dataset.user_offsets,
    'test_items': dataset.test_items,
  }
  if dataset.valid_items is not None:
    arrays['valid_items'] = dataset.valid_items
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
  if (
    offsets.dtype != np.int32
    or items.dtype != np.int32
    or test.dtype != np.int32
    or offsets.shape != (num_users + 1,)
    or test.shape != (num_users,)
    or int(offsets[-1]) != items.shape[0]
    or (valid is not None and (valid.dtype != np.int32 or valid.shape != (num_users,)))
  ):
    raise cache.CacheError('arrays do not match the header counts')
  degrees = np.diff(offsets)
  oracle = None
  if 'oracle_theta' in arrays:
    oracle = synthetic.SyntheticOracle(
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
  )


def _source_part(v: dict[str, Any]) -> tuple[dict[str, Any], str, Any]:
  """(source part of the cache params, source identity, handle) of a non-fractal name.

  The handle is None for synthetic data, the located `movielens.Source` for GroupLens
  files and the TFDS data source for TFDS.
  """
  name, data_dir = v['name'], v['data_dir']
  if name == 'synthetic':
    return (
      {
        'source': 'synthetic',
        'generator': v['synthetic'],
        'generator_version': synthetic.GENERATOR_VERSION,
      },
      f'synthetic-generator-v{synthetic.GENERATOR_VERSION}',
      None,
    )
  if v['source'] == 'grouplens':
    src = movielens.locate(name, data_dir, download=v['download'])
    return (
      {'source': 'grouplens'},
      cache.content_hash(src.path, os.path.join(cache_dir(data_dir), 'source_hashes.json')),
      src,
    )
  ds = movielens.open_tfds(name, os.path.join(data_dir, 'tfds'), v['download'], zip_dir=data_dir)
  return {'source': 'tfds'}, movielens.tfds_identity(ds, name), ds


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


def prepare(dataset_config, *, force: bool = False, validation: str = 'none') -> Prepared:
  """Loads the processed dataset from its cache under data_dir, building it if needed.

  The cache file is `<data_dir>/processed/<name>-<key>.ncfcache`, key = hash of the
  preprocessing parameters (name, source kind, min_ratings, PREPROCESS_VERSION, synthetic
  generator parameters and version, and the validation split unless it is 'none', so
  that caches built before the split existed keep their key). Its header also records the
  source's identity (content SHA-256 of the GroupLens file or zip, memoised by (path,
  size, mtime_ns) in processed/source_hashes.json; the TFDS name, version and size; the
  generator version);
  a cache from another source, of another format version, truncated or failing its
  checksum is rebuilt (one warning line). Writes are atomic, so concurrent prepares are
  safe and a failed build never touches an existing cache.

  Args:
    dataset_config: the `config.dataset` block (see configs/default.py).
    force: rebuild even when a valid cache exists.
    validation: `config.validation`, one of VALIDATIONS.

  Raises:
    UserError: bad config, missing or malformed data (one message saying what to do).
  """
  v = _config_values(dataset_config)
  if validation not in VALIDATIONS:
    raise UserError(
      f'config.validation={validation!r} is invalid: use one of {", ".join(VALIDATIONS)}.'
    )
  name, data_dir, min_ratings = v['name'], v['data_dir'], v['min_ratings']
  params = {'name': name, 'min_ratings': min_ratings, 'preprocess_version': PREPROCESS_VERSION}
  if validation != 'none':
    params['validation'] = validation
  if name == FRACTAL:
    base = v['base']
    base_part, base_id, handle = _source_part(base)
    params.update(
      source=FRACTAL,
      fractal=dict(
        v['fractal'],
        version=fractal.VERSION,
        base=dict(base_part, name=base['name'], min_ratings=base['min_ratings']),
      ),
    )
    source_id = f'fractal-v{fractal.VERSION}:{base_id}'
    build = lambda: build_fractal(base, handle, v['fractal'], min_ratings, validation)
  elif name == movielens.EXPANDED_NAME:
    del params['min_ratings']  # not applied: the published split is used as it is
    params['source'] = 'grouplens'
    shards = movielens.locate_shards(data_dir, v['download'])
    memo = os.path.join(cache_dir(data_dir), 'source_hashes.json')
    digest = hashlib.sha256(
      '\n'.join(cache.content_hash(p, memo) for p in shards.paths).encode()
    ).hexdigest()
    source_id = f'shards-sha256:{digest}'
    build = lambda: build_ml20mx16x32(shards, validation)
  else:
    part, source_id, handle = _source_part(v)
    params.update(part)
    if name == 'synthetic':
      build = lambda: _build_synthetic(v['synthetic'], min_ratings, validation)
    elif v['source'] == 'grouplens':
      build = lambda: build_grouplens(handle, min_ratings, validation)
    else:
      build = lambda: _build_movielens(
        movielens.read_tfds(handle, name), name, min_ratings, validation
      )
  key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
  path = os.path.join(cache_dir(data_dir), f'{name}-{key}.ncfcache')

  if not force:
    dataset = _try_cache(path, params, source_id)
    if dataset is not None:
      logging.info('Loaded %s from %s', name, path)
      return Prepared(dataset, path, built=False)
  logging.info('Building %s (%s)', name, source_id)
  dataset = build()
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
