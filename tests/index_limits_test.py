"""Indices past 32 bits: Wide (hi, lo) arithmetic against Python ints on both sides of
each limit, the wide paths against today's 32-bit ones on small data, and the refusals
of sizes past the limits (fake sizes, no big arrays). See docs/scale.md.
"""

import math
import types

from conftest import make_dataset, random_dataset
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from configs import mlperf
from ncf_jax import config_checks, pipeline, sampling, steps
from ncf_jax.errors import UserError

KEY = jax.random.key(0, impl='threefry2x32')
M32 = (1 << 32) - 1
NARROW = sampling.NARROW_SLOTS
ML20MX16X32_TRAIN = 1_223_962_043  # MLPerf's ml-20mx16x32 training positives
ML20MX16X32_SLOTS = ML20MX16X32_TRAIN * 5  # 4 negatives each: 6,119,810,215 slots
EDGES = [0, 1, (1 << 31) - 1, 1 << 31, NARROW - 1, NARROW, M32 - 1, M32]


def _u32(values):
  return jnp.asarray(np.asarray(values, np.uint64).astype(np.uint32))


def _wide(values):
  v = np.asarray(values, np.uint64)
  return sampling.Wide(_u32(v >> np.uint64(32)), _u32(v & np.uint64(M32)))


def _ints(w):
  return [int(h) << 32 | int(l) for h, l in zip(np.asarray(w.hi).ravel(), np.asarray(w.lo).ravel())]


# ---- Python-int ground truth of the keyed permutation --------------------------------


def _mix32(x):
  x ^= x >> 16
  x = x * 0x85EBCA6B & M32
  x ^= x >> 13
  x = x * 0xC2B2AE35 & M32
  return x ^ (x >> 16)


