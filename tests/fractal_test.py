"""Tests of the fractal expansion (ncf_jax.data.fractal) and its source, name='fractal'.

Bases are tiny synthetic sets (a few hundred users): the sizes, bounds and determinism of
the construction, and the properties Belletti et al. (arXiv 1901.08910) claim it keeps:
the reduced matrix's singular values, the leading singular values of the expansion
(products of the reduced matrix's and the base's) and the item popularity and user
activity distributions (each item block a scaled copy of the base's).
"""

import os

import ml_collections
import numpy as np
import pytest

from configs import default
from ncf_jax import data
from ncf_jax.data import fractal, synthetic
from ncf_jax.data.sources import grouplens
from ncf_jax.errors import UserError

N, M = 300, 400  # base users, items


@pytest.fixture(scope='module')
def base():
  """A synthetic base: dense users / items, timestamps (every user has >= 20 rows)."""
  return synthetic.generate(N, M, 30.0, 4, 0)


@pytest.fixture(scope='module')
def triplets(base):
  """The base's 5 largest singular triplets (dense), computed once."""
  return fractal.top_singular_triplets(base.users, base.items, N, M, 5)


def matrix(users, items, shape):
  b = np.zeros(shape)
  b[users, items] = 1.0
  return b


def gini(x):
  x = np.sort(x.astype(np.float64))
  c = np.cumsum(x)
  return (x.size + 1 - 2 * (c / c[-1]).sum()) / x.size


def config(data_dir, **kwargs):
  c = default.get_dataset_config()
  c.name, c.data_dir = 'fractal', str(data_dir)
  c.synthetic_num_users, c.synthetic_num_items = 200, 300
  c.synthetic_mean_interactions, c.synthetic_num_topics = 30.0, 4
  c.fractal_rows, c.fractal_cols = 2, 3
  for k, v in kwargs.items():
    setattr(c, k, v)
  return c


# --- the construction ---------------------------------------------------------------------


@pytest.mark.parametrize('rows,cols', [(3, 5), (4, 2), (1, 1), (400, 2)])
def test_the_reduced_matrix_has_the_bases_largest_singular_values(triplets, rows, cols):
  u, s, vt = triplets
  reduced = fractal.reduced_matrix(u, s, vt, rows, cols)
  assert reduced.shape == (rows, cols)
  k = min(rows, cols)
  got = np.linalg.svd(reduced, compute_uv=False)
  np.testing.assert_allclose(got[:k], s[:k], rtol=1e-9)
  # (400, 2): more rows than the base has users; the resize interpolates instead.


def test_the_sparse_svd_matches_the_dense_one(base, triplets):
  dense = triplets[1][:4]
  sparse = fractal.top_singular_triplets(base.users, base.items, N, M, 4, dense_entries=0)
  np.testing.assert_allclose(sparse[1], dense, rtol=1e-6)
  b = matrix(base.users, base.items, (N, M))
  # Same singular subspace: u_j^T B v_j = s_j for the sparse path's vectors too.
  np.testing.assert_allclose(np.einsum('nk,nm,km->k', sparse[0], b, sparse[2]), dense, rtol=1e-6)


