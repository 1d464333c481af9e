"""The negative sampler's claims: exact, uniform, without replacement where asked, keyed."""

from conftest import make_dataset, random_dataset, with_validation
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ncf_jax import sampling

KEY = sampling.keypair(jax.random.key(0, impl='threefry2x32'))


def _positives(ds, u):
  return set(ds.train_items[ds.user_offsets[u] : ds.user_offsets[u + 1]].tolist())


@pytest.fixture(scope='module')
def varied():
  # Degrees from 1 to 250 of 300 items: empty, partly and fully occupied chunks and groups,
  # users whose positives all lie below m and users with many at or above it.
  return random_dataset(num_users=120, num_items=300, seed=1, max_degree=250)


def _check_bijection(ds):
  """f_u maps [0, m) onto the non-positives, fixes non-positives below m, and inverts."""
  data = sampling.to_device(ds)
  n = ds.num_items
  users = np.repeat(np.arange(ds.num_users, dtype=np.int32), n)
  r = np.tile(np.arange(n, dtype=np.int32), ds.num_users)
  m = np.repeat(n - ds.user_degrees(), n)
  # One call for all users (one compilation); lanes with r >= m are clamped, then ignored.
  got = np.asarray(
    sampling.nonpositive_at(data, jnp.asarray(users), jnp.asarray(np.minimum(r, m - 1)))
  )
  back = np.asarray(sampling.nonpositive_index(data, jnp.asarray(users), jnp.asarray(r)))
  for u in range(ds.num_users):
    pos = ds.train_items[ds.user_offsets[u] : ds.user_offsets[u + 1]]
    nonpos = np.setdiff1d(np.arange(n), pos)
    row = got[u * n : u * n + nonpos.size]
    np.testing.assert_array_equal(np.sort(row), nonpos)
    fixed = ~np.isin(np.arange(nonpos.size), pos)
    np.testing.assert_array_equal(row[fixed], np.arange(nonpos.size)[fixed])
    np.testing.assert_array_equal(row[back[u * n + nonpos]], nonpos)


def test_nonpositive_at_is_a_bijection_onto_the_nonpositives(varied):
  _check_bijection(varied)


def test_rank_positives_matches_numpy_for_every_item(varied):
  data = sampling.to_device(varied)
  x = np.arange(varied.num_items + 1, dtype=np.int32)
  fn = jax.jit(lambda u: sampling.rank_positives(data, jnp.full(x.shape, u), jnp.asarray(x)))
  for u in range(varied.num_users):
    pos = varied.train_items[varied.user_offsets[u] : varied.user_offsets[u + 1]]
    rank, is_pos = map(np.asarray, fn(u))
    np.testing.assert_array_equal(rank, np.searchsorted(pos, x))
    np.testing.assert_array_equal(is_pos, np.isin(x, pos))


def test_wide_device_form_when_item_ids_do_not_fit_16_bits():
  # 70,000 items: ids and counts no longer pack into 16 bits; same bijection.
  items = {
    0: list(range(0, 70000, 7)),
    1: [5, 69998],
    2: list(range(65530, 65560)),
    4: [0, 1, 2, 69999],
  }
  ds = make_dataset(items, [3, 6, 0, 9, 69990], num_items=70000)
  data = sampling.to_device(ds)
  assert data.train_items.dtype == jnp.int32 and data.word_before is not None
  _check_bijection(ds)


def test_training_negatives_are_never_positives_and_reach_every_nonpositive(tiny_dataset):
  data = sampling.to_device(tiny_dataset)
  n = 20000
  for u in range(tiny_dataset.num_users):
    users = jnp.full((n,), u, jnp.int32)
    negs = np.asarray(sampling.sample_negatives(data, KEY, users, jnp.arange(n)))
    nonpos = set(range(tiny_dataset.num_items)) - _positives(tiny_dataset, u)
    assert set(negs.tolist()) == nonpos  # never a positive; every non-positive drawn


def test_training_negatives_are_uniform_chi_square():
  # 50 items, 10 positives: 40 equally likely negatives.
  ds = make_dataset({0: [0, 3, 7, 8, 9, 20, 31, 32, 33, 49]}, [5], num_items=50)
  data = sampling.to_device(ds)
  n = 80000
  negs = np.asarray(sampling.sample_negatives(data, KEY, jnp.zeros((n,), jnp.int32), jnp.arange(n)))
  counts = np.bincount(negs, minlength=50)
  nonpos = np.array(sorted(set(range(50)) - _positives(ds, 0)))
  assert counts[list(_positives(ds, 0))].sum() == 0
  expected = n / len(nonpos)
  chi2 = float(((counts[nonpos] - expected) ** 2 / expected).sum())
  # 39 degrees of freedom: P(chi2 > 72.05) = 0.001 for a uniform sampler.
  assert chi2 < 72.05, chi2
  # The same statistic flags a sampler that is 3% off on a single item.
  skewed = counts[nonpos].astype(float)
  skewed[0] *= 1.10
  skewed[1] -= counts[nonpos][0] * 0.10
  assert float(((skewed - expected) ** 2 / expected).sum()) > chi2


