"""Training and evaluation loop; `python -m ncf_jax.train --config=configs/<name>.py`.

The logic lives in `train_and_evaluate(config, workdir)` so that tests, sweeps and the
Colab notebook call it directly; `main` only parses flags, sets up multi-host JAX and
turns user errors into one message.

Data parallel over every device of every process: a 1-D `data` mesh, parameters and the
dataset replicated, each device computing its share of the global batch (negatives
included) inside the compiled step and averaging gradients with an explicit `pmean`.
"""
import os
import signal
import tempfile
import time
from typing import Optional

from absl import app
from absl import flags
from absl import logging
from flax.training import train_state
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
import optax

from ncf_jax import checkpoint as ckpt_lib
from ncf_jax import data as data_lib
from ncf_jax import dispatch
from ncf_jax import hashing
from ncf_jax import metrics as metrics_lib
from ncf_jax import models
from ncf_jax import pipeline
from ncf_jax import sampling
from ncf_jax import writers
from ncf_jax.errors import UserError, exit_on_user_error, parse_flags

AXIS = 'data'
OPTIMIZERS = ('adam', 'sgd')
SELECT_METRICS = ('hr', 'ndcg')


class TrainState(train_state.TrainState):
  """Parameters, Adam state, global step, and the running epoch's accumulators.

  The accumulators live in the state so that a run stopped mid-epoch and resumed logs the
  same epoch loss and pipeline hashes as an uninterrupted one.
  """
  loss_sum: jax.Array     # float32: sum of per-sample BCE this epoch
  loss_count: jax.Array   # float32: valid samples this epoch
  hash_chain: jax.Array   # uint32[2]: chained batch digests this epoch
  hash_first: jax.Array   # uint32[2]: digest chain after the epoch's first batch
  bad_step: jax.Array     # int32: first global step with a non-finite loss, or -1


# ----------------------------------------------------------------------------------------
# Config checks: before any expensive work.

