"""Source `ml-20mx16x32`: GroupLens's published fractal expansion of ml-20m, as .npz shards.

MLPerf's planned successor dataset; layout in docs/data.md ("ml-20mx16x32"). It comes
split (train rows and one test item per user) and without timestamps, so this source builds
the `Dataset` itself (`build`) instead of leaving the split to the preprocessing, and
min_ratings is not applied.
"""

import dataclasses
import hashlib
import os
from typing import Any
import zipfile
import zlib

from absl import logging
import numpy as np

from ncf_jax.data import cache
from ncf_jax.data.dataset import Dataset
from ncf_jax.data.sources import base, grouplens
from ncf_jax.errors import UserError

NAME = 'ml-20mx16x32'
# One train and one test shard per user row block (the expansion's 16 user multiplier).
SHARDS = 16
URL = f'{grouplens.BASE_URL}/ml-20mx16x32.tar'
# (train rows, items) of the published files, as both the mlcommons README and PyG's
# MovieLens1B state them. Their user counts disagree (2,197,225 and 2,210,078), so the
# user count is not checked.
KNOWN_SIZES = {NAME: (1_223_962_043, 855_776)}
_NPZ_ARRAY = 'arr_0'  # np.savez's name for its one positional array
# It has no timestamps: its validation item is a training positive per user drawn with this
# seed (numpy PCG64), the same for every run.
VALIDATION_SEED = 0


@dataclasses.dataclass(frozen=True)
class ShardFiles:
  """The located shards of ml-20mx16x32: trainx16x32_<i>.npz and testx16x32_<i>.npz."""

  folder: str
  train: tuple  # paths, shard 0 first
  test: tuple  # paths, shard 0 first

  @property
  def paths(self) -> tuple:
    return self.train + self.test


@dataclasses.dataclass(frozen=True)
class ShardRows:
  """ml-20mx16x32 as published: (user, item) train rows and one test row per user."""

  train_users: np.ndarray  # int32 [n] raw user ids, shard order
  train_items: np.ndarray  # int32 [n] item ids (already dense, 0-based)
  test_users: np.ndarray  # int32 [num_test] raw user ids
  test_items: np.ndarray  # int32 [num_test]
  where: str  # the folder, for messages


def shard_paths(data_dir: str):
  """(folder, train paths, test paths) that `locate_shards` looks for."""
  folder = os.path.join(data_dir, NAME)
  return (
    folder,
    tuple(os.path.join(folder, f'trainx16x32_{i}.npz') for i in range(SHARDS)),
    tuple(os.path.join(folder, f'testx16x32_{i}.npz') for i in range(SHARDS)),
  )


def how_to_get(data_dir: str) -> str:
  return (
    f'Download {URL} (3.1 GB) and extract it into {data_dir} (`tar -xf '
    f'ml-20mx16x32.tar -C {data_dir}`), or generate it from ml-20m with mlcommons/'
    'training data_generation/fractal_graph_expansions/data_gen.sh.'
  )


def locate_shards(data_dir: str, download: bool = False) -> ShardFiles:
  """Finds the 16 train and 16 test shards of ml-20mx16x32 in data_dir/ml-20mx16x32/.

  Raises:
    UserError: a shard is missing (names how many and the first one, and how to get them).
  """
  folder, train, test = shard_paths(data_dir)
  missing = [p for p in train + test if not os.path.isfile(p)]
  if missing:
    where = (
      f'data_dir {data_dir} does not exist'
      if not os.path.isdir(data_dir)
      else f'{folder} does not exist'
      if not os.path.isdir(folder)
      else f'{len(missing)} of {2 * SHARDS} shards are missing, the first is {missing[0]}'
    )
    note = (
      ' (--download does not fetch this tarball: it has no published checksum to '
      'verify it against.)'
      if download
      else ''
    )
    raise UserError(
      f'{NAME} not found: {where}. It is {SHARDS} train and '
      f'{SHARDS} test shards, trainx16x32_<i>.npz and testx16x32_<i>.npz for i = '
      f'0..{SHARDS - 1}, in {folder}. {how_to_get(data_dir)}{note}'
    )
  return ShardFiles(folder, train, test)


