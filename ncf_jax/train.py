"""The training loop; `python -m ncf_jax.train --config=configs/<name>.py`.

The logic lives in `train_and_evaluate(config, workdir)` so that tests, sweeps and the
Colab notebook call it directly; `main` only parses flags, sets up the process
(`ncf_jax.launch`) and turns user errors into one message. The compiled programs the loop
runs (state, epoch builder, train/eval steps) are in `ncf_jax.steps`; the config checks
that run before any work, in `ncf_jax.config_checks`.
"""

import os
import signal
import tempfile
import time

from absl import app, flags, logging
import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np

from ncf_jax import checkpoint as ckpt_lib
from ncf_jax import (
  config_checks,
  dispatch,
  errors,
  hashing,
  launch,
  memory,
  models,
  pipeline,
  sharding,
  steps,
  writers,
)
from ncf_jax import data as data_lib
from ncf_jax.errors import UserError, exit_on_user_error, parse_flags

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
    self._multi = (
      jax.process_count() > 1
      and jax.distributed.is_initialized()
      and jax.config.jax_enable_preemption_service
    )

  def check(self, call: int) -> bool:
    """Call before every train call, `call` rising by one each time, as on every process.

    A counter of calls, not the global step: with `steps_per_call` > 1 the step jumps,
    and the preemption service's agreed stop point (the hosts' max + 1) must be reached.
    """
    if self._multi and not self.requested:
      from jax.experimental import multihost_utils

      self.requested = multihost_utils.reached_preemption_sync_point(call)
    return self.requested

  def __enter__(self):
    if self._multi:  # keep the preemption service's own SIGTERM handler
      return self
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. a notebook worker): no handler
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
  if config_checks.fixed_seed(config) is not None:
    return config_checks.fixed_seed(config)
  seed = int.from_bytes(os.urandom(4), 'little') & 0x7FFFFFFF
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    seed = int(multihost_utils.broadcast_one_to_all(np.int32(seed)))
  logging.info(
    'config.seed=%s: drew seed %d (rerun with --config.seed=%d).', config.seed, seed, seed
  )
  return seed


def _missing_dirs(path: str) -> list:
  """`path` and those of its parents that do not exist yet, deepest first."""
  missing = []
  path = os.path.abspath(path)
  while not os.path.exists(path):
    missing.append(path)
    path = os.path.dirname(path)
  return missing


def remove_if_empty(dirs) -> None:
  """Removes each of `dirs` (deepest first) whose tree holds no file at all.

  For the folders a run created before it failed: it leaves no empty workdir behind.
  Only empty folders are removed (`os.rmdir`), so no file is ever lost.
  """
  for top in dirs:
    if not os.path.isdir(top):
      continue
    try:
      for root, _, _ in sorted(os.walk(top), key=lambda w: -len(w[0])):
        os.rmdir(root)  # fails (and stops) at the first folder that is not empty
    except OSError:
      return


def make_workdir(workdir: str | None, made: list | None = None) -> str:
  """Creates (or checks) the run's folder; appends the folders it created to `made`."""
  made = [] if made is None else made
  if not workdir and jax.process_count() > 1:
    raise UserError('a multi-process run needs --workdir (the same shared folder on every host).')
  if not workdir:
    made[:0] = _missing_dirs('runs')
    os.makedirs('runs', exist_ok=True)
    workdir = tempfile.mkdtemp(prefix=time.strftime('%Y%m%d-%H%M%S-'), dir='runs')
    made.insert(0, os.path.abspath(workdir))
    print(f'workdir: {workdir}', flush=True)
  try:
    made[:0] = _missing_dirs(workdir)
    os.makedirs(workdir, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix='.write_test', dir=workdir)  # unique per process
    with os.fdopen(fd, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise UserError(
      f'workdir {workdir!r} is not writable ({e.strerror}); pass a --workdir you can write to.'
    ) from None
  return workdir


def _oom_hint(e: Exception) -> str | None:
  text = str(e)
  if 'RESOURCE_EXHAUSTED' in text or 'Out of memory' in text or 'out of memory' in text:
    return (
      'out of device memory: reduce config.batch_size and/or config.eval_batch_size '
      '(or use dtype=bfloat16). Details: ' + text.splitlines()[0][:300]
    )
  return None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | None) -> steps.TrainState:
  """Trains, evaluates every `eval_every_epochs`, checkpoints, and resumes from `workdir`.

  Writes config.json, metrics.jsonl, summary.json and TensorBoard events to `workdir`.
  Logs to stderr even from plain Python (`writers.visible_logs`). A run that fails
  before writing anything removes the folders it created. Returns the final TrainState.
  """
  config = config_checks.resolve_model_defaults(config)  # None fields: the model's values
  made = []  # folders this run created (deepest first)
  try:
    with writers.visible_logs():
      return _train_and_evaluate(config, workdir, made)
  except BaseException as e:
    if made and jax.process_count() == 1:  # else another process may write there now
      remove_if_empty(made)
    if isinstance(e, jax.errors.JaxRuntimeError) and _oom_hint(e):
      raise UserError(_oom_hint(e)) from None
    raise


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


