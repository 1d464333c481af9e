"""Tests of MLPerf preprocessing, the processed cache and `data.load` (ncf_jax.data)."""

import logging
import os
import struct
import zipfile

from conftest import ml100k_zip, serve_http, write_tfds_metadata
import numpy as np
import pytest

from configs import default
from ncf_jax import data
from ncf_jax.data import cache, sources
from ncf_jax.data.sources import grouplens
from ncf_jax.data.sources import tfds as tfds_source
from ncf_jax.errors import UserError

# (raw user, raw movie, timestamp) in file order: 5 users, 12 movies.
ROWS = [
  (3, 500, 10),
  (3, 100, 20),
  (3, 900, 20),  # user 3: tie at its latest ts, 900 is last
  (10, 200, 5),
  (10, 300, 6),
  (10, 200, 7),  # user 10: duplicate training pair (10, 200)
  (10, 1200, 9),
  (7, 100, 1),
  (7, 400, 2),
  (7, 100, 3),  # user 7: the test pair also appears earlier
  (42, 600, 100),
  (42, 700, 50),
  (42, 800, 60),  # user 42: latest row comes first
  (5, 1000, 1),
  (5, 1100, 2),  # user 5: 2 ratings, dropped at min_ratings 3
  (3, 400, 15),
]
# Expected at min_ratings=3: users 3, 7, 10, 42 -> 0..3; movies 100..900, 1200 -> 0..9.
EXPECTED_OFFSETS = [0, 3, 4, 6, 8]
EXPECTED_TRAIN_USERS = [0, 0, 0, 1, 2, 2, 3, 3]
EXPECTED_TRAIN_ITEMS = [0, 3, 4, 3, 1, 2, 6, 7]
EXPECTED_TEST = [8, 0, 9, 5]


def write_ratings(data_dir, name, rows=ROWS, as_zip=False):
  fmt = grouplens.FORMATS[name]
  lines = [fmt.header] if fmt.header else []
  lines += [
    fmt.sep.join([str(u), str(i), '4' if fmt.sep != ',' else '3.5', str(t)]) for u, i, t in rows
  ]
  text = '\n'.join(lines) + '\n'
  member = f'{fmt.folder}/{fmt.filename}'
  os.makedirs(data_dir, exist_ok=True)
  if as_zip:
    path = os.path.join(data_dir, f'{name}.zip')
    with zipfile.ZipFile(path, 'w', zipfile.ZIP_DEFLATED) as z:
      z.writestr(member, text)
  else:
    path = os.path.join(data_dir, member)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
      f.write(text)
  return path


def config(data_dir, name='ml-latest-small', **kwargs):
  c = default.get_dataset_config()
  c.name, c.data_dir, c.min_ratings = name, str(data_dir), 3
  for k, v in kwargs.items():
    setattr(c, k, v)
  return c


def synthetic_config(data_dir, **kwargs):
  c = config(
    data_dir,
    'synthetic',
    min_ratings=20,
    synthetic_num_users=200,
    synthetic_num_items=300,
    synthetic_mean_interactions=30.0,
    synthetic_num_topics=4,
  )
  for k, v in kwargs.items():
    setattr(c, k, v)
  return c


@pytest.fixture(autouse=True)
def _no_size_check_on_tiny_files(monkeypatch):
  # The tiny files use the ml-1m / ml-20m layouts; the published sizes are tested separately.
  monkeypatch.setattr(grouplens, 'KNOWN_SIZES', {})


def assert_expected(ds):
  assert (ds.num_users, ds.num_items, ds.num_train, ds.num_test) == (4, 10, 8, 4)
  np.testing.assert_array_equal(ds.user_offsets, EXPECTED_OFFSETS)
  np.testing.assert_array_equal(ds.train_users, EXPECTED_TRAIN_USERS)
  np.testing.assert_array_equal(ds.train_items, EXPECTED_TRAIN_ITEMS)
  np.testing.assert_array_equal(ds.test_items, EXPECTED_TEST)
  for a in (ds.train_users, ds.train_items, ds.user_offsets, ds.test_items):
    assert a.dtype == np.int32


