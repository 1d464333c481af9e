"""Seeded MovieLens-like implicit-feedback data with a planted, exactly known preference model.

The model (GENERATOR_VERSION 1):
  * K topics. Items are split evenly over topics at random; inside its topic an item has a
    Zipf-like popularity: the topic's items in a random order get the masses of a
    discretised power law, within_topic[rank] = F(rank + 1) - F(rank) with
    F(x) = ((x + 1)^(1 - s) - 1) / ((S + 1)^(1 - s) - 1), s = ZIPF_EXPONENT, S = topic size.
    Sampling a rank is the exact inverse, floor(F^-1(uniform)).
  * Each user has topic weights theta_u = (1 - TOPIC_FLOOR) * Dirichlet(DIRICHLET_ALPHA)
    + TOPIC_FLOOR / K: concentrated on a few topics, every topic reachable.
  * Activity is heavy tailed: target n_u = 20 + (mean - 20) * LogNormal (mean 1,
    sigma ACTIVITY_SIGMA), capped at num_items // 2, so every user has >= 20 interactions.
  * A user draws items i.i.d. from P(i | u) = theta[u, topic(i)] * within_topic[i] (a topic
    from theta_u, then an item by inverse CDF); the interactions are the distinct items
    drawn. Users that fall short of n_u draw their deficit again, for up to MAX_ROUNDS
    rounds (then keep what they have, and always at least 20). Ranking by
    log P(i | u) (`SyntheticOracle.score`) is the best a model can do.
  * Label noise (`noise` > 0): each draw is instead, with that probability, an item
    uniform over the catalogue (drawn after the planted one, so noise 0 gives the same
    bytes as before the option existed). The oracle stays the planted model, which still
    ranks best: the mixture is a monotone function of it.
  * Timestamps: each user starts at a random time in 1998-2013 and rates in sessions a week
    apart (1 + n_u // 10 sessions), each interaction at a random second in the first minute
    of its session, so ties at a user's latest timestamp occur (7.6 % of users at ml-20m
    size, seed 0).

Everything comes from numpy Generator(PCG64(seed)) in a fixed order, vectorized and
processed in chunks of users (fixed by the targets, not by memory), so the same parameters
always give the same bytes.
"""

import dataclasses
import os

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from ncf_jax.errors import UserError

GENERATOR_VERSION = 1
DIRICHLET_ALPHA = 0.2
TOPIC_FLOOR = 0.05
ZIPF_EXPONENT = 1.1
ACTIVITY_SIGMA = 1.2
MIN_INTERACTIONS = 20
MAX_ROUNDS = 16
_CHUNK_DRAWS = 1 << 21  # target interactions per chunk of users
_T0, _SPAN = 883_612_800, 473_385_600  # 1998-01-01 .. 2013-01-01
_SESSION_GAP, _SESSION_LEN = 7 * 86_400, 60