def best_record(history, key: str) -> dict | None:
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


def _max_over_epochs(history, key: str) -> float | None:
  values = [r[key] for r in history if r.get(key) is not None]
  return max(values) if values else None


def _train_and_evaluate(config, workdir, made):
  writers.quiet_library_logs()
  mesh = steps.make_mesh(int(config.num_devices))
  config_checks.validate_config(config, mesh.size)
  workdir = make_workdir(workdir, made)
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
  config_checks.validate_against_data(config, dataset)
  spe = pipeline.steps_per_epoch(dataset.num_train, config.num_neg, config.batch_size)
  logging.info(
    'Devices: %d (%d processes), platform %s. Dataset %s: %d users, %d items, '
    '%d train positives; %d samples/epoch, %d steps/epoch of %d.',
    mesh.size,
    jax.process_count(),
    jax.devices()[0].platform,
    dataset.name,
    dataset.num_users,
    dataset.num_items,
    dataset.num_train,
    pipeline.epoch_size(dataset.num_train, config.num_neg),
    spe,
    config.batch_size,
  )

  init_key, data_key, dropout_key = steps.make_keys(seed, mesh)
  model_config = config.model
  if sharding.is_sharded(config):  # a projection would read whole tables, not row shards
    model_config = model_config.copy_and_resolve_references()
    model_config.first_layer = 'concat'
  model = models.create_model(model_config, dataset.num_users, dataset.num_items, config.dtype)
  _check_memory(config, model, dataset, mesh, init_key)
  data = steps.device_data(config, dataset, mesh)
  state = steps.create_train_state(config, model, init_key, mesh)
  logging.info('Model %s: %d parameters.', config.model.name, models.num_params(state.params))
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
  )

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
  train_step = steps.make_train_step(config, mesh, like=abstract)
  # k steps per call; an epoch's last (steps left < k) run one per call through train_step.
  per_call = int(config.steps_per_call)
  multi_step = (
    steps.make_train_step(config, mesh, num_steps=per_call, like=abstract) if per_call > 1 else None
  )
  build_epoch = steps.make_epoch_items(config, mesh, data)
  # The most any device holds of each (collective with several processes: all call it).
  device_bytes = memory.bytes_per_device(
    params=state.params, opt_state=state.opt_state, data=data, epoch=build_epoch.abstract(data)
  )
  logging.info('Bytes per device (max over devices): %s', device_bytes)
  # Every epoch's evaluation reads the validation split when there is one, else the test.
  eval_step = steps.make_eval_step(
    config,
    mesh,
    model,
    dataset.num_users,
    dataset.num_items,
    split='valid' if validated else 'test',
  )

  def meta_now(epoch):
    return {
      'seed': seed,
      'config': ckpt_lib.config_to_dict(config),
      'epoch': epoch,
      'history': history,
      'test_hr_max_over_epochs': _max_over_epochs(history, 'hr'),
      'eval_hash': eval_hash,
      'total_wall_s': elapsed_before + (time.time() - t_start),
      'hash_steps': hash_steps,
    }

  t_start = time.time()
  start_step = int(jax.device_get(state.step))
  start_epoch = start_step // spe
  reached = next(
    (
      h['epoch']
      for h in history
      if config.hr_threshold is not None and h.get('hr', 0) >= config.hr_threshold
    ),
    None,
  )
  stop_early = validated and early_stopped(history, select_key, patience)
  num_epochs = int(config.num_epochs)
  preempted = False
  where = {'epoch': start_epoch, 'step': start_step - start_epoch * spe, 'saved': latest}
  test_result, test_hash = None, None

  def stalled(idle):
    saved = where['saved']
    kept = (
      f'the last checkpoint (step {saved}) in {ckpts.directory} is intact; rerun the '
      'same command to resume'
      if saved is not None
      else 'no checkpoint had been saved yet; rerun the same command to start again'
    )
    return (
      f'no training progress for {idle:.0f} s at epoch {where["epoch"]}, batch '
      f'{where["step"]} of {spe}: a device or a multi-device collective is stalled '
      f'(another process died or hangs, or a device is wedged). {kept}. '
      'config.stall_timeout_s sets this limit (0 disables it).'
    )

  def save(step, epoch):
    ckpts.save(step, state, meta_now(epoch))
    where['saved'] = step
    watchdog.beat()

  watchdog = dispatch.Watchdog(float(config.stall_timeout_s), stalled)
  in_flight = dispatch.InFlight(dispatch.in_flight_limit(mesh.devices.flat), on_wait=watchdog.beat)
  calls = 0  # train calls so far in this process (the preemption check's counter)
  log_every = int(config.log_every_steps)
  with _Preemption() as preemption, watchdog:
    for epoch in range(start_epoch, num_epochs):
      if reached is not None or stop_early:
        break
      first_step = start_step - epoch * spe if epoch == start_epoch else 0
      where.update(epoch=epoch, step=first_step)
      t_epoch = time.time()
      stopped = False  # only a SIGTERM before the epoch's last step stops it midway
      items = build_epoch(data, data_key, np.int32(epoch), in_flight)
      if config.hash_pipeline and first_step > 0 and hash_steps != first_step:
        state = _replay_hashes(
          config, mesh, state, data, items, data_key, epoch, first_step, in_flight
        )
      hash_steps = first_step if config.hash_pipeline else None
      progress = writers.progress(spe, first_step, f'epoch {epoch}', is_main, on_wait=watchdog.beat)
      step = first_step
      while step < spe:
        if preemption.check(calls):
          stopped = True
          break
        calls += 1
        n = per_call if multi_step is not None and step + per_call <= spe else 1
        state, out = (multi_step if n > 1 else train_step)(
          state, data, items, (data_key, dropout_key), np.int32(epoch), np.int32(step)
        )
        in_flight.add(out['train_loss'])
        watchdog.beat()
        step += n
        where['step'] = step
        if hash_steps is not None:
          hash_steps = step
        progress.add(out['train_loss'], n)  # counted when the device has finished it
        if log_every and step // log_every > (step - n) // log_every:
          _check_finite(state, ckpts)
          writer.log_step(epoch, step, spe, state)
      progress.close()
      if stopped:
        _check_finite(state, ckpts)
        gstep = int(jax.device_get(state.step))
        if ckpts.latest_step() != gstep:  # else: stopped right after an epoch-end save
          save(gstep, epoch)
        logging.info(
          'SIGTERM: saved a checkpoint at step %d (epoch %d, batch %d of %d); '
          'rerun the same command to resume.',
          gstep,
          epoch,
          gstep - epoch * spe,
          spe,
        )
        preempted = True
        break
      _check_finite(state, ckpts)
      loss_sum, loss_count = jax.device_get((state.loss_sum, state.loss_count))
      watchdog.beat()
      epoch_wall = time.time() - t_epoch
      record = {
        'epoch': epoch,
        'train_loss': float(loss_sum / max(loss_count, 1.0)),
        'train_samples_per_sec': float(loss_count) / max(epoch_wall, 1e-9)
        if first_step == 0
        else None,
      }
      if config.hash_pipeline:
        record['pipeline_hash_first'] = hashing.hexdigest(state.hash_first)
        record['pipeline_hash_all'] = hashing.hexdigest(state.hash_chain)
        logging.info('[pipeline_hash] First batch hash: %s', record['pipeline_hash_first'])
        logging.info('[pipeline_hash] All batches hash: %s', record['pipeline_hash_all'])
        logging.info('[pipeline_hash] Batch count: %d', spe)
      improved = False
      if (epoch + 1) % int(config.eval_every_epochs) == 0 or epoch + 1 == num_epochs:
        result, digest = steps.evaluate(
          eval_step,
          state.params,
          data,
          data_key,
          dataset.num_users,
          int(config.eval_batch_size),
          in_flight,
        )
        watchdog.beat()
        if config.hash_pipeline and eval_hash is None:
          logging.info(
            '[pipeline_hash] %s candidates hash: %s', 'Valid' if validated else 'Eval', digest
          )
        eval_hash = digest
        if validated:
          record.update({f'valid_{k}': v for k, v in result.items()})
          improved = best_record(history + [record], select_key) is record
          logging.info(
            'Iteration %d: valid HR = %.4f, NDCG = %.4f, MRR = %.4f%s',
            epoch,
            result['hr'],
            result['ndcg'],
            result['mrr'],
            ' (best so far)' if improved else '',
          )
        else:
          record.update(result)
          logging.info('Iteration %d: HR = %.4f, NDCG = %.4f', epoch, result['hr'], result['ndcg'])
      record['epoch_wall_s'] = time.time() - t_epoch
      record['total_wall_s'] = elapsed_before + (time.time() - t_start)
      history.append(record)
      writer.write_epoch(record)
      if (
        config.hr_threshold is not None
        and record.get('hr') is not None
        and record['hr'] >= float(config.hr_threshold)
      ):
        reached = epoch
        logging.info(
          'Reached HR@%d >= %s after %d epochs in %.1f s.',
          config.top_k,
          config.hr_threshold,
          epoch + 1,
          record['total_wall_s'],
        )
      if validated and early_stopped(history, select_key, patience):
        stop_early = True
        best = best_record(history, select_key)
        logging.info(
          'Early stop after epoch %d: valid %s@%d has not improved for %d '
          'epochs since epoch %d (%.4f).',
          epoch,
          config.select_metric.upper(),
          config.top_k,
          epoch - best['epoch'],
          best['epoch'],
          best[select_key],
        )
      gstep = int(jax.device_get(state.step))
      if improved:  # before the latest checkpoint, whose history names this epoch best
        best_ckpts.save(gstep, state, meta_now(epoch + 1), metrics={select_key: record[select_key]})
        watchdog.beat()
      last = epoch + 1 == num_epochs or reached is not None or stop_early
      every = int(config.checkpoint_every_epochs)
      if last or (every and (epoch + 1) % every == 0):
        save(gstep, epoch + 1)

    if validated and not preempted and best_record(history, select_key) is not None:
      test_result, test_hash = _test_selected(
        config,
        mesh,
        model,
        best_ckpts,
        abstract,
        data,
        data_key,
        dataset,
        best_record(history, select_key),
        in_flight,
      )
      watchdog.beat()

  phash = steps.params_hash(state.params, mesh, model)
  logging.info('[params_hash] %s', phash)
  best = best_record(history, select_key) if validated else None
  # The test metrics of the run's result: the selected parameters' with a validation
  # split, else the last evaluated epoch's (the final parameters', unless preempted).
  final_test = (
    test_result
    if validated
    else {
      k: v
      for k, v in next((r for r in reversed(history) if 'hr' in r), {}).items()
      if k in ('hr', 'ndcg', 'mrr') or k.startswith('full_')
    }
  )
  summary = {
    'seed': seed,
    'params_hash': phash,
    'epochs_done': len(history),
    'validation': config.validation,
    'select_metric': select_key,
    'best_epoch': None if best is None else best['epoch'],
    **{
      f'valid_{k}': None if best is None else best.get(f'valid_{k}') for k in ('hr', 'ndcg', 'mrr')
    },
    **{
      f'test_{k}': None if final_test is None else final_test.get(k) for k in ('hr', 'ndcg', 'mrr')
    },
    'test_hr_max_over_epochs': _max_over_epochs(history, 'hr'),
    'test_ndcg_max_over_epochs': _max_over_epochs(history, 'ndcg'),
    'final': history[-1] if history else None,
    'eval_candidates_hash': test_hash if validated else eval_hash,
    'valid_candidates_hash': eval_hash if validated else None,
    'early_stopped': bool(stop_early),
    'hr_threshold': config.hr_threshold,
    'epochs_to_target': None if reached is None else reached + 1,
    'seconds_to_target': None
    if reached is None
    else history[[h['epoch'] for h in history].index(reached)]['total_wall_s'],
    'preempted': preempted,
    'num_devices': mesh.size,
    'bytes_per_device': device_bytes,
    'num_processes': jax.process_count(),
    'platform': jax.devices()[0].platform,
    'versions': library_versions(),
    'workdir': os.path.abspath(workdir),
  }
  if final_test:
    summary.update({f'test_{k}': v for k, v in final_test.items() if k.startswith('full_')})
  if best is not None:
    summary.update({k: v for k, v in best.items() if k.startswith('valid_full_')})
  writer.write_summary(summary)
  writer.close()
  ckpts.close()
  if best_ckpts is not None:
    best_ckpts.close()
  if is_main:
    logging.info(
      '%s',
      done_line(
        workdir, summary, history, int(config.top_k), elapsed_before + (time.time() - t_start)
      ),
    )
  return state


