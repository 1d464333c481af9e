"""The compiled programs of a run: state, epoch builder, train/grad/eval steps, on a mesh.

Data parallel over every device of every process: a 1-D `data` mesh, parameters and the
dataset replicated, each device computing its share of the global batch (negatives
included) inside the compiled step and averaging gradients with one explicit `pmean`
(`jax.shard_map`: pmap semantics without `jax.pmap`). With `config.sharding='sharded'`
the embedding tables (`ncf_jax.sharding`), the sampler's data and the epoch
(`ncf_jax.data_shards`) are split over `data` instead, the same batches either way. Everything here is a pure function
of its arguments; the loop that calls them is `ncf_jax.train`.
"""

from flax.training import train_state
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

from ncf_jax import data_shards, dispatch, hashing, models, pipeline, sampling, sharding
from ncf_jax import metrics as metrics_lib
from ncf_jax.errors import UserError

# The mesh axis that the batch is split over.
AXIS = 'data'
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
  config, model, key: jax.Array, mesh: Mesh, abstract: bool = False
) -> TrainState:
  """Initialised TrainState on the mesh (init runs under jit).

  Replicated; or with `config.sharding='sharded'` its embedding tables and their Adam
  moments zero-padded to a multiple of the device count and split by rows over `data`
  (`ncf_jax.sharding`), its `apply_fn` reading them inside shard_map. The real rows have
  the replicated run's initial values. `abstract`: its shapes and shardings only.
  """
  tx = make_optimizer(config)
  sharded = sharding.is_sharded(config)

  def init(key):
    dummy = jnp.zeros((2,), jnp.int32)
    params = model.init({'params': key}, dummy, dummy)['params']
    if sharded:
      params = sharding.pad_tables(params, mesh.size)
    return TrainState.create(
      apply_fn=sharding.ShardedApply(model.apply) if sharded else model.apply,
      params=params,
      tx=tx,
      loss_sum=jnp.zeros((), jnp.float32),
      loss_count=jnp.zeros((), jnp.float32),
      hash_chain=hashing.init(),
      hash_first=hashing.init(),
      bad_step=jnp.full((), -1, jnp.int32),
    )

  shapes = jax.eval_shape(init, key)
  out = (
    sharding.shardings(shapes, mesh)
    if sharded
    else jax.tree.map(lambda _: NamedSharding(mesh, P()), shapes)
  )
  if abstract:
    return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, out
    )
  return jax.jit(init, out_shardings=out)(key)


def state_specs(config, like):
  """The shard_map specs of a TrainState or params tree `like` (abstract or not).

  P() (all replicated) unless `config.sharding='sharded'`: then the tables' by rows.
  """
  return sharding.specs(like) if sharding.is_sharded(config) else P()


def _l2_params_term(params, l2_params: float):
  """`model.l2_params`: the whole-parameter penalty, once per step (not per sample)."""
  if not l2_params:
    return 0.0
  return l2_params * sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(params))


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
  return jax.make_mesh((len(devices),), (AXIS,), (jax.sharding.AxisType.Auto,), devices=devices)


def device_data(config, dataset, mesh: Mesh):
  """The sampler's device form of `dataset` for this run's mode, on `mesh`.

  Replicated on every device (`sampling.to_device`), or with `config.sharding='sharded'`
  split by training positives over `data` (`data_shards.to_devices`).
  """
  if sharding.is_sharded(config):
    return data_shards.to_devices(dataset, mesh, AXIS)
  return sampling.to_device(dataset, NamedSharding(mesh, P()))


def abstract_device_data(config, dataset, mesh: Mesh):
  """`device_data`'s shapes and shardings, without building anything."""
  if sharding.is_sharded(config):
    return data_shards.abstract(dataset, mesh, AXIS)
  return sampling.abstract_device_data(dataset, NamedSharding(mesh, P()))