def validate_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Raises UserError naming the field, its value and the allowed range."""
  def bad(field, value, allowed):
    raise UserError(f'config.{field}={value!r} is invalid: {allowed}.')
  if config.model.name not in models.MODEL_NAMES:
    bad('model.name', config.model.name, f'use one of {", ".join(models.MODEL_NAMES)}')
  if int(config.batch_size) <= 0 or int(config.batch_size) % num_devices:
    bad('batch_size', config.batch_size,
        f'it must be a positive multiple of the global device count ({num_devices})')
  if int(config.eval_batch_size) <= 0 or int(config.eval_batch_size) % num_devices:
    bad('eval_batch_size', config.eval_batch_size,
        f'it must be a positive multiple of the global device count ({num_devices})')
  if int(config.num_neg) < 1:
    bad('num_neg', config.num_neg, 'it must be >= 1')
  if int(config.eval_num_neg) < 1:
    bad('eval_num_neg', config.eval_num_neg, 'it must be >= 1')
  if not 1 <= int(config.top_k) <= int(config.eval_num_neg) + 1:
    bad('top_k', config.top_k,
        f'it must be in [1, eval_num_neg + 1 = {int(config.eval_num_neg) + 1}]')
  if config.optimizer not in OPTIMIZERS:
    bad('optimizer', config.optimizer, f'use one of {", ".join(OPTIMIZERS)}')
  if not float(config.learning_rate) > 0:
    bad('learning_rate', config.learning_rate, 'it must be > 0')
  for f in ('beta1', 'beta2'):
    if not 0 <= float(config[f]) < 1:
      bad(f, config[f], 'it must be in [0, 1)')
  if not float(config.eps) >= 0:
    bad('eps', config.eps, 'it must be >= 0')
  if int(config.num_epochs) < 1:
    bad('num_epochs', config.num_epochs, 'it must be >= 1')
  if config.dtype not in ('float32', 'bfloat16'):
    bad('dtype', config.dtype, "use 'float32' or 'bfloat16'")
  layers = tuple(config.model.mlp_layers)
  if config.model.name in ('neumf', 'mlp') and (
      len(layers) < 1 or layers[0] % 2 or min(layers) < 1):
    bad('model.mlp_layers', layers, 'positive widths; the first (user+item) must be even')
  if int(config.model.mf_dim) < 1:
    bad('model.mf_dim', config.model.mf_dim, 'it must be >= 1')
  if not 0 <= float(config.model.dropout) < 1:
    bad('model.dropout', config.model.dropout, 'it must be in [0, 1)')
  for f in ('l2', 'l2_params'):
    if not float(config.model[f]) >= 0:
      bad(f'model.{f}', config.model[f], 'it must be >= 0')
  if not float(config.model.embed_init_std) > 0:
    bad('model.embed_init_std', config.model.embed_init_std, 'it must be > 0')
  if config.hr_threshold is not None and not 0 < float(config.hr_threshold) <= 1:
    bad('hr_threshold', config.hr_threshold, 'it must be in (0, 1] or None')
  if config.validation not in data_lib.VALIDATIONS:
    bad('validation', config.validation, f'use one of {", ".join(data_lib.VALIDATIONS)}')
  if config.select_metric not in SELECT_METRICS:
    bad('select_metric', config.select_metric, f'use one of {", ".join(SELECT_METRICS)}')
  if int(config.early_stop_patience) < 0:
    bad('early_stop_patience', config.early_stop_patience, 'it must be >= 0 (0: no early '
        'stopping)')
  if int(config.full_ranking_chunk) < 1:
    bad('full_ranking_chunk', config.full_ranking_chunk, 'it must be >= 1')
  if config.validation == 'none':
    if int(config.early_stop_patience):
      bad('early_stop_patience', config.early_stop_patience, 'early stopping reads the '
          'validation split: set config.validation=leave_one_out, or use 0')
  else:
    if config.hr_threshold is not None:
      bad('hr_threshold', config.hr_threshold, 'it stops on the test HR, which a run with a '
          'validation split reads only once, at the end: use None (stop with '
          'early_stop_patience)')
    if config.match_mlperf:
      bad('match_mlperf', config.match_mlperf, 'the MLPerf reference has no validation '
          'split: use False with validation=leave_one_out')
  for f in ('eval_every_epochs', 'keep_checkpoints'):
    if int(config[f]) < 1:
      bad(f, config[f], 'it must be >= 1')
  if not float(config.stall_timeout_s) >= 0:
    bad('stall_timeout_s', config.stall_timeout_s, 'it must be >= 0 (0 disables it)')
  for f in ('log_every_steps', 'checkpoint_every_epochs'):
    if int(config[f]) < 0:
      bad(f, config[f], 'it must be >= 0')


def validate_against_data(config, dataset: data_lib.Dataset) -> None:
  """Checks that need the dataset: enough candidate items for every user."""
  degrees = dataset.user_degrees()
  worst = int(degrees.max()) if degrees.size else 0
  held = 0 if config.match_mlperf else 1 + (dataset.valid_items is not None)
  candidates = dataset.num_items - worst - held
  if int(config.eval_num_neg) > candidates:
    raise UserError(
        f'config.eval_num_neg={config.eval_num_neg} is invalid: the most active user has '
        f'{worst} training positives, leaving only {candidates} candidate negatives of '
        f'{dataset.num_items} items; use eval_num_neg <= {candidates}.')
  if config.model.pretrained_gmf or config.model.pretrained_mlp:
    if config.model.name != 'neumf':
      raise UserError('config.model.pretrained_gmf/pretrained_mlp need model.name=neumf.')


# ----------------------------------------------------------------------------------------
# State and steps.

def make_optimizer(config) -> optax.GradientTransformation:
  """Adam (the MLPerf rules' optimizer) or plain SGD, at `config.learning_rate`."""
  if config.optimizer == 'sgd':
    return optax.sgd(float(config.learning_rate))
  return optax.adam(float(config.learning_rate), b1=float(config.beta1),
                    b2=float(config.beta2), eps=float(config.eps))


def create_train_state(config, model, key: jax.Array, mesh: Mesh) -> TrainState:
  """Initialised, replicated TrainState (init runs under jit on the mesh)."""
  tx = make_optimizer(config)
  replicated = NamedSharding(mesh, P())

  def init(key):
    dummy = jnp.zeros((2,), jnp.int32)
    params = model.init({'params': key}, dummy, dummy)['params']
    return TrainState.create(
        apply_fn=model.apply, params=params, tx=tx,
        loss_sum=jnp.zeros((), jnp.float32), loss_count=jnp.zeros((), jnp.float32),
        hash_chain=hashing.init(), hash_first=hashing.init(),
        bad_step=jnp.full((), -1, jnp.int32))
  return jax.jit(init, out_shardings=replicated)(key)


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


def make_epoch_items(config, mesh: Mesh, num_train: int):
  """The epoch builder: (data, data_key, epoch, in_flight=None) -> every slot's item.

  Each device builds its 1/ndev of the slots in slot order (`pipeline.epoch_items`), in
  calls of `pipeline.EPOCH_CHUNK` slots that write into a donated buffer; one reshard
  then gives every device the whole epoch, which its batches read. Every launch is
  reported to `in_flight` (a `dispatch.InFlight`), so an epoch of many calls stays
  within the CPU client's queue limit.
  """
  num_neg = int(config.num_neg)
  per = -(-pipeline.epoch_size(num_train, num_neg) // mesh.size)
  chunk = min(pipeline.EPOCH_CHUNK, per)
  calls = -(-per // chunk)
  per = calls * chunk
  sharded, replicated = NamedSharding(mesh, P(AXIS)), NamedSharding(mesh, P())

  def fill(buf, data, data_key, epoch, call):
    start = jax.lax.axis_index(AXIS) * per + call * chunk
    part = pipeline.epoch_items(data, data_key, epoch, num_neg=num_neg, start=start,
                                size=chunk)
    # part[:1] is a small output that is not donated: what `in_flight` waits on.
    return jax.lax.dynamic_update_slice(buf, part, (call * chunk,)), part[:1]

  fill = jax.jit(jax.shard_map(fill, mesh=mesh, in_specs=(P(AXIS), P(), P(), P(), P()),
                               out_specs=(P(AXIS), P(AXIS))), donate_argnums=0)
  replicate = jax.jit(lambda buf: buf, out_shardings=replicated)
  zeros = jax.jit(lambda dtype: jnp.zeros((mesh.size * per,), dtype), static_argnums=0,
                  out_shardings=sharded)

  def build(data, data_key, epoch, in_flight: Optional[dispatch.InFlight] = None):
    in_flight = in_flight or dispatch.InFlight(dispatch.in_flight_limit(mesh.devices.flat))
    buf = zeros(np.dtype(data.train_items.dtype))
    for call in range(calls):
      buf, token = fill(buf, data, data_key, epoch, np.int32(call))
      in_flight.add(token)
    items = replicate(buf)
    in_flight.add(items)
    return items
  return build


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
  """
  batch_size, num_neg = int(config.batch_size), int(config.num_neg)
  local = batch_size // ndev
  l2, l2_params = float(config.model.l2), float(config.model.l2_params)
  use_dropout = float(config.model.dropout) > 0

  def grads_fn(params, apply_fn, data, items, keys, epoch, step, global_step):
    data_key, dropout_key = keys
    start = jax.lax.axis_index(AXIS) * local
    batch = pipeline.batch_from_items(data, items, data_key, epoch, step,
                                      batch_size=batch_size, num_neg=num_neg, start=start,
                                      size=local)
    position = start + jnp.arange(local, dtype=jnp.uint32)   # global, within the batch
    n_valid = jax.lax.psum(jnp.sum(batch['valid'], dtype=jnp.float32), AXIS)

    def logits_fn(p):
      if not use_dropout:
        return apply_fn({'params': p}, batch['user'], batch['item'])
      # One dropout key per sample, from (global step, position in the global batch):
      # the masks do not depend on how the batch is split over devices.
      step_key = jax.random.fold_in(dropout_key, global_step)
      sample_keys = jax.vmap(jax.random.fold_in, (None, 0))(step_key, position)

      def one(u, i, k):
        return apply_fn({'params': p}, u[None], i[None], deterministic=False,
                        rngs={'dropout': k})[0]
      return jax.vmap(one)(batch['user'], batch['item'], sample_keys)

    def loss_fn(p):
      local_sum = metrics_lib.bce_sum(logits_fn(p), batch['label'], batch['valid'])
      objective = local_sum
      if l2:   # per sample, so scaled like the loss: the mean over the global batch
        rows = models.embedding_rows_sq(p, batch['user'], batch['item'])
        objective = objective + l2 * jnp.sum(jnp.where(batch['valid'], rows, 0.0))
      # Scaled so that the pmean of the gradients is that of the global batch mean, even
      # with padded shards.
      return (objective * ndev / jnp.maximum(n_valid, 1.0) + _l2_params_term(p, l2_params),
              local_sum)

    varying = jax.tree.map(lambda x: jax.lax.pcast(x, AXIS, to='varying'), params)
    (_, local_sum), grads = jax.value_and_grad(loss_fn, has_aux=True)(varying)
    grads = jax.lax.pmean(grads, AXIS)
    return grads, local_sum, n_valid, batch, position
  return grads_fn


def make_grad_step(config, mesh: Mesh, apply_fn):
  """Compiled (params, data, items, keys, epoch, step, global_step) -> gradients.

  The gradients that the train step applies, for tests and diagnostics: they must equal
  the gradient of the global batch mean whatever the device count.
  """
  grads_fn = _make_per_device_grads(config, mesh.size)

  def per_device(params, data, items, keys, epoch, step, global_step):
    return grads_fn(params, apply_fn, data, items, keys, epoch, step, global_step)[0]

  return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(),) * 7, out_specs=P()))


def _hash_update(state_chain, state_first, batch, position, step):
  """(chain, first) after folding in this batch's digest; the chain restarts at step 0."""
  first = step == 0
  chain = hashing.chain(jnp.where(first, hashing.init(), state_chain),
                        hashing.batch_digest(batch, position, AXIS))
  return chain, jnp.where(first, chain, state_first)


def make_train_step(config, mesh: Mesh):
  """The compiled global train step: (state, data, items, keys, epoch, step) -> (state, out).

  `items` is the epoch's `make_epoch_items` output and `keys` is (data_key, dropout_key).
  `step` is the batch number within `epoch`; the batch is generated on device, identical
  to `pipeline.train_batch(data, data_key, epoch, step)`. `out` holds the batch's
  `train_loss` (a small output that is not donated: the loop waits on it to bound the
  launches in flight).
  """
  use_hash = bool(config.hash_pipeline)
  grads_fn = _make_per_device_grads(config, mesh.size)

  def per_device(state: TrainState, data, items, keys, epoch, step):
    grads, local_sum, n_valid, batch, position = grads_fn(
        state.params, state.apply_fn, data, items, keys, epoch, step, state.step)
    loss_sum = jax.lax.psum(local_sum, AXIS)
    new = state.apply_gradients(grads=grads)
    first = step == 0
    finite = jnp.isfinite(loss_sum)
    updates = dict(
        loss_sum=jnp.where(first, 0.0, state.loss_sum) + loss_sum,
        loss_count=jnp.where(first, 0.0, state.loss_count) + n_valid,
        bad_step=jnp.where((state.bad_step < 0) & ~finite, state.step, state.bad_step))
    if use_hash:
      updates['hash_chain'], updates['hash_first'] = _hash_update(
          state.hash_chain, state.hash_first, batch, position, step)
    return new.replace(**updates), {'train_loss': loss_sum / jnp.maximum(n_valid, 1.0)}

  step = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(), P(), P(), P()),
                       out_specs=(P(), P()))
  return jax.jit(step, donate_argnums=(0,))


def make_hash_replay(config, mesh: Mesh):
  """Compiled (chain, first, data, items, data_key, epoch, step) -> (chain, first).

  The train step's digest update alone: a resume that turns `hash_pipeline` on mid-epoch
  replays the epoch's earlier batches through it (batches are pure functions of the
  epoch and step), so its digests cover the whole epoch like an uninterrupted run's.
  """
  batch_size, num_neg = int(config.batch_size), int(config.num_neg)
  local = batch_size // mesh.size

  def per_device(chain, first, data, items, data_key, epoch, step):
    start = jax.lax.axis_index(AXIS) * local
    batch = pipeline.batch_from_items(data, items, data_key, epoch, step,
                                      batch_size=batch_size, num_neg=num_neg, start=start,
                                      size=local)
    return _hash_update(chain, first, batch, start + jnp.arange(local, dtype=jnp.uint32),
                        step)

  return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(),) * 7,
                               out_specs=(P(), P())))


