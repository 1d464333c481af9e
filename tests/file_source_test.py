"""The `file` source: your own interactions file (CSV/TSV/Parquet), and the NCF paper's splits."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from configs import default
from ncf_jax import data
from ncf_jax.data.sources import grouplens
from ncf_jax.errors import UserError

# A MovieLens-style ratings table: 6 users, 12 items, times with ties, a repeated pair.
RNG = np.random.default_rng(7)
ROWS = [
  (u, int(i), float(RNG.integers(1, 6)), int(t))
  for u in (1, 3, 4, 8, 9, 12)
  for i, t in zip(RNG.choice(np.arange(1, 40, 3), 6, replace=False), RNG.integers(100, 110, 6))
]


def ml_config(data_dir, **kw):
  c = default.get_dataset_config()
  c.name, c.data_dir, c.min_ratings = 'ml-latest-small', str(data_dir), 3
  for k, v in kw.items():
    setattr(c, k, v)
  return c


def file_config(data_dir, path, **kw):
  return ml_config(data_dir, name='file', path=str(path), **kw)


def write(path, text):
  with open(path, 'w') as f:
    f.write(text)
  return str(path)


@pytest.fixture(scope='module')
def original(tmp_path_factory):
  """The GroupLens reader's datasets (no validation, validation) of ROWS as ratings.csv."""
  d = tmp_path_factory.mktemp('ml')
  os.makedirs(d / 'ml-latest-small')
  write(
    d / 'ml-latest-small' / 'ratings.csv',
    'userId,movieId,rating,timestamp\n' + ''.join(f'{u},{i},{r},{t}\n' for u, i, r, t in ROWS),
  )
  grouplens_sizes, grouplens.KNOWN_SIZES = grouplens.KNOWN_SIZES, {}
  try:
    return {v: data.prepare(ml_config(d), validation=v).dataset for v in data.VALIDATIONS}
  finally:
    grouplens.KNOWN_SIZES = grouplens_sizes


def sizes(ds):
  valid = None if ds.valid_items is None else ds.valid_items.shape[0]
  return ds.num_users, ds.num_items, ds.num_train, ds.num_test, valid


def same_arrays(a, b):
  for f in ('train_users', 'train_items', 'user_offsets', 'test_items', 'valid_items'):
    x, y = getattr(a, f), getattr(b, f)
    assert (x is None) == (y is None), f
    if x is not None:
      np.testing.assert_array_equal(x, y, err_msg=f)


def test_integer_ids_give_the_grouplens_dataset_exactly(original, tmp_path):
  path = write(tmp_path / 'r.tsv', ''.join(f'{u}\t{i}\t{r}\t{t}\n' for u, i, r, t in ROWS))
  for v in data.VALIDATIONS:
    same_arrays(data.prepare(file_config(tmp_path, path), validation=v).dataset, original[v])


def test_renamed_string_columns_and_parquet_give_the_same_sizes(original, tmp_path):
  text = 'when;who;stars;what\n' + ''.join(f'{t};u{u};{r};m{i}\n' for u, i, r, t in ROWS)
  csv = write(tmp_path / 'r.csv', text)
  cfg = file_config(tmp_path, csv, user_col='who', item_col='what', time_col='when')
  table = pa.table(
    {
      'user_id': [f'u{u}' for u, *_ in ROWS],
      'item_id': [i for _, i, _, _ in ROWS],
      'ts': [t for *_, t in ROWS],
    }
  )
  pq.write_table(table, tmp_path / 'r.parquet')
  pcfg = file_config(tmp_path, tmp_path / 'r.parquet')
  for v in data.VALIDATIONS:
    prepared = data.prepare(cfg, validation=v)
    assert sizes(prepared.dataset) == sizes(original[v])
    assert sizes(data.prepare(pcfg, validation=v).dataset) == sizes(original[v])
  with open(prepared.cache_path + '.users.json') as f:
    users = json.load(f)
  assert users == sorted(f'u{u}' for u in {u for u, *_ in ROWS})  # code-point order
  with open(prepared.cache_path + '.items.json') as f:
    assert len(json.load(f)) == original['none'].num_items


def test_repeats_count_once_and_the_threshold_keeps_high_ratings(tmp_path):
  rows = 'user,item,rating\n' + ''.join(f'a,{i},{1 + i % 5}\n' for i in range(10)) * 2
  rows += ''.join(f'b,{i},5\n' for i in range(3))
  path = write(tmp_path / 'r.csv', rows)
  ds = data.prepare(file_config(tmp_path, path)).dataset
  assert (ds.num_users, ds.num_items, ds.num_train) == (2, 10, 9 + 2)
  ds = data.prepare(file_config(tmp_path, path, implicit_threshold=4.0)).dataset
  assert (ds.num_users, ds.num_items, ds.num_train) == (
    2,
    7,
    3 + 2,
  )  # a: items 3, 4, 8, 9; b: 0, 1, 2