# --- preprocessing rules ------------------------------------------------------------------


def test_hand_written_file_gives_the_pinned_dataset(tmp_path):
  write_ratings(tmp_path, 'ml-latest-small')
  ds = data.load(config(tmp_path))
  assert_expected(ds)
  assert ds.name == 'ml-latest-small' and ds.oracle is None


@pytest.mark.parametrize('name', grouplens.NAMES)
@pytest.mark.parametrize('as_zip', [False, True])
def test_every_format_folder_or_zip_gives_the_same_dataset(tmp_path, name, as_zip):
  write_ratings(tmp_path, name, as_zip=as_zip)
  assert_expected(data.load(config(tmp_path, name)))


def test_ids_are_dense_in_ascending_raw_order():
  users = np.array([42, 7, 42, 7, 3, 3], np.int32)
  items = np.array([9, 1000, 5, 9, 5, 1000], np.int32)
  ds, raw_users = data.preprocess(
    users, items, np.arange(6, dtype=np.int64), name='x', min_ratings=1, where='w'
  )
  np.testing.assert_array_equal(raw_users, [3, 7, 42])
  # Test items (latest row per user): 42 -> 5, 7 -> 9, 3 -> 1000; ascending items 5, 9, 1000.
  np.testing.assert_array_equal(ds.test_items, [2, 1, 0])
  np.testing.assert_array_equal(ds.train_items, [0, 2, 1])


def test_min_ratings_drops_users_and_their_only_items(tmp_path):
  write_ratings(tmp_path, 'ml-latest-small')
  ds2 = data.load(config(tmp_path, min_ratings=2))
  assert (ds2.num_users, ds2.num_items) == (5, 12)  # user 5 and movies 1000, 1100 stay
  ds4 = data.load(config(tmp_path, min_ratings=4))
  assert (ds4.num_users, ds4.num_items) == (2, 7)  # users 3 and 10 only
  np.testing.assert_array_equal(ds4.test_items, [5, 6])  # 900, 1200 among 7 movies


def test_latest_timestamp_is_the_test_item_and_the_last_tied_row_in_the_file_wins():
  users = np.zeros(5, np.int32)
  items = np.array([1, 2, 3, 4, 5], np.int32)
  ts = np.array([7, 9, 3, 9, 8], np.int64)
  ds, _ = data.preprocess(users, items, ts, name='x', min_ratings=1, where='w')
  assert ds.test_items[0] == 3  # movie 4: second of the two rows at ts 9
  ds, _ = data.preprocess(
    users, items[::-1].copy(), ts[::-1].copy(), name='x', min_ratings=1, where='w'
  )
  assert ds.test_items[0] == 1  # reversed file: movie 2 is now last among the tie


def test_training_positives_are_deduplicated_and_exclude_the_test_pair():
  users = np.array([0, 0, 0, 0, 0], np.int32)
  items = np.array([3, 1, 3, 1, 2], np.int32)
  ts = np.array([1, 2, 3, 5, 4], np.int64)
  ds, _ = data.preprocess(users, items, ts, name='x', min_ratings=1, where='w')
  assert ds.test_items[0] == 0  # movie 1 at ts 5
  np.testing.assert_array_equal(ds.train_items, [1, 2])  # movies 2, 3 once; no movie 1


def test_csr_offsets_slice_each_users_sorted_positives(tmp_path):
  ds = data.load(synthetic_config(tmp_path))
  assert ds.user_offsets[0] == 0 and ds.user_offsets[-1] == ds.num_train
  np.testing.assert_array_equal(
    ds.user_degrees(), np.bincount(ds.train_users, minlength=ds.num_users)
  )
  keys = ds.train_users.astype(np.int64) * ds.num_items + ds.train_items
  assert np.all(np.diff(keys) > 0)
  for u in (0, 17, ds.num_users - 1):
    row = ds.train_items[ds.user_offsets[u] : ds.user_offsets[u + 1]]
    assert np.all(ds.train_users[ds.user_offsets[u] : ds.user_offsets[u + 1]] == u)
    assert ds.test_items[u] not in row