def test_a_draw_depends_only_on_its_counter_not_on_batch_shape(varied):
  data = sampling.to_device(varied)
  users = jnp.asarray(np.arange(96, dtype=np.int32) % varied.num_users)
  counters = jnp.arange(1000, 1096)
  whole = np.asarray(sampling.sample_negatives(data, KEY, users, counters))
  parts = [
    np.asarray(sampling.sample_negatives(data, KEY, users[i : i + 32], counters[i : i + 32]))
    for i in range(0, 96, 32)
  ]
  np.testing.assert_array_equal(whole, np.concatenate(parts))
  grid = np.asarray(
    sampling.sample_negatives(data, KEY, users.reshape(8, 12), counters.reshape(8, 12))
  )
  np.testing.assert_array_equal(whole, grid.ravel())


def test_distinct_negatives_exclude_positives_and_test_item_without_repeats(varied):
  data = sampling.to_device(varied)
  degrees = varied.user_degrees()
  users = np.flatnonzero(varied.num_items - degrees - 1 >= 40).astype(np.int32)
  negs = np.asarray(sampling.sample_distinct_negatives(data, KEY, jnp.asarray(users), 40))
  for u, row in zip(users, negs):
    assert len(set(row.tolist())) == 40
    assert not set(row.tolist()) & _positives(varied, u)
    assert varied.test_items[u] not in row


def test_distinct_negatives_skip_every_held_out_item_and_can_take_all_the_rest(varied):
  ds = with_validation(varied, seed=4)
  data = sampling.to_device(ds)
  draw = jax.jit(sampling.sample_distinct_negatives, static_argnums=3)
  users = np.arange(ds.num_users, dtype=np.int32)
  held = (jnp.asarray(ds.test_items), jnp.asarray(ds.valid_items))
  for order in (held, held[::-1]):  # the held-out items may come in any order
    negs = np.asarray(draw(data, KEY, jnp.asarray(users), 8, order))
    for u, row in zip(users, negs):
      row = set(row.tolist())
      assert len(row) == 8 and not row & _positives(ds, u)
      assert ds.test_items[u] not in row and ds.valid_items[u] not in row
  # The busiest user has exactly n candidates: it gets all of them.
  u = int(np.argmax(ds.user_degrees()))
  n = ds.num_items - int(ds.user_degrees()[u]) - 2
  row = np.asarray(draw(data, KEY, jnp.asarray([u]), n, (held[0][u : u + 1], held[1][u : u + 1])))
  want = (
    set(range(ds.num_items)) - _positives(ds, u) - {int(ds.test_items[u]), int(ds.valid_items[u])}
  )
  assert sorted(row[0].tolist()) == sorted(want)


def test_distinct_negatives_can_take_every_candidate(tiny_dataset):
  data = sampling.to_device(tiny_dataset)
  # user 1: 8 positives + test item of 12 items -> exactly 3 candidates.
  row = np.asarray(sampling.sample_distinct_negatives(data, KEY, jnp.asarray([1]), 3))[0]
  assert sorted(row.tolist()) == [0, 1, 2]


@pytest.mark.parametrize('n', [1, 2, 3, 5, 16, 17, 99, 1000, 4097, 65537])
def test_permute_is_a_bijection(n):
  rk = sampling.round_keys(KEY, 7)
  y = np.asarray(sampling.permute(jnp.arange(n, dtype=jnp.uint32), n, rk))
  np.testing.assert_array_equal(np.sort(y), np.arange(n))


def test_permute_depends_on_key():
  n = 1000
  a = np.asarray(sampling.permute(jnp.arange(n), n, sampling.round_keys(KEY, 1)))
  b = np.asarray(sampling.permute(jnp.arange(n), n, sampling.round_keys(KEY, 2)))
  assert (a != b).mean() > 0.9


def test_mulhi_u32_is_exact():
  rng = np.random.default_rng(0)
  a = rng.integers(0, 2**32, 10000, dtype=np.uint64)
  b = rng.integers(0, 2**32, 10000, dtype=np.uint64)
  a[:3], b[:3] = [2**32 - 1, 0, 2**32 - 1], [2**32 - 1, 5, 1]
  got = np.asarray(
    sampling.mulhi_u32(jnp.asarray(a.astype(np.uint32)), jnp.asarray(b.astype(np.uint32)))
  )
  want = [(int(x) * int(y)) >> 32 for x, y in zip(a, b)]
  np.testing.assert_array_equal(got.astype(np.uint64), np.asarray(want, np.uint64))


def test_device_form_is_at_most_twice_the_int32_dataset(varied):
  arrays = sampling.host_arrays(varied)
  int32_size = 4 * (2 * varied.num_train + varied.num_users + 1 + varied.num_users)
  assert sum(a.nbytes for a in arrays.values()) <= 2 * int32_size