def make_epoch_items(config, mesh: Mesh, data):
  """The epoch builder: (data, data_key, epoch, in_flight=None) -> every slot's item.

  `data` is `device_data`'s (or its shapes: only its sizes are read). Split data
  (`data_shards.Split`): each device builds only the slots it owns and keeps them; no
  reshard, nothing replicated.

  Each device builds its 1/ndev of the slots in slot order (`pipeline.epoch_items`), in
  calls of `pipeline.EPOCH_CHUNK` slots that write into a donated buffer; one reshard
  then gives every device the whole epoch, which its batches read. Every launch is
  reported to `in_flight` (a `dispatch.InFlight`), so an epoch of many calls stays
  within the CPU client's queue limit. `build.programs` are its jitted functions;
  `build.abstract(data)` is the shape, dtype and sharding of what it returns.
  """
  num_neg = int(config.num_neg)
  split, owned, chunk, calls = _epoch_layout(config, mesh, data)
  per = calls * chunk
  sharded, replicated = NamedSharding(mesh, P(AXIS)), NamedSharding(mesh, P())

  def fill(buf, data, data_key, epoch, call):
    index = jax.lax.axis_index(AXIS)
    if split:  # this device's owned slots, from its first: d * owned
      start = pipeline.shard_start(index, owned, call, chunk, mesh.size * owned + chunk)
      part = data_shards.epoch_items(
        data, data_key, epoch, num_neg=num_neg, start=start, size=chunk
      )
    else:
      start = pipeline.shard_start(index, per, call, chunk, mesh.size * per)
      part = pipeline.epoch_items(data, data_key, epoch, num_neg=num_neg, start=start, size=chunk)
    # part[:1] is a small output that is not donated: what `in_flight` waits on.
    if per <= sampling.INT32_MAX:
      return jax.lax.dynamic_update_slice(buf, part, (call * chunk,)), part[:1]
    # A shard past int32 offsets: update row `call` of its [calls, chunk] view.
    rows = jax.lax.dynamic_update_slice(buf.reshape(calls, chunk), part[None], (call, 0))
    return rows.reshape(-1), part[:1]

  fill = jax.jit(
    jax.shard_map(
      fill,
      mesh=mesh,
      in_specs=(P(AXIS), P(AXIS) if split else P(), P(), P(), P()),
      out_specs=(P(AXIS), P(AXIS)),
    ),
    donate_argnums=0,
  )
  replicate = jax.jit(lambda buf: buf, out_shardings=replicated)
  zeros = jax.jit(
    lambda dtype: jnp.zeros((mesh.size * per,), dtype), static_argnums=0, out_shardings=sharded
  )

  def build(data, data_key, epoch, in_flight: dispatch.InFlight | None = None):
    in_flight = in_flight or dispatch.InFlight(dispatch.in_flight_limit(mesh.devices.flat))
    buf = zeros(np.dtype(_local(data).train_items.dtype))
    for call in range(calls):
      buf, token = fill(buf, data, data_key, epoch, np.int32(call))
      in_flight.add(token)
    items = buf if split else replicate(buf)
    in_flight.add(items)
    return items

  build.programs = (
    (zeros, fill) if split else (zeros, fill, replicate)
  )  # its compiled programs (compile-count tests)
  # What `build` returns, unbuilt (`memory.bytes_per_device` of an epoch before it runs).
  build.abstract = lambda data: epoch_items_shape(config, mesh, data)
  return build


