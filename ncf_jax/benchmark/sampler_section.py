"""Benchmark section `sampler`: negative sampling, epoch batches and eval candidates.

Training negatives/s as the train loop makes them (an epoch's slots in slot order,
`pipeline.epoch_items`, positives' copies included) against the rate of merely drawing as
many random integers (`sampler_vs_random_ratio`, target >= 0.6) and a vectorised NumPy
bisection in the same order (`sampler_vs_numpy_ratio`, target >= 3); the same two ratios
in the visiting order (users at random, `train_batch`'s path); a whole epoch's batches
(built, then read) and all users' eval candidates against the same number of raw draws
(targets <= 2x); the hash's cost on batch generation; the device form's size over the
int32 dataset (target <= 2); and a breakdown at 2**20 lanes (randint, our draw, one random
read, the permutation, the sampler in either order) in ms.
"""

from collections.abc import Callable
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ncf_jax import data, hashing, pipeline, sampling, steps
from ncf_jax.benchmark import common, peers, timing

NUM_NEG = 4
CHUNK = 1 << 22  # lanes per call in the visiting order, and of the NumPy peer
RANDOM_ORDER_CALLS = 4  # calls of CHUNK lanes timed in the visiting order
EPOCH_BATCH = 1 << 20  # global batch of the whole-epoch measurement
EVAL_USERS = 4096  # users per eval-candidates call
BREAKDOWN_LANES = 1 << 20


@dataclasses.dataclass(frozen=True)
class _Setup:
  """What every measurement of the section shares."""

  ds: data.Dataset
  dev: sampling.DeviceData
  key: jax.Array  # the data key of every measurement
  build: Callable  # the train loop's epoch builder, (dev, key, epoch) -> items

  @property
  def n_slots(self) -> int:
    return pipeline.epoch_size(self.ds.num_train, NUM_NEG)

  @property
  def num_negatives(self) -> int:
    return NUM_NEG * self.ds.num_train

  def randint(self, i, shape):
    """Raw draws: `shape` random items under the i-th fold of the key (the yardstick)."""
    return jax.random.randint(jax.random.fold_in(self.key, i), shape, 0, self.ds.num_items)


def _setup(args: common.Args) -> _Setup:
  """The scaled dataset on one device, the key, and the train loop's epoch builder."""
  ds = common.scaled_dataset(args)
  dev = sampling.to_device(ds)
  config = ml_collections.ConfigDict({'num_neg': NUM_NEG})
  build = steps.make_epoch_items(config, steps.make_mesh(1), dev)
  return _Setup(ds=ds, dev=dev, key=jax.random.key(0, impl='threefry2x32'), build=build)


