"""MLPerf NCF preprocessing: raw interactions -> leave-one-out `Dataset`.

The rules of docs/mlperf.md section 1, with the differences documented in docs/data.md:
ascending-id relabelling and a deterministic tie rule. numpy only.
"""

import numpy as np

from ncf_jax.data.dataset import Dataset
from ncf_jax.errors import UserError

# Bump when the preprocessing output changes for the same input: old caches are rebuilt.
PREPROCESS_VERSION = 1
# config.validation: no validation split (MLPerf), or the latest training interaction of
# each user held out as its validation item.
VALIDATIONS = ('none', 'leave_one_out')
# Raw ids up to this bound (or 4x the rows) use an O(n) presence table; larger ones sort.
_TABLE_IDS = 1 << 24


def factorize(raw: np.ndarray):
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
  if int(users.shape[0]) == 0:
    raise UserError(f'{where} has no ratings.')
  ucode, uraw, items, timestamps = _filter_users(users, items, timestamps, min_ratings, where)
  num_users = int(uraw.shape[0])
  if num_items is None:
    icode, iraw = factorize(items)
    num_items = int(iraw.shape[0])
  else:
    icode = items.astype(np.int32, copy=False)
  held = _HeldOut(ucode, uraw, icode, timestamps, num_users, validation, min_ratings, where)
  train_users, train_items = _training_positives(ucode, icode, num_users, num_items, held)
  degrees = np.bincount(train_users, minlength=num_users)
  if not degrees.all():
    u = int(np.argmin(degrees))
    what = 'its latest rating' if held.count == 1 else 'its two latest items'
    raise UserError(
      f'{where}: user {int(uraw[u])} has no training positive left after holding out '
      f'{what} (it rated {int(np.count_nonzero(ucode == u))} time(s), '
      f'min_ratings={min_ratings}). {held.hint}'
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
    test_items=held.test_items.astype(np.int32),
    valid_items=None if held.valid_items is None else held.valid_items.astype(np.int32),
  )
  return dataset, uraw


def _filter_users(users, items, timestamps, min_ratings: int, where: str):
  """(dense user ids, their raw ids, items, timestamps) of the users with at least
  `min_ratings` rows, in file order."""
  ucode, uraw = factorize(users)
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
  return ucode, uraw, items, timestamps


class _HeldOut:
  """Each user's test item (its latest row; the last among equals) and, with
  validation='leave_one_out', its validation item (the latest of the other items)."""

  def __init__(self, ucode, uraw, icode, timestamps, num_users, validation, min_ratings, where):
    held_out = 2 if validation == 'leave_one_out' else 1
    hint = (
      f'Use --config.dataset.min_ratings={held_out + 1} or more (MLPerf: 20).'
      if min_ratings <= held_out
      else 'Its ratings repeat one item (min_ratings counts ratings, not distinct items): '
      'remove the repeats or raise config.dataset.min_ratings (MLPerf: 20).'
    )
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
    self.count, self.hint, self.rows = held_out, hint, held_rows
    self.test_items, self.valid_items = test_items, valid_items


def _training_positives(ucode, icode, num_users: int, num_items: int, held: _HeldOut):
  """Every row that is not held out, as sorted unique (user, item) pairs without any
  repeat of a user's held-out items."""
  is_held = np.zeros(ucode.shape[0], bool)
  for pos in held.rows:
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
  for out in (held.test_items, held.valid_items):  # a repeat of a held-out pair is not training
    if out is not None:
      keep_row &= train != (user_base + out)[train_users]
  train_items = (train - train_users * num_items)[keep_row].astype(np.int32)
  train_users = train_users[keep_row].astype(np.int32)
  return train_users, train_items