def make_eval_step(config, mesh: Mesh, model, num_users: int, num_items: int,
                   split: str = 'test'):
  """Compiled eval of `split` for users [first, first + eval_batch_size): sums, counts, digest.

  `split` is 'test' or 'valid' (`pipeline.SPLITS`); each has its own candidates
  (`pipeline.eval_batch`).
  """
  ndev = mesh.size
  local = int(config.eval_batch_size) // ndev
  num_neg, top_k = int(config.eval_num_neg), int(config.top_k)
  match_mlperf = bool(config.match_mlperf)
  full = bool(config.eval_full_ranking)
  chunk = int(config.full_ranking_chunk)

  def per_device(params, data, data_key, first):
    users = first + jax.lax.axis_index(AXIS) * local + jnp.arange(local, dtype=jnp.int32)
    valid = users < num_users
    users = jnp.where(valid, users, 0)
    items, mask = pipeline.eval_batch(data, data_key, users, num_neg=num_neg,
                                      match_mlperf=match_mlperf, split=split)
    scores = model.apply({'params': params}, jnp.broadcast_to(users[:, None], items.shape),
                         items)
    out = metrics_lib.ranking_sums(metrics_lib.positive_rank(scores, mask), valid, top_k)
    cols = 1 + num_neg
    position = users[:, None].astype(jnp.uint32) * jnp.uint32(cols) + jnp.arange(
        cols, dtype=jnp.uint32)
    out['digest'] = hashing.array_digest(items, position, mask=valid[:, None])
    if full:
      positive, excluded = pipeline.held_out(data, users, split)
      rank = full_rank(model, params, data, users, positive, excluded, chunk)
      fsums = metrics_lib.ranking_sums(rank, valid, top_k)
      out.update({f'full_{k}': v for k, v in fsums.items() if k != 'count'})
      out['full_recall_sum'] = metrics_lib.recall_sum(
          rank[:, None], jnp.ones((local, 1), bool), valid, top_k)
    return jax.tree.map(lambda x: jax.lax.psum(x, AXIS), out)

  step = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(), P()), out_specs=P())
  return jax.jit(step)


