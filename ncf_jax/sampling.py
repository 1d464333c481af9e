"""Exact uniform negative sampling as pure, jittable functions.

A user's negatives are the items it has no training positive for. To draw one uniformly
there is no rejection loop: draw r uniformly in [0, num_items - |P_u|) and return the r-th
non-positive item. With the user's positives p_0 < p_1 < ... stored sorted (CSR), the r-th
non-positive is r + j where j = #{k : p_k - k <= r}; `p_k - k` is non-decreasing, so j is
found by a search. The search is two-level: first over a small per-user `coarse` list
(every 8th shifted value, a few MB that stay in cache), then over one block of 8 in the
full list, so only the last steps read the large array. Each level is a branch-free binary
lifting (one carried value, steps of 2^k), which XLA fuses into a few loops instead of
materialising two bounds per step.

Randomness is counter-based: every draw is threefry2x32(key, (index, stream)) for a global
index (sample slot, user, candidate number), so a value never depends on batch size, how a
batch is split across devices, or how many devices and hosts there are.
"""
from typing import Tuple

import flax.struct
import jax
from jax.extend import random as jex_random
import jax.numpy as jnp
import numpy as np

from ncf_jax import data as data_lib

COARSE_STRIDE = 8   # one coarse entry per 8 positives: the coarse list stays in cache
FEISTEL_ROUNDS = 6  # even, so the mixed-radix state returns to (Z_a, Z_b)
_U32_MAX = 0xFFFFFFFF