def test_without_timestamps_the_held_out_item_is_keyed_not_the_file_order(tmp_path):
  pairs = [(u, i) for u in range(5) for i in range(8)]
  forward = write(tmp_path / 'a.csv', ''.join(f'{u} {i}\n' for u, i in pairs))
  backward = write(tmp_path / 'b.csv', ''.join(f'{u} {i}\n' for u, i in pairs[::-1]))
  a = data.prepare(file_config(tmp_path, forward)).dataset
  b = data.prepare(file_config(tmp_path, backward)).dataset
  np.testing.assert_array_equal(a.test_items, b.test_items)
  assert len(set(a.test_items.tolist())) > 1
  last = data.prepare(file_config(tmp_path, forward, holdout='last_row')).dataset
  np.testing.assert_array_equal(last.test_items, [7] * 5)


@pytest.mark.parametrize(
  'text, kw, message',
  [
    ('', {}, r'r.txt is empty'),
    ('user,item\n', {}, r'r.txt has no interactions \(only a header\)'),
    ('a,b,c\n1,2,3\n', {'user_col': 'who'}, r"r.txt line 1: no column 'who'"),
    ('who,what,ts\nx,y,3\n', {}, r'r.txt line 1: no user column.*user_col'),
    ('1,2\n3,4\n', {'item_col': '5'}, r'r.txt line 1 column 6: config.dataset.item_col=5'),
    ('user,item\n1,2\n3,x\nu1,3\n', {}, r'r.txt line 4 column 1: user id .u1. is not an integer'),
    (
      'user,item,ts\n1,2,3\n1,3,noon\n',
      {},
      r"r.txt line 3 column 3: timestamp 'noon' is not a number",
    ),
    (
      'user,item,rating\n1,2,5\n1,3,x\n',
      {'implicit_threshold': 3.0},
      r"line 3 column 3: rating 'x'",
    ),
    ('user,item\n1,2\n1,3\n2,3\n', {}, r'no user has at least min_ratings=3'),
    ('user,item\n1,2\n\n1,3,4\n', {}, r'r.txt line 4: expected 2 fields separated by .,.'),
  ],
)
def test_bad_input_is_one_line_naming_the_file_and_line(tmp_path, text, kw, message):
  path = write(tmp_path / 'r.txt', text)
  with pytest.raises(UserError, match=message) as e:
    data.prepare(file_config(tmp_path, path, **kw))
  assert '\n' not in str(e.value)
  assert not os.path.exists(data.cache_dir(str(tmp_path))) or not any(
    n.endswith('.ncfcache') for n in os.listdir(data.cache_dir(str(tmp_path)))
  )


@pytest.mark.parametrize(
  'kw, message',
  [
    ({'path': ''}, r'config.dataset.path is empty'),
    ({'format': 'xls'}, r"config.dataset.format='xls' is invalid"),
    ({'holdout': 'first'}, r"config.dataset.holdout='first' is invalid"),
  ],
)
def test_bad_settings_are_refused_before_reading(tmp_path, kw, message):
  cfg = file_config(tmp_path, tmp_path / 'missing.csv')
  for k, v in kw.items():
    setattr(cfg, k, v)
  with pytest.raises(UserError, match=message):
    data.check_config(cfg)


def test_a_missing_file_is_named(tmp_path):
  with pytest.raises(UserError, match=r'missing.csv not found'):
    data.prepare(file_config(tmp_path, tmp_path / 'missing.csv'))


# ------------------------------------------------------------------------------------------
# The NCF paper's released splits.

PAPER_USERS, PAPER_ITEMS, PAPER_K = 8, 40, 5