def _reference(users, items, ts, min_ratings, validation=False):
  """Slow, obvious per-row implementation of the same rules (test oracle only).

  Returns (test items, train users, train items, validation items or None).
  """
  counts = {}
  for u in users:
    counts[u] = counts.get(u, 0) + 1
  rows = [
    (u, i, t, k) for k, (u, i, t) in enumerate(zip(users, items, ts)) if counts[u] >= min_ratings
  ]
  umap = {u: d for d, u in enumerate(sorted({r[0] for r in rows}))}
  imap = {i: d for d, i in enumerate(sorted({r[1] for r in rows}))}
  test, valid = {}, {}
  for u, i, t, k in rows:
    if u not in test or (t, k) > test[u][0]:
      test[u] = ((t, k), i)
  held = {u: {test[u][1]} for u in test}
  if validation:  # the latest row of another item than the test one, same tie rule
    for u, i, t, k in rows:
      if i != test[u][1] and (u not in valid or (t, k) > valid[u][0]):
        valid[u] = ((t, k), i)
    for u in valid:
      held[u].add(valid[u][1])
  train = sorted({(umap[u], imap[i]) for u, i, t, k in rows if i not in held[u]})
  return (
    [imap[test[u][1]] for u in sorted(umap)],
    [p[0] for p in train],
    [p[1] for p in train],
    [imap[valid[u][1]] for u in sorted(umap)] if validation else None,
  )


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_vectorized_preprocessing_matches_a_per_row_reference(seed):
  rng = np.random.default_rng(seed)
  n = 3000
  users = rng.integers(1, 120, n).astype(np.int32)
  items = (rng.integers(1, 80, n) * 7).astype(np.int32)
  ts = rng.integers(0, 40, n).astype(np.int64)  # many ties and duplicates
  for validation in ('none', 'leave_one_out'):
    ds, _ = data.preprocess(
      users, items, ts, name='x', min_ratings=25, where='w', validation=validation
    )
    test, tu, ti, valid = _reference(
      users.tolist(), items.tolist(), ts.tolist(), 25, validation == 'leave_one_out'
    )
    np.testing.assert_array_equal(ds.test_items, test)
    np.testing.assert_array_equal(ds.train_users, tu)
    np.testing.assert_array_equal(ds.train_items, ti)
    if valid is None:
      assert ds.valid_items is None
    else:
      np.testing.assert_array_equal(ds.valid_items, valid)


def test_huge_raw_ids_take_the_sorting_path_with_the_same_result():
  users = np.array([2_000_000_000, 5, 5, 2_000_000_000, 5], np.int32)
  items = np.array([1_900_000_000, 3, 1_900_000_000, 3, 4], np.int32)
  ds, raw = data.preprocess(
    users, items, np.arange(5, dtype=np.int64), name='x', min_ratings=1, where='w'
  )
  np.testing.assert_array_equal(raw, [5, 2_000_000_000])
  np.testing.assert_array_equal(ds.test_items, [1, 0])
  np.testing.assert_array_equal(ds.train_items, [0, 2, 2])


# --- the validation split --------------------------------------------------------------------

# ROWS plus an earliest rating for user 7, whose two latest rows are its held-out items.
VALID_ROWS = ROWS + [(7, 300, 0)]


def test_hand_written_file_with_a_validation_split_gives_the_pinned_dataset(tmp_path):
  write_ratings(tmp_path, 'ml-latest-small', VALID_ROWS)
  ds = data.load(config(tmp_path), validation='leave_one_out')
  # Movies 100..900, 1200 -> 0..9. User 3: test 900 (last of the tie at ts 20), validation
  # 100 (ts 20, its latest other row); user 7: test 100 (ts 3), validation 400, and the
  # earlier repeat of 100 is no training positive; user 10: test 1200, validation 200 (the
  # row at ts 7; the repeat at ts 5 goes too); user 42: test 600, validation 800.
  np.testing.assert_array_equal(ds.test_items, [8, 0, 9, 5])
  np.testing.assert_array_equal(ds.valid_items, [0, 3, 1, 7])
  np.testing.assert_array_equal(ds.user_offsets, [0, 2, 3, 4, 5])
  np.testing.assert_array_equal(ds.train_users, [0, 0, 1, 2, 3])
  np.testing.assert_array_equal(ds.train_items, [3, 4, 2, 2, 6])
  assert ds.valid_items.dtype == np.int32
  # Without the split the same file keeps today's dataset: the validation items train.
  none = data.load(config(tmp_path))
  assert none.valid_items is None
  np.testing.assert_array_equal(none.test_items, ds.test_items)
  np.testing.assert_array_equal(none.train_items, [0, 3, 4, 2, 3, 1, 2, 6, 7])