def _layout_error(path: str, found: str) -> UserError:
  return UserError(
    f'{path}: {found}; a published {NAME} shard holds one array {_NPZ_ARRAY!r} of '
    f'integer (user, item) rows, shape [n, 2]. Re-extract it from ml-20mx16x32.tar, or '
    f'regenerate it.'
  )


def shard_rows(path: str) -> int:
  """Rows of a shard, from the .npy header inside the .npz (no data read).

  Raises:
    UserError: not a readable .npz, no arr_0, or not an integer [n, >= 2] array.
  """
  try:
    with zipfile.ZipFile(path) as z:
      names = z.namelist()
      if f'{_NPZ_ARRAY}.npy' not in names:
        raise _layout_error(
          path, f'it holds {", ".join(n[:-4] for n in names) or "nothing"}, no {_NPZ_ARRAY!r}'
        )
      with z.open(f'{_NPZ_ARRAY}.npy') as f:
        version = np.lib.format.read_magic(f)
        read_header = (
          np.lib.format.read_array_header_1_0
          if version == (1, 0)
          else np.lib.format.read_array_header_2_0
        )
        shape, _, dtype = read_header(f)
  except (zipfile.BadZipFile, OSError, ValueError, EOFError, zlib.error) as e:
    raise UserError(
      f'{path} is not a readable .npz file ({e}). Re-extract it from '
      f'ml-20mx16x32.tar, or regenerate it.'
    ) from None
  if len(shape) != 2 or shape[1] < 2 or dtype.kind not in 'iu':
    raise _layout_error(path, f'{_NPZ_ARRAY!r} is {dtype} with shape {tuple(shape)}')
  return int(shape[0])


def _read_shard(path: str, rows: int) -> np.ndarray:
  """The [rows, >= 2] integer array of a shard, checked (ids in [0, 2**31))."""
  try:
    with np.load(path, allow_pickle=False) as z:
      array = z[_NPZ_ARRAY]
  except (zipfile.BadZipFile, OSError, ValueError, EOFError, zlib.error) as e:
    raise UserError(
      f'{path} cannot be read ({e}). Re-extract it from ml-20mx16x32.tar, or regenerate it.'
    ) from None
  if array.shape[0] != rows:
    raise UserError(f'{path} changed while it was read; run again.')
  cols = array[:, :2]
  if cols.size and (int(cols.min()) < 0 or int(cols.max()) >= 2**31):
    k = int(np.argmax(((cols < 0) | (cols >= 2**31)).any(axis=1)))
    raise UserError(
      f'{path} row {k}: (user, item) = {tuple(int(v) for v in cols[k])}; ids '
      'must be in [0, 2**31). Is this a published ml-20mx16x32 shard?'
    )
  return array


def read_shards(source: ShardFiles) -> ShardRows:
  """Reads every shard in turn into preallocated int32 columns (one shard in memory).

  Peak memory: the int32 train columns (8 bytes a row, about 9.8 GB for the published
  1.2 billion rows) plus one shard as stored.

  Raises:
    UserError: unreadable shard, wrong layout, an id out of range, no train row.
  """
  train_rows = [shard_rows(p) for p in source.train]
  test_rows = [shard_rows(p) for p in source.test]
  total = sum(train_rows)
  if total == 0:
    raise UserError(
      f'{source.folder}: the train shards have no rows. '
      f'{how_to_get(os.path.dirname(source.folder))}'
    )
  columns = []
  for paths, counts in ((source.train, train_rows), (source.test, test_rows)):
    n = sum(counts)
    users, items = np.empty(n, np.int32), np.empty(n, np.int32)
    pos = 0
    for path, rows in zip(paths, counts):
      array = _read_shard(path, rows)
      users[pos : pos + rows] = array[:, 0]
      items[pos : pos + rows] = array[:, 1]
      del array
      pos += rows
      logging.info('Read %s (%d rows)', path, rows)
    columns += [users, items]
  train_users, train_items, test_users, test_items = columns
  return ShardRows(train_users, train_items, test_users, test_items, where=source.folder)