def full_rank(model, params, data: sampling.DeviceData, users, positive, excluded,
              chunk: int):
  """Rank of each user's `positive` item among all items that are candidates for it.

  Candidates are every item but the user's training positives and the `excluded`
  held-out items (`pipeline.held_out`, the positive among them); ties count against the
  positive. Items are scored `chunk` at a time (users x chunk pairs in memory, not
  users x num_items), and the count does not depend on `chunk`.
  """
  num_items = data.num_items
  b = users.shape[0]
  s_pos = model.apply({'params': params}, users, positive)
  n_chunks = -(-num_items // chunk)

  def body(c, above):
    items = c * chunk + jnp.arange(chunk, dtype=jnp.int32)
    inside = items < num_items
    items = jnp.minimum(items, num_items - 1)
    grid_u = jnp.broadcast_to(users[:, None], (b, chunk))
    grid_i = jnp.broadcast_to(items[None, :], (b, chunk))
    scores = model.apply({'params': params}, grid_u, grid_i)
    _, is_pos = sampling.rank_positives(data, grid_u, grid_i)
    competes = inside[None, :] & ~is_pos
    for item in excluded:
      competes &= grid_i != item[:, None]
    return above + jnp.sum(competes & (scores >= s_pos[:, None]), axis=1, dtype=jnp.int32)

  # zeros_like(users): the count varies over the mesh like the users (inside shard_map).
  return jax.lax.fori_loop(0, n_chunks, body, jnp.zeros_like(users, jnp.int32))


def evaluate(eval_step, params, data, data_key, num_users: int, eval_batch_size: int,
             in_flight: Optional[dispatch.InFlight] = None):
  """Runs all eval batches; returns host floats: hr, ndcg, mrr (+ full_*) and the digest.

  Launches are reported to `in_flight` (default: the bound for `params`' devices).
  """
  if in_flight is None:
    devices = jax.tree.leaves(params)[0].sharding.device_set
    in_flight = dispatch.InFlight(dispatch.in_flight_limit(list(devices)))
  totals = None
  for first in range(0, num_users, eval_batch_size):
    out = eval_step(params, data, data_key, np.int32(first))
    in_flight.add(out['count'])
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    in_flight.add(totals['count'])
  # Digests are sums over (user, column) positions: independent of the eval batch size.
  chain = hashing.chain(hashing.init(), totals.pop('digest'))
  totals = {k: float(v) for k, v in jax.device_get(totals).items()}
  count = totals.pop('count')
  result = {k[:-len('_sum')]: v / count for k, v in totals.items()}
  return result, hashing.hexdigest(chain)


def params_hash(params) -> str:
  """Hex digest of the parameters' bytes (host side, once per run)."""
  import hashlib
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(jax.device_get(params)):
    h.update(np.ascontiguousarray(leaf).tobytes())
  return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------
# The loop.

class _Preemption:
  """Turns SIGTERM into a flag that the loop checks at step boundaries (`check`).

  With several processes every one must stop at the same step (saving is collective), so
  JAX's preemption service handles SIGTERM instead: a notice on any host makes
  `reached_preemption_sync_point` true on all of them at one agreed step.
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    self._multi = (jax.process_count() > 1 and jax.distributed.is_initialized()
                   and jax.config.jax_enable_preemption_service)

  def check(self, global_step: int) -> bool:
    """Call before every step, with the same step on every process."""
    if self._multi and not self.requested:
      from jax.experimental import multihost_utils
      self.requested = multihost_utils.reached_preemption_sync_point(global_step)
    return self.requested

  def __enter__(self):
    if self._multi:   # keep the preemption service's own SIGTERM handler
      return self
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:   # not the main thread (e.g. a notebook worker): no handler
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def resolve_seed(config) -> int:
  """config.seed, or (None or negative) one drawn by process 0 and sent to every process.

  Every process must use the same seed: the keys and the initial parameters are
  "replicated", and nothing would notice if each process drew its own.
  """
  if fixed_seed(config) is not None:
    return fixed_seed(config)
  seed = int.from_bytes(os.urandom(4), 'little') & 0x7FFFFFFF
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    seed = int(multihost_utils.broadcast_one_to_all(np.int32(seed)))
  logging.info('config.seed=%s: drew seed %d (rerun with --config.seed=%d).', config.seed,
               seed, seed)
  return seed


def fixed_seed(config) -> Optional[int]:
  """The seed the config fixes, or None when it asks for a drawn one (None or < 0)."""
  if config.seed is None or int(config.seed) < 0:
    return None
  return int(config.seed)


def make_workdir(workdir: Optional[str]) -> str:
  if not workdir and jax.process_count() > 1:
    raise UserError('a multi-process run needs --workdir (the same shared folder on every '
                    'host).')
  if not workdir:
    os.makedirs('runs', exist_ok=True)
    workdir = tempfile.mkdtemp(prefix=time.strftime('%Y%m%d-%H%M%S-'), dir='runs')
    print(f'workdir: {workdir}', flush=True)
  try:
    os.makedirs(workdir, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix='.write_test', dir=workdir)  # unique per process
    with os.fdopen(fd, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise UserError(f'workdir {workdir!r} is not writable ({e.strerror}); pass a '
                    '--workdir you can write to.') from None
  return workdir


def _oom_hint(e: Exception) -> Optional[str]:
  text = str(e)
  if 'RESOURCE_EXHAUSTED' in text or 'Out of memory' in text or 'out of memory' in text:
    return ('out of device memory: reduce config.batch_size and/or config.eval_batch_size '
            '(or use dtype=bfloat16). Details: ' + text.splitlines()[0][:300])
  return None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: Optional[str]) -> TrainState:
  """Trains, evaluates every `eval_every_epochs`, checkpoints, and resumes from `workdir`.

  Writes config.json, metrics.jsonl, summary.json and TensorBoard events to `workdir`.
  Returns the final TrainState.
  """
  try:
    return _train_and_evaluate(config, workdir)
  except jax.errors.JaxRuntimeError as e:
    hint = _oom_hint(e)
    if hint:
      raise UserError(hint) from None
    raise


def make_mesh(num_devices: int = 0) -> Mesh:
  """1-D `data` mesh over every device (0) or the first `num_devices` (one process).

  `jax.make_mesh` orders the devices by the physical topology (on TPU slices, neighbours
  on the interconnect are neighbours in the mesh). Samples are keyed by global position,
  not by device, so the order changes no batch.
  """
  devices = jax.devices()
  if num_devices:
    if jax.process_count() > 1 or not 0 < num_devices <= len(devices):
      raise UserError(f'config.num_devices={num_devices} is invalid: use 0 (all) or 1..'
                      f'{len(devices)} in a single-process run.')
    devices = devices[:num_devices]
  return jax.make_mesh((len(devices),), (AXIS,), (jax.sharding.AxisType.Auto,),
                       devices=devices)


def library_versions() -> dict:
  """Versions that `params_hash` depends on: it reproduces only when they match."""
  import importlib.metadata
  out = {}
  for name in ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'numpy'):
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  return out


def best_record(history, key: str) -> Optional[dict]:
  """The epoch record with the highest `key` (the earliest among equals), or None."""
  best = None
  for record in history:
    value = record.get(key)
    if value is not None and (best is None or value > best[key]):
      best = record
  return best


def early_stopped(history, key: str, patience: int) -> bool:
  """Whether the last evaluated epoch is `patience` or more epochs after the best one."""
  best = best_record(history, key)
  if not patience or best is None:
    return False
  last = max(r['epoch'] for r in history if r.get(key) is not None)
  return last - best['epoch'] >= patience


def _max_over_epochs(history, key: str) -> Optional[float]:
  values = [r[key] for r in history if r.get(key) is not None]
  return max(values) if values else None


def _train_and_evaluate(config, workdir):
  writers.quiet_library_logs()
  mesh = make_mesh(int(config.num_devices))
  validate_config(config, mesh.size)
  workdir = make_workdir(workdir)
  is_main = jax.process_index() == 0
  ckpts = ckpt_lib.Checkpoints(workdir, int(config.keep_checkpoints))
  latest = ckpts.latest_step()
  saved_meta = ckpts.restore_meta(latest) if latest is not None else None
  if saved_meta is not None:
    ckpt_lib.check_compatible(saved_meta, config, saved_meta['seed'])
    seed = int(saved_meta['seed'])
  else:
    seed = resolve_seed(config)
  # With a validation split: the metric that selects the best epoch, and its checkpoint.
  validated = config.validation != 'none'
  select_key = f'valid_{config.select_metric}' if validated else None
  patience = int(config.early_stop_patience)
  best_ckpts = None
  if validated:
    best_ckpts = ckpt_lib.Checkpoints(workdir, 1, best_metric=select_key)
    best_ckpts.delete_after(latest)

  dataset = data_lib.load(config.dataset, config.validation)
  validate_against_data(config, dataset)
  replicated = NamedSharding(mesh, P())
  data = sampling.to_device(dataset, replicated)
  spe = pipeline.steps_per_epoch(dataset.num_train, config.num_neg, config.batch_size)
  logging.info('Devices: %d (%d processes), platform %s. Dataset %s: %d users, %d items, '
               '%d train positives; %d samples/epoch, %d steps/epoch of %d.',
               mesh.size, jax.process_count(), jax.devices()[0].platform, dataset.name,
               dataset.num_users, dataset.num_items, dataset.num_train,
               pipeline.epoch_size(dataset.num_train, config.num_neg), spe, config.batch_size)

  init_key, data_key, dropout_key = make_keys(seed, mesh)
  model = models.create_model(config.model, dataset.num_users, dataset.num_items,
                              config.dtype)
  state = create_train_state(config, model, init_key, mesh)
  logging.info('Model %s: %d parameters.', config.model.name, models.num_params(state.params))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)

  history, eval_hash = [], None
  elapsed_before = 0.0
  # Steps of the running epoch that state.hash_chain covers (None: it covers nothing).
  hash_steps = None
  if latest is not None:
    state, meta = ckpts.restore(abstract, latest)
    ckpt_lib.log_restored(latest, meta)
    history = meta['history']
    eval_hash = meta.get('eval_hash')
    elapsed_before = meta.get('total_wall_s', 0.0)
    hash_steps = meta.get('hash_steps')
  elif config.model.pretrained_gmf or config.model.pretrained_mlp:
    state = state.replace(params=_load_pretrained(config, state, mesh))

  writer = writers.MetricWriter(workdir, enabled=is_main)
  writer.write_config(ckpt_lib.config_to_dict(config) | {'resolved_seed': seed})
  writer.rewrite_history(history)
  train_step = make_train_step(config, mesh)
  build_epoch = make_epoch_items(config, mesh, dataset.num_train)
  # Every epoch's evaluation reads the validation split when there is one, else the test.
  eval_step = make_eval_step(config, mesh, model, dataset.num_users, dataset.num_items,
                             split='valid' if validated else 'test')

  def meta_now(epoch):
    return {'seed': seed, 'config': ckpt_lib.config_to_dict(config), 'epoch': epoch,
            'history': history,
            'test_hr_max_over_epochs': _max_over_epochs(history, 'hr'),
            'eval_hash': eval_hash,
            'total_wall_s': elapsed_before + (time.time() - t_start),
            'hash_steps': hash_steps}

  t_start = time.time()
  start_step = int(jax.device_get(state.step))
  start_epoch = start_step // spe
  reached = next((h['epoch'] for h in history
                  if config.hr_threshold is not None and h.get('hr', 0) >= config.hr_threshold),
                 None)
  stop_early = validated and early_stopped(history, select_key, patience)
  num_epochs = int(config.num_epochs)
  preempted = False
  where = {'epoch': start_epoch, 'step': start_step - start_epoch * spe, 'saved': latest}
  test_result, test_hash = None, None

  def stalled(idle):
    saved = where['saved']
    kept = (f'the last checkpoint (step {saved}) in {ckpts.directory} is intact; rerun the '
            'same command to resume' if saved is not None else
            'no checkpoint had been saved yet; rerun the same command to start again')
    return (f'no training progress for {idle:.0f} s at epoch {where["epoch"]}, batch '
            f'{where["step"]} of {spe}: a device or a multi-device collective is stalled '
            f'(another process died or hangs, or a device is wedged). {kept}. '
            'config.stall_timeout_s sets this limit (0 disables it).')

  def save(step, epoch):
    ckpts.save(step, state, meta_now(epoch))
    where['saved'] = step
    watchdog.beat()

  watchdog = dispatch.Watchdog(float(config.stall_timeout_s), stalled)
  in_flight = dispatch.InFlight(dispatch.in_flight_limit(mesh.devices.flat),
                                on_wait=watchdog.beat)
  with _Preemption() as preemption, watchdog:
    for epoch in range(start_epoch, num_epochs):
      if reached is not None or stop_early:
        break
      first_step = start_step - epoch * spe if epoch == start_epoch else 0
      where.update(epoch=epoch, step=first_step)
      t_epoch = time.time()
      stopped = False   # only a SIGTERM before the epoch's last step stops it midway
      items = build_epoch(data, data_key, np.int32(epoch), in_flight)
      if config.hash_pipeline and first_step > 0 and hash_steps != first_step:
        state = _replay_hashes(config, mesh, state, data, items, data_key, epoch,
                               first_step, in_flight)
      hash_steps = first_step if config.hash_pipeline else None
      progress = writers.progress(spe, first_step, f'epoch {epoch}', is_main)
      for step in range(first_step, spe):
        if preemption.check(epoch * spe + step):
          stopped = True
          break
        state, out = train_step(state, data, items, (data_key, dropout_key),
                                np.int32(epoch), np.int32(step))
        in_flight.add(out['train_loss'])
        watchdog.beat()
        where['step'] = step + 1
        if hash_steps is not None:
          hash_steps = step + 1
        progress.update(1)
        if config.log_every_steps and (step + 1) % config.log_every_steps == 0:
          _check_finite(state, ckpts)
          writer.log_step(epoch, step + 1, spe, state)
      progress.close()
      if stopped:
        _check_finite(state, ckpts)
        gstep = int(jax.device_get(state.step))
        if ckpts.latest_step() != gstep:   # else: stopped right after an epoch-end save
          save(gstep, epoch)
        logging.info('SIGTERM: saved a checkpoint at step %d (epoch %d, batch %d of %d); '
                     'rerun the same command to resume.', gstep, epoch, gstep - epoch * spe,
                     spe)
        preempted = True
        break
      _check_finite(state, ckpts)
      loss_sum, loss_count = jax.device_get((state.loss_sum, state.loss_count))
      watchdog.beat()
      epoch_wall = time.time() - t_epoch
      record = {'epoch': epoch, 'train_loss': float(loss_sum / max(loss_count, 1.0)),
                'train_samples_per_sec': float(loss_count) / max(epoch_wall, 1e-9)
                if first_step == 0 else None}
      if config.hash_pipeline:
        record['pipeline_hash_first'] = hashing.hexdigest(state.hash_first)
        record['pipeline_hash_all'] = hashing.hexdigest(state.hash_chain)
        logging.info('[pipeline_hash] First batch hash: %s', record['pipeline_hash_first'])
        logging.info('[pipeline_hash] All batches hash: %s', record['pipeline_hash_all'])
        logging.info('[pipeline_hash] Batch count: %d', spe)
      improved = False
      if (epoch + 1) % int(config.eval_every_epochs) == 0 or epoch + 1 == num_epochs:
        result, digest = evaluate(eval_step, state.params, data, data_key,
                                  dataset.num_users, int(config.eval_batch_size), in_flight)
        watchdog.beat()
        if config.hash_pipeline and eval_hash is None:
          logging.info('[pipeline_hash] %s candidates hash: %s',
                       'Valid' if validated else 'Eval', digest)
        eval_hash = digest
        if validated:
          record.update({f'valid_{k}': v for k, v in result.items()})
          improved = best_record(history + [record], select_key) is record
          logging.info('Iteration %d: valid HR = %.4f, NDCG = %.4f, MRR = %.4f%s', epoch,
                       result['hr'], result['ndcg'], result['mrr'],
                       ' (best so far)' if improved else '')
        else:
          record.update(result)
          logging.info('Iteration %d: HR = %.4f, NDCG = %.4f', epoch, result['hr'],
                       result['ndcg'])
      record['epoch_wall_s'] = time.time() - t_epoch
      record['total_wall_s'] = elapsed_before + (time.time() - t_start)
      history.append(record)
      writer.write_epoch(record)
      if (config.hr_threshold is not None and record.get('hr') is not None
          and record['hr'] >= float(config.hr_threshold)):
        reached = epoch
        logging.info('Reached HR@%d >= %s after %d epochs in %.1f s.', config.top_k,
                     config.hr_threshold, epoch + 1, record['total_wall_s'])
      if validated and early_stopped(history, select_key, patience):
        stop_early = True
        best = best_record(history, select_key)
        logging.info('Early stop after epoch %d: valid %s@%d has not improved for %d '
                     'epochs since epoch %d (%.4f).', epoch, config.select_metric.upper(),
                     config.top_k, epoch - best['epoch'], best['epoch'], best[select_key])
      gstep = int(jax.device_get(state.step))
      if improved:   # before the latest checkpoint, whose history names this epoch best
        best_ckpts.save(gstep, state, meta_now(epoch + 1),
                        metrics={select_key: record[select_key]})
        watchdog.beat()
      last = epoch + 1 == num_epochs or reached is not None or stop_early
      every = int(config.checkpoint_every_epochs)
      if last or (every and (epoch + 1) % every == 0):
        save(gstep, epoch + 1)

    if validated and not preempted and best_record(history, select_key) is not None:
      test_result, test_hash = _test_selected(
          config, mesh, model, best_ckpts, abstract, data, data_key, dataset,
          best_record(history, select_key), in_flight)
      watchdog.beat()

  phash = params_hash(state.params)
  logging.info('[params_hash] %s', phash)
  best = best_record(history, select_key) if validated else None
  # The test metrics of the run's result: the selected parameters' with a validation
  # split, else the last evaluated epoch's (the final parameters', unless preempted).
  final_test = test_result if validated else {
      k: v for k, v in next((r for r in reversed(history) if 'hr' in r), {}).items()
      if k in ('hr', 'ndcg', 'mrr') or k.startswith('full_')}
  summary = {
      'seed': seed, 'params_hash': phash, 'epochs_done': len(history),
      'validation': config.validation, 'select_metric': select_key,
      'best_epoch': None if best is None else best['epoch'],
      **{f'valid_{k}': None if best is None else best.get(f'valid_{k}')
         for k in ('hr', 'ndcg', 'mrr')},
      **{f'test_{k}': None if final_test is None else final_test.get(k)
         for k in ('hr', 'ndcg', 'mrr')},
      'test_hr_max_over_epochs': _max_over_epochs(history, 'hr'),
      'test_ndcg_max_over_epochs': _max_over_epochs(history, 'ndcg'),
      'final': history[-1] if history else None,
      'eval_candidates_hash': test_hash if validated else eval_hash,
      'valid_candidates_hash': eval_hash if validated else None,
      'early_stopped': bool(stop_early),
      'hr_threshold': config.hr_threshold, 'epochs_to_target': None if reached is None
      else reached + 1, 'seconds_to_target': None if reached is None
      else history[[h['epoch'] for h in history].index(reached)]['total_wall_s'],
      'preempted': preempted, 'num_devices': mesh.size,
      'num_processes': jax.process_count(), 'platform': jax.devices()[0].platform,
      'versions': library_versions(), 'workdir': os.path.abspath(workdir)}
  if final_test:
    summary.update({f'test_{k}': v for k, v in final_test.items() if k.startswith('full_')})
  if best is not None:
    summary.update({k: v for k, v in best.items() if k.startswith('valid_full_')})
  writer.write_summary(summary)
  writer.close()
  ckpts.close()
  if best_ckpts is not None:
    best_ckpts.close()
  return state


def _test_selected(config, mesh, model, best_ckpts, abstract, data, data_key, dataset,
                   best: dict, in_flight: dispatch.InFlight):
  """Test metrics of the selected (best validation) epoch's parameters: the run's result.

  Restores WORKDIR/best_checkpoint, checks that it is the selected epoch's, and evaluates
  it once on the test split. Returns (metrics, test candidates digest).
  """
  step = best_ckpts.best_step()
  if step is None:
    raise UserError(f'the best epoch\'s checkpoint is missing from {best_ckpts.directory}; '
                    'it is written with each new best validation metric. Start the run '
                    'again in a new --workdir.')
  selected, meta = best_ckpts.restore(abstract, step)
  if meta['epoch'] != best['epoch'] + 1:
    raise UserError(f'{best_ckpts.directory} holds epoch {meta["epoch"] - 1}, but the run\'s '
                    f'metrics select epoch {best["epoch"]}; start the run again in a new '
                    '--workdir.')
  test_step = make_eval_step(config, mesh, model, dataset.num_users, dataset.num_items,
                             split='test')
  result, digest = evaluate(test_step, selected.params, data, data_key, dataset.num_users,
                            int(config.eval_batch_size), in_flight)
  logging.info('Selected epoch %d (valid %s@%d = %.4f): test HR = %.4f, NDCG = %.4f, '
               'MRR = %.4f', best['epoch'], config.select_metric.upper(), config.top_k,
               best[f'valid_{config.select_metric}'], result['hr'], result['ndcg'],
               result['mrr'])
  if config.hash_pipeline:
    logging.info('[pipeline_hash] Eval candidates hash: %s', digest)
  return result, digest


def _check_finite(state: TrainState, ckpts: ckpt_lib.Checkpoints) -> None:
  bad = int(jax.device_get(state.bad_step))
  if bad >= 0:
    latest = ckpts.latest_step()
    where = (f'the last good checkpoint (step {latest}) in {ckpts.directory} is untouched'
             if latest is not None else 'no checkpoint had been saved yet')
    raise UserError(f'the training loss became NaN or inf at global step {bad}; {where}. '
                    'Lower config.learning_rate or check the data.')


def _replay_hashes(config, mesh, state: TrainState, data, items, data_key, epoch: int,
                   first_step: int, in_flight: dispatch.InFlight) -> TrainState:
  """Recomputes the digests of this epoch's batches [0, first_step) into `state`.

  For a resume that turns `hash_pipeline` on mid-epoch, or whose checkpoint's digests do
  not cover the batches before it: the logged digests then cover the whole epoch and
  equal an uninterrupted hashed run's, instead of silently covering a part of it.
  """
  logging.info('[pipeline_hash] The checkpoint does not hash batches 0..%d of epoch %d; '
               'recomputing their digests.', first_step - 1, epoch)
  replay = make_hash_replay(config, mesh)
  chain, first = state.hash_chain, state.hash_first
  replays = dispatch.InFlight(in_flight.limit)   # the chain goes on into the donated state
  for step in range(first_step):
    chain, first = replay(chain, first, data, items, data_key, np.int32(epoch),
                          np.int32(step))
    replays.add(chain)
  jax.block_until_ready((chain, first))
  return state.replace(hash_chain=chain, hash_first=first)


def _load_pretrained(config, state: TrainState, mesh: Mesh):
  """NeuMF params from the final checkpoints of trained GMF / MLP workdirs."""
  def load(path, name):
    if not path:
      return None
    ck = ckpt_lib.Checkpoints(path, 1)
    step = ck.latest_step()
    if step is None:
      raise UserError(f'config.model.pretrained_{name}={path!r} has no checkpoint; train '
                      f'a {name} model with --workdir={path} first.')
    meta = ck.restore_meta(step)
    saved = meta['config']['model']
    if saved['name'] != name:
      raise UserError(f'config.model.pretrained_{name}={path!r} holds a {saved["name"]} '
                      f'model, not {name}.')
    restored = ck.manager.restore(step, args=ckpt_lib.ocp.args.Composite(
        state=ckpt_lib.ocp.args.StandardRestore()))['state']
    ck.close()
    return restored['params']
  gmf = load(config.model.pretrained_gmf, 'gmf')
  mlp = load(config.model.pretrained_mlp, 'mlp')
  params = models.neumf_from_pretrained(jax.device_get(state.params), gmf, mlp)
  try:
    return jax.device_put(params, NamedSharding(mesh, P()))
  except (ValueError, TypeError) as e:
    raise UserError(f'pretrained GMF/MLP shapes do not match this NeuMF config: {e}') from None


# ----------------------------------------------------------------------------------------
# Command line.

def define_flags() -> None:
  """Defines the train command's flags, once.

  Only when run as a command: modules that import this one (evaluate, benchmark, tests)
  define flags of the same names for their own commands.
  """
  if 'coordinator_address' in flags.FLAGS:
    return
  config_flags.DEFINE_config_file('config', 'configs/default.py', 'Training config file.',
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, 'Run directory (made if absent; resumed).')
  flags.DEFINE_string('coordinator_address', None,
                      'Multi-host: host:port of process 0 (jax.distributed).')
  flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes.')
  flags.DEFINE_integer('process_id', None, 'Multi-host: this process index.')


def maybe_initialize_distributed(coordinator_address=None, num_processes=None,
                                 process_id=None) -> None:
  """jax.distributed from flags, or from the environment where JAX can detect it."""
  explicit = any(v is not None for v in (coordinator_address, num_processes, process_id))
  env = os.environ
  detectable = (env.get('JAX_COORDINATOR_ADDRESS') or int(env.get('SLURM_NTASKS', '1')) > 1
                or ',' in env.get('TPU_WORKER_HOSTNAMES', ''))
  if not (explicit or detectable):
    # A Cloud TPU VM (pod slice workers included) announces itself only through the GCE
    # metadata server, which jax.distributed.initialize() queries: try it there.
    if os.path.exists('/dev/accel0') or os.path.exists('/dev/vfio/0'):
      try:
        jax.distributed.initialize()
      except (ValueError, RuntimeError) as e:   # not a detectable cluster: one process
        logging.info('No multi-host cluster detected on this TPU VM (%s).', e)
    return
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)


def _add_xla_flag(name: str, value) -> None:
  current = os.environ.get('XLA_FLAGS', '')
  if f'--{name}=' not in current:
    os.environ['XLA_FLAGS'] = f'{current} --{name}={value}'.strip()


def xla_flags(config) -> None:
  """XLA flags that must be set before the backends start.

  With a fixed seed, deterministic GPU kernels. With the stall watchdog on, XLA's CPU
  collectives wait longer than it before aborting (their default is 40 s), so that a stall
  ends with the watchdog's one line rather than XLA's abort and C++ stack.
  """
  if fixed_seed(config) is not None:
    _add_xla_flag('xla_gpu_deterministic_ops', 'true')
  if float(config.stall_timeout_s) > 0:
    _add_xla_flag('xla_cpu_collective_call_terminate_timeout_seconds',
                  int(float(config.stall_timeout_s)) + 60)


@exit_on_user_error
def main(argv):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  FLAGS = flags.FLAGS
  config = FLAGS.config
  xla_flags(config)
  maybe_initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                               FLAGS.process_id)
  logging.info('JAX process %d of %d, %d local devices of %d.', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  train_and_evaluate(config, FLAGS.workdir)


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=parse_flags)