def done_line(workdir: str, summary: dict, history: list, top_k: int, wall_s: float) -> str:
  """The run's last line: where its outputs are and its headline result.

  `Done: runs/demo - HR@10 0.6877, NDCG@10 0.4655 (epoch 7), 8.1 s; summary.json`: the
  run's result as in summary.json, i.e. the selected epoch's test metrics with a
  validation split (the best validation epoch so far if it was stopped before the
  test), else the last evaluated epoch's.
  """

  def metrics(prefix, label):
    return (
      f'{label}HR@{top_k} {summary[prefix + "hr"]:.4f}, NDCG@{top_k} {summary[prefix + "ndcg"]:.4f}'
    )

  if summary['validation'] == 'none' and summary['test_hr'] is not None:
    last = next(r['epoch'] for r in reversed(history) if r.get('hr') is not None)
    what = f'{metrics("test_", "")} (epoch {last})'
  elif summary['validation'] != 'none' and summary['test_hr'] is not None:
    what = f'{metrics("test_", "test ")} (selected epoch {summary["best_epoch"]})'
  elif summary['validation'] != 'none' and summary['valid_hr'] is not None:
    what = f'{metrics("valid_", "valid ")} (best epoch so far: {summary["best_epoch"]})'
  else:
    what = 'no epoch evaluated yet'
  if summary['preempted']:
    return (
      f'Stopped (SIGTERM): {workdir} - {what}, {wall_s:.1f} s; summary.json; rerun '
      'the same command to resume.'
    )
  return f'Done: {workdir} - {what}, {wall_s:.1f} s; summary.json'


