"""`train_and_evaluate(config, workdir)`: a run as named stages.

setup (run.py) -> resume -> for each epoch: train, evaluate, select and save -> test the
selected epoch -> summary. The loop's position lives in one `Progress` value, which the
checkpoints' meta, the stall watchdog's message and the preemption save read.
"""

import dataclasses
import math
import os
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from ncf_jax import checkpoint as ckpt_lib
from ncf_jax import dispatch, hashing, steps, writers
from ncf_jax.errors import UserError
from ncf_jax.train.preemption import Interrupted, Preemption
from ncf_jax.train.progress import Progress
from ncf_jax.train.provenance import Provenance
import ncf_jax.train.results as results
from ncf_jax.train.run import Run, setup
from ncf_jax.train.workdir import remove_if_empty


@dataclasses.dataclass(frozen=True)
class Guards:
  """What watches the loop: SIGTERM, a stall, and how far dispatch may run ahead."""

  preemption: Preemption
  watchdog: dispatch.Watchdog
  in_flight: dispatch.InFlight


def oom_hint(e: Exception) -> str | None:
  """The one-line advice for a device out-of-memory error, or None for any other error."""
  text = str(e)
  if 'RESOURCE_EXHAUSTED' in text or 'Out of memory' in text or 'out of memory' in text:
    return (
      'out of device memory: reduce config.batch_size and/or config.eval_batch_size '
      '(or use dtype=bfloat16). Details: ' + text.splitlines()[0][:300]
    )
  return None


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str | None, provenance: Provenance | None = None
) -> steps.TrainState:
  """Trains, evaluates every `eval_every_epochs`, checkpoints, and resumes from `workdir`.

  Writes config.json, metrics.jsonl, summary.json and TensorBoard events to `workdir`
  (without one: a new `runs/<config>-<date>-<time>`). `provenance` (the command's) is
  recorded in config.json and summary.json. Logs to stderr even from plain Python
  (`writers.visible_logs`). A run that fails before writing anything removes the folders
  it created. Returns the final TrainState.
  """
  from ncf_jax import config_checks

  config = config_checks.resolve_model_defaults(config)  # None fields: the model's values
  made: list[str] = []  # folders this run created (deepest first)
  try:
    with writers.visible_logs():
      run = setup(config, workdir, made, provenance)
      if not workdir and run.is_main:
        print(f'workdir: {run.workdir}', flush=True)
      try:
        return _stages(run)
      finally:
        run.lock.release()  # also when the loop fails: the workdir is free again
  except BaseException as e:
    if made and jax.process_count() == 1:  # else another process may write there now
      remove_if_empty(made)
      if not workdir and os.path.isdir(made[0]):  # kept: it holds what the run wrote
        print(f'workdir: {os.path.relpath(made[0])}', flush=True)
    hint = oom_hint(e) if isinstance(e, jax.errors.JaxRuntimeError) else None
    if hint:
      raise UserError(hint) from None
    raise


def _stages(run: Run) -> steps.TrainState:
  state = run.take_state()
  progress = resume(run, state)
  test, test_hash = None, None
  watchdog = dispatch.Watchdog(
    float(run.config.stall_timeout_s), lambda idle: stall_message(run, progress, idle)
  )
  in_flight = dispatch.InFlight(
    dispatch.in_flight_limit(list(run.mesh.devices.flat)), on_wait=watchdog.beat
  )
  with Preemption() as preemption, watchdog:
    guards = Guards(preemption, watchdog, in_flight)
    for epoch in range(progress.epoch, int(run.config.num_epochs)):
      if progress.finished:
        break
      state, record = train_epoch(run, state, progress, guards, epoch)
      if record is None:  # preempted: saved mid-epoch
        break
      improved = evaluate_epoch(run, state, progress, guards, epoch, record)
      end_epoch(run, state, progress, guards, epoch, record, improved)
    best = results.best_record(progress.history, run.select_key)
    if run.select_key and run.config.test_at_end and not progress.preempted and best is not None:
      test, test_hash = test_selected(run, best, in_flight)
      watchdog.beat()
  finish(run, state, progress, test, test_hash)
  if progress.stop_reason == 'Ctrl-C':
    raise Interrupted(f'Ctrl-C: the run saved its state in {run.workdir}; rerun to resume.')
  return state


