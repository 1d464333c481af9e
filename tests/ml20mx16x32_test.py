"""Tests of the ml-20mx16x32 reader (GroupLens's published fractal expansion of ml-20m).

The tests write small shards in the published layout (docs/data.md#ml-20mx16x32):
`<data_dir>/ml-20mx16x32/trainx16x32_<i>.npz` and `testx16x32_<i>.npz`, i = 0..15, each
holding one integer array `arr_0` of (user, item) rows; the test shards hold one row per
user.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from configs import default
from ncf_jax import data
from ncf_jax.data.sources import ml20mx16x32
from ncf_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = 'ml-20mx16x32'


@pytest.fixture(autouse=True)
def _no_size_check_on_tiny_files(monkeypatch):
  # The published sizes are checked in their own test.
  monkeypatch.setattr(ml20mx16x32, 'KNOWN_SIZES', {})


def make_split(seed=0, users_per_shard=3, num_items=40, gap=True):
  """{raw user: (sorted train items, test item)} over 16 shards of consecutive users.

  With `gap`, raw user ids skip some values (the published ids may have gaps).
  """
  rng = np.random.default_rng(seed)
  split, raw = {}, 0
  for shard in range(ml20mx16x32.SHARDS):
    for _ in range(users_per_shard):
      chosen = rng.choice(num_items, size=int(rng.integers(3, 9)), replace=False)
      split[raw] = (shard, sorted(chosen[1:].tolist()), int(chosen[0]))
      raw += 2 if gap and raw % 5 == 0 else 1
  return split


def write_shards(data_dir, split, dtype=np.int64, compressed=True, shuffle=False):
  folder = os.path.join(data_dir, NAME)
  os.makedirs(folder, exist_ok=True)
  save = np.savez_compressed if compressed else np.savez
  rng = np.random.default_rng(1)
  for shard in range(ml20mx16x32.SHARDS):
    train = [(u, i) for u, (s, items, _) in split.items() if s == shard for i in items]
    test = [(u, t) for u, (s, _, t) in split.items() if s == shard]
    train = np.asarray(train, dtype).reshape(-1, 2)
    if shuffle:
      train = train[rng.permutation(len(train))]
    save(os.path.join(folder, f'trainx16x32_{shard}.npz'), train)
    save(os.path.join(folder, f'testx16x32_{shard}.npz'), np.asarray(test, dtype))
  return folder


def config(data_dir, **kwargs):
  c = default.get_dataset_config()
  c.name, c.data_dir = NAME, str(data_dir)
  for k, v in kwargs.items():
    setattr(c, k, v)
  return c


def assert_matches(ds, split):
  raw_users = sorted(split)
  assert ds.name == NAME and ds.num_users == len(raw_users)
  assert ds.num_items == 1 + max(max(t, *items) for _, items, t in split.values())
  for u, raw in enumerate(raw_users):
    _, items, test = split[raw]
    got = ds.train_items[ds.user_offsets[u] : ds.user_offsets[u + 1]]
    np.testing.assert_array_equal(got, [i for i in items if i != test])
    assert ds.test_items[u] == test
  np.testing.assert_array_equal(
    ds.train_users, np.repeat(np.arange(ds.num_users), ds.user_degrees())
  )
  for a in (ds.train_users, ds.train_items, ds.user_offsets, ds.test_items):
    assert a.dtype == np.int32
  assert ds.valid_items is None and ds.oracle is None


@pytest.mark.parametrize('dtype,compressed', [(np.int64, True), (np.int32, False)])
def test_published_layout_gives_the_split_it_defines(tmp_path, dtype, compressed):
  split = make_split()
  write_shards(tmp_path, split, dtype=dtype, compressed=compressed)
  assert_matches(data.load(config(tmp_path)), split)


def test_unsorted_shards_with_repeats_give_the_same_dataset(tmp_path):
  split = make_split(seed=3)
  write_shards(tmp_path, split, shuffle=True)
  # One repeated train row and one train row equal to its user's test pair.
  path = os.path.join(tmp_path, NAME, 'trainx16x32_4.npz')
  rows = np.load(path)['arr_0']
  user = int(rows[0, 0])
  np.savez(path, np.concatenate([rows, rows[:1], [[user, split[user][2]]]]))
  assert_matches(data.load(config(tmp_path)), split)


def test_the_cache_is_reused_and_rebuilt_when_a_shard_changes(tmp_path, monkeypatch):
  split = make_split()
  write_shards(tmp_path, split)
  first = data.prepare(config(tmp_path))
  assert first.built and os.path.basename(first.cache_path).startswith(f'{NAME}-')
  monkeypatch.setattr(ml20mx16x32, 'read_shards', lambda *a: pytest.fail('read again'))
  again = data.prepare(config(tmp_path, min_ratings=5))  # min_ratings is not applied
  assert not again.built and again.cache_path == first.cache_path
  assert_matches(again.dataset, split)
  monkeypatch.undo()
  monkeypatch.setattr(ml20mx16x32, 'KNOWN_SIZES', {})
  split[0] = (0, split[0][1], 39)  # another test item for user 0
  write_shards(tmp_path, split)
  rebuilt = data.prepare(config(tmp_path))
  assert rebuilt.built and rebuilt.dataset.test_items[0] == 39


def test_validation_split_holds_out_one_seeded_training_positive_per_user(tmp_path):
  split = make_split()
  write_shards(tmp_path, split)
  ds = data.load(config(tmp_path), validation='leave_one_out')
  again = data.prepare(config(tmp_path), validation='leave_one_out', force=True).dataset
  np.testing.assert_array_equal(ds.valid_items, again.valid_items)
  picks = set()
  for u, raw in enumerate(sorted(split)):
    _, items, test = split[raw]
    train = ds.train_items[ds.user_offsets[u] : ds.user_offsets[u + 1]].tolist()
    assert ds.valid_items[u] in items and ds.valid_items[u] != test
    assert sorted(train + [int(ds.valid_items[u])]) == items
    picks.add(items.index(int(ds.valid_items[u])))
  assert len(picks) > 1  # not always the same position in the user's list


def test_published_sizes_are_checked(tmp_path, monkeypatch):
  monkeypatch.setattr(ml20mx16x32, 'KNOWN_SIZES', {NAME: (1_223_962_043, 855_776)})
  write_shards(tmp_path, make_split())
  with pytest.raises(
    UserError,
    match=r'train rows; the published ml-20mx16x32 has '
    r'1,223,962,043.*not the published shards',
  ):
    data.load(config(tmp_path))


def test_missing_shards_say_what_where_and_how_to_get_them(tmp_path):
  with pytest.raises(
    UserError,
    match=rf'ml-20mx16x32 not found: {tmp_path}/ml-20mx16x32 does '
    r'not exist.*trainx16x32_<i>.npz.*ml-20mx16x32.tar',
  ):
    data.load(config(tmp_path))
  folder = write_shards(tmp_path, make_split())
  os.unlink(os.path.join(folder, 'testx16x32_7.npz'))
  with pytest.raises(
    UserError,
    match=r'1 of 32 shards are missing, the first is '
    rf'{folder}/testx16x32_7.npz',
  ):
    data.load(config(tmp_path, download=True))


def _replace(folder, name, write):
  path = os.path.join(folder, name)
  os.unlink(path)
  write(path)
  return path


@pytest.mark.parametrize(
  'write,match',
  [
    (lambda p: np.savez(p, ratings=np.zeros((2, 2), np.int64)), r"it holds ratings, no 'arr_0'"),
    (
      lambda p: np.savez(p, np.zeros((4, 2), np.float32)),
      r"'arr_0' is float32 with shape \(4, 2\)",
    ),
    (lambda p: np.savez(p, np.zeros(4, np.int64)), r"'arr_0' is int64 with shape \(4,\)"),
    (lambda p: open(p, 'wb').write(b'not a zip'), r'is not a readable .npz file'),
    (lambda p: np.savez(p, np.array([[0, 1], [0, -3]])), r'row 1: \(user, item\) = \(0, -3\)'),
  ],
)
def test_a_shard_in_another_layout_is_one_clear_error(tmp_path, write, match):
  folder = write_shards(tmp_path, make_split())
  path = _replace(folder, 'trainx16x32_2.npz', write)
  with pytest.raises(UserError, match=rf'{path}.*{match}.*(Re-extract|published)'):
    data.load(config(tmp_path))


def test_users_without_exactly_one_test_row_are_named(tmp_path):
  split = make_split(gap=False)
  folder = write_shards(tmp_path, split)
  _replace(
    folder, 'testx16x32_0.npz', lambda p: np.savez(p, np.array([[0, 1], [0, 2], [1, 3], [2, 4]]))
  )
  with pytest.raises(
    UserError,
    match=r'user 0 has 2 test rows; the published ml-20mx16x32 '
    r'split has exactly one',
  ):
    data.load(config(tmp_path))
  _replace(
    folder, 'testx16x32_0.npz', lambda p: np.savez(p, np.array([[0, 1], [1, 3], [2, 4], [999, 5]]))
  )
  with pytest.raises(UserError, match=r'user 999 has a test row but no train row'):
    data.load(config(tmp_path))


def test_tfds_source_is_refused(tmp_path):
  with pytest.raises(
    UserError,
    match=r"source='tfds': ml-20mx16x32 exists only as the "
    r'GroupLens .npz shards',
  ):
    data.load(config(tmp_path, source='tfds'))


def test_prepare_command_reports_missing_shards_in_one_line(tmp_path):
  proc = subprocess.run(
    [
      sys.executable,
      '-m',
      'ncf_jax.prepare',
      '--config=configs/default.py',
      f'--config.dataset.name={NAME}',
      f'--config.dataset.data_dir={tmp_path}',
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 2 and proc.stdout == '' and 'Traceback' not in proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert lines[-1].startswith('error: ml-20mx16x32 not found:')