def _test_selected(
  config,
  mesh,
  model,
  best_ckpts,
  abstract,
  data,
  data_key,
  dataset,
  best: dict,
  in_flight: dispatch.InFlight,
):
  """Test metrics of the selected (best validation) epoch's parameters: the run's result.

  Restores WORKDIR/best_checkpoint, checks that it is the selected epoch's, and evaluates
  it once on the test split. Returns (metrics, test candidates digest).
  """
  step = best_ckpts.best_step()
  if step is None:
    raise UserError(
      f'the best epoch\'s checkpoint is missing from {best_ckpts.directory}; '
      'it is written with each new best validation metric. Start the run '
      'again in a new --workdir.'
    )
  selected, meta = best_ckpts.restore(abstract, step)
  if meta['epoch'] != best['epoch'] + 1:
    raise UserError(
      f'{best_ckpts.directory} holds epoch {meta["epoch"] - 1}, but the run\'s '
      f'metrics select epoch {best["epoch"]}; start the run again in a new '
      '--workdir.'
    )
  test_step = steps.make_eval_step(
    config, mesh, model, dataset.num_users, dataset.num_items, split='test'
  )
  result, digest = steps.evaluate(
    test_step,
    selected.params,
    data,
    data_key,
    dataset.num_users,
    int(config.eval_batch_size),
    in_flight,
  )
  logging.info(
    'Selected epoch %d (valid %s@%d = %.4f): test HR = %.4f, NDCG = %.4f, MRR = %.4f',
    best['epoch'],
    config.select_metric.upper(),
    config.top_k,
    best[f'valid_{config.select_metric}'],
    result['hr'],
    result['ndcg'],
    result['mrr'],
  )
  if config.hash_pipeline:
    logging.info('[pipeline_hash] Eval candidates hash: %s', digest)
  return result, digest