def write_paper(folder):
  """Tiny `<folder>/toy.{train.rating,test.rating,test.negative}`; returns (prefix, negatives)."""
  rng = np.random.default_rng(3)
  train, test, negs = [], [], []
  for u in range(PAPER_USERS):
    items = rng.choice(PAPER_ITEMS, 12, replace=False)
    times = rng.integers(1000, 1010, 11)
    train += [f'{u}\t{i}\t5\t{t}' for i, t in zip(items[:-1], times)]
    test.append(f'{u}\t{items[-1]}\t4\t900')  # older than training: still the test row
    others = np.setdiff1d(np.arange(PAPER_ITEMS), items)
    negs.append(rng.choice(others, PAPER_K, replace=False))
  prefix = str(folder / 'toy')
  write(prefix + '.train.rating', '\n'.join(train) + '\n')
  write(prefix + '.test.rating', '\n'.join(test) + '\n')
  write(
    prefix + '.test.negative',
    ''.join(
      f'({u},{t.split()[1]})\t' + '\t'.join(map(str, n)) + '\n'
      for u, (t, n) in enumerate(zip(test, negs))
    ),
  )
  return prefix, np.asarray(negs), np.asarray([int(t.split()[1]) for t in test])


def paper_config(data_dir, prefix, **kw):
  return file_config(data_dir, prefix, format='ncf_paper', **kw)


@pytest.fixture(scope='module')
def paper(tmp_path_factory):
  d = tmp_path_factory.mktemp('paper')
  prefix, negs, tests = write_paper(d)
  return d, prefix, negs, tests


def test_paper_candidates_are_the_files_and_an_oracle_gets_its_exact_hr(paper):
  import jax

  from ncf_jax import baselines, pipeline

  d, prefix, negs, tests = paper
  ds = data.prepare(paper_config(d, prefix)).dataset
  assert (ds.num_users, ds.num_items, ds.num_train) == (PAPER_USERS, PAPER_ITEMS, 88)
  np.testing.assert_array_equal(ds.test_items, tests)
  key = jax.random.key(0, impl='threefry2x32')
  users, items = pipeline.eval_candidates(ds, key, num_neg=PAPER_K)
  np.testing.assert_array_equal(items[:, 0], tests)
  np.testing.assert_array_equal(items[:, 1:], negs)
  chosen = np.array([0, 2, 3, 7])  # the oracle ranks the test item first for these users
  good = np.isin(np.arange(PAPER_USERS), chosen)

  def scorer(u, i):
    return np.where(i == tests[u], good[u].astype(float), 0.5)

  for mlperf in (False, True):
    hr = baselines.evaluate_scorer(ds, key, scorer, num_neg=PAPER_K, top_k=1, match_mlperf=mlperf)
    assert hr['hr'] == len(chosen) / PAPER_USERS
  with pytest.raises(UserError, match=r'config.eval_num_neg=4 but the dataset fixes 5 test'):
    pipeline.eval_candidates(ds, key, num_neg=4)


def test_paper_validation_comes_from_the_training_file_and_the_cache_keeps_negatives(paper):
  d, prefix, negs, tests = paper
  first = data.prepare(paper_config(d, prefix), validation='leave_one_out')
  again = data.prepare(paper_config(d, prefix), validation='leave_one_out')
  assert first.built and not again.built
  ds = again.dataset
  np.testing.assert_array_equal(ds.test_negatives, negs)
  np.testing.assert_array_equal(ds.test_items, tests)
  assert ds.num_train == 88 - PAPER_USERS and (ds.valid_items != tests).all()


def test_paper_files_must_match(paper, tmp_path):
  _, prefix, _, _ = paper
  for suffix in ('.train.rating', '.test.rating'):
    with open(prefix + suffix) as f:
      write(str(tmp_path / 'toy') + suffix, f.read())
  write(str(tmp_path / 'toy.test.negative'), '(0,1)\t3\t4\n(5,6)\t7\t8\n')
  with pytest.raises(UserError, match=r'toy.test.negative line 1: its \(user,item\) does not'):
    data.prepare(paper_config(tmp_path, tmp_path / 'toy'))


# ------------------------------------------------------------------------------------------
# Training on them: one tiny epoch each, in one module fixture.


