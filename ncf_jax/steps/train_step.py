"""The compiled train step, its gradients alone (`make_grad_step`), and the digest replay.

Data parallel over every device of every process: each device computes its share of the
global batch (negatives included) inside the compiled step (`jax.shard_map`: pmap
semantics without `jax.pmap`), its layout (`ncf_jax.parallel`) reading the samples and the
table rows and reducing the gradients.
"""

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from ncf_jax import hashing, parallel
from ncf_jax import metrics as metrics_lib
from ncf_jax.parallel import AXIS
from ncf_jax.steps.state import TrainState


def _device_share(layout: parallel.Layout, data, items, key, epoch, step, batch_size, num_neg):
  """(this device's samples of global batch `step`, their positions within the batch).

  Called per device inside shard_map: device d holds samples [d * local, (d + 1) * local).
  """
  local = batch_size // layout.ndev
  start = jax.lax.axis_index(AXIS) * local
  batch = layout.device_batch(
    data, items, key, epoch, step, batch_size=batch_size, num_neg=num_neg, start=start,
    size=local,
  )  # fmt: skip
  return batch, start + jnp.arange(local, dtype=jnp.uint32)


def _make_per_device_grads(config, layout: parallel.Layout):
  """Per-device body shared by the train step and `make_grad_step`.

  Returns f(params, apply_fn, data, items, keys, epoch, step, global_step) ->
  (grads, local loss sum, global valid count, batch, positions). `grads` is already the
  gradient of the global batch mean of the per-sample loss (BCE plus `model.l2` times the
  sample's embedding rows' sum of squares), plus the `model.l2_params` term, identical on
  every device (for sharded tables: of this device's rows). Each device's objective is
  scaled by ndev, so that the layout's reduction (`Layout.value_and_grad`: a `pmean`, the
  one gradient all-reduce, or for row-sharded tables a division by ndev of the rows'
  summed cotangents) gives the global mean's gradient.
  """
  ndev = layout.ndev
  batch_size, num_neg = int(config.batch_size), int(config.num_neg)
  l2, l2_params = float(config.model.l2), float(config.model.l2_params)
  use_dropout = float(config.model.dropout) > 0

  def grads_fn(params, apply_fn, data, items, keys, epoch, step, global_step):
    data_key, dropout_key = keys
    batch, position = _device_share(layout, data, items, data_key, epoch, step, batch_size, num_neg)
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
        rows = layout.embedding_rows_sq(p, batch['user'], batch['item'])
        objective = objective + l2 * jnp.sum(jnp.where(batch['valid'], rows, 0.0))
      reg = layout.l2_params_term(p, l2_params)
      # Scaled so that the reduced gradients are those of the global batch mean, even
      # with padded shards.
      return objective * ndev / jnp.maximum(n_valid, 1.0) + reg, local_sum

    (_, local_sum), grads = layout.value_and_grad(loss_fn, params)
    return grads, local_sum, n_valid, batch, position

  return grads_fn


def make_grad_step(config, layout: parallel.Layout | Mesh, apply_fn, like=None):
  """Compiled (params, data, items, keys, epoch, step, global_step) -> gradients.

  The gradients that the train step applies, for tests and diagnostics: they must equal
  the gradient of the global batch mean whatever the device count. `like`: the params
  (or their shapes), needed with sharded tables, whose gradients come back sharded.
  """
  layout = parallel.as_layout(config, layout)
  grads_fn = _make_per_device_grads(config, layout)
  specs = layout.state_specs(like)

  def per_device(params, data, items, keys, epoch, step, global_step):
    return grads_fn(params, apply_fn, data, items, keys, epoch, step, global_step)[0]

  data_spec = layout.data_spec
  return jax.jit(
    jax.shard_map(
      per_device,
      mesh=layout.mesh,
      in_specs=(specs, data_spec, data_spec) + (P(),) * 4,
      out_specs=specs,
    )
  )


def _hash_update(state_chain, state_first, batch, position, step):
  """(chain, first) after folding in this batch's digest; the chain restarts at step 0."""
  first = step == 0
  chain = hashing.chain(
    jnp.where(first, hashing.init(), state_chain), hashing.batch_digest(batch, position, AXIS)
  )
  return chain, jnp.where(first, chain, state_first)


def make_train_step(config, layout: parallel.Layout | Mesh, num_steps: int = 1, like=None):
  """The compiled global train step: (state, data, items, keys, epoch, step) -> (state, out).

  `items` is the epoch's `make_epoch_items` output and `keys` is (data_key, dropout_key).
  `step` is the batch number within `epoch`; the batch is generated on device, identical
  to `pipeline.train_batch(data, data_key, epoch, step)`. With `num_steps` k > 1 one call
  runs batches step .. step + k - 1 in a `lax.fori_loop` over the same step body (the
  caller keeps step + k <= steps per epoch): the same updates as k calls, without k
  launches from Python (`config.steps_per_call`). `out` holds the last batch's
  `train_loss` (a small output that is not donated: the loop waits on it to bound the
  launches in flight). `layout`: the run's (a Mesh: `parallel.make_layout(config, mesh)`).
  `like`: the TrainState (or its shapes), needed with sharded tables.
  """
  layout = parallel.as_layout(config, layout)
  use_hash = bool(config.hash_pipeline)
  grads_fn = _make_per_device_grads(config, layout)
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

  specs = layout.state_specs(like)
  step = jax.shard_map(
    per_device,
    mesh=layout.mesh,
    in_specs=(specs, layout.data_spec, layout.data_spec, P(), P(), P()),
    out_specs=(specs, P()),
  )
  return jax.jit(step, donate_argnums=(0,))


def make_hash_replay(config, layout: parallel.Layout | Mesh):
  """Compiled (chain, first, data, items, data_key, epoch, step) -> (chain, first).

  The train step's digest update alone: a resume that turns `hash_pipeline` on mid-epoch
  replays the epoch's earlier batches through it (batches are pure functions of the
  epoch and step), so its digests cover the whole epoch like an uninterrupted run's.
  `data` and `items` are laid out as in the train step.
  """
  layout = parallel.as_layout(config, layout)
  batch_size, num_neg = int(config.batch_size), int(config.num_neg)

  def per_device(chain, first, data, items, data_key, epoch, step):
    batch, position = _device_share(layout, data, items, data_key, epoch, step, batch_size, num_neg)
    return _hash_update(chain, first, batch, position, step)

  data_spec = layout.data_spec
  return jax.jit(
    jax.shard_map(
      per_device,
      mesh=layout.mesh,
      in_specs=(P(), P(), data_spec, data_spec, P(), P(), P()),
      out_specs=(P(), P()),
    )
  )