@dataclasses.dataclass(frozen=True)
class SyntheticOracle:
  """The planted preference model of a synthetic dataset.

  P(item | user) = theta[user, topic[item]] * within_topic[item]; the oracle score of a
  (user, item) pair is its log, so ranking by it is the best any model can do.
  """

  theta: np.ndarray  # float32 [num_users, num_topics], rows sum to 1
  item_topic: np.ndarray  # int32 [num_items]
  within_topic: np.ndarray  # float32 [num_items], sums to 1 within each topic

  def score(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Log-probability of each (user, item) pair under the planted model."""
    p = self.theta[users, self.item_topic[items]] * self.within_topic[items]
    return np.log(np.maximum(p, 1e-30)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class SyntheticData:
  """Generated interactions (dense ids, sorted by (user, item)) and the planted model."""

  num_users: int
  num_items: int
  users: np.ndarray  # int32 [n]
  items: np.ndarray  # int32 [n]
  timestamps: np.ndarray  # int64 [n]
  oracle: SyntheticOracle  # over all num_users x num_items

  def __len__(self) -> int:
    return int(self.users.shape[0])


def check_params(
  num_users: int, num_items: int, mean_interactions: float, num_topics: int, noise: float = 0.0
) -> None:
  """Raises UserError on generator parameters that cannot give MovieLens-like data."""
  where = 'config.dataset.synthetic_'
  if not 0 <= noise < 1:
    raise UserError(
      f'{where}noise is {noise}; it must be in [0, 1) (the share of '
      'interactions drawn uniformly instead of from the planted model).'
    )
  if num_users < 1:
    raise UserError(f'{where}num_users is {num_users}; it must be >= 1.')
  if num_topics < 1:
    raise UserError(f'{where}num_topics is {num_topics}; it must be >= 1.')
  if num_items < max(2 * MIN_INTERACTIONS, 2 * num_topics):
    raise UserError(
      f'{where}num_items is {num_items}; it must be >= '
      f'{max(2 * MIN_INTERACTIONS, 2 * num_topics)} (every user has >= '
      f'{MIN_INTERACTIONS} distinct items and a topic >= 2 items).'
    )
  if not MIN_INTERACTIONS < mean_interactions <= num_items / 2:
    raise UserError(
      f'{where}mean_interactions is {mean_interactions}; it must be above '
      f'{MIN_INTERACTIONS} (every user has >= {MIN_INTERACTIONS}) and at most '
      f'num_items / 2 = {num_items / 2}.'
    )


def _power_cdf(x, size):
  a = 1.0 - ZIPF_EXPONENT
  return ((x + 1.0) ** a - 1.0) / ((size + 1.0) ** a - 1.0)


def generate(
  num_users: int,
  num_items: int,
  mean_interactions: float,
  num_topics: int,
  seed: int,
  noise: float = 0.0,
) -> SyntheticData:
  """Generates the interactions and the oracle (see the module docstring).

  Args:
    num_users: users (all kept: each has >= 20 interactions).
    num_items: items (an item may end up with no interaction).
    mean_interactions: target mean interactions per user (the realised mean is a little
      lower for heavy users with concentrated tastes; see MAX_ROUNDS).
    num_topics: rank K of the planted preference structure.
    seed: data seed.
    noise: probability that a draw is uniform over all items (label noise).

  Returns:
    SyntheticData with rows sorted by (user, item).
  """
  check_params(num_users, num_items, mean_interactions, num_topics, noise)
  rng = np.random.Generator(np.random.PCG64(seed))
  k = num_topics

  item_topic, by_topic, topic_size, topic_start, within = _items(rng, num_items, k)
  theta, target, start = _users(rng, num_users, num_items, k, mean_interactions)

  bounds = (
    np.searchsorted(np.cumsum(target), np.arange(_CHUNK_DRAWS, target.sum(), _CHUNK_DRAWS), 'left')
    + 1
  )
  bounds = np.unique(np.concatenate([[0], bounds, [num_users]]))
  total = int(target.sum())
  users = np.empty(total, np.int32)
  items = np.empty(total, np.int32)
  timestamps = np.empty(total, np.int64)
  pos = 0
  for lo, hi in zip(bounds[:-1], bounds[1:]):
    keys = _draw_chunk(
      rng, theta[lo:hi], target[lo:hi], topic_size, topic_start, by_topic, num_items, noise
    )
    u = (keys // num_items).astype(np.int32)
    n = keys.size
    users[pos : pos + n] = u + lo
    items[pos : pos + n] = keys - u.astype(np.int64) * num_items
    have = np.bincount(u, minlength=hi - lo)
    sessions = 1 + have // 10
    session = (rng.random(n) * np.repeat(sessions, have)).astype(np.int64)
    timestamps[pos : pos + n] = (
      np.repeat(start[lo:hi], have) + session * _SESSION_GAP + rng.integers(0, _SESSION_LEN, n)
    )
    pos += n
  oracle = SyntheticOracle(
    theta=theta.astype(np.float32), item_topic=item_topic, within_topic=within.astype(np.float32)
  )
  return SyntheticData(num_users, num_items, users[:pos], items[:pos], timestamps[:pos], oracle)


def _items(rng, num_items: int, k: int):
  """Items: balanced random topics, random within-topic popularity rank (draws from `rng`
  in a fixed order: the data set is a function of the seed)."""
  item_topic = (rng.permutation(num_items) % k).astype(np.int32)
  by_topic = np.lexsort((rng.permutation(num_items), item_topic)).astype(np.int32)
  topic_size = np.bincount(item_topic, minlength=k)
  topic_start = np.concatenate([[0], np.cumsum(topic_size)[:-1]])
  rank = np.empty(num_items, np.int64)
  rank[by_topic] = np.arange(num_items) - np.repeat(topic_start, topic_size)
  size_of_item = topic_size[item_topic].astype(np.float64)
  within = _power_cdf(rank + 1.0, size_of_item) - _power_cdf(rank, size_of_item)
  return item_topic, by_topic, topic_size, topic_start, within


def _users(rng, num_users: int, num_items: int, k: int, mean_interactions: float):
  """Users: topic weights, heavy-tailed interaction targets, and first timestamps."""
  theta = rng.dirichlet(np.full(k, DIRICHLET_ALPHA), size=num_users)
  theta = (1.0 - TOPIC_FLOOR) * theta + TOPIC_FLOOR / k
  theta /= theta.sum(axis=1, keepdims=True)
  extra = (mean_interactions - MIN_INTERACTIONS) * rng.lognormal(
    -(ACTIVITY_SIGMA**2) / 2, ACTIVITY_SIGMA, num_users
  )
  target = np.minimum(MIN_INTERACTIONS + np.rint(extra).astype(np.int64), num_items // 2)
  start = _T0 + rng.integers(0, _SPAN, num_users)
  return theta, target, start


def _draw(rng, theta, counts, topic_size, topic_start, by_topic, num_items, noise):
  """counts[u] i.i.d. draws for each row u of theta -> sorted unique keys u * I + item."""
  per_topic = rng.multinomial(counts, theta)
  k = theta.shape[1]
  topic = np.repeat(np.tile(np.arange(k), theta.shape[0]), per_topic.ravel())
  user = np.repeat(np.arange(theta.shape[0], dtype=np.int64), counts)
  size = topic_size[topic].astype(np.float64)
  a = 1.0 - ZIPF_EXPONENT
  x = (rng.random(topic.size) * ((size + 1.0) ** a - 1.0) + 1.0) ** (1.0 / a) - 1.0
  r = np.minimum(x.astype(np.int64), topic_size[topic] - 1)
  item = by_topic[topic_start[topic] + r]
  if noise > 0:  # only then: noise 0 consumes the generator exactly as before
    flip = rng.random(item.size) < noise
    item[flip] = rng.integers(0, num_items, int(flip.sum()))
  keys = user * num_items + item
  keys.sort()
  return _unique_sorted(keys)


def _unique_sorted(keys):
  keep = np.empty(keys.size, bool)
  keep[:1] = True
  np.not_equal(keys[1:], keys[:-1], out=keep[1:])
  return keys[keep]


def _draw_chunk(rng, theta, target, topic_size, topic_start, by_topic, num_items, noise):
  """Distinct items of a chunk of users, as sorted keys local_user * num_items + item."""
  m = theta.shape[0]
  keys = _draw(rng, theta, target, topic_size, topic_start, by_topic, num_items, noise)
  for round_ in range(1, 64):
    have = np.bincount(keys // num_items, minlength=m)
    want = (target if round_ < MAX_ROUNDS else MIN_INTERACTIONS) - have
    need = np.flatnonzero(want > 0)
    if need.size == 0:
      break
    # Drawing exactly the deficit never overshoots the target.
    new = _draw(rng, theta[need], want[need], topic_size, topic_start, by_topic, num_items, noise)
    local = new // num_items
    new = need[local] * num_items + (new - local * num_items)
    fresh = keys[np.minimum(np.searchsorted(keys, new), keys.size - 1)] != new
    keys = np.concatenate([keys, new[fresh]])
    keys.sort(kind='stable')  # two sorted runs: a linear merge
  else:
    raise RuntimeError('synthetic generator could not give every user 20 distinct items')
  return keys


HALF_STARS = ('0.5', '1.0', '1.5', '2.0', '2.5', '3.0', '3.5', '4.0', '4.5', '5.0')


def raw_movie_ids(num_items: int, seed: int) -> np.ndarray:
  """Sparse ascending raw movie ids (like MovieLens's) for dense items 0..num_items-1."""
  rng = np.random.Generator(np.random.PCG64([seed, 1]))
  ids = rng.choice(4 * num_items, num_items, replace=False)
  ids.sort()
  return (ids + 1).astype(np.int32)


def write_grouplens_csv(data: SyntheticData, path: str, seed: int) -> None:
  """Writes `data` as a GroupLens ratings.csv (ml-20m layout), fast (pyarrow).

  Header `userId,movieId,rating,timestamp`; 1-based user ids, sparse ascending movie ids
  (`raw_movie_ids`), half-star ratings drawn from the seed, rows sorted by user then movie
  like ml-20m. Written to a temp file and renamed into place.
  """
  rng = np.random.Generator(np.random.PCG64([seed, 2]))
  movie = raw_movie_ids(data.num_items, seed)
  stars = pa.array(HALF_STARS).take(pa.array(rng.integers(0, 10, len(data), dtype=np.int8)))
  table = pa.table(
    {
      'userId': data.users + 1,
      'movieId': movie[data.items],
      'rating': stars,
      'timestamp': data.timestamps,
    }
  )
  tmp = f'{path}.{os.getpid()}.tmp'
  try:
    with open(tmp, 'wb') as f:
      f.write(b'userId,movieId,rating,timestamp\n')
      pacsv.write_csv(table, f, pacsv.WriteOptions(include_header=False, quoting_style='none'))
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