def _train_files(folder):
  """{kind: (dataset overrides)} of small files without timestamps, with string ids, with a
  threshold, and in the paper's layout."""
  rng = np.random.default_rng(11)
  rows = [(u, int(i)) for u in range(60) for i in rng.choice(50, 15, replace=False)]
  plain = write(folder / 'plain.txt', ''.join(f'{u} {i}\n' for u, i in rows))
  strings = write(folder / 'strings.csv', 'uid,iid\n' + ''.join(f'u{u},m{i}\n' for u, i in rows))
  low = [(u, int(i)) for u in range(60) for i in rng.choice(50, 3, replace=False)]
  rated = write(  # the rows rated 4, other pairs rated 1 or 2 (dropped by threshold 3)
    folder / 'rated.tsv',
    'user\titem\trating\n'
    + ''.join(f'{u}\t{i}\t{1 + k % 2}\n' for k, (u, i) in enumerate(low) if (u, i) not in rows)
    + ''.join(f'{u}\t{i}\t4\n' for u, i in rows),
  )
  prefix = str(folder / 'paper')
  train = [r for k, r in enumerate(rows) if k % 15]
  test = [r for k, r in enumerate(rows) if k % 15 == 0]
  write(prefix + '.train.rating', ''.join(f'{u}\t{i}\t5\t{k}\n' for k, (u, i) in enumerate(train)))
  write(prefix + '.test.rating', ''.join(f'{u}\t{i}\t5\t0\n' for u, i in test))
  seen = {}
  for u, i in rows:
    seen.setdefault(u, set()).add(i)
  write(
    prefix + '.test.negative',
    ''.join(
      f'({u},{i})\t' + '\t'.join(str(n) for n in sorted(set(range(50)) - seen[u])[:10]) + '\n'
      for u, i in test
    ),
  )
  return {
    'no_timestamps': {'path': plain},
    'string_ids': {'path': strings},
    'threshold': {'path': rated, 'implicit_threshold': 3.0},
    'ncf_paper': {'path': prefix, 'format': 'ncf_paper'},
  }


@pytest.fixture(scope='module')
def train_one(tmp_path_factory):
  """Trains one tiny epoch on a kind of file (each kind once per module); its summary."""
  from _train_helpers import tiny_config

  from ncf_jax import config_checks, train

  folder = tmp_path_factory.mktemp('train')
  files, done = _train_files(folder), {}

  def run(kind):
    if kind not in done:
      config = tiny_config(
        str(folder / 'data'),
        num_epochs=1,
        num_devices=1,
        batch_size=256,
        eval_num_neg=10,
        dataset__name='file',
        dataset__min_ratings=3,
        **{f'dataset__{k}': v for k, v in files[kind].items()},
      )
      train.train_and_evaluate(config_checks.resolve_model_defaults(config), str(folder / kind))
      with open(folder / kind / 'summary.json') as f:
        done[kind] = json.load(f)
    return done[kind]

  return run


def test_the_paper_layout_trains_and_evaluates_on_its_negatives(train_one):
  summary = train_one('ncf_paper')
  assert 0 < summary['test_hr'] <= 1 and summary['epochs_done'] == 1, summary


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['no_timestamps', 'string_ids', 'threshold'])
def test_each_kind_of_file_trains_and_evaluates(train_one, kind):
  summary = train_one(kind)
  assert 0 < summary['test_hr'] <= 1 and summary['epochs_done'] == 1, summary


@pytest.mark.parametrize('kind', ['no_timestamps', 'string_ids', 'threshold'])
def test_each_kind_of_file_evaluates_a_popularity_scorer(tmp_path, kind):
  import jax

  from ncf_jax import baselines

  fields = _train_files(tmp_path)[kind]
  ds = data.prepare(file_config(tmp_path / 'data', fields.pop('path'), **fields)).dataset
  assert (ds.num_users, ds.num_items, ds.num_train) == (60, 50, 60 * 14)
  key = jax.random.key(0, impl='threefry2x32')
  hr = baselines.evaluate_scorer(ds, key, baselines.popularity_scorer(ds), num_neg=10, top_k=10)[
    'hr'
  ]
  assert 0 < hr <= 1


def test_the_id_maps_list_the_kept_users_and_items_only(tmp_path):
  text = 'user,item\n' + ''.join(f'{u},{i}\n' for u in 'abc' for i in 'wxyz')
  path = write(tmp_path / 'r.csv', text + 'd,q\nd,w\n')  # d has too few: q goes with it
  prepared = data.prepare(file_config(tmp_path, path))
  maps = [json.load(open(f'{prepared.cache_path}.{w}.json')) for w in ('users', 'items')]
  assert maps == [['a', 'b', 'c'], ['w', 'x', 'y', 'z']]