def test_the_validation_item_follows_the_test_items_tie_rule_and_skips_its_repeats():
  users = np.zeros(6, np.int32)
  items = np.array([1, 2, 3, 4, 5, 5], np.int32)
  ts = np.array([7, 8, 8, 6, 9, 2], np.int64)
  ds, _ = data.preprocess(
    users, items, ts, name='x', min_ratings=1, where='w', validation='leave_one_out'
  )
  assert ds.test_items[0] == 4 and ds.valid_items[0] == 2  # movie 5; movie 3 wins the tie
  np.testing.assert_array_equal(ds.train_items, [0, 1, 3])  # no repeat of movie 5


def test_validation_is_part_of_the_cache_key_and_none_keeps_the_old_key(tmp_path):
  write_ratings(tmp_path, 'ml-latest-small', VALID_ROWS)
  plain = data.prepare(config(tmp_path))
  none = data.prepare(config(tmp_path), validation='none')
  loo = data.prepare(config(tmp_path), validation='leave_one_out')
  assert plain.cache_path == none.cache_path != loo.cache_path
  assert not none.built and loo.built
  again = data.prepare(config(tmp_path), validation='leave_one_out')
  assert not again.built and again.cache_path == loo.cache_path
  np.testing.assert_array_equal(again.dataset.valid_items, loo.dataset.valid_items)


def test_a_user_with_too_few_items_for_a_validation_split_is_named(tmp_path):
  write_ratings(tmp_path, 'ml-latest-small')  # user 7: items 100, 400 only
  with pytest.raises(
    UserError,
    match=r'user 7 has no training positive left after holding '
    r'out its two latest items.*min_ratings=3',
  ):
    data.load(config(tmp_path), validation='leave_one_out')
  users = np.array([0, 0, 1, 1, 1], np.int32)
  items = np.array([4, 4, 1, 2, 3], np.int32)
  with pytest.raises(UserError, match=r'user 0 has no rating left for validation'):
    data.preprocess(
      users,
      items,
      np.arange(5, dtype=np.int64),
      name='x',
      min_ratings=1,
      where='w',
      validation='leave_one_out',
    )
  with pytest.raises(UserError, match=r"config.validation='kfold' is invalid"):
    data.load(config(tmp_path), validation='kfold')


# --- bad input ------------------------------------------------------------------------------


def test_user_without_training_positive_names_the_raw_user_and_min_ratings(tmp_path):
  write_ratings(tmp_path, 'ml-latest-small', ROWS + [(77, 100, 1)])
  with pytest.raises(UserError, match=r'user 77 has no training positive.*min_ratings=2'):
    data.load(config(tmp_path, min_ratings=1))
  assert not os.path.exists(data.cache_dir(str(tmp_path))) or not any(
    f.endswith('.ncfcache') for f in os.listdir(data.cache_dir(str(tmp_path)))
  )


def test_no_user_left_after_the_filter_is_reported(tmp_path):
  write_ratings(tmp_path, 'ml-latest-small')
  with pytest.raises(UserError, match='no user has at least min_ratings=50'):
    data.load(config(tmp_path, min_ratings=50))


def test_unknown_dataset_name_lists_the_valid_ones(tmp_path):
  with pytest.raises(
    UserError,
    match="unknown dataset name 'ml-2m'.*synthetic, ml-100k, "
    'ml-1m, ml-10m, ml-20m, ml-25m, ml-latest-small',
  ):
    data.load(config(tmp_path, 'ml-2m'))