def _epoch_layout(config, mesh: Mesh, data):
  """(split data?, slots a device owns, slots per builder call, calls per epoch)."""
  num_neg = int(config.num_neg)
  split = isinstance(data, data_shards.Split)
  if split:
    owned = data_shards.slots_per_device(data, num_neg)
  else:
    owned = -(-pipeline.epoch_size(data.num_train, num_neg) // mesh.size)
  chunk = min(pipeline.EPOCH_CHUNK, owned)
  return split, owned, chunk, -(-owned // chunk)


def epoch_items_shape(config, mesh: Mesh, data) -> jax.ShapeDtypeStruct:
  """What `make_epoch_items(config, mesh, data)` builds, as a shape with its sharding."""
  split, _, chunk, calls = _epoch_layout(config, mesh, data)
  return jax.ShapeDtypeStruct(
    (mesh.size * calls * chunk,),
    np.dtype(_local(data).train_items.dtype),
    sharding=NamedSharding(mesh, P(AXIS) if split else P()),
  )


def _local(data) -> sampling.DeviceData:
  """The DeviceData of `data` (a Split's is its devices' parts)."""
  return data.local if isinstance(data, data_shards.Split) else data


def _device_batch(
  sharded: bool,
  data,
  items,
  data_key,
  epoch,
  step,
  batch_size: int,
  num_neg: int,
  start,
  local: int,
):
  """This device's `local` samples of global batch `step`, from `start`.

  Read from the whole epoch's `items` (replicated), or with split data from the owners of
  its slots (`data_shards.device_batch`): the same batch either way.
  """
  if sharded:
    return data_shards.device_batch(
      data,
      items,
      data_key,
      epoch,
      step,
      batch_size=batch_size,
      num_neg=num_neg,
      start=start,
      size=local,
      axis=AXIS,
    )
  return pipeline.batch_from_items(
    data,
    items,
    data_key,
    epoch,
    step,
    batch_size=batch_size,
    num_neg=num_neg,
    start=start,
    size=local,
  )


def _make_per_device_grads(config, ndev: int):
  """Per-device body shared by the train step and `make_grad_step`.

  Returns f(params, apply_fn, data, items, keys, epoch, step, global_step) ->
  (grads, local loss sum, global valid count, batch, positions). `grads` is already the
  gradient of the global batch mean of the per-sample loss (BCE plus `model.l2` times the
  sample's embedding rows' sum of squares), plus the `model.l2_params` term, identical on
  every device.

  The explicit `pmean` is the one gradient all-reduce. For it to be right the parameters
  must enter the differentiated function as per-device (varying) values: differentiating
  the replicated parameters directly, shard_map's autodiff would already sum the
  cotangents over `data`, and the pmean would then return ndev x the mean gradient.

  Sharded tables (`config.sharding='sharded'`, `params`' tables this device's rows):
  `data` and `items` are split too (`data_shards`), and autodiff
  through `sharding.lookup` already sums every device's cotangent of a row into its
  owner's gradient, i.e. ndev x the mean gradient of the ndev-scaled objective: the
  tables' gradients are divided by ndev instead of all-reduced (their `l2_params` term is
  weighted by ndev to match), the dense layers keep the pmean.
  """
  sharded = sharding.is_sharded(config)
  batch_size, num_neg = int(config.batch_size), int(config.num_neg)
  local = batch_size // ndev
  l2, l2_params = float(config.model.l2), float(config.model.l2_params)
  use_dropout = float(config.model.dropout) > 0

  def grads_fn(params, apply_fn, data, items, keys, epoch, step, global_step):
    data_key, dropout_key = keys
    start = jax.lax.axis_index(AXIS) * local
    batch = _device_batch(
      sharded, data, items, data_key, epoch, step, batch_size, num_neg, start, local
    )
    position = start + jnp.arange(local, dtype=jnp.uint32)  # global, within the batch
    n_valid = jax.lax.psum(jnp.sum(batch['valid'], dtype=jnp.float32), AXIS)

    def logits_fn(p):
      if not use_dropout:
        return apply_fn({'params': p}, batch['user'], batch['item'])
      # One dropout key per sample, from (global step, position in the global batch):
      # the masks do not depend on how the batch is split over devices.
      step_key = jax.random.fold_in(dropout_key, global_step)
      sample_keys = jax.vmap(jax.random.fold_in, (None, 0))(step_key, position)

      def one(u, i, k):
        return apply_fn({'params': p}, u[None], i[None], deterministic=False, rngs={'dropout': k})[
          0
        ]

      return jax.vmap(one)(batch['user'], batch['item'], sample_keys)

    def loss_fn(p):
      local_sum = metrics_lib.bce_sum(logits_fn(p), batch['label'], batch['valid'])
      objective = local_sum
      if l2:  # per sample, so scaled like the loss: the mean over the global batch
        rows_sq = sharding.embedding_rows_sq if sharded else models.embedding_rows_sq
        rows = rows_sq(p, batch['user'], batch['item'])
        objective = objective + l2 * jnp.sum(jnp.where(batch['valid'], rows, 0.0))
      if sharded:
        tables, dense = sharding.split_tables(p)
        reg = _l2_params_term(dense, l2_params) + ndev * _l2_params_term(tables, l2_params)
      else:
        reg = _l2_params_term(p, l2_params)
      # Scaled so that the pmean of the gradients is that of the global batch mean, even
      # with padded shards.
      return objective * ndev / jnp.maximum(n_valid, 1.0) + reg, local_sum

    if not sharded:
      varying = jax.tree.map(lambda x: jax.lax.pcast(x, AXIS, to='varying'), params)
      (_, local_sum), grads = jax.value_and_grad(loss_fn, has_aux=True)(varying)
      grads = jax.lax.pmean(grads, AXIS)
      return grads, local_sum, n_valid, batch, position
    tables, dense = sharding.split_tables(params)  # the tables' rows vary already
    varying = sharding.merge_tables(
      tables, jax.tree.map(lambda x: jax.lax.pcast(x, AXIS, to='varying'), dense)
    )
    (_, local_sum), grads = jax.value_and_grad(loss_fn, has_aux=True)(varying)
    table_grads, dense_grads = sharding.split_tables(grads)
    grads = sharding.merge_tables(
      {k: g / ndev for k, g in table_grads.items()}, jax.lax.pmean(dense_grads, AXIS)
    )
    return grads, local_sum, n_valid, batch, position

  return grads_fn


def _data_specs(config):
  """shard_map specs of (data, items): split over `data` when sharded, else replicated."""
  return (P(AXIS), P(AXIS)) if sharding.is_sharded(config) else (P(), P())


def make_grad_step(config, mesh: Mesh, apply_fn, like=None):
  """Compiled (params, data, items, keys, epoch, step, global_step) -> gradients.

  The gradients that the train step applies, for tests and diagnostics: they must equal
  the gradient of the global batch mean whatever the device count. `like`: the params
  (or their shapes), needed with sharded tables, whose gradients come back sharded.
  """
  grads_fn = _make_per_device_grads(config, mesh.size)
  specs = state_specs(config, like)

  def per_device(params, data, items, keys, epoch, step, global_step):
    return grads_fn(params, apply_fn, data, items, keys, epoch, step, global_step)[0]

  return jax.jit(
    jax.shard_map(
      per_device, mesh=mesh, in_specs=(specs, *_data_specs(config)) + (P(),) * 4, out_specs=specs
    )
  )


def _hash_update(state_chain, state_first, batch, position, step):
  """(chain, first) after folding in this batch's digest; the chain restarts at step 0."""
  first = step == 0
  chain = hashing.chain(
    jnp.where(first, hashing.init(), state_chain), hashing.batch_digest(batch, position, AXIS)
  )
  return chain, jnp.where(first, chain, state_first)


def make_train_step(config, mesh: Mesh, num_steps: int = 1, like=None):
  """The compiled global train step: (state, data, items, keys, epoch, step) -> (state, out).

  `items` is the epoch's `make_epoch_items` output and `keys` is (data_key, dropout_key).
  `step` is the batch number within `epoch`; the batch is generated on device, identical
  to `pipeline.train_batch(data, data_key, epoch, step)`. With `num_steps` k > 1 one call
  runs batches step .. step + k - 1 in a `lax.fori_loop` over the same step body (the
  caller keeps step + k <= steps per epoch): the same updates as k calls, without k
  launches from Python (`config.steps_per_call`). `out` holds the last batch's
  `train_loss` (a small output that is not donated: the loop waits on it to bound the
  launches in flight). `like`: the TrainState (or its shapes), needed with sharded
  tables; then `data` and `items` are split over `data` (`data_shards`).
  """
  use_hash = bool(config.hash_pipeline)
  grads_fn = _make_per_device_grads(config, mesh.size)
  num_steps = int(num_steps)

  def one_step(state: TrainState, data, items, keys, epoch, step):
    grads, local_sum, n_valid, batch, position = grads_fn(
      state.params, state.apply_fn, data, items, keys, epoch, step, state.step
    )
    loss_sum = jax.lax.psum(local_sum, AXIS)
    new = state.apply_gradients(grads=grads)
    first = step == 0
    finite = jnp.isfinite(loss_sum)
    updates = dict(
      loss_sum=jnp.where(first, 0.0, state.loss_sum) + loss_sum,
      loss_count=jnp.where(first, 0.0, state.loss_count) + n_valid,
      bad_step=jnp.where((state.bad_step < 0) & ~finite, state.step, state.bad_step),
    )
    if use_hash:
      updates['hash_chain'], updates['hash_first'] = _hash_update(
        state.hash_chain, state.hash_first, batch, position, step
      )
    loss = loss_sum / jnp.maximum(n_valid, 1.0)
    return new.replace(**updates), loss.astype(jnp.float32)  # the fori_loop carry's dtype

  def per_device(state: TrainState, data, items, keys, epoch, step):
    if num_steps == 1:
      state, loss = one_step(state, data, items, keys, epoch, step)
    else:

      def body(i, carry):
        return one_step(carry[0], data, items, keys, epoch, step + i)

      state, loss = jax.lax.fori_loop(0, num_steps, body, (state, jnp.zeros((), jnp.float32)))
    return state, {'train_loss': loss}

  specs = state_specs(config, like)
  step = jax.shard_map(
    per_device,
    mesh=mesh,
    in_specs=(specs, *_data_specs(config), P(), P(), P()),
    out_specs=(specs, P()),
  )
  return jax.jit(step, donate_argnums=(0,))


def make_hash_replay(config, mesh: Mesh):
  """Compiled (chain, first, data, items, data_key, epoch, step) -> (chain, first).

  The train step's digest update alone: a resume that turns `hash_pipeline` on mid-epoch
  replays the epoch's earlier batches through it (batches are pure functions of the
  epoch and step), so its digests cover the whole epoch like an uninterrupted run's.
  With sharded tables `data` and `items` are split, as in the train step.
  """
  batch_size, num_neg = int(config.batch_size), int(config.num_neg)
  local = batch_size // mesh.size
  sharded = sharding.is_sharded(config)

  def per_device(chain, first, data, items, data_key, epoch, step):
    start = jax.lax.axis_index(AXIS) * local
    batch = _device_batch(
      sharded, data, items, data_key, epoch, step, batch_size, num_neg, start, local
    )
    return _hash_update(chain, first, batch, start + jnp.arange(local, dtype=jnp.uint32), step)

  return jax.jit(
    jax.shard_map(
      per_device,
      mesh=mesh,
      in_specs=(P(), P(), *_data_specs(config), P(), P(), P()),
      out_specs=(P(), P()),
    )
  )


def make_eval_step(config, mesh: Mesh, model, num_users: int, num_items: int, split: str = 'test'):
  """Compiled eval of `split` for users [first, first + eval_batch_size): sums, counts, digest.

  `split` is 'test' or 'valid' (`pipeline.SPLITS`); each has its own candidates
  (`pipeline.eval_batch`). With sharded tables (`config.sharding`) the params' tables
  are split by rows (padded to this mesh; another layout is resharded on the way in),
  every score's rows are looked up across devices, and each device evaluates the users
  of its part of the data (`data_shards.eval_users`).
  """
  ndev = mesh.size
  sharded = sharding.is_sharded(config)
  apply = sharding.ShardedApply(model.apply) if sharded else model.apply
  specs = P()
  if sharded:
    specs = sharding.specs(sharding.model_shapes(model))
  local = int(config.eval_batch_size) // ndev
  num_neg, top_k = int(config.eval_num_neg), int(config.top_k)
  match_mlperf = bool(config.match_mlperf)
  full = bool(config.eval_full_ranking)
  chunk = int(config.full_ranking_chunk)

  def per_device(params, data, data_key, first):
    if sharded:  # this device's own users, on its part of the data
      users, valid, base = data_shards.eval_users(data, first, local)
      data = data.local
    else:
      users = first + jax.lax.axis_index(AXIS) * local + jnp.arange(local, dtype=jnp.int32)
      valid = users < num_users
      users, base = jnp.where(valid, users, 0), 0
    items, mask = pipeline.eval_batch(
      data, data_key, users, num_neg=num_neg, match_mlperf=match_mlperf, split=split, user_base=base
    )
    scores = apply({'params': params}, jnp.broadcast_to(users[:, None], items.shape), items)
    out = metrics_lib.ranking_sums(metrics_lib.positive_rank(scores, mask), valid, top_k)
    cols = 1 + num_neg
    position = users[:, None].astype(jnp.uint32) * jnp.uint32(cols) + jnp.arange(
      cols, dtype=jnp.uint32
    )
    out['digest'] = hashing.array_digest(items, position, mask=valid[:, None])
    if full:
      positive, excluded = pipeline.held_out(data, users - base, split)
      rank = full_rank(model, params, data, users, positive, excluded, chunk, apply, base)
      fsums = metrics_lib.ranking_sums(rank, valid, top_k)
      out.update({f'full_{k}': v for k, v in fsums.items() if k != 'count'})
      out['full_recall_sum'] = metrics_lib.recall_sum(
        rank[:, None], jnp.ones((local, 1), bool), valid, top_k
      )
    return jax.tree.map(lambda x: jax.lax.psum(x, AXIS), out)

  step = jax.shard_map(
    per_device, mesh=mesh, in_specs=(specs, _data_specs(config)[0], P(), P()), out_specs=P()
  )
  return jax.jit(step)


def full_rank(
  model,
  params,
  data: sampling.DeviceData,
  users,
  positive,
  excluded,
  chunk: int,
  apply_fn=None,
  user_base=0,
):
  """Rank of each user's `positive` item among all items that are candidates for it.

  Candidates are every item but the user's training positives and the `excluded`
  held-out items (`pipeline.held_out`, the positive among them); ties count against the
  positive. Items are scored `chunk` at a time (users x chunk pairs in memory, not
  users x num_items), and the count does not depend on `chunk`. `apply_fn`: how to score
  (default `model.apply`; sharded tables pass their own). `data` may hold users
  [user_base, ...) only (`data_shards`).
  """
  apply_fn = model.apply if apply_fn is None else apply_fn
  num_items = data.num_items
  b = users.shape[0]
  s_pos = apply_fn({'params': params}, users, positive)
  n_chunks = -(-num_items // chunk)

  def body(c, above):
    items = c * chunk + jnp.arange(chunk, dtype=jnp.int32)
    inside = items < num_items
    items = jnp.minimum(items, num_items - 1)
    grid_u = jnp.broadcast_to(users[:, None], (b, chunk))
    grid_i = jnp.broadcast_to(items[None, :], (b, chunk))
    scores = apply_fn({'params': params}, grid_u, grid_i)
    _, is_pos = sampling.rank_positives(data, grid_u - user_base, grid_i)
    competes = inside[None, :] & ~is_pos
    for item in excluded:
      competes &= grid_i != item[:, None]
    return above + jnp.sum(competes & (scores >= s_pos[:, None]), axis=1, dtype=jnp.int32)

  # zeros_like(users): the count varies over the mesh like the users (inside shard_map).
  return jax.lax.fori_loop(0, n_chunks, body, jnp.zeros_like(users, jnp.int32))


def evaluate(
  eval_step,
  params,
  data,
  data_key,
  num_users: int,
  eval_batch_size: int,
  in_flight: dispatch.InFlight | None = None,
):
  """Runs all eval batches; returns host floats: hr, ndcg, mrr (+ full_*) and the digest.

  Launches are reported to `in_flight` (default: the bound for `params`' devices).
  """
  if in_flight is None:
    devices = jax.tree.leaves(params)[0].sharding.device_set
    in_flight = dispatch.InFlight(dispatch.in_flight_limit(list(devices)))
  totals = None
  if isinstance(data, data_shards.Split):  # each device's own users, padded to the most
    num_users = data.eval_span
  for first in range(0, num_users, eval_batch_size):
    out = eval_step(params, data, data_key, np.int32(first))
    in_flight.add(out['count'])
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    in_flight.add(totals['count'])
  # Digests are sums over (user, column) positions: independent of the eval batch size.
  chain = hashing.chain(hashing.init(), totals.pop('digest'))
  totals = {k: float(v) for k, v in jax.device_get(totals).items()}
  count = totals.pop('count')
  result = {k[: -len('_sum')]: v / count for k, v in totals.items()}
  return result, hashing.hexdigest(chain)


def params_hash(params, mesh: Mesh, model) -> str:
  """Hex digest of the parameters' bytes (once per run; collective: every process calls it).

  Tables are cut to `model`'s rows, so a sharded run's padding does not count.
  """
  import hashlib

  h = hashlib.sha256()
  host = sharding.unpadded(
    jax.device_get(sharding.gathered(params, mesh)), sharding.model_shapes(model)
  )
  for leaf in jax.tree.leaves(host):
    h.update(np.ascontiguousarray(leaf).tobytes())
  return h.hexdigest()[:16]