def _reference_permute(x, n, keys):
  """sampling.permute's Feistel network and cycle walking, in unbounded Python ints."""
  a = math.isqrt(n - 1) + 1  # ceil(sqrt(n))
  b = -(-n // a)

  def feistel(v):
    left, right = divmod(v, b)
    for i, rk in enumerate(keys):
      m = (a, b)[i % 2]
      left, right = right, (left + ((_mix32(right ^ rk) * m) >> 32)) % m
    return left * b + right

  y = feistel(x)
  while y >= n:
    y = feistel(y)
  return y


def _order_keys(epoch=0):
  order_kp, _ = pipeline.epoch_keys(KEY, epoch)
  return sampling.round_keys(order_kp)


# ---- arithmetic ----------------------------------------------------------------------


def test_wide_add_mul_less_match_python_ints_across_2_32():
  xs = EDGES + [12345, 0xDEADBEEF]
  for c in [1, 5, 1 << 20, M32, 1 << 32, ML20MX16X32_SLOTS, (1 << 40) + 3]:
    assert _ints(sampling.wide_mul(_u32(xs), c)) == [x * c % (1 << 64) for x in xs]
  big = [x + (k << 32) for k, x in enumerate(xs)]
  assert _ints(sampling.wide_add(_wide(big), _u32(xs))) == [a + b for a, b in zip(big, xs)]
  for n in [M32, 1 << 32, (1 << 32) + 1, ML20MX16X32_SLOTS]:
    values = [n - 2, n - 1, n, n + 1, 1 << 32, M32]
    got = np.asarray(sampling.wide_less(_wide(values), n)).tolist()
    assert got == [v < n for v in values]


def test_radices_equal_the_float32_ones_up_to_the_narrow_limit():
  ns = [1, 2, 3, 15, 16, 17, 1 << 20, 65535**2 - 1, NARROW - 1, NARROW]
  a, b = sampling._radices(_u32(ns))
  assert list(zip(np.asarray(a).tolist(), np.asarray(b).tolist())) == [
    sampling.radices(n) for n in ns
  ]


def test_divmod_is_exact_on_both_sides_of_2_32_minus_2_17():
  # The Feistel split of [0, a * b) for domains at the narrow limit: the 32-bit _divmod
  # and the Wide one agree with Python there; past it only the Wide form can hold x.
  for n in [NARROW - 1, NARROW]:
    a, b = sampling.radices(n)
    xs = [0, b - 1, b, (1 << 31) - 1, 1 << 31, n - 2, n - 1, a * b - 1]
    want = [divmod(x, b) for x in xs]
    q, r = sampling._divmod(_u32(xs), jnp.uint32(b))
    assert list(zip(np.asarray(q).tolist(), np.asarray(r).tolist())) == want
    q, r = sampling._divmod_wide(_wide(xs), b)
    assert list(zip(np.asarray(q).tolist(), np.asarray(r).tolist())) == want
  for n in [NARROW + 1, 1 << 32, (1 << 32) + 1, ML20MX16X32_SLOTS, sampling.MAX_WIDE_SLOTS]:
    a, b = sampling.radices(n)
    xs = [0, b - 1, M32, 1 << 32, (1 << 32) + b, n - 1, a * b - 1]
    q, r = sampling._divmod_wide(_wide(xs), b)
    assert list(zip(np.asarray(q).tolist(), np.asarray(r).tolist())) == [
      divmod(x, b) for x in xs
    ], n


def test_slot_decoding_past_2_32_matches_python_divmod():
  for d in [2, 5, 1000, 1 << 16]:
    n = ML20MX16X32_TRAIN * d
    slots = [
      s for s in [0, d - 1, d, M32 - 1, M32, 1 << 32, (1 << 32) + 1, n // 2, n - 2, n - 1] if s < n
    ]
    q, r = sampling.wide_divmod_const(_wide(slots), d)
    assert list(zip(np.asarray(q).tolist(), np.asarray(r).tolist())) == [
      divmod(s, d) for s in slots
    ], d
    k, is_pos = pipeline._slot_parts(_wide(slots), d - 1)
    assert np.asarray(k).tolist() == [s // d for s in slots]
    assert np.asarray(is_pos).tolist() == [s % d == 0 for s in slots]
  below = [0, 4, 5, 12345, NARROW - 1, M32]  # the uint32 decoding agrees below 2**32
  for part_narrow, part_wide in zip(
    pipeline._slot_parts(_u32(below), 4), pipeline._slot_parts(_wide(below), 4)
  ):
    np.testing.assert_array_equal(part_narrow, part_wide)


def test_batch_positions_cross_2_32_exactly():
  batch = 1 << 20
  step = (1 << 32) // batch - 1  # the batch that ends exactly at 2**32 ...
  for s in (step, step + 1, ML20MX16X32_SLOTS // batch):  # ... the next one, the last
    for start in (0, batch - 3):
      got = _ints(pipeline.batch_positions(np.int32(s), batch, np.int32(start), 3, True))
      assert got == [s * batch + start + i for i in range(3)]
  narrow = pipeline.batch_positions(np.int32(7), 96, np.int32(5), 4, False)
  assert _ints(pipeline.batch_positions(np.int32(7), 96, np.int32(5), 4, True)) == (
    np.asarray(narrow).tolist()
  )


# ---- the permutation -----------------------------------------------------------------


def test_permute_wide_is_permute_up_to_the_narrow_limit():
  keys = _order_keys()
  rng = np.random.default_rng(0)
  ns = [7, (1 << 31) + 5, NARROW]
  xs = [_u32(np.unique(np.r_[0, n - 1, rng.integers(0, n, 200)])) for n in ns]

  @jax.jit
  def both(xs):  # one compile for every domain
    return [
      (sampling.permute(x, n, keys), sampling.permute_wide(x, n, keys)) for x, n in zip(xs, ns)
    ]

  for (narrow, wide), n in zip(both(xs), ns):
    assert not np.asarray(wide.hi).any(), n
    np.testing.assert_array_equal(narrow, wide.lo, err_msg=str(n))


def test_permute_wide_matches_python_past_2_32_and_stays_injective():
  keys = _order_keys()
  key_ints = [int(k) for k in keys]
  ns = [(1 << 32) + 1, ML20MX16X32_SLOTS, sampling.MAX_WIDE_SLOTS]
  xs = [[x for x in [0, 1, M32 - 1, M32, 1 << 32, n // 3, n - 2, n - 1] if x < n] for n in ns]
  # A window of 2**16 indices around 2**32 must map to distinct slots inside the epoch.
  window = (1 << 32) - (1 << 15) + np.arange(1 << 16, dtype=np.uint64)

  @jax.jit
  def images(xs, window):
    return (
      [sampling.permute_wide(x, n, keys) for x, n in zip(xs, ns)],
      sampling.permute_wide(window, ML20MX16X32_SLOTS, keys),
    )

  got, window_images = images([_wide(x) for x in xs], _wide(window))
  for g, x, n in zip(got, xs, ns):
    assert _ints(g) == [_reference_permute(v, n, key_ints) for v in x], n
  window_images = np.asarray(_ints(window_images))
  assert len(np.unique(window_images)) == len(window)
  assert window_images.max() < ML20MX16X32_SLOTS


def test_visited_slots_at_ml20mx16x32_scale():
  fake = types.SimpleNamespace(num_train=ML20MX16X32_TRAIN)  # only its size is read
  batch, num_neg = 1 << 20, 4
  assert pipeline.wide_positions(ML20MX16X32_TRAIN, num_neg, batch)
  steps_ = pipeline.steps_per_epoch(ML20MX16X32_TRAIN, num_neg, batch)
  keys = [int(k) for k in _order_keys()]
  in_last = ML20MX16X32_SLOTS - (steps_ - 1) * batch  # valid positions of the last batch
  for step, start in [((1 << 32) // batch, 0), (steps_ - 1, 0), (steps_ - 1, in_last - 2048)]:
    slot, valid = pipeline._visited_slots(
      fake, KEY, 0, np.int32(step), batch, num_neg, np.int32(start), 4096
    )
    positions = step * batch + start + np.arange(4096)
    np.testing.assert_array_equal(valid, positions < ML20MX16X32_SLOTS)
    got = np.asarray(_ints(slot))[np.asarray(valid)]
    assert len(np.unique(got)) == len(got) and (got < ML20MX16X32_SLOTS).all()
    for i in [0, int(np.asarray(valid).sum()) - 1]:
      if i >= 0:
        assert got[i] == _reference_permute(int(positions[i]), ML20MX16X32_SLOTS, keys)


def test_read_slots_rows_and_columns_past_2_32():
  n = 1 << 34  # an abstract buffer: only traced
  slots = [0, (1 << 18) - 1, 1 << 18, M32, 1 << 32, n - 1]
  items = jax.ShapeDtypeStruct((n,), jnp.uint16)
  jaxpr = jax.make_jaxpr(pipeline.read_slots)(items, _wide(slots))
  assert 'i32[6]' in str(jaxpr) and 'reshape' in str(jaxpr)
  with pytest.raises(ValueError, match='divisible by 2'):
    jax.make_jaxpr(pipeline.read_slots)(jax.ShapeDtypeStruct((n + 1,), jnp.uint16), _wide(slots))


# ---- the wide paths against today's on small data -----------------------------------


@pytest.fixture(scope='module')
def ds256():
  """256 positives (32 users x 8) over 300 items: 2 occupancy groups per user."""
  rng = np.random.default_rng(5)
  positives, tests = {}, []
  for u in range(32):
    chosen = rng.choice(300, size=9, replace=False)
    positives[u], tests = chosen[:8].tolist(), tests + [int(chosen[8])]
  return make_dataset(positives, tests, 300)


def _everything(ds, ndev=2, batch=384, num_neg=4):
  """The epoch-0 items and every batch, direct and read from the items (last one padded)."""
  mesh = steps.make_mesh(ndev)
  data = sampling.to_device(ds, NamedSharding(mesh, P()))
  config = types.SimpleNamespace(num_neg=num_neg)
  items = steps.make_epoch_items(config, mesh, data)(data, KEY, np.int32(0))
  direct = jax.jit(
    lambda d, s: pipeline.train_batch(d, KEY, 0, s, batch_size=batch, num_neg=num_neg)
  )
  read = jax.jit(
    lambda d, it, s: pipeline.batch_from_items(d, it, KEY, 0, s, batch_size=batch, num_neg=num_neg)
  )
  n_steps = pipeline.steps_per_epoch(ds.num_train, num_neg, batch)
  out = [
    jax.device_get(f(s))
    for s in range(n_steps)
    for f in (lambda s: direct(data, np.int32(s)), lambda s: read(data, items, np.int32(s)))
  ]
  return np.asarray(items)[: pipeline.epoch_size(ds.num_train, num_neg)], out


@pytest.mark.slow  # compiles the epoch builder and both batch paths twice (~20 s)
def test_wide_paths_give_the_same_items_and_batches(ds256, monkeypatch):
  items, batches = _everything(ds256)
  # Every limit at toy sizes: Wide positions, slots and builder offsets, [calls, chunk]
  # buffer updates, and 2-D reads of the items buffer and the occupancy groups.
  monkeypatch.setattr(sampling, 'NARROW_SLOTS', 0)
  monkeypatch.setattr(sampling, 'INT32_MAX', 63)
  items_w, batches_w = _everything(ds256)
  np.testing.assert_array_equal(items, items_w)
  for a, b in zip(batches, batches_w):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert batches[0]['valid'].all() and not batches[-1]['valid'].all()


def test_wide_counters_with_hi_zero_are_todays_draws():
  ds = random_dataset(num_users=20, num_items=70, seed=2, max_degree=20)
  data = sampling.to_device(ds)
  kp = sampling.keypair(KEY)
  users = jnp.asarray(np.arange(200) % ds.num_users, jnp.int32)
  counters = jnp.arange(200, dtype=jnp.uint32)
  narrow = sampling.sample_negatives(data, kp, users, counters)
  wide = sampling.sample_negatives(data, kp, users, sampling.to_wide(counters))
  np.testing.assert_array_equal(narrow, wide)
  high = sampling.sample_negatives(
    data, kp, users, sampling.Wide(jnp.ones_like(counters), counters)
  )
  assert (np.asarray(high) != np.asarray(narrow)).mean() > 0.5  # another counter each


# ---- refusals --------------------------------------------------------------------------


def _fake(num_users, num_items, num_train):
  return types.SimpleNamespace(
    name='fake',
    num_users=num_users,
    num_items=num_items,
    num_train=num_train,
    valid_items=None,
    user_degrees=lambda: np.array([100], np.int32),
  )


def _refusal(num_users=2_197_225, num_items=855_776, num_train=ML20MX16X32_TRAIN, **fields):
  config = mlperf.get_config()
  for k, v in fields.items():
    config[k] = v
  try:
    config_checks.validate_against_data(config, _fake(num_users, num_items, num_train))
  except UserError as e:
    return str(e)
  return None


def test_ml20mx16x32_sizes_pass_the_checks():
  assert _refusal() is None
  assert _refusal(batch_size=1 << 20) is None


@pytest.mark.parametrize(
  'below, above, phrase',
  [
    (
      dict(num_items=(1 << 31) - 1, num_train=0),
      dict(num_items=1 << 31, num_train=0),
      'item ids are int32',
    ),
    (
      dict(num_train=(1 << 31) - 1 - 2_197_225),
      dict(num_train=(1 << 31) - 2_197_225),
      'num_train + num_users <= 2,147,483,647',
    ),
    (
      dict(num_train=1 << 30, num_neg=1023),
      dict(num_train=1 << 30, num_neg=1024),
      'exact up to 2**40',
    ),
    (
      dict(num_train=2_000_000, num_neg=(1 << 16) - 1),
      dict(num_train=2_000_000, num_neg=1 << 16),
      'use num_neg <= 65535',
    ),
    (dict(batch_size=3), dict(batch_size=2), 'step numbers are int32'),
    (
      dict(num_users=(1 << 32) // 1000, num_train=1000),
      dict(num_users=(1 << 32) // 1000 + 1, num_train=1000),
      'eval_num_neg <= 998',
    ),
  ],
)
def test_sizes_past_a_limit_are_refused_with_the_figures(below, above, phrase):
  assert phrase not in (_refusal(**below) or '')
  message = _refusal(**above)
  assert message is not None and phrase in message, message
