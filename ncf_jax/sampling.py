"""Exact uniform negative sampling as pure, jittable functions.

A user's negatives are the items it has no training positive for: m = num_items - |P_u|
of them. To draw one uniformly there is no rejection loop: draw r uniformly in [0, m) and
map it through a fixed bijection f_u of [0, m) onto the non-positives. f_u keeps every
non-positive r < m in place and sends the j-th positive below m to the j-th non-positive
at or above m (there are equally many of each); those targets are precomputed per user
(`remap`). So a draw needs only "is r a positive, and how many positives lie below it",
which a two-level bitmap answers in O(1) reads, with no search:

- `words`: for each 16-item chunk of the item range that holds a positive of u, its
  16-bit bitmap and the number of u's positives in earlier chunks; after a user's chunks,
  one sentinel holding the degree.
- `groups`: for every 16 consecutive chunks of every user, a 16-bit occupancy mask and
  how many of u's non-empty chunks come before the group, so a chunk's word is found by
  a popcount.

Randomness is counter-based: every draw is threefry2x32(key, (index, stream)) for a global
index (sample slot, user, candidate number), so a value never depends on batch size, how a
batch is split across devices, or how many devices and hosts there are.

Indices past 32 bits (epochs of more than NARROW_SLOTS slots) are `Wide` (hi, lo) pairs
of uint32 words, so nothing needs jax_enable_x64; every function that takes one gives the
same values as its 32-bit form wherever that form is exact (docs/scale.md).
"""

import math
from typing import NamedTuple

import flax.struct
import jax
from jax.extend import random as jex_random
import jax.numpy as jnp
import numpy as np

from ncf_jax import data as data_lib

CHUNK = 16  # items per bitmap word
GROUP = 16  # chunks per occupancy mask
NARROW_ITEMS = 1 << 16  # up to this many items, ids, counts and masks pack into 16 bits
FEISTEL_ROUNDS = 6  # even, so the mixed-radix state returns to (Z_a, Z_b)
INT32_MAX = (1 << 31) - 1  # largest index an int32 gather (x64 off) can address
# `permute` and `_divmod` are exact on [0, n) for n <= NARROW_SLOTS: ceil(sqrt(n)) <= 65535,
# so a * a and a * b stay below 2**32. Larger domains go through `permute_wide`.
NARROW_SLOTS = (1 << 32) - (1 << 17)
# `permute_wide` is exact for n <= MAX_WIDE_SLOTS: radices below 2**20 + 1 keep the float32
# quotient in `_divmod_wide` within one of the truth, and hi words below 2**8.
MAX_WIDE_SLOTS = 1 << 40


