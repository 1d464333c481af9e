"""`config.sharding='replicated'`: data parallel, everything on every device.

Parameters, their Adam state and the sampler's data are replicated; each device builds
1/ndev of the epoch's slots, which one reshard then gives every device whole; each device
computes its share of the global batch and the gradients are averaged by one `pmean`.
"""

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ncf_jax import models, pipeline, sampling
from ncf_jax.parallel import layout
from ncf_jax.parallel.layout import AXIS


class Replicated(layout.Layout):
  """Every device holds the whole parameters, data and epoch."""

  mode = 'replicated'

  def init_params(self, params):
    return params

  def apply_fn(self, apply):
    return apply

  def state_specs(self, like=None):
    return P()

  def l2_params_term(self, params, l2_params: float):
    return layout.l2_params(params, l2_params)

  def value_and_grad(self, loss_fn, params):
    # The parameters must enter the differentiated function as per-device (varying)
    # values: differentiating the replicated ones directly, shard_map's autodiff would
    # already sum the cotangents over `data`, and the pmean would give ndev x the mean.
    varying = jax.tree.map(lambda x: jax.lax.pcast(x, AXIS, to='varying'), params)
    out, grads = jax.value_and_grad(loss_fn, has_aux=True)(varying)
    return out, jax.lax.pmean(grads, AXIS)

  def embedding_rows_sq(self, params, users, items):
    return models.embedding_rows_sq(params, users, items)

  @property
  def data_spec(self) -> P:
    return P()

  def device_data(self, dataset):
    return sampling.to_device(dataset, NamedSharding(self.mesh, P()))

  def abstract_device_data(self, dataset):
    return sampling.abstract_device_data(dataset, NamedSharding(self.mesh, P()))

  def local_data(self, data) -> sampling.DeviceData:
    return data

  def epoch_slots(self, data, num_neg: int) -> int:
    return -(-pipeline.epoch_size(data.num_train, num_neg) // self.ndev)

  def epoch_part(self, data, key, epoch, *, num_neg: int, call, chunk: int, calls: int):
    per = calls * chunk  # slots of a device's buffer: its 1/ndev of the slots, in order
    index = jax.lax.axis_index(AXIS)
    start = pipeline.shard_start(index, per, call, chunk, self.ndev * per)
    return pipeline.epoch_items(data, key, epoch, num_neg=num_neg, start=start, size=chunk)

  @property
  def epoch_spec(self) -> P:
    return P()

  def device_batch(self, data, items, key, epoch, step, *, batch_size, num_neg, start, size):
    return pipeline.batch_from_items(
      data,
      items,
      key,
      epoch,
      step,
      batch_size=batch_size,
      num_neg=num_neg,
      start=start,
      size=size,
    )

  def eval_users(self, data, first, size: int, num_users: int):
    users = first + jax.lax.axis_index(AXIS) * size + jnp.arange(size, dtype=jnp.int32)
    valid = users < num_users
    return jnp.where(valid, users, 0), valid, 0, data

  def eval_span(self, data, num_users: int) -> int:
    return num_users

  def alternative(self) -> layout.Layout:
    from ncf_jax.parallel.sharded import Sharded

    return Sharded(self.mesh)