def resume(run: Run, state: steps.TrainState) -> Progress:
  """The loop's position from the restored checkpoint (or the start)."""
  meta = run.resumed or {}
  history = list(meta.get('history', []))
  start_step = int(jax.device_get(state.step))
  spe = run.steps_per_epoch
  threshold = run.config.hr_threshold
  return Progress(
    epoch=start_step // spe,
    step=start_step - (start_step // spe) * spe,
    saved=run.ckpts.latest_step(),
    history=history,
    eval_hash=meta.get('eval_hash'),
    hash_steps=meta.get('hash_steps'),
    elapsed_before=meta.get('total_wall_s', 0.0),
    reached=next(
      (h['epoch'] for h in history if threshold is not None and h.get('hr', 0) >= threshold),
      None,
    ),
    stop_early=run.select_key is not None
    and results.early_stopped(history, run.select_key, int(run.config.early_stop_patience)),
  )


def stall_message(run: Run, progress: Progress, idle: float) -> str:
  """The watchdog's message: where the loop stopped moving, and what is safe on disk."""
  saved = progress.saved
  kept = (
    f'the last checkpoint (step {saved}) in {run.ckpts.directory} is intact; rerun the '
    'same command to resume'
    if saved is not None
    else 'no checkpoint had been saved yet; rerun the same command to start again'
  )
  return (
    f'no training progress for {idle:.0f} s at epoch {progress.epoch + 1}, batch '
    f'{progress.step} of {run.steps_per_epoch}: a device or a multi-device collective is '
    f'stalled (another process died or hangs, or a device is wedged). {kept}. '
    'config.stall_timeout_s sets this limit (0 disables it).'
  )


def train_epoch(run: Run, state, progress: Progress, guards: Guards, epoch: int):
  """Trains `epoch` from its first unfinished batch.

  Returns (state, the epoch's record), or (state, None) when SIGTERM stopped it midway
  (after saving a checkpoint at the current step).
  """
  config = run.config
  first_step = progress.step if epoch == progress.epoch else 0
  progress.epoch, progress.step, progress.t_epoch = epoch, first_step, time.time()
  items = run.programs.build_epoch(run.data, run.data_key, np.int32(epoch), guards.in_flight)
  if config.hash_pipeline and first_step > 0 and progress.hash_steps != first_step:
    state = _replay_hashes(run, state, items, epoch, first_step, guards.in_flight)
  progress.hash_steps = first_step if config.hash_pipeline else None
  state, stopped = _train_batches(run, state, progress, guards, items, epoch, first_step)
  _check_health(run, state)
  if stopped:
    _save_preempted(run, state, progress, epoch, guards.preemption.reason or 'SIGTERM')
    return state, None
  loss_sum, loss_count = jax.device_get((state.loss_sum, state.loss_count))
  guards.watchdog.beat()
  epoch_wall = time.time() - progress.t_epoch
  record: dict[str, Any] = {
    'epoch': epoch,
    'train_loss': float(loss_sum / max(loss_count, 1.0)),
    'train_samples_per_sec': float(loss_count) / max(epoch_wall, 1e-9) if first_step == 0 else None,
  }
  if config.hash_pipeline:
    record['pipeline_hash_first'] = hashing.hexdigest(state.hash_first)
    record['pipeline_hash_all'] = hashing.hexdigest(state.hash_chain)
    logging.info('[pipeline_hash] First batch hash: %s', record['pipeline_hash_first'])
    logging.info('[pipeline_hash] All batches hash: %s', record['pipeline_hash_all'])
    logging.info('[pipeline_hash] Batch count: %d', run.steps_per_epoch)
  return state, record


def _train_batches(run: Run, state, progress: Progress, guards: Guards, items, epoch, first_step):
  """Runs the epoch's train calls from `first_step`; (state, whether SIGTERM stopped it)."""
  spe, per_call = run.steps_per_epoch, int(run.config.steps_per_call)
  multi, log_every = run.programs.multi_step, int(run.config.log_every_steps)
  bar = writers.progress(
    spe, first_step, f'epoch {epoch + 1}/{int(run.config.num_epochs)}', run.is_main,
    on_wait=guards.watchdog.beat, samples_per_step=int(run.config.batch_size),
  )  # fmt: skip
  step, stopped = first_step, False
  while step < spe:
    if guards.preemption.check(progress.calls):
      stopped = True
      break
    progress.calls += 1
    n = per_call if multi is not None and step + per_call <= spe else 1
    call = multi if multi is not None and n > 1 else run.programs.train_step
    if progress.calls == 1:
      logging.info('Compiling the train step…')
      t_compile = time.time()
    state, out = call(
      state, run.data, items, (run.data_key, run.dropout_key), np.int32(epoch), np.int32(step)
    )
    if progress.calls == 1:
      logging.info('Compiled the train step in %.1f s.', time.time() - t_compile)
    guards.in_flight.add(out['train_loss'])
    guards.watchdog.beat()
    step += n
    progress.step = step
    if progress.hash_steps is not None:
      progress.hash_steps = step
    bar.add(out['train_loss'], n)  # counted when the device has finished it
    if log_every and step // log_every > (step - n) // log_every:
      _check_health(run, state)
      run.writer.log_step(epoch, step, spe, state)
  bar.close()
  return state, stopped


def _save_preempted(run: Run, state, progress: Progress, epoch: int, reason: str) -> None:
  """SIGTERM or Ctrl-C mid-epoch: a checkpoint at the current step, so a rerun resumes
  exactly."""
  gstep = int(jax.device_get(state.step))
  if run.ckpts.latest_step() != gstep:  # else: stopped right after an epoch-end save
    save(run, state, progress, gstep, epoch)
  logging.info(
    '%s: saved a checkpoint at step %d (epoch %d, batch %d of %d); '
    'rerun the same command to resume.',
    reason, gstep, epoch + 1, gstep - epoch * run.steps_per_epoch, run.steps_per_epoch,
  )  # fmt: skip
  progress.preempted, progress.stop_reason = True, reason


def evaluate_epoch(run: Run, state, progress: Progress, guards: Guards, epoch: int, record) -> bool:
  """Evaluates when due into `record`; True when the selection metric reached a new best."""
  config = run.config
  due = (epoch + 1) % int(config.eval_every_epochs) == 0 or epoch + 1 == int(config.num_epochs)
  if not due:
    return False
  t_eval = time.time()
  result, digest = steps.evaluate(
    run.programs.eval_step, state.params, run.data, run.data_key,
    run.dataset.num_users, int(config.eval_batch_size), guards.in_flight,
  )  # fmt: skip
  guards.watchdog.beat()
  seconds, progress.evaluations = time.time() - t_eval, progress.evaluations + 1
  logging.info(
    'Evaluated %d users in %.1f s (%.0f users/s%s).', run.dataset.num_users, seconds,
    run.dataset.num_users / max(seconds, 1e-9),
    ', compiling included' if progress.evaluations == 1 else '',
  )  # fmt: skip
  if config.hash_pipeline and progress.eval_hash is None:
    logging.info(
      '[pipeline_hash] %s candidates hash: %s', 'Valid' if run.select_key else 'Eval', digest
    )
  progress.eval_hash = digest
  if run.select_key is None:
    record.update(result)
    logging.info('Iteration %d: HR = %.4f, NDCG = %.4f', epoch + 1, result['hr'], result['ndcg'])
    return False
  record.update({f'valid_{k}': v for k, v in result.items()})
  improved = results.best_record(progress.history + [record], run.select_key) is record
  logging.info(
    'Iteration %d: valid HR = %.4f, NDCG = %.4f, MRR = %.4f%s',
    epoch + 1, result['hr'], result['ndcg'], result['mrr'], ' (best so far)' if improved else '',
  )  # fmt: skip
  return improved


def end_epoch(run: Run, state, progress: Progress, guards: Guards, epoch, record, improved):
  """Records the epoch, decides whether to stop, and saves the best and latest checkpoints."""
  config = run.config
  record['epoch_wall_s'] = time.time() - progress.t_epoch
  record['total_wall_s'] = progress.wall_s()
  progress.history.append(record)
  run.writer.write_epoch(record)
  _check_stop(run, progress, epoch, record)
  gstep = int(jax.device_get(state.step))
  if improved:  # before the latest checkpoint, whose history names this epoch best
    assert run.best_ckpts is not None and run.select_key is not None
    run.best_ckpts.save(
      gstep, state, checkpoint_meta(run, progress, epoch + 1),
      metrics={run.select_key: record[run.select_key]},
    )  # fmt: skip
    guards.watchdog.beat()
  every = int(config.checkpoint_every_epochs)
  if (
    epoch + 1 == int(config.num_epochs) or progress.finished or (every and (epoch + 1) % every == 0)
  ):
    save(run, state, progress, gstep, epoch + 1)
    guards.watchdog.beat()


def _check_stop(run: Run, progress: Progress, epoch: int, record: dict) -> None:
  """The MLPerf quality target, and early stopping on the validation metric."""
  config = run.config
  if (
    config.hr_threshold is not None
    and record.get('hr') is not None
    and record['hr'] >= float(config.hr_threshold)
  ):
    progress.reached = epoch
    logging.info(
      'Reached HR@%d >= %s after %d epochs in %.1f s.',
      config.top_k, config.hr_threshold, epoch + 1, record['total_wall_s'],
    )  # fmt: skip
  key, patience = run.select_key, int(config.early_stop_patience)
  if key is not None and results.early_stopped(progress.history, key, patience):
    progress.stop_early = True
    best = results.best_record(progress.history, key)
    assert best is not None
    logging.info(
      'Early stop after epoch %d: valid %s@%d has not improved for %d epochs since epoch '
      '%d (%.4f).',
      epoch + 1, config.select_metric.upper(), config.top_k, epoch - best['epoch'],
      best['epoch'] + 1, best[key],
    )  # fmt: skip


def checkpoint_meta(run: Run, progress: Progress, epoch: int) -> dict:
  """What a checkpoint saves beside the state: enough to resume the loop exactly."""
  return {
    'seed': run.seed,
    'config': ckpt_lib.config_to_dict(run.config),
    'epoch': epoch,
    'history': progress.history,
    'test_hr_max_over_epochs': results.max_over_epochs(progress.history, 'hr'),
    'eval_hash': progress.eval_hash,
    'total_wall_s': progress.wall_s(),
    'hash_steps': progress.hash_steps,
  }


def save(run: Run, state, progress: Progress, step: int, epoch: int) -> None:
  run.ckpts.save(step, state, checkpoint_meta(run, progress, epoch))
  progress.saved = step


def test_selected(run: Run, best: dict, in_flight: dispatch.InFlight):
  """Test metrics of the selected (best validation) epoch's parameters: the run's result.

  Restores WORKDIR/best_checkpoint, checks that it is the selected epoch's, and evaluates
  it once on the test split. Returns (metrics, test candidates digest).
  """
  config, best_ckpts = run.config, run.best_ckpts
  assert best_ckpts is not None
  step = best_ckpts.best_step()
  if step is None:
    raise UserError(
      f"the best epoch's checkpoint is missing from {best_ckpts.directory}; "
      'it is written with each new best validation metric. Start the run '
      'again in a new --workdir.'
    )
  try:
    selected, meta = best_ckpts.restore(run.abstract, step)
  except ckpt_lib.Damaged as e:
    raise UserError(
      f"the best epoch's checkpoint (step {e.step}) is damaged ({e.reason}); it was set aside "
      f'in {best_ckpts.set_aside(e.step)}. The selected epoch cannot be tested without it: '
      'train again in a new --workdir.'
    ) from None
  if meta['epoch'] != best['epoch'] + 1:
    raise UserError(
      f'{best_ckpts.directory} holds epoch {meta["epoch"]}, but the run\'s '
      f'metrics select epoch {best["epoch"] + 1}; start the run again in a new '
      '--workdir.'
    )
  test_step = steps.make_eval_step(
    config, run.layout, run.model, run.dataset.num_users, run.dataset.num_items, split='test'
  )
  result, digest = steps.evaluate(
    test_step, selected.params, run.data, run.data_key, run.dataset.num_users,
    int(config.eval_batch_size), in_flight,
  )  # fmt: skip
  logging.info(
    'Selected epoch %d (valid %s@%d = %.4f): test HR = %.4f, NDCG = %.4f, MRR = %.4f',
    best['epoch'] + 1, config.select_metric.upper(), config.top_k,
    best[f'valid_{config.select_metric}'], result['hr'], result['ndcg'], result['mrr'],
  )  # fmt: skip
  if config.hash_pipeline:
    logging.info('[pipeline_hash] Eval candidates hash: %s', digest)
  return result, digest


def finish(run: Run, state, progress: Progress, test: dict | None, test_hash: str | None):
  """Writes summary.json, closes the writers and checkpoints, and logs the last line."""
  phash = steps.params_hash(state.params, run.layout, run.model)
  logging.info('[params_hash] %s', phash)
  summary = results.summary(run, progress, phash, test, test_hash)
  run.writer.write_summary(summary)
  run.close()
  if run.is_main:
    logging.info(
      '%s',
      results.done_line(
        run.workdir, summary, progress.history, int(run.config.top_k), progress.wall_s()
      ),
    )


def _last_good(ckpts: ckpt_lib.Checkpoints) -> str:
  """Names the newest checkpoint known to be intact: saved by this process, or restored
  and matching its digests (a step never checked is not called intact)."""
  good = ckpts.last_verified()
  if good is not None:
    return (
      f'the last checkpoint that passed its digest check (step {good}) in {ckpts.directory} '
      'is intact'
    )
  if ckpts.latest_step() is not None:
    return f'the checkpoints in {ckpts.directory} were not checked by this run'
  return 'no checkpoint had been saved yet'


def _check_health(run: Run, state: steps.TrainState) -> None:
  """Stops the run when the loss became NaN/inf, or diverged (`config.divergence_factor`)."""
  bad, loss_sum, count, step = jax.device_get(
    (state.bad_step, state.loss_sum, state.loss_count, state.step)
  )
  factor = float(run.config.divergence_factor)
  loss = float(loss_sum) / max(float(count), 1.0)
  if factor and int(bad) < 0 and loss > factor * math.log(2.0):
    raise UserError(
      f'the training loss diverged: its running mean this epoch is {loss:.4g} at global step '
      f'{int(step)}, over config.divergence_factor x ln 2 = {factor * math.log(2.0):.4g} '
      f'(a fresh model starts at 0.693); {_last_good(run.ckpts)}. Lower '
      'config.learning_rate, or pass --config.divergence_factor=0 to train on regardless.'
    )
  _check_finite(int(bad), run.ckpts)


def _check_finite(bad: int, ckpts: ckpt_lib.Checkpoints) -> None:
  if bad >= 0:
    where = _last_good(ckpts)
    raise UserError(
      f'the training loss became NaN or inf at global step {bad}; {where}. '
      'Lower config.learning_rate or check the data.'
    )


def _replay_hashes(run: Run, state, items, epoch: int, first_step: int, in_flight):
  """Recomputes the digests of this epoch's batches [0, first_step) into `state`.

  For a resume that turns `hash_pipeline` on mid-epoch, or whose checkpoint's digests do
  not cover the batches before it: the logged digests then cover the whole epoch and
  equal an uninterrupted hashed run's, instead of silently covering a part of it.
  """
  logging.info(
    '[pipeline_hash] The checkpoint does not hash batches 0..%d of epoch %d; '
    'recomputing their digests.',
    first_step - 1,
    epoch + 1,
  )
  replay = steps.make_hash_replay(run.config, run.layout)
  chain, first = state.hash_chain, state.hash_first
  replays = dispatch.InFlight(in_flight.limit)  # the chain goes on into the donated state
  for step in range(first_step):
    chain, first = replay(
      chain, first, run.data, items, run.data_key, np.int32(epoch), np.int32(step)
    )
    replays.add(chain)
  jax.block_until_ready((chain, first))
  return state.replace(hash_chain=chain, hash_first=first)
