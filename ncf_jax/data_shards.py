"""The sampler's device data split over the `data` axis (`config.sharding='sharded'`).

Device d owns training positives [d K, (d + 1) K), K = ceil(num_train / ndev), hence the
epoch slots [d K (1 + num_neg), (d + 1) K (1 + num_neg)): it builds those slots' items
(`epoch_items`) and no other device holds them. It evaluates the users whose first
positive index (`user_offsets[u]`) lies in its range. For both it holds the sampler's
arrays (`sampling.host_arrays`) of one contiguous range of users, re-based to 0; a user
whose positives straddle two ranges is held by both devices. Every device's part is
zero-padded to the longest, so the arrays split evenly.

A training batch keeps the visiting order of the replicated mode: each device computes
the slots of its own positions, the slots are all-gathered, each device reads the
(user, item) of the slots it owns and a psum_scatter returns every device its own
samples (`device_batch`). Exactly one device contributes each sample, so the batches, and
their `[pipeline_hash]` lines, are those of a replicated run on any device count.
"""

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from ncf_jax import data as data_lib
from ncf_jax import pipeline, sampling


@flax.struct.dataclass
class Split:
  """Every device's part of the sampler's data, as arrays split over `data`.

  Outside shard_map each array is the concatenation of the ndev padded parts; inside,
  a device sees its own part (`local` a `sampling.DeviceData` of its user range, each
  per-device scalar an array of shape [1]).
  """

  local: sampling.DeviceData
  user_base: jax.Array  # int32 [ndev]: the first user of the device's range
  pos_base: jax.Array  # int32 [ndev]: global index of the range's first positive
  eval_lo: jax.Array  # int32 [ndev]: the users it evaluates, [eval_lo, eval_hi)
  eval_hi: jax.Array
  num_users: int = flax.struct.field(pytree_node=False, default=0)  # global
  num_items: int = flax.struct.field(pytree_node=False, default=0)
  num_train: int = flax.struct.field(pytree_node=False, default=0)  # global
  ndev: int = flax.struct.field(pytree_node=False, default=1)
  per_device: int = flax.struct.field(pytree_node=False, default=1)  # K positives
  eval_per: int = flax.struct.field(pytree_node=False, default=1)  # most eval users

  @property
  def eval_span(self) -> int:
    """Users one pass of the eval loop covers: ndev x the most any device evaluates."""
    return self.ndev * self.eval_per