def memory_need(config, model, dataset, mesh, key) -> dict:
  """Bytes per device (the most any holds) of the state, data and epoch, before building.

  Collective with several processes: every process calls it.
  """
  state = steps.create_train_state(config, model, key, mesh, abstract=True)
  data = steps.abstract_device_data(config, dataset, mesh)
  epoch = steps.epoch_items_shape(config, mesh, data)
  return memory.bytes_per_device(
    params=state.params, opt_state=state.opt_state, data=data, epoch=epoch
  )


def _check_memory(config, model, dataset, mesh, key) -> None:
  """Refuses, before allocating, a run whose state, data and epoch cannot fit in memory."""
  need = memory_need(config, model, dataset, mesh, key)
  alternative = ''
  if not sharding.is_sharded(config):
    other = config.copy_and_resolve_references()
    other.sharding = 'sharded'
    split = sum(memory_need(other, model, dataset, mesh, key).values())
    alternative = (
      f'--config.sharding=sharded splits the tables, their optimizer state, '
      f'the data and the epoch over the {mesh.size} devices: about '
      f'{split / 1e9:.2f} GB per device (docs/scale.md).'
    )
  memory.check_fits(
    need, [d for d in mesh.devices.flat if d.process_index == jax.process_index()], alternative
  )


def _check_finite(state: steps.TrainState, ckpts: ckpt_lib.Checkpoints) -> None:
  bad = int(jax.device_get(state.bad_step))
  if bad >= 0:
    latest = ckpts.latest_step()
    where = (
      f'the last good checkpoint (step {latest}) in {ckpts.directory} is untouched'
      if latest is not None
      else 'no checkpoint had been saved yet'
    )
    raise UserError(
      f'the training loss became NaN or inf at global step {bad}; {where}. '
      'Lower config.learning_rate or check the data.'
    )


