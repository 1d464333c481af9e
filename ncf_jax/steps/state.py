"""The train state and what a run starts from: mesh, keys, optimizer, initial parameters."""

from flax.training import train_state
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import optax

from ncf_jax import hashing, parallel
from ncf_jax.errors import UserError

# Values of config.optimizer.
OPTIMIZERS = ('adam', 'sgd')


class TrainState(train_state.TrainState):
  """Parameters, Adam state, global step, and the running epoch's accumulators.

  The accumulators live in the state so that a run stopped mid-epoch and resumed logs the
  same epoch loss and pipeline hashes as an uninterrupted one.
  """

  loss_sum: jax.Array  # float32: sum of per-sample BCE this epoch
  loss_count: jax.Array  # float32: valid samples this epoch
  hash_chain: jax.Array  # uint32[2]: chained batch digests this epoch
  hash_first: jax.Array  # uint32[2]: digest chain after the epoch's first batch
  bad_step: jax.Array  # int32: first global step with a non-finite loss, or -1


def make_optimizer(config) -> optax.GradientTransformation:
  """Adam (the MLPerf rules' optimizer) or plain SGD, at `config.learning_rate`."""
  if config.optimizer == 'sgd':
    return optax.sgd(float(config.learning_rate))
  return optax.adam(
    float(config.learning_rate),
    b1=float(config.beta1),
    b2=float(config.beta2),
    eps=float(config.eps),
  )


def create_train_state(
  config, model, key: jax.Array, layout: parallel.Layout | Mesh, abstract: bool = False
) -> TrainState:
  """Initialised TrainState in `layout` (init runs under jit).

  Replicated; or, sharded, its embedding tables and their Adam moments zero-padded to a
  multiple of the device count and split by rows over `data` (`ncf_jax.sharding`), its
  `apply_fn` reading them inside shard_map. The real rows have the replicated run's
  initial values. `layout`: the run's (a Mesh: `parallel.make_layout(config, mesh)`).
  `abstract`: its shapes and shardings only.
  """
  layout = parallel.as_layout(config, layout)
  tx = make_optimizer(config)

  def init(key):
    dummy = jnp.zeros((2,), jnp.int32)
    params = layout.init_params(model.init({'params': key}, dummy, dummy)['params'])
    return TrainState.create(
      apply_fn=layout.apply_fn(model.apply),
      params=params,
      tx=tx,
      loss_sum=jnp.zeros((), jnp.float32),
      loss_count=jnp.zeros((), jnp.float32),
      hash_chain=hashing.init(),
      hash_first=hashing.init(),
      bad_step=jnp.full((), -1, jnp.int32),
    )

  shapes = jax.eval_shape(init, key)
  out = layout.shardings(shapes)
  if abstract:
    return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, out
    )
  return jax.jit(init, out_shardings=out)(key)


def make_keys(seed: int, mesh: Mesh):
  """(init_key, data_key, dropout_key) from the seed, replicated over the mesh."""

  def keys():
    return tuple(jax.random.split(jax.random.key(seed, impl='threefry2x32'), 3))

  return jax.jit(keys, out_shardings=NamedSharding(mesh, P()))()


def make_mesh(num_devices: int = 0) -> Mesh:
  """1-D `data` mesh over every device (0) or the first `num_devices` (one process).

  `jax.make_mesh` orders the devices by the physical topology (on TPU slices, neighbours
  on the interconnect are neighbours in the mesh). Samples are keyed by global position,
  not by device, so the order changes no batch.
  """
  devices = jax.devices()
  if num_devices:
    if jax.process_count() > 1 or not 0 < num_devices <= len(devices):
      raise UserError(
        f'config.num_devices={num_devices} is invalid: use 0 (all) or 1..'
        f'{len(devices)} in a single-process run.'
      )
    devices = devices[:num_devices]
  return jax.make_mesh(
    (len(devices),), (parallel.AXIS,), (jax.sharding.AxisType.Auto,), devices=devices
  )