def partition(user_offsets: np.ndarray, num_train: int, ndev: int) -> dict[str, np.ndarray]:
  """Per device: owned positives [pos_lo, pos_hi), eval users, held users [lo, hi)."""
  offsets = np.asarray(user_offsets, np.int64)
  num_users = offsets.shape[0] - 1
  per = max(1, -(-int(num_train) // ndev))
  pos_lo = np.minimum(np.arange(ndev, dtype=np.int64) * per, num_train)
  pos_hi = np.minimum(pos_lo + per, num_train)
  eval_lo = np.searchsorted(offsets[:-1], pos_lo, 'left')  # first user starting in range
  eval_lo[0] = 0
  eval_hi = np.r_[eval_lo[1:], num_users]
  has = pos_hi > pos_lo
  first = np.searchsorted(offsets, pos_lo, 'right') - 1  # the user of positive pos_lo
  last = np.searchsorted(offsets, np.maximum(pos_hi - 1, 0), 'right') - 1
  lo = np.where(has, np.minimum(eval_lo, first), eval_lo)
  hi = np.where(has, np.maximum(eval_hi, last + 1), eval_hi)
  return dict(per=per, pos_lo=pos_lo, pos_hi=pos_hi, eval_lo=eval_lo, eval_hi=eval_hi, lo=lo, hi=hi)


def local_dataset(dataset: data_lib.Dataset, lo: int, hi: int) -> data_lib.Dataset:
  """Users [lo, hi) of `dataset` with their positives, ids re-based to 0."""
  offsets = dataset.user_offsets
  a, b = int(offsets[lo]), int(offsets[hi])
  valid = dataset.valid_items
  return data_lib.Dataset(
    name=dataset.name,
    num_users=int(hi - lo),
    num_items=dataset.num_items,
    train_users=(dataset.train_users[a:b] - lo).astype(np.int32),
    train_items=dataset.train_items[a:b],
    user_offsets=(offsets[lo : hi + 1] - a).astype(np.int32),
    test_items=dataset.test_items[lo:hi],
    valid_items=None if valid is None else valid[lo:hi],
    test_negatives=None if dataset.test_negatives is None else dataset.test_negatives[lo:hi],
  )


def _layout(dataset: data_lib.Dataset, ndev: int):
  """(partition, {host_arrays key: (padded per-device length, dtype)}).

  A part's length is the longest device's (at least one user and one positive).
  """
  parts = partition(dataset.user_offsets, dataset.num_train, ndev)
  offsets = np.asarray(dataset.user_offsets, np.int64)
  users = max(1, int((parts['hi'] - parts['lo']).max()))
  train = max(1, int((offsets[parts['hi']] - offsets[parts['lo']]).max()))
  return parts, sampling.host_shapes(
    users, dataset.num_items, train, dataset.valid_items is not None, _negatives(dataset)
  )


def _negatives(dataset: data_lib.Dataset) -> int:
  return 0 if dataset.test_negatives is None else int(dataset.test_negatives.shape[1])


def _split(dataset: data_lib.Dataset, ndev: int, parts, arrays, scalars) -> Split:
  offsets = np.asarray(dataset.user_offsets, np.int64)
  degrees = np.diff(offsets)
  local = sampling.DeviceData(
    num_users=int(arrays['test_items'].shape[0]) // ndev,
    num_items=dataset.num_items,
    max_degree=int(degrees.max()) if degrees.size else 0,
    num_test_negatives=_negatives(dataset),
    **arrays,
  )
  return Split(
    local=local,
    user_base=scalars(parts['lo']),
    pos_base=scalars(offsets[parts['lo']]),
    eval_lo=scalars(parts['eval_lo']),
    eval_hi=scalars(parts['eval_hi']),
    num_users=dataset.num_users,
    num_items=dataset.num_items,
    num_train=dataset.num_train,
    ndev=ndev,
    per_device=int(parts['per']),
    eval_per=max(1, int((parts['eval_hi'] - parts['eval_lo']).max())),
  )


def abstract(dataset: data_lib.Dataset, mesh: Mesh, axis: str = 'data') -> Split:
  """`to_devices(dataset, mesh)` as shapes with their shardings (nothing is built)."""
  ndev = mesh.size
  parts, shapes = _layout(dataset, ndev)
  sharding = NamedSharding(mesh, P(axis))
  arrays = {
    k: jax.ShapeDtypeStruct((ndev * n,), dt, sharding=sharding) for k, (n, dt) in shapes.items()
  }
  return _split(
    dataset,
    ndev,
    parts,
    arrays,
    lambda v: jax.ShapeDtypeStruct((ndev,), np.dtype(np.int32), sharding=sharding),
  )


def to_devices(dataset: data_lib.Dataset, mesh: Mesh, axis: str = 'data') -> Split:
  """`dataset`'s sampler arrays, each device holding only its part.

  Each process builds (`sampling.host_arrays`) only the parts of its own devices.
  """
  ndev = mesh.size
  parts, shapes = _layout(dataset, ndev)
  lengths = {k: n for k, (n, _) in shapes.items()}
  built = {}

  def part(d: int) -> dict:
    if d not in built:
      arrays = sampling.host_arrays(local_dataset(dataset, parts['lo'][d], parts['hi'][d]))
      out = {}
      for k, v in arrays.items():
        fill = v[-1] if k == 'user_offsets' else 0
        out[k] = np.concatenate([v, np.full(lengths[k] - v.shape[0], fill, v.dtype)])
      built[d] = out
    return built[d]

  sharding = NamedSharding(mesh, P(axis))
  local_devices = [
    i for i, dev in enumerate(mesh.devices.flat) if dev.process_index == jax.process_index()
  ]
  keys = part(local_devices[0]).keys()

  def split(key: str) -> jax.Array:
    n = lengths[key]

    def shard(index) -> np.ndarray:  # index: this device's slice of the 1-D array
      return part((index[0].start or 0) // n)[key]

    return jax.make_array_from_callback((ndev * n,), sharding, shard)

  arrays = {k: split(k) for k in keys}
  built.clear()  # the device arrays hold them now

  def scalars(values) -> jax.Array:
    values = np.asarray(values, np.int32)
    return jax.make_array_from_callback(values.shape, sharding, lambda index: values[index])

  return _split(dataset, ndev, parts, arrays, scalars)


def slots_per_device(split: Split, num_neg: int) -> int:
  """Epoch slots a device owns (the last device's range may be shorter)."""
  return split.per_device * (1 + int(num_neg))


def epoch_items(
  split: Split, key: jax.Array, epoch, *, num_neg: int, start, size: int
) -> jax.Array:
  """Inside shard_map: items of this device's owned slots [start, start + size) (global).

  `pipeline.epoch_items` on the device's users; slots past its range get unspecified
  items that no batch reads.
  """
  return pipeline.epoch_items(
    split.local,
    key,
    epoch,
    num_neg=num_neg,
    start=start,
    size=size,
    num_train=split.num_train,
    pos_base=split.pos_base[0],
  )


def _offsets(local_k: jax.Array, j: jax.Array, num_neg: int, length: int):
  """Offsets local_k (1 + num_neg) + j into a device's items buffer of `length` slots."""
  if length <= sampling.INT32_MAX:
    return local_k * (1 + num_neg) + j
  return sampling.wide_add(
    sampling.wide_mul(local_k.astype(jnp.uint32), 1 + num_neg), j.astype(jnp.uint32)
  )


def device_batch(
  split: Split,
  items: jax.Array,
  key: jax.Array,
  epoch,
  step,
  *,
  batch_size: int,
  num_neg: int,
  start,
  size: int,
  axis: str = 'data',
) -> dict[str, jax.Array]:
  """Inside shard_map: this device's `size` samples of global batch `step`, from `start`.

  `items` is this device's part of the epoch (`epoch_items`). The same values as
  `pipeline.train_batch` on the whole dataset.
  """
  slot, valid = pipeline.visited_slots(
    split.num_train, key, epoch, step, batch_size, num_neg, start, size
  )
  k, j = pipeline.slot_parts(slot, num_neg)
  every_k = jax.lax.all_gather(k, axis, tiled=True)
  every_j = jax.lax.all_gather(j, axis, tiled=True)
  per = split.per_device
  local_k = every_k - jax.lax.axis_index(axis) * per
  owned = (local_k >= 0) & (local_k < per)
  local_k = jnp.clip(local_k, 0, per - 1)
  item = pipeline.read_slots(items, _offsets(local_k, every_j, num_neg, items.shape[0]))
  data = split.local
  index = jnp.clip(every_k - split.pos_base[0], 0, data.num_train - 1)
  user = data.train_users[index] + split.user_base[0]
  both = jnp.where(owned[:, None], jnp.stack([user, item.astype(jnp.int32)], axis=1), 0)
  mine = jax.lax.psum_scatter(both, axis, scatter_dimension=0, tiled=True)
  return dict(user=mine[:, 0], item=mine[:, 1], label=(j == 0).astype(jnp.float32), valid=valid)


def eval_users(split: Split, first, size: int):
  """Inside shard_map: (global users, valid, user_base) of eval call `first`.

  `first` counts eval_batch_size = ndev * size per call, as in the replicated loop; each
  device takes `size` of its own users [eval_lo, eval_hi) from first / ndev.
  """
  lo, hi = split.eval_lo[0], split.eval_hi[0]
  users = lo + first // split.ndev + jnp.arange(size, dtype=jnp.int32)
  valid = users < hi
  return jnp.where(valid, users, lo), valid, split.user_base[0]