def _replay_hashes(
  config,
  mesh,
  state: steps.TrainState,
  data,
  items,
  data_key,
  epoch: int,
  first_step: int,
  in_flight: dispatch.InFlight,
) -> steps.TrainState:
  """Recomputes the digests of this epoch's batches [0, first_step) into `state`.

  For a resume that turns `hash_pipeline` on mid-epoch, or whose checkpoint's digests do
  not cover the batches before it: the logged digests then cover the whole epoch and
  equal an uninterrupted hashed run's, instead of silently covering a part of it.
  """
  logging.info(
    '[pipeline_hash] The checkpoint does not hash batches 0..%d of epoch %d; '
    'recomputing their digests.',
    first_step - 1,
    epoch,
  )
  replay = steps.make_hash_replay(config, mesh)
  chain, first = state.hash_chain, state.hash_first
  replays = dispatch.InFlight(in_flight.limit)  # the chain goes on into the donated state
  for step in range(first_step):
    chain, first = replay(chain, first, data, items, data_key, np.int32(epoch), np.int32(step))
    replays.add(chain)
  jax.block_until_ready((chain, first))
  return state.replace(hash_chain=chain, hash_first=first)


def _load_pretrained(config, state: steps.TrainState, mesh: Mesh):
  """NeuMF params from the final checkpoints of trained GMF / MLP workdirs."""

  def load(path, name):
    if not path:
      return None
    ck = ckpt_lib.Checkpoints(path, 1)
    step = ck.latest_step()
    if step is None:
      raise UserError(
        f'config.model.pretrained_{name}={path!r} has no checkpoint; train '
        f'a {name} model with --workdir={path} first.'
      )
    meta = ck.restore_meta(step)
    saved = meta['config']['model']
    if saved['name'] != name:
      raise UserError(
        f'config.model.pretrained_{name}={path!r} holds a {saved["name"]} model, not {name}.'
      )
    restored = ck.manager.restore(
      step, args=ckpt_lib.ocp.args.Composite(state=ckpt_lib.ocp.args.StandardRestore())
    )['state']
    ck.close()
    return restored['params']

  gmf = load(config.model.pretrained_gmf, 'gmf')
  mlp = load(config.model.pretrained_mlp, 'mlp')
  current = jax.device_get(sharding.gathered(state.params, mesh))  # whole, on every host
  params = models.neumf_from_pretrained(current, gmf, mlp)
  try:
    # The pretrained runs' tables as saved (either layout): this run's rows.
    params = jax.tree.map(sharding.fit_rows, params, current)
    if sharding.is_sharded(config):
      return jax.device_put(params, sharding.shardings(params, mesh))
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
  errors.define_config_file('configs/default.py', 'Training config file.')
  flags.DEFINE_string('workdir', None, 'Run directory (made if absent; resumed).')
  flags.DEFINE_string(
    'coordinator_address', None, 'Multi-host: host:port of process 0 (jax.distributed).'
  )
  flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes.')
  flags.DEFINE_integer('process_id', None, 'Multi-host: this process index.')


@exit_on_user_error
def main(argv):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  FLAGS = flags.FLAGS
  config = FLAGS.config
  writers.quiet_library_logs()  # before JAX starts its backends
  launch.xla_flags(config)
  launch.maybe_initialize_distributed(
    FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id
  )
  logging.info(
    'JAX process %d of %d, %d local devices of %d.',
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
  train_and_evaluate(config, FLAGS.workdir)


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=parse_flags)