@pytest.mark.parametrize(
  'field,value,match',
  [
    ('source', 'kaggle', "unknown config.dataset.source 'kaggle'"),
    ('min_ratings', 0, 'min_ratings is 0'),
    ('data_dir', '', 'data_dir is empty'),
  ],
)
def test_bad_dataset_config_values_are_user_errors(tmp_path, field, value, match):
  c = config(tmp_path)
  setattr(c, field, value)
  with pytest.raises(UserError, match=match):
    data.load(c)


def test_missing_file_names_the_expected_paths(tmp_path):
  with pytest.raises(
    UserError,
    match=rf'{tmp_path}/ml-1m/ratings.dat nor '
    rf'{tmp_path}/ml-1m.zip.*--download',
  ):
    data.load(config(tmp_path, 'ml-1m'))


def test_published_sizes_are_checked_for_official_names(tmp_path, monkeypatch):
  monkeypatch.setattr(grouplens, 'KNOWN_SIZES', {'ml-1m': (1_000_209, 6_040, 3_706)})
  write_ratings(tmp_path, 'ml-1m')
  with pytest.raises(
    UserError,
    match=r'has 16 ratings; the official GroupLens ml-1m has '
    r'1,000,209.*not the official file',
  ):
    data.load(config(tmp_path, 'ml-1m'))
  monkeypatch.setattr(grouplens, 'KNOWN_SIZES', {'ml-1m': (16, 6_040, 3_706)})
  with pytest.raises(UserError, match=r'has 4 users; the official GroupLens ml-1m has 6,040'):
    data.load(config(tmp_path, 'ml-1m'))


def test_failed_build_never_touches_an_existing_good_cache(tmp_path):
  src = write_ratings(tmp_path, 'ml-latest-small')
  prepared = data.prepare(config(tmp_path))
  before = open(prepared.cache_path, 'rb').read()
  stat = os.stat(prepared.cache_path)
  with open(src, 'a') as f:
    f.write('1,2,3.5\n')  # malformed: the source hash changes, the rebuild fails
  with pytest.raises(UserError, match=r'line 18: expected 4 fields'):
    data.load(config(tmp_path))
  assert open(prepared.cache_path, 'rb').read() == before
  assert os.stat(prepared.cache_path).st_mtime_ns == stat.st_mtime_ns
  assert sorted(os.listdir(data.cache_dir(str(tmp_path)))) == [
    os.path.basename(prepared.cache_path),
    'source_hashes.json',
  ]


# --- the cache --------------------------------------------------------------------------------


def test_second_load_uses_the_cache_without_parsing(tmp_path, monkeypatch):
  write_ratings(tmp_path, 'ml-latest-small')
  first = data.prepare(config(tmp_path))
  assert first.built
  mtime = os.stat(first.cache_path).st_mtime_ns

  def no_build(*args, **kwargs):
    raise AssertionError('rebuilt although the cache is valid')

  monkeypatch.setattr(grouplens, 'read_ratings', no_build)
  second = data.prepare(config(tmp_path))
  assert not second.built and second.cache_path == first.cache_path
  assert os.stat(first.cache_path).st_mtime_ns == mtime
  assert_expected(second.dataset)


def test_cache_lives_under_data_dir_keyed_by_name_and_parameters(tmp_path):
  write_ratings(tmp_path, 'ml-latest-small')
  p3 = data.prepare(config(tmp_path)).cache_path
  p2 = data.prepare(config(tmp_path, min_ratings=2)).cache_path
  assert os.path.dirname(p3) == str(tmp_path / 'processed')
  assert os.path.basename(p3).startswith('ml-latest-small-') and p3.endswith('.ncfcache')
  assert p2 != p3


def _corrupt(path, how):
  raw = bytearray(open(path, 'rb').read())
  if how == 'truncate':
    raw = raw[: len(raw) - 7]
  elif how == 'flip':
    raw[-5] ^= 0x55
  elif how == 'version':
    raw[8:12] = struct.pack('<I', cache.FORMAT_VERSION + 7)
  with open(path, 'wb') as f:
    f.write(raw)


