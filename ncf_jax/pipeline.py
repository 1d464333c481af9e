"""Training epochs and evaluation candidates as pure functions of (key, epoch, index).

Epoch e is every training positive once (label 1) plus `num_neg` negatives for the same
user (label 0): num_train * (1 + num_neg) slots, visited in the order of a keyed
pseudo-random bijection of the slot indices (nothing is materialised). Global batch `step`
holds epoch positions [step * batch_size, (step + 1) * batch_size); positions past the end
of the epoch are padding with `valid=False`, so no sample is dropped or seen twice and
every batch has the same shape. A batch, or any slice of it (one device's share), is
computed on device from the `DeviceData` arrays; a sample's value depends only on
(key, epoch, slot), never on the batch size or the device count.

Two ways to compute the same batch: `train_batch` samples each position's negative in the
visiting order (pure in (key, epoch, step), for inspection and tests); the train loop
first builds the epoch's items in slot order (`epoch_items`, cache-friendly) and its
batches read them (`batch_from_items`). Both give identical batches and hashes.

Positions and slots are uint32 while an epoch's padded positions stay within
`sampling.NARROW_SLOTS`; past that (a static choice from the sizes) they are
`sampling.Wide` pairs, with the same values where both forms are exact (docs/scale.md).
"""

from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ncf_jax import data as data_lib
from ncf_jax import sampling
from ncf_jax.errors import UserError

# Slots per call when an epoch is built in slot order: small enough that the sampler's
# temporaries stay in cache (on the 2-core CPU 2**18 ran 2x faster than 2**20).
EPOCH_CHUNK = 1 << 18

# Streams of the run key (fold_in), so that each use of randomness is independent.
STREAM_ORDER, STREAM_TRAIN_NEG, STREAM_EVAL, STREAM_VALID = 0, 1, 2, 3

# The evaluation splits: the held-out test items, or the validation items.
SPLITS = ('test', 'valid')


def epoch_size(num_train: int, num_neg: int) -> int:
  """Samples (slots) in one training epoch."""
  return int(num_train) * (1 + int(num_neg))