def test_more_bad_inputs_are_one_line(tmp_path, paper):
  csv = write(tmp_path / 'r.csv', 'user,item\n1,2\n')
  cases = [
    (file_config(tmp_path, csv, format='parquet'), r'r.csv is not a readable Parquet file'),
    (
      file_config(tmp_path, csv, implicit_threshold=3.0),
      r'implicit_threshold=3.0 needs a rating column',
    ),
  ]
  _, prefix, _, _ = paper
  bad = str(tmp_path / 'toy')
  for suffix in ('.test.rating', '.test.negative'):
    with open(prefix + suffix) as f:
      write(bad + suffix, f.read())
  write(bad + '.train.rating', '0\t1\t5\t9\n0\tx\t5\t9\n')
  cases.append((paper_config(tmp_path, bad), r'toy.train.rating line 2: expected user, item'))
  for cfg, message in cases:
    with pytest.raises(UserError, match=message) as e:
      data.prepare(cfg)
    assert '\n' not in str(e.value)
  cfg = file_config(tmp_path, csv, implicit_threshold=float('nan'))
  with pytest.raises(UserError, match=r'implicit_threshold=nan is invalid'):
    data.check_config(cfg)


def test_a_devices_part_of_the_data_keeps_its_users_negatives(paper):
  import jax

  from ncf_jax import data_shards, pipeline, sampling

  d, prefix, negs, tests = paper
  ds = data.prepare(paper_config(d, prefix)).dataset
  lo, hi = 3, 7
  part = sampling.to_device(data_shards.local_dataset(ds, lo, hi))
  key = jax.random.key(0, impl='threefry2x32')
  users = jax.numpy.arange(lo, hi, dtype=jax.numpy.int32)
  items, mask = pipeline.eval_batch(part, key, users, num_neg=PAPER_K, user_base=lo)
  np.testing.assert_array_equal(items, np.c_[tests[lo:hi], negs[lo:hi]])
  assert np.asarray(mask).all()


@pytest.mark.slow
def test_sharded_evaluation_on_fixed_negatives_equals_the_replicated_one(paper):
  import _train_helpers as h

  from ncf_jax import config_checks, models, parallel, steps

  d, prefix, _, _ = paper
  ds = data.prepare(paper_config(d, prefix)).dataset
  results = {}
  for mode, ndev in (('replicated', 2), ('sharded', 8)):
    config = config_checks.resolve_model_defaults(
      h.tiny_config('', sharding=mode, eval_batch_size=ndev * 16, eval_num_neg=PAPER_K, top_k=3)
    )
    config.model.first_layer = 'concat'
    mesh = steps.make_mesh(ndev)
    model = models.create_model(config.model, ds.num_users, ds.num_items, 'float32')
    init_key, data_key, _ = steps.make_keys(0, mesh)
    layout = parallel.make_layout(config, mesh)
    state = steps.create_train_state(config, model, init_key, layout)
    step = steps.make_eval_step(config, layout, model, ds.num_users, ds.num_items)
    results[mode] = steps.evaluate(
      step, state.params, layout.device_data(ds), data_key, ds.num_users, ndev * 16
    )
  assert results['sharded'][1] == results['replicated'][1]
  assert results['sharded'][0] == pytest.approx(results['replicated'][0], abs=1e-6)


@pytest.mark.parametrize(
  'kind',
  [
    'string_ids',  # no timestamps either: the seeded hold-out, relabelled string ids
    pytest.param('no_timestamps', marks=pytest.mark.slow),
    pytest.param('threshold', marks=pytest.mark.slow),
    pytest.param('ncf_paper', marks=pytest.mark.slow),
  ],
)
def test_each_kind_of_file_trains_validates_and_evaluates_from_the_command_line(tmp_path, kind):
  import sys

  import _train_helpers as h

  fields = _train_files(tmp_path)[kind]
  flags = [f'--config.dataset.{k}={v}' for k, v in fields.items()] + [
    '--config.dataset.name=file',
    f'--config.dataset.data_dir={tmp_path / "data"}',
    '--config.dataset.min_ratings=3',
    '--config.validation=leave_one_out',
    '--config.eval_num_neg=10',
    '--config.batch_size=256',
    '--config.num_epochs=2',
    '--config.num_devices=1',
  ]
  workdir = str(tmp_path / 'run')
  cmd = [
    sys.executable,
    '-m',
    'ncf_jax.train',
    '--config=configs/default.py',
    f'--workdir={workdir}',
  ]
  out = h.run(cmd + flags, devices=1)
  assert out.returncode == 0, out.stderr[-3000:]
  summary = h.summary(workdir)
  assert summary['best_epoch'] in (0, 1) and 0 < summary['valid_hr'] <= 1, summary
  assert 0 < summary['test_hr'] <= 1
  args = [f'--workdir={workdir}', '--best', '--split=valid']
  out = h.run([sys.executable, '-m', 'ncf_jax.evaluate'] + args, devices=1)
  assert out.returncode == 0, out.stderr[-3000:]
  assert json.loads(out.stdout.splitlines()[-1])['hr'] == summary['valid_hr']
