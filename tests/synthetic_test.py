"""Tests of the seeded synthetic MovieLens-like generator (ncf_jax.data.synthetic)."""

import numpy as np
import pyarrow.csv as pacsv
import pytest

from configs import default
from ncf_jax import data
from ncf_jax.data import synthetic
from ncf_jax.data.sources import grouplens
from ncf_jax.errors import UserError

SMALL = dict(num_users=300, num_items=400, mean_interactions=40.0, num_topics=8)


@pytest.fixture(scope='module')
def gen():
  return synthetic.generate(seed=0, **SMALL)


def _all_bytes(g):
  return b''.join(
    a.tobytes()
    for a in (
      g.users,
      g.items,
      g.timestamps,
      g.oracle.theta,
      g.oracle.item_topic,
      g.oracle.within_topic,
    )
  )


def test_same_seed_gives_identical_bytes(gen):
  assert _all_bytes(synthetic.generate(seed=0, **SMALL)) == _all_bytes(gen)


def test_different_seed_gives_different_data(gen):
  other = synthetic.generate(seed=1, **SMALL)
  assert _all_bytes(other) != _all_bytes(gen)


def test_every_user_has_at_least_20_distinct_items_sorted_by_user_then_item(gen):
  degrees = np.bincount(gen.users, minlength=gen.num_users)
  assert degrees.min() >= 20
  keys = gen.users.astype(np.int64) * gen.num_items + gen.items
  assert np.all(np.diff(keys) > 0)  # sorted and de-duplicated
  assert gen.users.dtype == np.int32 and gen.items.dtype == np.int32
  assert gen.timestamps.dtype == np.int64


def test_user_activity_is_heavy_tailed(gen):
  degrees = np.bincount(gen.users, minlength=gen.num_users)
  assert degrees.mean() > np.median(degrees)
  assert degrees.max() >= 3 * np.median(degrees)
  assert 0.8 * SMALL['mean_interactions'] < degrees.mean() < 1.2 * SMALL['mean_interactions']


