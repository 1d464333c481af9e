"""How a run lays its state, data and epoch out over the `data` mesh axis: one interface.

`config.sharding` picks one of two implementations, once, in `make_layout`:
`parallel.Replicated` (data parallel: parameters, the sampler's data and the epoch on every
device) and `parallel.Sharded` (the embedding tables, the sampler's data and the epoch split
by rows over `data`). The compiled programs (`ncf_jax.steps`) take the layout and ask it
every question whose answer depends on the mode; no other module reads `config.sharding`.
Both give the same batches, so the same `[pipeline_hash]` lines, on any device count.
"""

import abc
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ncf_jax import sampling, sharding

# The mesh axis that the batch (and, sharded, the tables and data) is split over.
AXIS = 'data'


def l2_params(params, l2_params: float):
  """`model.l2_params`' whole-parameter penalty of `params`, once per step (not per sample)."""
  if not l2_params:
    return 0.0
  return l2_params * sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(params))


class Layout(abc.ABC):
  """One mode of laying a run out over `mesh` (1-D, axis `AXIS`).

  Methods marked "inside shard_map" run per device in the compiled programs; the others
  on the host. `mode` is the `config.sharding` value that selects it.
  """

  mode: ClassVar[str]

  def __init__(self, mesh: Mesh):
    self.mesh = mesh

  def __repr__(self) -> str:
    return f'{type(self).__name__}({self.mesh.size} devices)'

  @property
  def ndev(self) -> int:
    return self.mesh.size

  @property
  def local_devices(self) -> list:
    """The mesh's devices of this process (what the memory check measures)."""
    return [d for d in self.mesh.devices.flat if d.process_index == jax.process_index()]

  # -- Config. ---------------------------------------------------------------------------

  @classmethod
  def check_config(cls, config, bad) -> None:
    """Calls `bad(field, value, why)` for a config this mode cannot run (none by default)."""
    del config, bad  # no constraint by default

  def model_config(self, model_config):
    """`config.model` as this mode builds it (unchanged by default)."""
    return model_config

  # -- Parameters and the train state. ---------------------------------------------------

  @abc.abstractmethod
  def init_params(self, params):
    """Freshly initialised params as this layout stores them (inside jit)."""

  @abc.abstractmethod
  def apply_fn(self, apply: Callable) -> Callable:
    """The model's `apply` for params in this layout (inside shard_map)."""

  @abc.abstractmethod
  def state_specs(self, like) -> Any:
    """shard_map specs of a TrainState or params tree `like` (its shapes suffice)."""

  def shardings(self, tree) -> Any:
    """NamedShardings of `tree` (a TrainState or params, or their shapes) on the mesh."""
    specs = self.state_specs(tree)
    if isinstance(specs, P):
      return jax.tree.map(lambda _: NamedSharding(self.mesh, specs), tree)
    return jax.tree.map(lambda s: NamedSharding(self.mesh, s), specs)

  def gather(self, tree):
    """`tree` whole on every device (collective: every process calls it), so that each
    process can read it (a table split over other hosts' devices)."""
    return sharding.gathered(tree, self.mesh)

  def place_params(self, params, like):
    """Host `params` on the mesh in this layout; their tables' rows first padded or cut
    to `like`'s (this run's params, e.g. from `gather`), e.g. a checkpoint of the other
    layout or device count. Mismatched shapes raise ValueError or TypeError."""
    params = jax.tree.map(sharding.fit_rows, params, like)
    return jax.device_put(params, self.shardings(params))

  @abc.abstractmethod
  def l2_params_term(self, params, l2_params: float):
    """`model.l2_params`' penalty of this device's `params` (inside shard_map), such that
    `value_and_grad` turns it into the whole parameters' gradient."""

  @abc.abstractmethod
  def value_and_grad(self, loss_fn: Callable, params):
    """((loss, aux), grads) of `loss_fn(params)` (inside shard_map), with the gradients
    reduced over the devices: the gradient of the sum of every device's `loss_fn` / ndev
    (see `steps.train_step`)."""

  @abc.abstractmethod
  def embedding_rows_sq(self, params, users: jax.Array, items: jax.Array) -> jax.Array:
    """Per sample, the sum of squares of its user and item rows (inside shard_map)."""

  # -- The sampler's data and the epoch. -------------------------------------------------

  @property
  @abc.abstractmethod
  def data_spec(self) -> P:
    """shard_map spec of the device data and of the epoch's items in the steps."""

  @abc.abstractmethod
  def device_data(self, dataset):
    """The sampler's device form of `dataset`, on the mesh."""

  @abc.abstractmethod
  def abstract_device_data(self, dataset):
    """`device_data`'s shapes and shardings, without building anything."""

  @abc.abstractmethod
  def local_data(self, data) -> sampling.DeviceData:
    """The DeviceData of `data` (what its dtypes and sizes are read from)."""

  @abc.abstractmethod
  def epoch_slots(self, data, num_neg: int) -> int:
    """Epoch slots that each device builds (`steps.make_epoch_items`)."""

  @abc.abstractmethod
  def epoch_part(self, data, key, epoch, *, num_neg: int, call, chunk: int, calls: int):
    """Inside shard_map: the items of this device's `chunk` slots of builder call `call`."""

  @property
  @abc.abstractmethod
  def epoch_spec(self) -> P:
    """Partition of the built epoch's items: P() when every device holds them all."""

  @abc.abstractmethod
  def device_batch(
    self, data, items, key, epoch, step, *, batch_size: int, num_neg: int, start, size: int
  ) -> dict[str, jax.Array]:
    """Inside shard_map: this device's `size` samples of global batch `step`, from
    `start`; the same values as `pipeline.train_batch` on the whole dataset."""

  # -- Evaluation. -----------------------------------------------------------------------

  @abc.abstractmethod
  def eval_users(self, data, first, size: int, num_users: int):
    """Inside shard_map: (users, valid, user_base, data) of eval call `first`: this
    device's `size` users, and the DeviceData holding them from user `user_base`."""

  @abc.abstractmethod
  def eval_span(self, data, num_users: int) -> int:
    """Users that one pass of the host eval loop (`steps.evaluate`) covers."""

  # -- Memory. ---------------------------------------------------------------------------

  def alternative(self) -> 'Layout | None':
    """The layout to suggest when this one does not fit in memory (none by default)."""
    return None

  def suggestion(self, per_device: int) -> str:
    """The hint that names this layout as the way out, at `per_device` bytes a device."""
    return ''