def test_sizes_and_row_count_are_within_the_constructions_bounds(base):
  e = fractal.expand(base.users, base.items, base.timestamps, N, M, 2, 3, seed=0)
  assert (e.num_users, e.num_items) == (2 * N, 3 * M)
  p = e.probabilities
  assert p.shape == (2, 3) and p.min() >= fractal.MIN_KEEP and p.max() == fractal.MAX_KEEP
  nnz = base.users.shape[0]
  mean, sd = nnz * p.sum(), np.sqrt(nnz * (p * (1 - p)).sum())
  assert abs(e.users.shape[0] - mean) < 6 * sd
  assert e.users.shape[0] <= nnz * 6 * fractal.MAX_KEEP
  assert e.users.max() < 2 * N and e.items.max() < 3 * M
  # Every expanded row is a copy of a base row, with its timestamp.
  base_key = base.users.astype(np.int64) * M + base.items
  order = np.argsort(base_key)
  pos = np.searchsorted(base_key[order], (e.users % N).astype(np.int64) * M + e.items % M)
  assert (base_key[order][pos] == (e.users % N).astype(np.int64) * M + e.items % M).all()
  np.testing.assert_array_equal(e.timestamps, base.timestamps[order][pos])
  # Block (a, b) keeps about P[a, b] of the base's rows.
  for a in range(2):
    for b in range(3):
      kept = np.count_nonzero((e.users // N == a) & (e.items // M == b))
      assert abs(kept - nnz * p[a, b]) < 6 * np.sqrt(nnz * p[a, b] * (1 - p[a, b])) + 1


def test_same_seed_same_rows_another_seed_other_rows(base):
  args = (base.users, base.items, base.timestamps, N, M, 2, 3)
  one, two, other = (
    fractal.expand(*args, seed=0),
    fractal.expand(*args, seed=0),
    fractal.expand(*args, seed=1),
  )
  for a, b in ((one.users, two.users), (one.items, two.items), (one.timestamps, two.timestamps)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(one.probabilities, other.probabilities)  # the base's only
  assert one.users.shape != other.users.shape or (one.items != other.items).any()


def test_the_leading_singular_values_are_products_of_the_reduced_and_base_ones(base):
  e = fractal.expand(base.users, base.items, base.timestamps, N, M, 2, 3, seed=0)
  x = matrix(e.users, e.items, (e.num_users, e.num_items))
  b = matrix(base.users, base.items, (N, M))
  products = np.sort(
    np.outer(
      np.linalg.svd(e.probabilities, compute_uv=False), np.linalg.svd(b, compute_uv=False)
    ).ravel()
  )[::-1]
  got = np.linalg.svd(x, compute_uv=False)
  np.testing.assert_allclose(got[0], products[0], rtol=0.01)
  np.testing.assert_allclose(got[1:4], products[1:4], rtol=0.05)


def test_item_popularity_and_user_activity_keep_their_shape(base):
  e = fractal.expand(base.users, base.items, base.timestamps, N, M, 4, 4, seed=0)
  p = e.probabilities
  pop_base = np.bincount(base.items, minlength=M)
  pop = np.bincount(e.items, minlength=e.num_items)
  for b in range(4):  # item block b: the base's popularity scaled by sum_a P[a, b]
    block = pop[b * M : (b + 1) * M]
    assert np.corrcoef(block, pop_base)[0, 1] > 0.99
    assert block.sum() / (pop_base.sum() * p[:, b].sum()) == pytest.approx(1, abs=0.03)
  assert gini(pop) == pytest.approx(gini(pop_base), abs=0.01)
  deg_base = np.bincount(base.users, minlength=N)
  deg = np.bincount(e.users, minlength=e.num_users)
  for a in range(4):
    assert np.corrcoef(deg[a * N : (a + 1) * N], deg_base)[0, 1] > 0.9
  assert gini(deg) == pytest.approx(gini(deg_base), abs=0.03)


@pytest.mark.parametrize('rows,cols', [(0, 2), (2, -1), (2.5, 2), (2, True), (2, '3')])
def test_bad_multipliers_are_refused_by_the_construction(base, rows, cols):
  with pytest.raises(ValueError, match='multiplier is .*; it must be an integer >= 1'):
    fractal.expand(base.users, base.items, base.timestamps, N, M, rows, cols, seed=0)


# --- name='fractal' in ncf_jax.data --------------------------------------------------------


def test_the_dataset_has_the_multiplied_sizes_and_a_leave_one_out_split(tmp_path):
  prepared = data.prepare(config(tmp_path))
  ds = prepared.dataset
  assert ds.name == 'fractal' and (ds.num_users, ds.num_items) == (2 * 200, 3 * 300)
  assert prepared.built and os.path.basename(prepared.cache_path).startswith('fractal-')
  # The test item is the user's latest expanded row: recompute from the construction.
  gen = synthetic.generate(200, 300, 30.0, 4, 0)
  e = fractal.expand(gen.users, gen.items, gen.timestamps, 200, 300, 2, 3, seed=0)
  assert ds.num_train + ds.num_test == e.users.shape[0]  # no row repeats a pair
  latest = np.full(e.num_users, -1, np.int64)
  np.maximum.at(latest, e.users, e.timestamps)
  test_ts = {(int(u), int(i)): int(t) for u, i, t in zip(e.users, e.items, e.timestamps)}
  assert all(test_ts[(u, int(ds.test_items[u]))] == latest[u] for u in range(ds.num_users))
  for u in (0, 250, 399):
    row = ds.train_items[ds.user_offsets[u] : ds.user_offsets[u + 1]]
    assert ds.test_items[u] not in row
  loo = data.load(config(tmp_path), validation='leave_one_out')
  assert loo.valid_items is not None and (loo.valid_items != loo.test_items).all()
  np.testing.assert_array_equal(loo.test_items, ds.test_items)


def test_the_cache_key_holds_base_parameters_multipliers_and_seed(tmp_path, monkeypatch):
  first = data.prepare(config(tmp_path))
  monkeypatch.setattr(fractal, 'expand', lambda *a, **k: pytest.fail('expanded again'))
  again = data.prepare(config(tmp_path))
  assert not again.built and again.cache_path == first.cache_path
  np.testing.assert_array_equal(again.dataset.train_items, first.dataset.train_items)
  monkeypatch.undo()
  paths = {first.cache_path}
  for change in (
    {'fractal_seed': 1},
    {'fractal_rows': 3},
    {'fractal_cols': 2},
    {'synthetic_seed': 1},
    {'min_ratings': 21},
  ):
    other = data.prepare(config(tmp_path, **change))
    assert other.built and other.cache_path not in paths, change
    paths.add(other.cache_path)
  seed1 = data.load(config(tmp_path, fractal_seed=1))
  assert (
    seed1.num_train != first.dataset.num_train
    or (seed1.train_items != first.dataset.train_items).any()
  )


def test_a_grouplens_base_is_read_raw_and_its_file_is_part_of_the_source(tmp_path, monkeypatch):
  monkeypatch.setattr(grouplens, 'KNOWN_SIZES', {})
  rng = np.random.default_rng(0)
  folder = tmp_path / 'ml-latest-small'
  folder.mkdir()
  lines = ['userId,movieId,rating,timestamp']
  for user in range(1, 41):
    for movie in rng.choice(60, 30, replace=False):
      lines.append(f'{user},{10 * movie + 1},4.0,{int(rng.integers(1, 10**6))}')
  (folder / 'ratings.csv').write_text('\n'.join(lines) + '\n')
  c = config(
    tmp_path, fractal_base='ml-latest-small', fractal_rows=2, fractal_cols=2, min_ratings=5
  )
  first = data.prepare(c)
  assert first.dataset.num_items == 2 * 60 and first.dataset.num_users <= 2 * 40
  with open(folder / 'ratings.csv', 'a') as f:
    f.write('41,11,4.0,5\n')
  assert data.prepare(c).built  # the base file changed: rebuilt


@pytest.mark.parametrize(
  'field,value,match',
  [
    ('fractal_rows', 0, r'fractal_rows=0 is invalid: it must be an integer >= 1'),
    ('fractal_rows', -2, r'fractal_rows=-2 is invalid'),
    ('fractal_cols', 1.5, r'fractal_cols=1.5 is invalid: it must be an integer >= 1'),
    ('fractal_cols', True, r'fractal_cols=True is invalid'),
    ('fractal_seed', -1, r'fractal_seed=-1 is invalid: it must be an integer >= 0'),
    (
      'fractal_base',
      'fractal',
      r"fractal_base='fractal' is invalid \(an expansion cannot "
      r'start from another expansion\); use one of synthetic, '
      r'ml-100k',
    ),
    (
      'fractal_base',
      'ml-20mx16x32',
      r"fractal_base='ml-20mx16x32' is invalid \(.*no "
      r'timestamps\)',
    ),
    ('fractal_base', 'ml-2m', r"fractal_base='ml-2m' is invalid \(it is no dataset name\)"),
  ],
)
def test_bad_fractal_fields_are_one_clear_error(tmp_path, field, value, match):
  # A ConfigDict refuses 1.5 for an int field (so does --config.dataset.fractal_cols=1.5,
  # as one flag error); a block built from a dict can still hold it.
  fields = config(tmp_path).to_dict()
  fields[field] = value
  c = ml_collections.ConfigDict(fields)
  with pytest.raises(UserError, match=match):
    data.load(c)
  assert not os.path.exists(data.cache_dir(str(tmp_path)))