@pytest.mark.parametrize('how', ['truncate', 'flip', 'version'])
def test_bad_cache_is_reported_in_one_warning_and_rebuilt(tmp_path, caplog, how):
  write_ratings(tmp_path, 'ml-latest-small')
  path = data.prepare(config(tmp_path)).cache_path
  _corrupt(path, how)
  with caplog.at_level(logging.WARNING):
    prepared = data.prepare(config(tmp_path))
  assert prepared.built
  warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1 and path in warnings[0].getMessage()
  assert 'rebuilding' in warnings[0].getMessage()
  assert_expected(prepared.dataset)
  assert not data.prepare(config(tmp_path)).built  # the rebuilt file is valid


def test_changed_source_file_rebuilds_the_cache(tmp_path):
  src = write_ratings(tmp_path, 'ml-latest-small')
  data.prepare(config(tmp_path))
  write_ratings(tmp_path, 'ml-latest-small', ROWS + [(3, 1300, 30)])
  os.utime(src, ns=(0, os.stat(src).st_mtime_ns + 10**9))
  prepared = data.prepare(config(tmp_path))
  assert prepared.built and prepared.dataset.num_items == 11


def test_synthetic_cache_keeps_the_oracle_and_is_keyed_by_generator_parameters(tmp_path):
  first = data.prepare(synthetic_config(tmp_path))
  again = data.prepare(synthetic_config(tmp_path))
  assert first.built and not again.built
  for a, b in (
    (first.dataset.train_items, again.dataset.train_items),
    (first.dataset.train_users, again.dataset.train_users),
    (first.dataset.oracle.theta, again.dataset.oracle.theta),
    (first.dataset.oracle.item_topic, again.dataset.oracle.item_topic),
    (first.dataset.oracle.within_topic, again.dataset.oracle.within_topic),
  ):
    np.testing.assert_array_equal(a, b)
  other = data.prepare(synthetic_config(tmp_path, synthetic_seed=1))
  assert other.built and other.cache_path != first.cache_path


def test_synthetic_dataset_has_every_item_and_an_oracle_row_per_kept_user(tmp_path):
  ds = data.load(synthetic_config(tmp_path))
  assert (ds.num_users, ds.num_items) == (200, 300)
  assert ds.oracle.theta.shape == (200, 4) and ds.oracle.item_topic.shape == (300,)
  fewer = data.load(synthetic_config(tmp_path, min_ratings=40))
  assert fewer.num_users < 200 and fewer.oracle.theta.shape == (fewer.num_users, 4)


def test_unwritable_cache_dir_warns_and_still_returns_the_dataset(tmp_path, caplog):
  (tmp_path / 'processed').write_text('a file where the cache folder should be')
  with caplog.at_level(logging.WARNING):
    prepared = data.prepare(synthetic_config(tmp_path))
  assert prepared.cache_path is None and prepared.dataset.num_users == 200
  assert any('continuing without it' in r.getMessage() for r in caplog.records)


# --- TFDS ----------------------------------------------------------------------------------