def steps_per_epoch(num_train: int, num_neg: int, batch_size: int) -> int:
  """Global batches per epoch; the last one is padded."""
  return -(-epoch_size(num_train, num_neg) // int(batch_size))


def epoch_keys(key: jax.Array, epoch) -> tuple[jax.Array, jax.Array]:
  """Raw keypairs for an epoch's order and its negatives, from the run's data key."""
  ek = jax.random.fold_in(key, epoch)
  return (
    sampling.keypair(jax.random.fold_in(ek, STREAM_ORDER)),
    sampling.keypair(jax.random.fold_in(ek, STREAM_TRAIN_NEG)),
  )


def wide_positions(num_train: int, num_neg: int, batch_size: int) -> bool:
  """Whether an epoch's padded positions pass sampling.NARROW_SLOTS (so are Wide pairs)."""
  padded = steps_per_epoch(num_train, num_neg, batch_size) * int(batch_size)
  return padded > sampling.NARROW_SLOTS


def slot_parts(slot, num_neg: int) -> tuple[jax.Array, jax.Array]:
  """(index of the slot's positive, the slot's number within it: 0 is the positive), int32.

  `slot` is uint32 or a `sampling.Wide` (exact for slot < (1 + num_neg) * 2**32).
  """
  if isinstance(slot, sampling.Wide):
    k, j = sampling.wide_divmod_const(slot, 1 + num_neg)
    return k.astype(jnp.int32), j.astype(jnp.int32)
  return ((slot // (1 + num_neg)).astype(jnp.int32), (slot % (1 + num_neg)).astype(jnp.int32))


def _slot_parts(slot, num_neg: int) -> tuple[jax.Array, jax.Array]:
  """(index of the slot's positive, whether the slot is that positive itself)."""
  k, j = slot_parts(slot, num_neg)
  return k, j == 0


def batch_positions(step, batch_size: int, start, size: int, wide: bool):
  """Epoch positions step * batch_size + start + [0, size): uint32, or Wide when `wide`."""
  offsets = jnp.arange(size, dtype=jnp.uint32)
  if not wide:
    return (
      jnp.asarray(step, jnp.uint32) * jnp.uint32(batch_size)
      + jnp.asarray(start, jnp.uint32)
      + offsets
    )
  base = sampling.wide_add(
    sampling.wide_mul(jnp.asarray(step, jnp.uint32), batch_size), jnp.asarray(start, jnp.uint32)
  )
  return sampling.wide_add(base, offsets)


def _visited_slots(data, key, epoch, step, batch_size: int, num_neg: int, start, size: int | None):
  return visited_slots(data.num_train, key, epoch, step, batch_size, num_neg, start, size)


def visited_slots(
  num_train: int, key, epoch, step, batch_size: int, num_neg: int, start, size: int | None
):
  """(slots visited at batch positions [start, start + size) of `step`, valid mask).

  Depends on the dataset only through `num_train`. Slots are uint32, or `sampling.Wide`
  when the epoch needs it (`wide_positions`).
  """
  size = batch_size if size is None else size
  n_slots = epoch_size(num_train, num_neg)
  order_kp, _ = epoch_keys(key, epoch)
  keys = sampling.round_keys(order_kp)
  if wide_positions(num_train, num_neg, batch_size):
    position = batch_positions(step, batch_size, start, size, wide=True)
    valid = sampling.wide_less(position, n_slots)
    position = sampling.wide_where(valid, position, sampling.to_wide(0))
    return sampling.permute_wide(position, n_slots, keys), valid
  position = batch_positions(step, batch_size, start, size, wide=False)
  valid = position < jnp.uint32(n_slots)
  position = jnp.where(valid, position, 0)
  return sampling.permute(position, n_slots, keys), valid


def shard_start(shard, per: int, call, chunk: int, total: int):
  """First slot shard * per + call * chunk of an epoch-builder call (`steps.make_epoch_items`).

  The int32 expression of before while `per` fits int32 and the builder's `total` slots
  fit NARROW_SLOTS (past 2**31 it wraps to the right uint32); a `sampling.Wide` otherwise.
  """
  if total <= sampling.NARROW_SLOTS and per <= sampling.INT32_MAX:
    return shard * per + call * chunk
  return sampling.wide_add(
    sampling.wide_mul(jnp.asarray(shard, jnp.uint32), per),
    sampling.wide_mul(jnp.asarray(call, jnp.uint32), chunk),
  )


# Largest power of two that `read_slots` uses as the row length of a long items buffer.
READ_ROW = 1 << 18


def read_slots(items: jax.Array, slot) -> jax.Array:
  """items[slot] for uint32 or Wide slots, also past INT32_MAX entries.

  A 1-D gather while the buffer has at most INT32_MAX entries (x64 off, JAX gathers with
  int32 indices); a longer one is read as [rows, row] with row the largest power of two
  <= READ_ROW dividing its length (`steps.make_epoch_items` buffers are multiples of
  EPOCH_CHUNK), so both indices fit int32.
  """
  n = items.shape[0]
  if n <= sampling.INT32_MAX:
    if isinstance(slot, sampling.Wide):
      slot = slot.lo  # a slot below n < 2**31 has hi == 0
    return items[slot]
  slot = sampling.to_wide(slot)
  shift = min((n & -n).bit_length() - 1, READ_ROW.bit_length() - 1)
  if (n >> shift) > sampling.INT32_MAX:
    raise ValueError(
      f'an items buffer of {n} entries needs a length divisible by '
      f'2**{n.bit_length() - 31} to be read with int32 indices'
    )
  row = ((slot.hi << (32 - shift)) | (slot.lo >> shift)) if shift else slot.lo
  col = slot.lo & jnp.uint32((1 << shift) - 1)
  return items.reshape(n >> shift, 1 << shift)[row.astype(jnp.int32), col.astype(jnp.int32)]


def train_batch(
  data: sampling.DeviceData,
  key: jax.Array,
  epoch,
  step,
  *,
  batch_size: int,
  num_neg: int,
  start=0,
  size: int | None = None,
) -> dict[str, jax.Array]:
  """Training batch `step` of `epoch`, or its slice [start, start + size).

  Pure and jittable; `epoch`, `step` and `start` may be traced.

  Args:
    data: the device-side dataset.
    key: the run's data key (a threefry2x32 typed key).
    epoch: epoch number.
    step: global batch number within the epoch.
    batch_size: global batch size.
    num_neg: negatives per positive.
    start: first position of the slice within the batch (a device's offset).
    size: slice length (default: the whole batch).
  Returns:
    dict of int32 `user`, `item`, float32 `label`, bool `valid` of length `size`.
  """
  slot, valid = _visited_slots(data, key, epoch, step, batch_size, num_neg, start, size)
  k, is_pos = _slot_parts(slot, num_neg)
  _, neg_kp = epoch_keys(key, epoch)
  users = data.train_users[k]
  offsets = data.user_offsets[users]
  degrees = data.user_offsets[users + 1] - offsets
  pos_items = data.positive_items(k)
  neg_items = sampling.sample_negatives(data, neg_kp, users, slot, 0, offsets, degrees)
  return dict(
    user=users,
    item=jnp.where(is_pos, pos_items, neg_items),
    label=is_pos.astype(jnp.float32),
    valid=valid,
  )


def epoch_items(
  data: sampling.DeviceData,
  key: jax.Array,
  epoch,
  *,
  num_neg: int,
  start=0,
  size: int | None = None,
  num_train: int | None = None,
  pos_base=0,
) -> jax.Array:
  """Items of epoch slots [start, start + size) in slot order (not the visiting order).

  The same values `train_batch` computes for these slots, but generated in slot order:
  a user's slots are contiguous, so the sampler's reads hit cache (about 4x faster per
  negative than the visiting order on CPU). The train loop builds each epoch's items this
  way once, sharded over devices, and its batches then read them (`batch_from_items`).
  Slots past the epoch's end (padding) get unspecified items. Stored in the dataset's
  item dtype (uint16 for up to 65,536 items) to halve the memory. `start` may be a
  `sampling.Wide` (`shard_start`); epochs past NARROW_SLOTS count slots in Wide pairs.
  `data` may be a part of the dataset (`data_shards`): its positives are then global
  positives [pos_base, ...) of an epoch of `num_train` positives.
  """
  n_slots = epoch_size(data.num_train if num_train is None else num_train, num_neg)
  size = n_slots if size is None else size
  _, neg_kp = epoch_keys(key, epoch)
  slot: Any  # Wide past NARROW_SLOTS, else uint32
  if isinstance(start, sampling.Wide) or n_slots > sampling.NARROW_SLOTS:
    slot = sampling.wide_add(start, jnp.arange(size, dtype=jnp.uint32))
    last = sampling.to_wide(max(n_slots - 1, 0))
    slot = sampling.wide_where(sampling.wide_less(slot, n_slots), slot, last)
  else:
    slot = jnp.asarray(start, jnp.uint32) + jnp.arange(size, dtype=jnp.uint32)
    slot = jnp.minimum(slot, jnp.uint32(max(n_slots - 1, 0)))
  k, is_pos = _slot_parts(slot, num_neg)
  if num_train is not None:
    k = jnp.clip(k - pos_base, 0, max(data.num_train - 1, 0))
  users = data.train_users[k]
  neg_items = sampling.sample_negatives(data, neg_kp, users, slot)
  items = jnp.where(is_pos, data.positive_items(k), neg_items)
  return items.astype(data.train_items.dtype)


def batch_from_items(
  data: sampling.DeviceData,
  items: jax.Array,
  key: jax.Array,
  epoch,
  step,
  *,
  batch_size: int,
  num_neg: int,
  start=0,
  size: int | None = None,
) -> dict[str, jax.Array]:
  """`train_batch`, reading the items from `epoch_items(data, key, epoch)` (all slots).

  Identical output to `train_batch(data, key, epoch, step, ...)`; only the work differs:
  one read per sample instead of a draw and a rank query in the visiting order.
  """
  slot, valid = _visited_slots(data, key, epoch, step, batch_size, num_neg, start, size)
  k, is_pos = _slot_parts(slot, num_neg)
  return dict(
    user=data.train_users[k],
    item=read_slots(items, slot).astype(jnp.int32),
    label=is_pos.astype(jnp.float32),
    valid=valid,
  )


def iterate_train(
  dataset: data_lib.Dataset, key: jax.Array, epoch: int, *, batch_size: int, num_neg: int
) -> Iterator[dict[str, np.ndarray]]:
  """Yields an epoch's global batches as NumPy dicts (for inspection and tests)."""
  data = sampling.to_device(dataset)
  fn = jax.jit(lambda d, e, s: train_batch(d, key, e, s, batch_size=batch_size, num_neg=num_neg))
  for step in range(steps_per_epoch(dataset.num_train, num_neg, batch_size)):
    yield jax.device_get(fn(data, epoch, step))


def eval_key(key: jax.Array, split: str = 'test') -> jax.Array:
  """Keypair of a split's evaluation candidates: fixed for the whole run."""
  return sampling.keypair(
    jax.random.fold_in(key, STREAM_VALID if split == 'valid' else STREAM_EVAL)
  )


def held_out(data: sampling.DeviceData, users: jax.Array, split: str = 'test'):
  """(positive, excluded) items of `users` in `split`: int32 [len(users)] arrays.

  The positive is the split's held-out item. `excluded` lists the held-out items that are
  no candidates besides the training positives, the positive first. Validation excludes
  only the validation item: its candidates never depend on the test split, so selection
  on them cannot read it (the test item may be a validation negative). Test excludes
  every held-out item of the user: the test item and, with a split, the validation item.
  """
  if split not in SPLITS:
    raise ValueError(f'unknown split {split!r}: use one of {SPLITS}')
  if split == 'valid':
    if data.valid_items is None:
      raise ValueError('this dataset has no validation split (config.validation=none)')
    valid = data.valid_items[users]
    return valid, (valid,)
  test = data.test_items[users]
  if data.valid_items is None:
    return test, (test,)
  return test, (test, data.valid_items[users])


def eval_batch(
  data: sampling.DeviceData,
  key: jax.Array,
  users: jax.Array,
  *,
  num_neg: int,
  match_mlperf: bool = False,
  split: str = 'test',
  user_base=0,
) -> tuple[jax.Array, jax.Array]:
  """Candidates of `users` in `split`: column 0 its held-out item, then `num_neg` negatives.

  Default: distinct negatives, never a training positive nor an excluded held-out item
  (`held_out`). match_mlperf (test split without validation only): the MLPerf reference's
  draws, with replacement over the items that are not training positives (the test item
  may be drawn); `mask` is False for a repeated item and for a drawn copy of the test
  item, so duplicates count once.

  A dataset with fixed test negatives (`Dataset.test_negatives`, the NCF paper's
  .test.negative) uses exactly those in the test split (`num_neg` must equal their count;
  with match_mlperf a repeat counts once); the validation split still samples.

  `data` may hold users [user_base, ...) only (`data_shards`); `users` are global ids.

  Returns:
    items int32 [len(users), 1 + num_neg], mask bool of the same shape.
  """
  kp = eval_key(key, split)
  users = users.astype(jnp.int32)
  local = users - user_base
  positive, excluded = held_out(data, local, split)
  if split == 'test' and data.test_negatives is not None:
    k = data.num_test_negatives
    if num_neg != k:
      raise UserError(
        f'config.eval_num_neg={num_neg} but the dataset fixes {k} test negatives per user '
        f'(the NCF paper\'s .test.negative file); set --config.eval_num_neg={k}.'
      )
    index = local[:, None] * k + jnp.arange(k, dtype=jnp.int32)[None, :]
    items = jnp.concatenate([positive[:, None], data.test_negatives[index]], axis=1)
    return items, first_occurrence(items) if match_mlperf else jnp.ones(items.shape, bool)
  if not match_mlperf:
    negs = sampling.sample_distinct_negatives(data, kp, local, num_neg, excluded, key_users=users)
    items = jnp.concatenate([positive[:, None], negs], axis=1)
    return items, jnp.ones(items.shape, bool)
  if len(excluded) > 1 or split != 'test':
    raise ValueError('match_mlperf reproduces the MLPerf reference, which has no validation split')
  test = positive[:, None]
  counters = (
    users[:, None].astype(jnp.uint32) * jnp.uint32(num_neg)
    + jnp.arange(num_neg, dtype=jnp.uint32)[None, :]
  )
  negs = sampling.sample_negatives(data, kp, local[:, None], counters, stream=1)
  items = jnp.concatenate([test, negs], axis=1)
  return items, first_occurrence(items)


def first_occurrence(items: jax.Array) -> jax.Array:
  """True where an item appears for the first time in its row (column 0 always True)."""
  order = jnp.argsort(items, axis=1, stable=True)
  sorted_items = jnp.take_along_axis(items, order, axis=1)
  first_sorted = jnp.concatenate(
    [jnp.ones_like(sorted_items[:, :1], bool), sorted_items[:, 1:] != sorted_items[:, :-1]], axis=1
  )
  mask = jnp.zeros_like(first_sorted)
  rows = jnp.arange(items.shape[0])[:, None]
  return mask.at[rows, order].set(first_sorted)


def eval_candidates(
  dataset: data_lib.Dataset,
  key: jax.Array,
  *,
  num_neg: int,
  match_mlperf: bool = False,
  batch_users: int = 4096,
  split: str = 'test',
) -> tuple[np.ndarray, np.ndarray]:
  """All users' candidates in `split` as NumPy arrays: (users [U], items [U, 1 + num_neg]).

  `items[:, 0]` is the split's held-out item. The same key gives the same candidates
  every time.
  """
  data = sampling.to_device(dataset)
  fn = jax.jit(
    lambda d, u: eval_batch(d, key, u, num_neg=num_neg, match_mlperf=match_mlperf, split=split)[0]
  )
  users = np.arange(dataset.num_users, dtype=np.int32)
  out = []
  for lo in range(0, dataset.num_users, batch_users):
    chunk = users[lo : lo + batch_users]
    padded = np.pad(chunk, (0, batch_users - len(chunk)))
    out.append(np.asarray(fn(data, padded))[: len(chunk)])
  items = np.concatenate(out) if out else np.zeros((0, 1 + num_neg), np.int32)
  return users, items