@flax.struct.dataclass
class DeviceData:
  """Device-resident form of a `Dataset` (replicated on every device).

  Item ids of positives are not stored: `shifted[k] = item_k - (k - user_offsets[u])` holds
  the same information and is what the sampler searches (item_k = shifted[k] + local k).
  `coarse` holds every COARSE_STRIDE-th shifted value of each user (CSR by
  `coarse_offsets`). `shifted` and `coarse` are uint16 when every item id fits
  (num_items < 65535, e.g. ml-20m); read them through `positive_shifted`, which returns
  int32.
  """
  train_users: jax.Array     # int32 [num_train]
  shifted: jax.Array         # uint16 or int32 [num_train]
  user_offsets: jax.Array    # int32 [num_users + 1]
  coarse: jax.Array          # uint16 or int32 [sum ceil(degree / COARSE_STRIDE) + 1]
  coarse_offsets: jax.Array  # int32 [num_users + 1]
  test_items: jax.Array      # int32 [num_users]
  num_users: int = flax.struct.field(pytree_node=False)
  num_items: int = flax.struct.field(pytree_node=False)
  max_degree: int = flax.struct.field(pytree_node=False)

  @property
  def num_train(self) -> int:
    return int(self.shifted.shape[0])

  def positive_shifted(self, index: jax.Array) -> jax.Array:
    """int32 shifted values p_k - (local k) at global positive indices (clamped)."""
    index = jnp.minimum(index, max(self.num_train - 1, 0))
    return self.shifted[index].astype(jnp.int32)

  def coarse_value(self, index: jax.Array) -> jax.Array:
    """int32 coarse entries at global coarse indices (clamped)."""
    index = jnp.minimum(index, self.coarse.shape[0] - 1)
    return self.coarse[index].astype(jnp.int32)

  @property
  def coarse_steps(self) -> int:
    """Lifting steps that cover the longest coarse list."""
    return _steps_for(-(-self.max_degree // COARSE_STRIDE))


def _steps_for(length: int) -> int:
  """Binary-lifting steps (powers of two) that reach any count in [0, length]."""
  return max(1, int(length).bit_length())


def host_arrays(dataset: data_lib.Dataset) -> dict:
  """NumPy arrays of the device form (shifted positives, coarse index), built on host."""
  offsets = dataset.user_offsets.astype(np.int64)
  degrees = np.diff(offsets)
  local = np.arange(dataset.num_train, dtype=np.int64) - np.repeat(offsets[:-1], degrees)
  small = dataset.num_items < np.iinfo(np.uint16).max   # every r < num_items < sentinel
  dtype = np.uint16 if small else np.int32
  shifted = (dataset.train_items.astype(np.int64) - local).astype(dtype)
  lengths = -(-degrees // COARSE_STRIDE)
  coarse_offsets = np.concatenate([[0], np.cumsum(lengths)])
  owner = np.repeat(np.arange(dataset.num_users), lengths)
  t = np.arange(coarse_offsets[-1], dtype=np.int64) - coarse_offsets[:-1][owner]
  coarse = shifted[offsets[:-1][owner] + COARSE_STRIDE * t]
  # One trailing sentinel keeps the array non-empty; reads past a list are masked anyway.
  coarse = np.concatenate([coarse, [np.iinfo(dtype).max]]).astype(dtype)
  return dict(train_users=dataset.train_users.astype(np.int32), shifted=shifted,
              user_offsets=dataset.user_offsets.astype(np.int32), coarse=coarse,
              coarse_offsets=coarse_offsets.astype(np.int32),
              test_items=dataset.test_items.astype(np.int32))


def to_device(dataset: data_lib.Dataset, sharding=None) -> DeviceData:
  """Copies a Dataset to device memory (replicated with `sharding` when given)."""
  arrays = host_arrays(dataset)
  if sharding is None:
    arrays = jax.tree.map(jnp.asarray, arrays)
  else:
    arrays = {k: jax.make_array_from_process_local_data(sharding, v)
              for k, v in arrays.items()}
  degrees = np.diff(dataset.user_offsets)
  return DeviceData(num_users=dataset.num_users, num_items=dataset.num_items,
                    max_degree=int(degrees.max()) if degrees.size else 0, **arrays)


# ----------------------------------------------------------------------------------------
# Counter-based random numbers.

def keypair(key: jax.Array) -> jax.Array:
  """Raw uint32[2] threefry key of a typed key (made with impl='threefry2x32')."""
  data = jax.random.key_data(key)
  if data.shape[-1:] != (2,):
    raise ValueError('ncf_jax keys must use the threefry2x32 implementation.')
  return data


def random_words(kp: jax.Array, x0: jax.Array, x1) -> Tuple[jax.Array, jax.Array]:
  """Two uint32 pseudo-random words per counter pair (x0, x1): threefry2x32."""
  x0 = jnp.asarray(x0, jnp.uint32)
  x1 = jnp.broadcast_to(jnp.asarray(x1, jnp.uint32), x0.shape)
  k0, k1 = jnp.asarray(kp[..., 0], jnp.uint32), jnp.asarray(kp[..., 1], jnp.uint32)
  # Inside shard_map every operand must vary over the same mesh axes. Scalar keys stay
  # scalars (broadcasting them to the counters' shape makes threefry ~7x slower on CPU).
  args = _same_variance([k0, k1, x0, x1])
  return tuple(jex_random.threefry2x32_p.bind(*args))


def _varying_axes(value) -> frozenset:
  """Manual mesh axes a traced value varies over (empty outside shard_map)."""
  aval = jax.typeof(value)
  mat = getattr(aval, 'mat', None)          # JAX >= 0.9: ShapedArray.mat.varying
  if mat is not None and hasattr(mat, 'varying'):
    return frozenset(mat.varying)
  return frozenset(getattr(aval, 'vma', ()))  # JAX 0.7-0.8: ShapedArray.vma


def _same_variance(values):
  """pcasts each value to vary over the union of the values' manual mesh axes."""
  vmas = [_varying_axes(v) for v in values]
  union = frozenset().union(*vmas)
  return [jax.lax.pcast(v, tuple(sorted(union - vma)), to='varying') if union - vma else v
          for v, vma in zip(values, vmas)]


def mulhi_u32(a: jax.Array, b: jax.Array) -> jax.Array:
  """floor(a * b / 2**32) for uint32 a, b, exactly, with 16-bit limbs (no uint64 needed)."""
  a = a.astype(jnp.uint32)
  b = b.astype(jnp.uint32)
  a0, a1 = a & 0xFFFF, a >> 16
  b0, b1 = b & 0xFFFF, b >> 16
  p00, p01, p10, p11 = a0 * b0, a0 * b1, a1 * b0, a1 * b1
  mid = (p00 >> 16) + (p01 & 0xFFFF) + (p10 & 0xFFFF)
  return p11 + (p01 >> 16) + (p10 >> 16) + (mid >> 16)


def uniform_below(bits: jax.Array, span: jax.Array) -> jax.Array:
  """Maps uniform uint32 bits to [0, span) (Lemire's multiply-high; bias <= span / 2**32)."""
  return mulhi_u32(bits, span).astype(jnp.int32)


# ----------------------------------------------------------------------------------------
# A keyed bijection on [0, n) for any n: mixed-radix Feistel network + cycle walking.

def _mix32(x: jax.Array) -> jax.Array:
  """murmur3's 32-bit finaliser: a cheap, well-avalanched round function."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def _radices(n: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """a = ceil(sqrt(n)), b = ceil(n / a): a * b >= n and a * b - n < a."""
  n = jnp.maximum(n.astype(jnp.uint32), 1)
  a = jnp.ceil(jnp.sqrt(n.astype(jnp.float32))).astype(jnp.uint32)
  a = jnp.where((a - 1) * (a - 1) >= n, a - 1, a)   # fix float rounding either way
  a = jnp.where(a * a < n, a + 1, a)
  b = (n + a - 1) // a
  return a, b


def _divmod(x: jax.Array, b: jax.Array):
  """Exact (x // b, x % b) for uint32 x < 2**32 - 2**17, b >= 1, without integer division.

  XLA CPU does not vectorise integer division; a float32 quotient is off by at most one
  for these ranges (relative error 2**-24 of x / b < 2**8), and two corrections fix it.
  """
  q = jnp.floor(x.astype(jnp.float32) / b.astype(jnp.float32)).astype(jnp.int32)
  r = x.astype(jnp.int32) - q * b.astype(jnp.int32)
  for _ in range(2):
    low, high = r < 0, r >= b.astype(jnp.int32)
    q = q - low + high
    r = r + jnp.where(low, b, 0).astype(jnp.int32) - jnp.where(high, b, 0).astype(jnp.int32)
  return q.astype(jnp.uint32), r.astype(jnp.uint32)


def _feistel(x: jax.Array, a: jax.Array, b: jax.Array, round_keys) -> jax.Array:
  """One pass of the mixed-radix Feistel network: a bijection of [0, a * b)."""
  left, right = _divmod(x, b)            # left in Z_a, right in Z_b
  mods = (a, b)
  for i, rk in enumerate(round_keys):
    m = mods[i % 2]
    f = mulhi_u32(_mix32(right ^ rk), m)   # a round function into Z_m (no division)
    new_right = left + f
    new_right = jnp.where(new_right >= m, new_right - m, new_right)
    left, right = right, new_right
  return left * b + right


def permute(x: jax.Array, n: jax.Array, round_keys) -> jax.Array:
  """Keyed pseudo-random bijection of [0, n), evaluated per element (x < n).

  Args:
    x: uint32/int32 indices in [0, n).
    n: domain size (scalar or broadcastable to x), below 2**31.
    round_keys: FEISTEL_ROUNDS uint32 arrays broadcastable to x.
  Returns:
    uint32 images, a permutation of [0, n) when x ranges over [0, n). Lanes with x >= n
    get unspecified values (and never stall the computation).
  """
  x = x.astype(jnp.uint32)
  n = jnp.asarray(n, jnp.uint32)
  # Radices, n and keys keep their own (broadcastable) shapes: broadcasting them to x's
  # shape would make XLA materialise them for the loop below (3x slower on CPU).
  a, b = _radices(n)
  keys = [jnp.asarray(k, jnp.uint32) for k in round_keys]

  def step(v):
    return _feistel(v, a, b, keys)

  inside = x < n
  y = step(x)
  # a * b - n < a <= sqrt(n) + 1, so an image outside [0, n) is rare (~1 lane in sqrt(n)).
  # Cycle walking (re-applying the bijection of [0, a * b) until the image re-enters
  # [0, n)) keeps the map a bijection. One walk step is applied unconditionally (in a
  # large batch some lane nearly always needs it); the loop after it rarely iterates.
  y = jnp.where(inside & (y >= n), step(y), y)
  return jax.lax.while_loop(lambda y: jnp.any(inside & (y >= n)),
                            lambda y: jnp.where(inside & (y >= n), step(y), y), y)


def round_keys(kp: jax.Array, index=0) -> list:
  """FEISTEL_ROUNDS round keys from a keypair and an index (e.g. a user id)."""
  index = jnp.asarray(index, jnp.uint32)
  keys = []
  for i in range(0, FEISTEL_ROUNDS, 2):
    y0, y1 = random_words(kp, index, jnp.uint32(0x80000000 + i))
    keys += [y0, y1]
  return keys


# ----------------------------------------------------------------------------------------
# The r-th non-positive item of a user.

def _lift(read, lo: jax.Array, hi: jax.Array, steps: int, below) -> jax.Array:
  """Largest c in [lo, hi] with below(read(c - 1), c - 1) for a monotone predicate.

  Requires the predicate to hold at lo - 1 (or lo == 0) and to be monotone (true, then
  false). Branch-free binary lifting: c only grows, by 2^k when the entry 2^k further
  still satisfies it, so one value is carried between steps.
  """
  c = lo
  for k in range(steps - 1, -1, -1):
    step = 1 << k
    idx = c + (step - 1)
    ok = (c + step <= hi) & below(read(idx), idx)
    c = c + jnp.where(ok, step, 0)
  return c


def _count_two_level(data: DeviceData, users, offsets, degrees, below) -> jax.Array:
  """#{k < degree : below(shifted_k, k)} for a predicate monotone in k (true, then false).

  Searches the user's coarse list first, then the one block of COARSE_STRIDE entries of
  `shifted` that the answer lies in.
  """
  co = data.coarse_offsets[users]
  cm = data.coarse_offsets[users + 1] - co
  c = _lift(lambda t: data.coarse_value(co + t), jnp.zeros_like(cm), cm,
            data.coarse_steps, lambda v, t: below(v, COARSE_STRIDE * t))
  # Entry COARSE_STRIDE * (c - 1) is known to satisfy it; the next c-th coarse does not.
  lo = jnp.where(c > 0, COARSE_STRIDE * (c - 1) + 1, 0)
  hi = jnp.where(c > 0, jnp.minimum(COARSE_STRIDE * c, degrees), 0)
  return _lift(lambda k: data.positive_shifted(offsets + k), lo, hi,
               _steps_for(COARSE_STRIDE - 1), below)


def nth_nonpositive(data: DeviceData, users: jax.Array, r: jax.Array,
                    offsets=None, degrees=None) -> jax.Array:
  """The r-th item (0-based, ascending) that is not a training positive of `users`.

  Requires 0 <= r < num_items - degree(user). Shapes of users and r broadcast.
  """
  if offsets is None:
    offsets = data.user_offsets[users]
  if degrees is None:
    degrees = data.user_offsets[users + 1] - offsets
  r = r.astype(jnp.int32)
  return r + _count_two_level(data, users, offsets, degrees, lambda s, k: s <= r)


def count_positives_below(data: DeviceData, users: jax.Array, items: jax.Array,
                          offsets=None, degrees=None) -> jax.Array:
  """#{training positives p of the user with p < item} (p_k = shifted_k + local k)."""
  if offsets is None:
    offsets = data.user_offsets[users]
  if degrees is None:
    degrees = data.user_offsets[users + 1] - offsets
  items = items.astype(jnp.int32)
  return _count_two_level(data, users, offsets, degrees, lambda s, k: s + k < items)


def sample_negatives(data: DeviceData, kp: jax.Array, users: jax.Array,
                     counters: jax.Array, stream: int = 0,
                     offsets=None, degrees=None) -> jax.Array:
  """One uniform negative per (user, counter), with replacement, excluding train positives.

  The draw for a counter is a pure function of (kp, counter, stream), whatever the shape.
  """
  if offsets is None:
    offsets = data.user_offsets[users]
  if degrees is None:
    degrees = data.user_offsets[users + 1] - offsets
  bits, _ = random_words(kp, counters, stream)
  r = uniform_below(bits, (data.num_items - degrees).astype(jnp.uint32))
  return nth_nonpositive(data, users, r, offsets, degrees)


def sample_distinct_negatives(data: DeviceData, kp: jax.Array, users: jax.Array,
                              num_neg: int) -> jax.Array:
  """`num_neg` distinct negatives per user, never a training positive nor the test item.

  Draws are without replacement: the first num_neg images of a per-user keyed bijection
  of the user's candidate ranks [0, num_items - degree - 1), mapped to item ids. Requires
  num_neg <= num_items - degree - 1 for every user in `users` (train.py checks it); a
  user with fewer candidates gets repeats in the columns past its candidate count.

  Returns: int32 [len(users), num_neg].
  """
  offsets = data.user_offsets[users]
  degrees = data.user_offsets[users + 1] - offsets
  test = data.test_items[users]
  m = (data.num_items - degrees - 1).astype(jnp.uint32)             # candidate count
  keys = [k[:, None] for k in round_keys(kp, users)]
  j = jnp.broadcast_to(jnp.arange(num_neg, dtype=jnp.uint32)[None, :],
                       (users.shape[0], num_neg))
  ranks = permute(j, m[:, None], keys).astype(jnp.int32)
  # Skip the test item: its rank among the user's non-positives.
  test_rank = test - count_positives_below(data, users, test, offsets, degrees)
  ranks = ranks + (ranks >= test_rank[:, None])
  return nth_nonpositive(data, users[:, None], ranks, offsets[:, None], degrees[:, None])