@flax.struct.dataclass
class DeviceData:
  """Device-resident form of a `Dataset` (replicated on every device).

  With at most NARROW_ITEMS items (every MovieLens release), item ids are uint16 and each
  `groups`/`words` entry packs (count << 16 | mask) into one uint32, so a lookup reads one
  entry per level. With more items the counts live in the int32 `group_base` and
  `word_before` and the masks in uint32 `groups`/`words`.
  """

  train_users: jax.Array  # int32 [num_train]
  train_items: jax.Array  # uint16 or int32 [num_train]
  user_offsets: jax.Array  # int32 [num_users + 1]
  test_items: jax.Array  # int32 [num_users]
  groups: jax.Array  # uint32 [num_users * groups_per_user]
  words: jax.Array  # uint32 [num_train + num_users]; user u's start at off_u + u
  remap: jax.Array  # uint16 or int32 [num_train]; f_u's targets at off_u + j
  group_base: jax.Array | None = None  # int32, only when not narrow
  word_before: jax.Array | None = None  # int32, only when not narrow
  valid_items: jax.Array | None = None  # int32 [num_users], only with a validation split
  # int32 [num_users * K]: user u's fixed test negatives at [u * K, (u + 1) * K), or None
  test_negatives: jax.Array | None = None
  num_users: int = flax.struct.field(pytree_node=False, default=0)
  num_items: int = flax.struct.field(pytree_node=False, default=0)
  max_degree: int = flax.struct.field(pytree_node=False, default=0)
  num_test_negatives: int = flax.struct.field(pytree_node=False, default=0)  # K, 0: sampled

  @property
  def num_train(self) -> int:
    return int(self.train_items.shape[0])

  @property
  def groups_per_user(self) -> int:
    return groups_per_user(self.num_items)

  def positive_items(self, index: jax.Array) -> jax.Array:
    """int32 item ids of the training positives at global indices (clamped)."""
    index = jnp.minimum(index, max(self.num_train - 1, 0))
    return self.train_items[index].astype(jnp.int32)

  def group(self, users: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(occupancy mask uint32, non-empty chunks before the group int32) of users' group g.

    The flat index users * groups_per_user + g while it fits int32 (the 32-bit gather of
    before); past INT32_MAX entries the tables are read as [num_users, groups_per_user].
    """

    def read(table):
      if table.shape[0] <= INT32_MAX:
        return table[users * self.groups_per_user + g]
      return table.reshape(self.num_users, self.groups_per_user)[users, g]

    v = read(self.groups)
    if self.group_base is None:
      return v & 0xFFFF, (v >> 16).astype(jnp.int32)
    return v, read(self.group_base)

  def word(self, index: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(chunk bitmap uint32, positives in earlier chunks int32) at word indices."""
    w = self.words[index]
    if self.word_before is None:
      return w & 0xFFFF, (w >> 16).astype(jnp.int32)
    return w, self.word_before[index]


def groups_per_user(num_items: int) -> int:
  """Occupancy masks per user: chunks cover items [0, num_items] (num_items included)."""
  chunks = num_items // CHUNK + 1
  return -(-chunks // GROUP)


def host_arrays(dataset: data_lib.Dataset) -> dict:
  """NumPy arrays of the device form (bitmap index and remap targets), built on host."""
  offsets = dataset.user_offsets.astype(np.int64)
  degrees = np.diff(offsets)
  users = dataset.train_users.astype(np.int64)
  items = dataset.train_items.astype(np.int64)
  start_each = np.repeat(offsets[:-1], degrees)  # each positive's user's first index
  local = np.arange(dataset.num_train, dtype=np.int64) - start_each
  index = _bitmap_index(users, items, local, offsets, degrees, dataset.num_items)
  remap = _remap_targets(users, items, local, start_each, offsets, degrees, dataset.num_items)
  return _device_form(dataset, items, remap, *index)


def _bitmap_index(users, items, local, offsets, degrees, n_items: int):
  """(words, before, occ, g_base): each user's positives as CHUNK-bit words with the count
  of positives before each, and per GROUP of chunks an occupancy mask and a base index."""
  n_users, n_train = degrees.shape[0], users.shape[0]
  gpu = groups_per_user(n_items)
  # Non-empty chunks, in (user, chunk) order since positives are sorted by (user, item).
  chunk = items // CHUNK
  first = (
    np.flatnonzero(np.r_[True, (users[1:] != users[:-1]) | (chunk[1:] != chunk[:-1])])
    if n_train
    else np.zeros(0, np.int64)
  )
  bits = (
    np.bitwise_or.reduceat(np.left_shift(1, items % CHUNK), first)
    if n_train
    else np.zeros(0, np.int64)
  )
  c_user, c_chunk, c_before = users[first], chunk[first], local[first]
  nnz = np.bincount(c_user, minlength=n_users)
  c_start = np.concatenate([[0], np.cumsum(nnz)])[:-1]
  c_rank = np.arange(first.size) - np.repeat(c_start, nnz)  # index among u's chunks
  word_at = offsets[:-1][c_user] + c_user + c_rank
  sentinel_at = offsets[:-1] + np.arange(n_users) + nnz
  words = np.zeros(n_train + n_users, np.int64)
  before = np.zeros(n_train + n_users, np.int64)
  words[word_at], before[word_at] = bits, c_before
  before[sentinel_at] = degrees

  g_index = c_user * gpu + c_chunk // GROUP
  occ = np.zeros(n_users * gpu, np.int64)
  if first.size:  # g_index is non-decreasing: OR each run of equal groups
    g_first = np.flatnonzero(np.r_[True, g_index[1:] != g_index[:-1]])
    occ[g_index[g_first]] = np.bitwise_or.reduceat(np.left_shift(1, c_chunk % GROUP), g_first)
  counts = np.bincount(g_index, minlength=n_users * gpu)
  g_base = np.cumsum(counts) - counts  # exclusive, over all users
  g_base -= np.repeat(g_base[::gpu], gpu) if n_users else 0

  return words, before, occ, g_base


def _remap_targets(users, items, local, start_each, offsets, degrees, n_items: int):
  """f_u's targets: for each positive slot, the non-positive it maps to (see `sample`)."""
  n_users, n_train = degrees.shape[0], users.shape[0]
  # f_u's targets: the non-positives in [m, num_items), listed ascending. Candidates are
  # m + t for t < degree; those that are positives (the ones >= m) are struck out.
  m = n_items - degrees
  m_each = np.repeat(m, degrees)
  cand = m_each + local
  is_hit = items >= m_each  # positives at or above m ...
  strike = np.zeros(n_train, bool)
  strike[(items - m_each + start_each)[is_hit]] = True
  kept = np.flatnonzero(~strike)  # ... occupy exactly these candidates
  q = degrees - np.bincount(users[is_hit], minlength=n_users)  # positives below m
  q_start = np.concatenate([[0], np.cumsum(q)])[:-1]
  dest = np.repeat(offsets[:-1], q) + np.arange(kept.size) - np.repeat(q_start, q)
  remap = np.zeros(n_train, np.int64)
  remap[dest] = cand[kept]

  return remap


def _device_form(dataset: data_lib.Dataset, items, remap, words, before, occ, g_base) -> dict:
  """The arrays `to_device` places, packed narrow (uint16 items, 16-bit fields) when the
  catalogue allows it."""
  narrow = dataset.num_items <= NARROW_ITEMS
  item_dtype = np.uint16 if narrow else np.int32
  out = dict(
    train_users=dataset.train_users.astype(np.int32),
    train_items=items.astype(item_dtype),
    user_offsets=dataset.user_offsets.astype(np.int32),
    test_items=dataset.test_items.astype(np.int32),
    remap=remap.astype(item_dtype),
  )
  if dataset.valid_items is not None:
    out['valid_items'] = dataset.valid_items.astype(np.int32)
  if dataset.test_negatives is not None:
    out['test_negatives'] = dataset.test_negatives.astype(np.int32).reshape(-1)
  if narrow:
    out['groups'] = (occ | (g_base << 16)).astype(np.uint32)
    out['words'] = (words | (before << 16)).astype(np.uint32)
  else:
    out.update(
      groups=occ.astype(np.uint32),
      group_base=g_base.astype(np.int32),
      words=words.astype(np.uint32),
      word_before=before.astype(np.int32),
    )
  return out


def host_shapes(
  num_users: int, num_items: int, num_train: int, has_valid: bool, num_test_negatives: int = 0
) -> dict:
  """{key: (length, dtype)} of `host_arrays` for these sizes, without building them."""
  narrow = num_items <= NARROW_ITEMS
  item = np.dtype(np.uint16 if narrow else np.int32)
  i32, u32 = np.dtype(np.int32), np.dtype(np.uint32)
  groups = num_users * groups_per_user(num_items)
  out = dict(
    train_users=(num_train, i32),
    train_items=(num_train, item),
    user_offsets=(num_users + 1, i32),
    test_items=(num_users, i32),
    remap=(num_train, item),
    groups=(groups, u32),
    words=(num_train + num_users, u32),
  )
  if has_valid:
    out['valid_items'] = (num_users, i32)
  if num_test_negatives:
    out['test_negatives'] = (num_users * num_test_negatives, i32)
  if not narrow:
    out.update(group_base=(groups, i32), word_before=(num_train + num_users, i32))
  return out


def abstract_device_data(dataset: data_lib.Dataset, sharding) -> DeviceData:
  """`to_device(dataset, sharding)` as shapes with that sharding (nothing is built)."""
  negatives = 0 if dataset.test_negatives is None else int(dataset.test_negatives.shape[1])
  shapes = host_shapes(
    dataset.num_users,
    dataset.num_items,
    dataset.num_train,
    dataset.valid_items is not None,
    negatives,
  )
  return DeviceData(
    num_users=dataset.num_users,
    num_items=dataset.num_items,
    num_test_negatives=negatives,
    **{k: jax.ShapeDtypeStruct((n,), dt, sharding=sharding) for k, (n, dt) in shapes.items()},  # type: ignore[arg-type]  # shapes stand in for arrays
  )


def to_device(dataset: data_lib.Dataset, sharding=None) -> DeviceData:
  """Copies a Dataset to device memory (replicated with `sharding` when given)."""
  arrays = host_arrays(dataset)
  if sharding is None:
    arrays = jax.tree.map(jnp.asarray, arrays)
  else:
    arrays = {k: jax.make_array_from_process_local_data(sharding, v) for k, v in arrays.items()}
  degrees = np.diff(dataset.user_offsets)
  return DeviceData(
    num_users=dataset.num_users,
    num_items=dataset.num_items,
    max_degree=int(degrees.max()) if degrees.size else 0,
    num_test_negatives=0
    if dataset.test_negatives is None
    else int(dataset.test_negatives.shape[1]),
    **arrays,
  )


# ----------------------------------------------------------------------------------------
# Counter-based random numbers.


def keypair(key: jax.Array) -> jax.Array:
  """Raw uint32[2] threefry key of a typed key (made with impl='threefry2x32')."""
  data = jax.random.key_data(key)
  if data.shape[-1:] != (2,):
    raise ValueError('ncf_jax keys must use the threefry2x32 implementation.')
  return data


def random_words(kp: jax.Array, x0: jax.Array, x1) -> tuple[jax.Array, jax.Array]:
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
  mat = getattr(aval, 'mat', None)  # JAX >= 0.9: ShapedArray.mat.varying
  if mat is not None and hasattr(mat, 'varying'):
    return frozenset(mat.varying)
  return frozenset(getattr(aval, 'vma', ()))  # JAX 0.7-0.8: ShapedArray.vma


def _same_variance(values):
  """pcasts each value to vary over the union of the values' manual mesh axes."""
  vmas = [_varying_axes(v) for v in values]
  union = frozenset().union(*vmas)
  return [
    jax.lax.pcast(v, tuple(sorted(union - vma)), to='varying') if union - vma else v
    for v, vma in zip(values, vmas)
  ]


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
# Wide indices: exact 64-bit unsigned arithmetic on (hi, lo) uint32 pairs, x64 off.


class Wide(NamedTuple):
  """An unsigned index hi * 2**32 + lo as two uint32 arrays (a pytree; shapes broadcast)."""

  hi: jax.Array
  lo: jax.Array


def to_wide(x) -> Wide:
  """A Wide from a Wide, a Python int (any size below 2**64) or a uint32/int32 array."""
  if isinstance(x, Wide):
    return x
  if isinstance(x, int):
    return Wide(jnp.uint32(x >> 32), jnp.uint32(x & 0xFFFFFFFF))
  x = jnp.asarray(x).astype(jnp.uint32)
  return Wide(jnp.zeros_like(x), x)


def wide_add(x, y) -> Wide:
  """x + y (mod 2**64), with the carry out of the low words."""
  x, y = to_wide(x), to_wide(y)
  lo = x.lo + y.lo
  return Wide(x.hi + y.hi + (lo < x.lo).astype(jnp.uint32), lo)


def wide_mul(x: jax.Array, c: int) -> Wide:
  """x * c (mod 2**64) for uint32 x and a Python int 0 <= c < 2**64."""
  x = jnp.asarray(x).astype(jnp.uint32)
  c_lo, c_hi = jnp.uint32(c & 0xFFFFFFFF), jnp.uint32(c >> 32)
  return Wide(mulhi_u32(x, c_lo) + x * c_hi, x * c_lo)


def wide_less(x: Wide, n: int) -> jax.Array:
  """x < n for a Python int n."""
  n_hi, n_lo = jnp.uint32(n >> 32), jnp.uint32(n & 0xFFFFFFFF)
  return (x.hi < n_hi) | ((x.hi == n_hi) & (x.lo < n_lo))


def wide_where(cond: jax.Array, x: Wide, y: Wide) -> Wide:
  """Elementwise select between two Wides."""
  x, y = to_wide(x), to_wide(y)
  return Wide(jnp.where(cond, x.hi, y.hi), jnp.where(cond, x.lo, y.lo))


def wide_divmod_const(x: Wide, d: int) -> tuple[jax.Array, jax.Array]:
  """Exact (x // d, x % d) as uint32 for a Python int 1 <= d <= 2**16 and x < d * 2**32.

  Long division in 16-bit digits: each partial dividend stays below 2**32, and a constant
  divisor compiles to a multiply (as the 32-bit `slot // d` does).
  """
  if not 1 <= d <= 1 << 16:
    raise ValueError(f'wide_divmod_const needs 1 <= d <= 65536, got {d}')
  x = to_wide(x)
  d32 = jnp.uint32(d)
  t1 = (x.hi << 16) | (x.lo >> 16)  # x.hi < d <= 2**16
  q1, r1 = t1 // d32, t1 % d32
  t2 = (r1 << 16) | (x.lo & 0xFFFF)  # r1 < d <= 2**16
  return (q1 << 16) + t2 // d32, t2 % d32


def _divmod_wide(x: Wide, b: int) -> tuple[jax.Array, jax.Array]:
  """Exact (x // b, x % b) as uint32 for x < 2**40 and quotients below 2**20 + 1.

  `_divmod` on a 64-bit dividend: the float32 quotient (relative error below 2**-22, so
  off by less than 1/4 here) is fixed by the same two corrections; the remainder, in
  (-2b, 2b), is exact in wrapping 32-bit arithmetic on the low word.
  """
  xf = x.hi.astype(jnp.float32) * jnp.float32(1 << 32) + x.lo.astype(jnp.float32)
  q = jnp.floor(xf / jnp.float32(b)).astype(jnp.int32)
  r = (x.lo - q.astype(jnp.uint32) * jnp.uint32(b)).astype(jnp.int32)
  b32 = jnp.int32(b)
  for _ in range(2):
    low, high = r < 0, r >= b32
    q = q - low + high
    r = r + jnp.where(low, b32, 0) - jnp.where(high, b32, 0)
  return q.astype(jnp.uint32), r.astype(jnp.uint32)


# ----------------------------------------------------------------------------------------
# A keyed bijection on [0, n) for any n: mixed-radix Feistel network + cycle walking.


def _mix32(x: jax.Array) -> jax.Array:
  """murmur3's 32-bit finaliser: a cheap, well-avalanched round function."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def _radices(n: jax.Array) -> tuple[jax.Array, jax.Array]:
  """a = ceil(sqrt(n)), b = ceil(n / a): a * b >= n and a * b - n < a."""
  n = jnp.maximum(n.astype(jnp.uint32), 1)
  a = jnp.ceil(jnp.sqrt(n.astype(jnp.float32))).astype(jnp.uint32)
  a = jnp.where((a - 1) * (a - 1) >= n, a - 1, a)  # fix float rounding either way
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


def _rounds(left: jax.Array, right: jax.Array, a, b, round_keys):
  """The Feistel rounds on (left in Z_a, right in Z_b); an even count ends in Z_a x Z_b."""
  mods = (a, b)
  for i, rk in enumerate(round_keys):
    m = mods[i % 2]
    f = mulhi_u32(_mix32(right ^ rk), m)  # a round function into Z_m (no division)
    new_right = left + f
    new_right = jnp.where(new_right >= m, new_right - m, new_right)
    left, right = right, new_right
  return left, right


def _feistel(x: jax.Array, a: jax.Array, b: jax.Array, round_keys) -> jax.Array:
  """One pass of the mixed-radix Feistel network: a bijection of [0, a * b)."""
  high, low = _divmod(x, b)
  left, right = _rounds(high, low, a, b, round_keys)  # left in Z_a, right in Z_b
  return left * b + right


def radices(n: int) -> tuple[int, int]:
  """`_radices` in exact Python integers, for a static domain size of any width."""
  n = max(int(n), 1)
  a = math.isqrt(n - 1) + 1  # ceil(sqrt(n))
  return a, -(-n // a)


def _feistel_wide(x: Wide, a: int, b: int, round_keys) -> Wide:
  """`_feistel` on a Wide of [0, a * b): the same rounds, split and joined in 64 bits."""
  left, right = _rounds(*_divmod_wide(x, b), jnp.uint32(a), jnp.uint32(b), round_keys)
  return wide_add(wide_mul(left, b), right)


def permute_wide(x, n: int, round_keys) -> Wide:
  """`permute` for a static domain [0, n) with n <= MAX_WIDE_SLOTS, on Wide indices.

  The same bijection as `permute(x, n, round_keys)` wherever that is exact (n <=
  NARROW_SLOTS): the same radices, rounds and cycle walking, only the split of x into
  (x // b, x % b) and the join left * b + right are done on (hi, lo) words.
  """
  if not 1 <= n <= MAX_WIDE_SLOTS:
    raise ValueError(f'permute_wide needs 1 <= n <= {MAX_WIDE_SLOTS}, got {n}')
  x = to_wide(x)
  a, b = radices(n)
  keys = [jnp.asarray(k, jnp.uint32) for k in round_keys]
  inside = wide_less(x, n)

  def step(v):
    return _feistel_wide(v, a, b, keys)

  def walk(y):
    return wide_where(inside & ~wide_less(y, n), step(y), y)

  y = walk(step(x))
  return jax.lax.while_loop(lambda y: jnp.any(inside & ~wide_less(y, n)), walk, y)


def permute(x: jax.Array, n: jax.Array | int, round_keys) -> jax.Array:
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
  return jax.lax.while_loop(
    lambda y: jnp.any(inside & (y >= n)), lambda y: jnp.where(inside & (y >= n), step(y), y), y
  )


def round_keys(kp: jax.Array, index=0) -> list:
  """FEISTEL_ROUNDS round keys from a keypair and an index (e.g. a user id)."""
  index = jnp.asarray(index, jnp.uint32)
  keys = []
  for i in range(0, FEISTEL_ROUNDS, 2):
    y0, y1 = random_words(kp, index, jnp.uint32(0x80000000 + i))
    keys += [y0, y1]
  return keys


# ----------------------------------------------------------------------------------------
# Rank queries and the bijection f_u.


def rank_positives(
  data: DeviceData, users: jax.Array, x: jax.Array, offsets=None
) -> tuple[jax.Array, jax.Array]:
  """(#training positives of the user below x, whether x is one), for 0 <= x <= num_items.

  Two reads, whatever the degree: the group's occupancy mask gives the chunk's word by a
  popcount; the word's bitmap gives the rank inside the chunk. For an empty chunk the
  word found is the user's next non-empty one (or the sentinel), whose count is the rank.
  """
  if offsets is None:
    offsets = data.user_offsets[users]
  x = x.astype(jnp.int32)
  chunk = x // CHUNK
  occ, g_before = data.group(users, chunk // GROUP)
  j = (chunk % GROUP).astype(jnp.uint32)
  one = jnp.uint32(1)
  present = ((occ >> j) & one) == one
  w_index = (
    offsets
    + users
    + g_before
    + jax.lax.population_count(occ & ((one << j) - one)).astype(jnp.int32)
  )
  bits, before = data.word(w_index)
  s = (x % CHUNK).astype(jnp.uint32)
  bits = jnp.where(present, bits, 0)
  rank = before + jax.lax.population_count(bits & ((one << s) - one)).astype(jnp.int32)
  return rank, ((bits >> s) & one) == one


def nonpositive_at(data: DeviceData, users: jax.Array, r: jax.Array, offsets=None) -> jax.Array:
  """f_u(r): a bijection of [0, num_items - degree) onto the user's non-positives.

  r itself when r is not a training positive; the j-th positive below m is sent to the
  j-th non-positive at or above m. Requires 0 <= r < m. Shapes of users and r broadcast.
  """
  if offsets is None:
    offsets = data.user_offsets[users]
  r = r.astype(jnp.int32)
  rank, is_pos = rank_positives(data, users, r, offsets)
  index = jnp.minimum(offsets + rank, max(data.num_train - 1, 0))
  return jnp.where(is_pos, data.remap[index].astype(jnp.int32), r)


def nonpositive_index(
  data: DeviceData, users: jax.Array, items: jax.Array, offsets=None, degrees=None
) -> jax.Array:
  """f_u^{-1}: the r in [0, m) with f_u(r) = item, for items that are not positives."""
  if offsets is None:
    offsets = data.user_offsets[users]
  if degrees is None:
    degrees = data.user_offsets[users + 1] - offsets
  items = items.astype(jnp.int32)
  m = data.num_items - degrees
  # An item at or above m is the j-th non-positive there: j = (item - m) - #P in [m, item).
  j = (items - m) - (
    rank_positives(data, users, items, offsets)[0] - rank_positives(data, users, m, offsets)[0]
  )
  return jnp.where(items < m, items, data.positive_items(offsets + jnp.maximum(j, 0)))


def sample_negatives(
  data: DeviceData,
  kp: jax.Array,
  users: jax.Array,
  counters: jax.Array,
  stream: int = 0,
  offsets=None,
  degrees=None,
) -> jax.Array:
  """One uniform negative per (user, counter), with replacement, excluding train positives.

  The draw for a counter is a pure function of (kp, counter, stream), whatever the shape:
  threefry at (counter, stream), or for a `Wide` counter (lo, stream | hi << 16), which
  is the same pair when hi = 0 (needs stream < 2**16 and hi < 2**16).
  """
  if offsets is None:
    offsets = data.user_offsets[users]
  if degrees is None:
    degrees = data.user_offsets[users + 1] - offsets
  if isinstance(counters, Wide):
    counters, stream = counters.lo, jnp.uint32(stream) | (counters.hi << 16)
  bits, _ = random_words(kp, counters, stream)
  r = uniform_below(bits, (data.num_items - degrees).astype(jnp.uint32))
  return nonpositive_at(data, users, r, offsets)


def sample_distinct_negatives(
  data: DeviceData,
  kp: jax.Array,
  users: jax.Array,
  num_neg: int,
  held_out=None,
  key_users: jax.Array | None = None,
) -> jax.Array:
  """`num_neg` distinct negatives per user, never a training positive nor a held-out item.

  Draws are without replacement: the first num_neg images of a per-user keyed bijection
  of [0, m - h), shifted past the held-out items' indices f_u^{-1}(item) in ascending
  order and mapped through f_u (h = number of held-out items). Requires
  num_neg <= num_items - degree - h for every user in `users` (train.py checks it); a
  user with fewer candidates gets repeats in the columns past its candidate count.

  Args:
    held_out: a sequence of int32 [len(users)] arrays: per user, distinct items that are
      not training positives (default: the test item alone).
    key_users: the users' ids that key the draws (default `users`; a part of the
      dataset, `data_shards`, indexes its users from 0 but keys them by global id).

  Returns: int32 [len(users), num_neg].
  """
  offsets = data.user_offsets[users]
  degrees = data.user_offsets[users + 1] - offsets
  if held_out is None:
    held_out = (data.test_items[users],)
  m = (data.num_items - degrees - len(held_out)).astype(jnp.uint32)  # candidate count
  keys = [k[:, None] for k in round_keys(kp, users if key_users is None else key_users)]
  j = jnp.broadcast_to(jnp.arange(num_neg, dtype=jnp.uint32)[None, :], (users.shape[0], num_neg))
  ranks = permute(j, m[:, None], keys).astype(jnp.int32)
  index = [nonpositive_index(data, users, item, offsets, degrees) for item in held_out]
  if len(index) > 1:
    index = list(jnp.sort(jnp.stack(index), axis=0))
  # Shifting past the skipped indices in ascending order maps [0, m - h) onto [0, m)
  # without them.
  for skip in index:
    ranks = ranks + (ranks >= skip[:, None])
  return nonpositive_at(data, users[:, None], ranks, offsets[:, None])