def check_sizes(
  where: str,
  num_rows: int | None = None,
  num_items: int | None = None,
  known: dict[str, tuple] | None = None,
) -> None:
  """Raises UserError when ml-20mx16x32's train rows or items differ from the published."""
  known = KNOWN_SIZES if known is None else known
  if NAME not in known:
    return
  for what, got, exp in (
    ('train rows', num_rows, known[NAME][0]),
    ('items', num_items, known[NAME][1]),
  ):
    if got is not None and got != exp:
      raise UserError(
        f'{where} has {got:,} {what}; the published {NAME} has {exp:,}. These are '
        f'not the published shards (partial or modified?). {how_to_get(os.path.dirname(where))}'
      )


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


def build(source: ShardFiles, validation: str = 'none') -> Dataset:
  """ml-20mx16x32 from its published shards: train rows and one test item per user.

  Users get dense ids in ascending raw-id order (the published ids may have gaps); items
  keep their published ids (0-based, num_items = largest id + 1). Training positives are
  the train rows, sorted by (user, item) and de-duplicated (the published shards already
  are, which costs one pass to check; otherwise one int64 sort); a train row equal to the
  user's test pair is dropped. min_ratings is not applied: the split is used as published,
  as the MLPerf reference does. With validation='leave_one_out' the validation item is one
  training positive per user drawn with VALIDATION_SEED (there are no timestamps).

  Raises:
    UserError: missing or malformed shards, a user without a train row or without exactly
      one test row, or too few positives for the validation split.
  """
  raw = read_shards(source)
  where = raw.where
  check_sizes(where, num_rows=raw.train_users.shape[0])
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
      f'{how_to_get(os.path.dirname(where))}'
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
    rng = np.random.Generator(np.random.PCG64(VALIDATION_SEED))
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
  check_sizes(where, num_items=num_items)
  logging.info(
    '%s: %d users, %d items, %d training positives', where, num_users, num_items, int(offsets[-1])
  )
  return Dataset(
    name=NAME,
    num_users=num_users,
    num_items=num_items,
    train_users=users,
    train_items=items,
    user_offsets=offsets.astype(np.int32),
    test_items=test_items,
    valid_items=valid_items,
  )


class ShardsSource(base.Source):
  """The 16 train and 16 test shards in `<data_dir>/ml-20mx16x32/`, as published.

  Identity: the SHA-256 of the 32 shards' content hashes. Only config.dataset.source=
  'grouplens' (the published files) is accepted.
  """

  names = (NAME,)
  kinds = ('grouplens', 'tfds')  # tfds only to say why it is rejected (from_config)
  applies_min_ratings = False  # the published split is used as it is

  def __init__(self, settings: base.Settings):
    super().__init__(settings)
    self._files: ShardFiles | None = None

  @classmethod
  def from_config(cls, cfg, settings: base.Settings, select) -> 'ShardsSource':
    del select
    if cfg.source != 'grouplens':
      raise UserError(
        f'config.dataset.source={cfg.source!r}: {NAME} exists only as the '
        "GroupLens .npz shards; use config.dataset.source='grouplens'."
      )
    return cls(settings)

  def shard_files(self) -> ShardFiles:
    """The located shards (found once)."""
    if self._files is None:
      self._files = locate_shards(self.data_dir, self.settings.download)
    return self._files

  def cache_params(self) -> dict[str, Any]:
    return {'source': 'grouplens'}

  def identity(self) -> str:
    hashes = '\n'.join(cache.source_hash(p, self.data_dir) for p in self.shard_files().paths)
    return f'shards-sha256:{hashlib.sha256(hashes.encode()).hexdigest()}'

  def read(self, validation: str) -> Dataset:
    return build(self.shard_files(), validation)
