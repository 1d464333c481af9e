"""`config.sharding='sharded'`: the tables, the sampler's data and the epoch split by rows.

The embedding tables and their Adam moments are split by rows over `data`
(`ncf_jax.sharding`), the dense layers replicated; the sampler's data and the epoch's
slots are split by training positives (`ncf_jax.data_shards`), each device building and
keeping only the slots it owns. A batch's samples and a score's rows are read across
devices, so the batches and the values are those of a replicated run.
"""

import jax
from jax.sharding import PartitionSpec as P

from ncf_jax import data_shards, pipeline, sampling, sharding
from ncf_jax.parallel import layout
from ncf_jax.parallel.layout import AXIS

# The `model.first_layer` a sharded run builds: a projection would read whole tables, not
# row shards, so 'projected' is refused and 'auto' (which could project) becomes 'concat'.
FIRST_LAYER = 'concat'


class Sharded(layout.Layout):
  """Each device holds 1/ndev of the tables' rows, of the data and of the epoch."""

  mode = 'sharded'

  @classmethod
  def check_config(cls, config, bad) -> None:
    first_layer = config.model.get('first_layer', 'concat')
    if first_layer == 'projected':  # 'auto' reads sharded tables unprojected
      bad(
        'model.first_layer',
        first_layer,
        "sharding='sharded' looks up the embedding "
        "tables row by row and supports 'concat' or 'auto' (which then never projects)",
      )

  def model_config(self, model_config):
    model_config = model_config.copy_and_resolve_references()
    model_config.first_layer = FIRST_LAYER
    return model_config

  def init_params(self, params):
    return sharding.pad_tables(params, self.ndev)

  def apply_fn(self, apply):
    return sharding.ShardedApply(apply)

  def state_specs(self, like):
    return sharding.specs(like)

  def l2_params_term(self, params, l2_params: float):
    # The tables' gradients are divided by ndev (`value_and_grad`), so their term is
    # weighted by ndev to match.
    tables, dense = sharding.split_tables(params)
    return layout.l2_params(dense, l2_params) + self.ndev * layout.l2_params(tables, l2_params)

  def value_and_grad(self, loss_fn, params):
    # Autodiff through `sharding.lookup` already sums every device's cotangent of a row
    # into its owner's gradient, i.e. ndev x the mean gradient of the ndev-scaled
    # objective: the tables' gradients are divided by ndev instead of all-reduced, the
    # dense layers (made varying, as in the replicated layout) keep the pmean.
    tables, dense = sharding.split_tables(params)  # the tables' rows vary already
    varying = sharding.merge_tables(
      tables, jax.tree.map(lambda x: jax.lax.pcast(x, AXIS, to='varying'), dense)
    )
    out, grads = jax.value_and_grad(loss_fn, has_aux=True)(varying)
    table_grads, dense_grads = sharding.split_tables(grads)
    grads = sharding.merge_tables(
      {k: g / self.ndev for k, g in table_grads.items()}, jax.lax.pmean(dense_grads, AXIS)
    )
    return out, grads

  def embedding_rows_sq(self, params, users, items):
    return sharding.embedding_rows_sq(params, users, items)

  @property
  def data_spec(self) -> P:
    return P(AXIS)

  def device_data(self, dataset) -> data_shards.Split:
    return data_shards.to_devices(dataset, self.mesh, AXIS)

  def abstract_device_data(self, dataset) -> data_shards.Split:
    return data_shards.abstract(dataset, self.mesh, AXIS)

  def local_data(self, data) -> sampling.DeviceData:
    return data.local

  def epoch_slots(self, data, num_neg: int) -> int:
    return data_shards.slots_per_device(data, num_neg)

  def epoch_part(self, data, key, epoch, *, num_neg: int, call, chunk: int, calls: int):
    owned = self.epoch_slots(data, num_neg)  # this device's slots, from its first: d * owned
    index = jax.lax.axis_index(AXIS)
    start = pipeline.shard_start(index, owned, call, chunk, self.ndev * owned + chunk)
    return data_shards.epoch_items(data, key, epoch, num_neg=num_neg, start=start, size=chunk)

  @property
  def epoch_spec(self) -> P:
    return P(AXIS)

  def device_batch(self, data, items, key, epoch, step, *, batch_size, num_neg, start, size):
    return data_shards.device_batch(
      data,
      items,
      key,
      epoch,
      step,
      batch_size=batch_size,
      num_neg=num_neg,
      start=start,
      size=size,
      axis=AXIS,
    )

  def eval_users(self, data, first, size: int, num_users: int):
    users, valid, base = data_shards.eval_users(data, first, size)  # its own users
    return users, valid, base, data.local

  def eval_span(self, data, num_users: int) -> int:
    return data.eval_span  # each device's own users, padded to the most

  def suggestion(self, per_device: int) -> str:
    return (
      f'--config.sharding=sharded splits the tables, their optimizer state, '
      f'the data and the epoch over the {self.ndev} devices: about '
      f'{per_device / 1e9:.2f} GB per device (docs/scale.md).'
    )