def _slot_order(s: _Setup) -> tuple[float, float]:
  """(sampler s, raw draws s) for an epoch's negatives, as the train loop makes them.

  The sampler is the epoch builder (every slot, the positives' copies included, in slot
  order, EPOCH_CHUNK slots a call); the raw draws are as many integers as the epoch has
  negatives, in calls of the same size. Best of 3 each, alternating: the machine is shared.
  """
  epoch_chunk = min(pipeline.EPOCH_CHUNK, s.n_slots)
  chunk_draws = jax.jit(lambda i: s.randint(i, (epoch_chunk,)))
  calls = -(-s.num_negatives // epoch_chunk)
  neg_sec = draw_sec = float('inf')
  for _ in range(3):
    neg_sec = min(neg_sec, timing.timed(s.build, s.dev, s.key, np.int32(0)))
    draw_sec = min(draw_sec, timing.timed(lambda: [chunk_draws(i) for i in range(calls)]))
  return neg_sec, draw_sec


def _visiting_users(s: _Setup) -> jax.Array:
  """CHUNK users in the visiting order: the users of positives drawn at random."""
  positives = jax.random.randint(jax.random.key(1), (CHUNK,), 0, s.ds.num_train)
  return jax.jit(lambda d, k: d.train_users[k])(s.dev, positives)


def _visiting_order(s: _Setup, users: jax.Array) -> tuple[float, float]:
  """(sampler s, raw draws s) for RANDOM_ORDER_CALLS calls of CHUNK `users`."""
  kp = sampling.keypair(s.key)

  @jax.jit
  def negatives(d, u, i):
    counters = jnp.uint32(i) * jnp.uint32(CHUNK) + jnp.arange(CHUNK, dtype=jnp.uint32)
    return sampling.sample_negatives(d, kp, u, counters)

  draws = jax.jit(lambda i: s.randint(i, (CHUNK,)))
  calls = range(RANDOM_ORDER_CALLS)
  rand_sec = timing.timed(lambda: [negatives(s.dev, users, i) for i in calls], repeats=3)
  draw_sec = timing.timed(lambda: [draws(i) for i in calls], repeats=3)
  return rand_sec, draw_sec


def _numpy_peer(s: _Setup, users: jax.Array) -> tuple[float, float]:
  """Seconds per negative of the NumPy bisection: (visiting order, slot order)."""
  host_users = np.asarray(users)
  slot_users = s.ds.train_users[np.minimum(np.arange(CHUNK) // (1 + NUM_NEG), s.ds.num_train - 1)]
  draw = peers.numpy_bisection_negatives(s.ds)
  visiting = timing.timed(lambda: [draw(host_users) for _ in range(2)]) / (2 * CHUNK)
  slot = timing.timed(lambda: [draw(slot_users) for _ in range(2)]) / (2 * CHUNK)
  return visiting, slot


def _epoch_batches(s: _Setup) -> dict[str, float]:
  """Seconds for a whole epoch's batches without the model, and for as many raw draws.

  As the train loop makes them (the epoch's items in slot order, then every batch reads
  them), the same with the hash chained over the batches, and the pure per-position path.
  """
  steps = pipeline.steps_per_epoch(s.ds.num_train, NUM_NEG, EPOCH_BATCH)

  def read(d, items, step):
    return pipeline.batch_from_items(
      d, items, s.key, 0, step, batch_size=EPOCH_BATCH, num_neg=NUM_NEG
    )

  read_batch = jax.jit(read)

  @jax.jit
  def read_batch_hashed(d, items, step, chain):
    positions = jnp.arange(EPOCH_BATCH, dtype=jnp.uint32)
    return hashing.chain(chain, hashing.batch_digest(read(d, items, step), positions))

  position_batch = jax.jit(
    lambda d, step: pipeline.train_batch(d, s.key, 0, step, batch_size=EPOCH_BATCH, num_neg=NUM_NEG)
  )
  draws = jax.jit(lambda i: s.randint(i, (EPOCH_BATCH,)))

  def run_epoch():
    items = s.build(s.dev, s.key, np.int32(0))
    return [read_batch(s.dev, items, np.int32(step)) for step in range(steps)]

  def run_epoch_hashed():
    items = s.build(s.dev, s.key, np.int32(0))
    chain = hashing.init()
    for step in range(steps):
      chain = read_batch_hashed(s.dev, items, np.int32(step), chain)
    return chain

  return {
    'built': timing.timed(run_epoch, repeats=2),
    'hashed': timing.timed(run_epoch_hashed, repeats=2),
    'per_position': timing.timed(
      lambda: [position_batch(s.dev, np.int32(step)) for step in range(steps)]
    ),
    'draws': timing.timed(lambda: [draws(i) for i in range(steps)], repeats=2),
  }


def _eval_candidates(s: _Setup) -> tuple[int, float, float]:
  """(negatives per user, candidates s, raw draws s) for all users, EVAL_USERS a call.

  999 negatives each, fewer if a small --scale leaves fewer items.
  """
  ds = s.ds
  eval_neg = int(min(999, ds.num_items - ds.user_degrees().max() - 1))
  calls = range(-(-ds.num_users // EVAL_USERS))

  @jax.jit
  def candidates(d, first):
    u = jnp.minimum(first + jnp.arange(EVAL_USERS, dtype=jnp.int32), ds.num_users - 1)
    return pipeline.eval_batch(d, s.key, u, num_neg=eval_neg)[0]

  draws = jax.jit(lambda i: s.randint(i, (EVAL_USERS, eval_neg)))
  sec = timing.timed(lambda: [candidates(s.dev, np.int32(i * EVAL_USERS)) for i in calls])
  draw_sec = timing.timed(lambda: [draws(i) for i in calls])
  return eval_neg, sec, draw_sec


def _breakdown(s: _Setup, users: jax.Array) -> dict[str, float]:
  """Where a negative's time goes: ms per BREAKDOWN_LANES lanes of primitives and parts."""
  lanes, kp, n_slots = BREAKDOWN_LANES, sampling.keypair(s.key), s.n_slots
  visiting = users[:lanes]
  slots = s.dev.train_users[(jnp.arange(lanes) + (n_slots // 2)) // (1 + NUM_NEG)]
  read_idx = jax.random.randint(jax.random.key(2), (lanes,), 0, s.ds.num_train)
  # Every part takes its inputs as arguments, so XLA cannot fold it into a constant.
  parts = {
    'randint': lambda d, i: s.randint(i[0], (lanes,)),
    'draw': lambda d, i: sampling.uniform_below(
      sampling.random_words(kp, i, 0)[0], jnp.uint32(s.ds.num_items)
    ),
    'random_read': lambda d, i: d.positive_items(read_idx + i.astype(jnp.int32) * 0),
    'permute': lambda d, i: sampling.permute(i, n_slots, sampling.round_keys(kp)),
    'sampler_random_order': lambda d, i: sampling.sample_negatives(d, kp, visiting, i),
    'sampler_slot_order': lambda d, i: sampling.sample_negatives(d, kp, slots, i),
  }
  lane_ids = jnp.arange(lanes, dtype=jnp.uint32)
  return {
    f'breakdown_{name}_ms_per_2e20': 1e3 * timing.timed(jax.jit(fn), s.dev, lane_ids, repeats=3)
    for name, fn in parts.items()
  }


def run(args: common.Args) -> dict[str, Any]:
  """Negatives/s vs raw random draws and a NumPy bisection; epoch and eval generation."""
  s = _setup(args)
  ds = s.ds
  neg_sec, draw_sec = _slot_order(s)
  users = _visiting_users(s)
  rand_sec, rand_draw_sec = _visiting_order(s, users)
  np_sec, np_slot_sec = _numpy_peer(s, users)
  epoch = _epoch_batches(s)
  eval_neg, eval_sec, eval_draw_sec = _eval_candidates(s)
  breakdown = _breakdown(s, users)
  device_bytes = sum(x.nbytes for x in jax.tree.leaves(s.dev))
  int32_bytes = 4 * (2 * ds.num_train + 2 * ds.num_users + 1)
  rand_rate = RANDOM_ORDER_CALLS * CHUNK / rand_sec
  return {
    **timing.backend(),
    'sampler_num_users': ds.num_users,
    'sampler_num_items': ds.num_items,
    'sampler_num_train': ds.num_train,
    'epoch_items_build_sec': neg_sec,
    'sampler_negatives_per_sec': s.num_negatives / neg_sec,
    'random_draws_per_sec': s.num_negatives / draw_sec,
    'sampler_vs_random_ratio': draw_sec / neg_sec,
    'numpy_bisection_negatives_per_sec': 1.0 / np_slot_sec,
    'sampler_vs_numpy_ratio': (s.num_negatives / neg_sec) * np_slot_sec,
    'sampler_random_order_negatives_per_sec': rand_rate,
    'sampler_random_order_vs_random_ratio': rand_draw_sec / rand_sec,
    'numpy_bisection_random_order_negatives_per_sec': 1.0 / np_sec,
    'sampler_random_order_vs_numpy_ratio': rand_rate * np_sec,
    'epoch_samples': s.n_slots,
    'epoch_batches_sec': epoch['built'],
    'epoch_random_draws_sec': epoch['draws'],
    'epoch_vs_random_ratio': epoch['built'] / epoch['draws'],
    'epoch_batches_per_position_sec': epoch['per_position'],
    'epoch_batches_hashed_sec': epoch['hashed'],
    'hash_overhead_fraction_of_batches': epoch['hashed'] / epoch['built'] - 1.0,
    'eval_num_neg': eval_neg,
    'eval_candidates_sec': eval_sec,
    'eval_random_draws_sec': eval_draw_sec,
    'eval_candidates_vs_random_ratio': eval_sec / eval_draw_sec,
    **breakdown,
    'device_data_bytes': device_bytes,
    'device_data_vs_int32_ratio': device_bytes / int32_bytes,
  }