def test_item_popularity_is_skewed(gen):
  pop = np.sort(np.bincount(gen.items, minlength=gen.num_items))[::-1]
  assert pop[: gen.num_items // 10].sum() > 0.2 * pop.sum()  # uniform would give 0.1


def test_some_users_have_ties_at_their_latest_timestamp(gen):
  latest = np.zeros(gen.num_users, np.int64)
  np.maximum.at(latest, gen.users, gen.timestamps)
  at_latest = np.bincount(gen.users[gen.timestamps == latest[gen.users]], minlength=gen.num_users)
  assert 0.02 < np.mean(at_latest >= 2) < 0.9
  assert gen.timestamps.min() > 800_000_000  # plausible Unix seconds


def test_oracle_shapes_and_normalisation(gen):
  o = gen.oracle
  assert o.theta.shape == (SMALL['num_users'], SMALL['num_topics'])
  assert o.item_topic.shape == o.within_topic.shape == (SMALL['num_items'],)
  assert o.theta.dtype == o.within_topic.dtype == np.float32 and o.item_topic.dtype == np.int32
  np.testing.assert_allclose(o.theta.sum(axis=1), 1.0, rtol=1e-5)
  per_topic = np.bincount(o.item_topic, weights=o.within_topic, minlength=SMALL['num_topics'])
  np.testing.assert_allclose(per_topic, 1.0, rtol=1e-5)
  assert o.score(gen.users[:5], gen.items[:5]).shape == (5,)


def test_planted_structure_makes_the_oracle_rank_held_out_items_well(tmp_path):
  config = data_config(tmp_path)
  ds = data.load(config)
  rng = np.random.default_rng(0)
  users = np.arange(ds.num_users)
  candidates = rng.integers(0, ds.num_items, (ds.num_users, 100))
  pos = ds.oracle.score(users, ds.test_items)
  neg = ds.oracle.score(np.repeat(users, 100), candidates.ravel()).reshape(-1, 100)
  hit_rate = np.mean((neg > pos[:, None]).sum(axis=1) < 10)
  assert hit_rate > 0.5  # random ranking: 10 / 101


def data_config(data_dir):
  from configs import default  # pylint: disable=g-import-not-at-top

  config = default.get_dataset_config()
  config.synthetic_num_users, config.synthetic_num_items = 500, 600
  config.synthetic_mean_interactions, config.synthetic_num_topics = 40.0, 8
  config.data_dir = str(data_dir)
  return config


def test_many_chunks_keep_all_properties(monkeypatch):
  monkeypatch.setattr(synthetic, '_CHUNK_DRAWS', 500)
  g = synthetic.generate(seed=3, **SMALL)
  degrees = np.bincount(g.users, minlength=g.num_users)
  assert degrees.min() >= 20
  assert np.all(np.diff(g.users.astype(np.int64) * g.num_items + g.items) > 0)


@pytest.mark.parametrize(
  'kwargs,match',
  [
    (dict(num_users=0), 'num_users'),
    (dict(num_items=30), 'num_items'),
    (dict(mean_interactions=15.0), 'mean_interactions'),
    (dict(mean_interactions=300.0), 'mean_interactions'),
    (dict(num_topics=0), 'num_topics'),
    (dict(noise=1.0), 'noise'),
    (dict(noise=-0.1), 'noise'),
  ],
)
def test_impossible_parameters_are_user_errors(kwargs, match):
  with pytest.raises(UserError, match=f'config.dataset.synthetic_{match}'):
    synthetic.generate(seed=0, **{**SMALL, **kwargs})


def test_grouplens_csv_has_the_ml20m_layout_and_parses_back(gen, tmp_path):
  path = tmp_path / 'ml-25m' / 'ratings.csv'
  path.parent.mkdir()
  synthetic.write_grouplens_csv(gen, str(path), seed=0)
  lines = path.read_text().splitlines()
  assert lines[0] == 'userId,movieId,rating,timestamp'
  table = pacsv.read_csv(str(path))
  assert table.num_rows == len(gen)
  ratings = table.column('rating').to_numpy()
  assert set(np.unique(ratings * 2)) <= set(range(1, 11))
  movie = synthetic.raw_movie_ids(gen.num_items, 0)
  assert np.all(np.diff(movie) > 0) and movie[-1] > gen.num_items  # sparse, ascending
  raw = grouplens.read_ratings(grouplens.locate('ml-25m', str(tmp_path)))
  np.testing.assert_array_equal(raw.users, gen.users + 1)
  np.testing.assert_array_equal(raw.items, movie[gen.items])
  np.testing.assert_array_equal(raw.timestamps, gen.timestamps)


def test_dataset_from_the_csv_equals_the_dataset_built_directly(gen, tmp_path):
  path = tmp_path / 'ml-25m' / 'ratings.csv'
  path.parent.mkdir()
  synthetic.write_grouplens_csv(gen, str(path), seed=0)
  cfg = default.get_dataset_config()
  cfg.name, cfg.source, cfg.data_dir, cfg.min_ratings = 'ml-25m', 'grouplens', str(tmp_path), 20
  from_csv = data.build(data.select(cfg))  # read and preprocess, no cache
  direct, _ = data.preprocess(
    gen.users,
    gen.items,
    gen.timestamps,
    name='x',
    min_ratings=20,
    where='w',
    num_items=gen.num_items,
  )
  used = np.flatnonzero(np.bincount(gen.items, minlength=gen.num_items))
  relabel = np.full(gen.num_items, -1)
  relabel[used] = np.arange(used.size)  # the csv only knows items with ratings
  np.testing.assert_array_equal(from_csv.user_offsets, direct.user_offsets)
  np.testing.assert_array_equal(from_csv.train_items, relabel[direct.train_items])
  np.testing.assert_array_equal(from_csv.test_items, relabel[direct.test_items])


def test_no_noise_gives_the_bytes_of_the_generator_without_the_option(gen):
  assert _all_bytes(synthetic.generate(seed=0, noise=0.0, **SMALL)) == _all_bytes(gen)


def test_label_noise_replaces_planted_draws_by_uniform_items(gen, tmp_path):
  noisy = synthetic.generate(seed=0, noise=0.5, **SMALL)
  assert np.bincount(noisy.users).min() >= 20
  # Half the draws ignore the planted model: their oracle log-probability is that of a
  # uniform item, far below the planted draws'.
  planted = float(gen.oracle.score(gen.users, gen.items).mean())
  mixed = float(noisy.oracle.score(noisy.users, noisy.items).mean())
  uniform = float(
    gen.oracle.score(
      gen.users, np.random.default_rng(0).integers(0, gen.num_items, gen.users.size)
    ).mean()
  )
  assert uniform < mixed < planted
  assert mixed == pytest.approx((planted + uniform) / 2, abs=0.35 * (planted - uniform))
  # The noise level is part of the cache key; 0 keeps the key of caches made before it.
  config = data_config(tmp_path)
  plain = data.prepare(config).cache_path
  config.synthetic_noise = 0.0
  assert data.prepare(config).cache_path == plain
  config.synthetic_noise = 0.3
  assert data.prepare(config).cache_path != plain