def test_tfds_source_gives_the_same_dataset_and_is_converted_once(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  reads = []

  class Records(list):
    def __getitem__(self, k):
      reads.append(k)
      return list.__getitem__(self, k)

  records = Records(
    {
      'user_id': str(u).encode(),
      'movie_id': str(i).encode(),
      'user_rating': np.float32(4),
      'timestamp': np.int64(t),
    }
    for u, i, t in ROWS
  )
  tfds_dir = tmp_path / 'tfds'
  write_tfds_metadata(tfds_dir, 'array_record')  # built, as `open_tfds` builds it
  c = config(tmp_path, 'ml-20m', source='tfds')
  with tfds.testing.mock_data(data_dir=str(tfds_dir), as_data_source_fn=lambda *a, **k: records):
    first = data.prepare(c)
    n = len(reads)
    second = data.prepare(c)
  assert first.built and not second.built and n == len(ROWS) and len(reads) == n
  assert_expected(second.dataset)
  assert '/processed/ml-20m-' in first.cache_path


def test_tfds_not_built_without_download_names_the_command_that_builds_it(tmp_path):
  with pytest.raises(UserError) as e:
    data.prepare(config(tmp_path, 'ml-100k', source='tfds'))
  message = str(e.value)
  assert f'TFDS movielens/100k-ratings is not built in {tmp_path}/tfds' in message
  assert (
    '`python -m ncf_jax.prepare --config=configs/default.py --config.dataset.name=ml-100k '
    '--config.dataset.source=tfds --download`'
  ) in message
  assert 'source=grouplens' in message and 'tfds build' not in message
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('download', [False, True])
def test_tfds_built_as_tfrecord_says_delete_and_rebuild_as_array_record(tmp_path, download):
  where = write_tfds_metadata(tmp_path / 'tfds', 'tfrecord', name='ml-100k')
  with pytest.raises(
    UserError,
    match=(
      rf'TFDS movielens/100k-ratings in {where} is stored as tfrecord, which tfds.data_source '
      rf'cannot read \(it needs array_record\). Delete {where} and rebuild it with '
      r'`python -m ncf_jax.prepare .*--download`'
    ),
  ):
    data.prepare(config(tmp_path, 'ml-100k', source='tfds', download=download))


def test_tfds_build_without_tensorflow_says_install_it_before_downloading(tmp_path, monkeypatch):
  monkeypatch.setattr(tfds_source, 'has_tensorflow', lambda: False)
  monkeypatch.setenv(grouplens.URL_ENV, 'http://127.0.0.1:9')  # would fail if reached
  with pytest.raises(
    UserError,
    match=r'building TFDS movielens/100k-ratings needs TensorFlow '
    r'.*pip install -r requirements-tfds.txt.*source=grouplens',
  ):
    data.prepare(config(tmp_path, 'ml-100k', source='tfds', download=True))
  assert os.listdir(tmp_path) == []


def test_tfds_download_failure_names_the_url_and_what_to_do(tmp_path, monkeypatch):
  monkeypatch.setattr(tfds_source, 'has_tensorflow', lambda: True)  # fails before TF is used
  with serve_http({}) as url:  # every path is a 404
    monkeypatch.setenv(grouplens.URL_ENV, url)
    with pytest.raises(
      UserError,
      match=(
        rf'download of {url}/ml-100k.zip failed: HTTP Error 404.*Check the network.*by hand '
        rf'into {tmp_path}/ml-100k.zip'
      ),
    ):
      data.prepare(config(tmp_path, 'ml-100k', source='tfds', download=True))
  assert not (tmp_path / 'ml-100k.zip').exists()


def test_tfds_unofficial_zip_in_data_dir_fails_the_checksum_with_one_clear_error(
  tmp_path, monkeypatch
):
  monkeypatch.setattr(tfds_source, 'has_tensorflow', lambda: True)  # fails before TF is used
  (tmp_path / 'ml-100k.zip').write_bytes(ml100k_zip(ROWS))
  with pytest.raises(
    UserError,
    match=(
      rf'{tmp_path}/ml-100k.zip is not the official GroupLens ml-100k zip that TFDS '
      r'movielens/100k-ratings expects \(its SHA-256 differs\)'
    ),
  ):
    data.prepare(config(tmp_path, 'ml-100k', source='tfds', download=True))


def _snapshot(folder):
  files = {}
  for root, _, names in os.walk(folder):
    for n in names:
      p = os.path.join(root, n)
      with open(p, 'rb') as f:
        files[p] = f.read()
  return files


CSV_HEADER = 'userId,movieId,rating,timestamp\n'


@pytest.mark.parametrize(
  'name,text,match',
  [
    ('ml-latest-small', None, r'neither .*ml-latest-small/ratings.csv nor .*--download'),
    ('ml-latest-small', CSV_HEADER + '1,2,3.5,4\n1,2\n', r'ratings.csv line 3: expected 4'),
    ('ml-latest-small', '', r'ratings.csv is empty'),
    ('ml-latest-small', CSV_HEADER + '1,2,3.5,4\nu1,2,3.5,5\n', r"line 3: user id 'u1'"),
    ('ml-1m', '1,2,3,4\n', r"ratings.dat line 1: expected fields separated by '::'"),
    (
      'ml-latest-small',
      CSV_HEADER + ''.join(f'{u},{u},3,{u}\n' for u in (1, 2, 2)),
      r'user 1 has no training positive',
    ),
    ('ml-5m', None, r"unknown dataset name 'ml-5m'"),
  ],
)
def test_bad_input_fails_with_one_message_and_loses_nothing_on_disk(tmp_path, name, text, match):
  good = data.prepare(synthetic_config(tmp_path))  # an unrelated good cache in data_dir
  if text is not None:
    write_ratings(tmp_path, name, rows=())  # create the folder layout, then the content
    fmt = grouplens.FORMATS[name]
    with open(tmp_path / fmt.folder / fmt.filename, 'w') as f:
      f.write(text)
  before = _snapshot(tmp_path)
  with pytest.raises(UserError, match=match):
    data.load(config(tmp_path, name, min_ratings=1))
  after = _snapshot(tmp_path)
  assert {p: after.get(p) for p in before} == before  # nothing changed or removed
  added = set(after) - set(before)
  assert added <= {str(tmp_path / 'processed' / 'source_hashes.json')}, added
  assert not data.prepare(synthetic_config(tmp_path)).built  # still valid
  assert good.cache_path in after


# --- sources: one interface, one registry --------------------------------------------------


def test_check_config_checks_the_whole_block_without_reading_data(tmp_path):
  missing = tmp_path / 'nothing here'
  for name in data.NAMES:  # valid blocks pass although no data exists
    data.check_config(config(missing, name, source='grouplens', path=str(missing / 'r.csv')))
  assert not missing.exists()
  with pytest.raises(UserError, match=r"unknown dataset name 'ml-5m'"):
    data.check_config(config(missing, 'ml-5m'))
  with pytest.raises(UserError, match=r'fractal_rows=0 is invalid'):
    data.check_config(config(missing, 'fractal', fractal_rows=0))
  with pytest.raises(UserError, match=r'ml-20mx16x32 exists only as the GroupLens'):
    data.check_config(config(missing, 'ml-20mx16x32', source='tfds'))


def test_the_registry_picks_the_source_by_name_and_config_source():
  def chosen(name, kind):
    return type(data.select(config('/nonexistent', name, source=kind))).__name__

  assert [chosen('ml-1m', k) for k in data.SOURCES] == ['GroupLensSource', 'TfdsSource']
  assert chosen('synthetic', 'not used') == 'SyntheticSource'
  assert chosen('ml-20mx16x32', 'grouplens') == 'ShardsSource'
  fractal = data.select(config('/nonexistent', 'fractal', fractal_base='ml-1m', source='tfds'))
  assert type(fractal.base).__name__ == 'TfdsSource' and fractal.base.name == 'ml-1m'


class _EchoSource(data.Source):
  """A source added as one class: ROWS as interactions, found through the registry."""

  names = ('echo',)
  reads = 0

  def cache_params(self):
    return {'source': 'echo', 'version': 1}

  def identity(self):
    return 'echo-v1'

  def read(self, validation):
    type(self).reads += 1
    users, items, timestamps = (np.array(c) for c in zip(*ROWS))
    return data.Interactions(
      users.astype(np.int32), items.astype(np.int32), timestamps.astype(np.int64), 'echo rows'
    )


def test_a_new_source_is_one_class_in_the_registry(tmp_path, monkeypatch):
  monkeypatch.setattr(sources, 'REGISTRY', sources.REGISTRY + (_EchoSource,))
  monkeypatch.setattr(sources, 'NAMES', sources.NAMES + ('echo',))
  first = data.prepare(config(tmp_path, 'echo'))
  again = data.prepare(config(tmp_path, 'echo'))
  assert first.built and not again.built and _EchoSource.reads == 1
  assert_expected(again.dataset)
  assert again.dataset.name == 'echo' and os.path.basename(first.cache_path).startswith('echo-')
  assert data.cache_params(data.select(config(tmp_path, 'echo')), 'none') == {
    'name': 'echo',
    'min_ratings': 3,
    'preprocess_version': data.PREPROCESS_VERSION,
    'source': 'echo',
    'version': 1,
  }
