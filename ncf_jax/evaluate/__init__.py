"""Evaluates a saved checkpoint (library; the command is `python -m ncf_jax.evaluate`).

The run is rebuilt from the checkpoint's own meta (its config and resolved seed), never
from flags, so the evaluation candidates are exactly those of training: the same seed
gives the same data key (`steps.make_keys`), hence the same negatives for every user, and
`eval_candidates_hash` equals the one in the run's summary.json. The model, the eval step
and the metrics are training's (`ncf_jax.steps`). Prints one readable line, then one JSON
line for scripts.

  python -m ncf_jax.evaluate --workdir=runs/neumf            # latest checkpoint
  python -m ncf_jax.evaluate --workdir=runs/neumf --step=4000
  python -m ncf_jax.evaluate --workdir=runs/neumf --data_dir=/data/ncf   # data moved
  python -m ncf_jax.evaluate --workdir=runs/ncf_paper --best --split=valid   # selected epoch

Read-only: safe to run while a train command is still writing to the same workdir.
"""

import functools
import os

from absl import logging
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections

from ncf_jax import checkpoint as ckpt_lib
from ncf_jax import config_checks, models, pipeline, sampling, steps
from ncf_jax import data as data_lib
from ncf_jax.errors import UserError


def _find_step(ckpts: ckpt_lib.Checkpoints, workdir: str, step: int | None) -> int:
  saved = sorted(ckpts.all_steps())
  if not saved:
    raise UserError(
      f'no checkpoint in {ckpts.directory}; train first with '
      f'`python -m ncf_jax.train --workdir={workdir}`.'
    )
  if step is None:
    return saved[-1]
  if step not in saved:
    raise UserError(
      f'no checkpoint at step {step} in {ckpts.directory}; available steps: '
      f'{", ".join(map(str, saved))}.'
    )
  return step


def _damaged(ckpts: ckpt_lib.Checkpoints, e: ckpt_lib.Damaged, explicit: bool) -> None:
  """A named step that is damaged is an error; the latest one is skipped with a warning
  (evaluate only reads: the train command sets damaged steps aside)."""
  if explicit:
    raise UserError(
      f'the checkpoint at step {e.step} in {ckpts.directory} is damaged ({e.reason}); '
      f'evaluate another --step (saved: {", ".join(map(str, sorted(ckpts.all_steps())))}).'
    )
  logging.warning('Checkpoint step %d in %s is damaged (%s); trying an older one.',
                  e.step, ckpts.directory, e.reason)  # fmt: skip


def _readable_meta(ckpts: ckpt_lib.Checkpoints, candidates: list[int], explicit: bool):
  for step in candidates:
    try:
      return step, ckpts.restore_meta(step)
    except ckpt_lib.Damaged as e:
      _damaged(ckpts, e, explicit)
  raise UserError(f'no checkpoint in {ckpts.directory} can be read (each is damaged).')


def _restore_intact(ckpts: ckpt_lib.Checkpoints, abstract, candidates: list[int], explicit):
  """(step, state, meta) of the first of `candidates` that reads and passes its digests."""
  for step in candidates:
    try:
      return (step, *ckpts.restore(abstract, step))
    except ckpt_lib.Damaged as e:
      _damaged(ckpts, e, explicit)
  raise UserError(f'no intact checkpoint in {ckpts.directory}: each one is damaged.')


def checkpoint_epoch(step: int, steps_per_epoch: int):
  """(epoch, batch) of a checkpoint at global `step`, numbered as in metrics.jsonl.

  Epochs count from 0, like the `Iteration <e>` lines, metrics.jsonl's `epoch` and
  summary.json's `best_epoch`: the checkpoint saved at the end of epoch e is (e, None).
  One saved mid-epoch (SIGTERM) is (the epoch it is in, the batches of it done);
  step 0 is (None, 0).
  """
  if step == 0:
    return None, 0
  epoch, batch = divmod(step, steps_per_epoch)
  return (epoch - 1, None) if batch == 0 else (epoch, batch)


def describe_epoch(epoch, batch) -> str:
  if epoch is None:
    return 'before training'
  return f'end of epoch {epoch}' if batch is None else f'epoch {epoch}, batch {batch}'


def evaluate_checkpoint(
  workdir: str,
  step: int | None = None,
  data_dir: str | None = None,
  split: str = 'test',
  best: bool = False,
) -> dict:
  """HR/NDCG/MRR of the checkpoint at `step` (default: the latest) of a train workdir.

  Args:
    workdir: the `--workdir` of a train command.
    step: global step of a saved checkpoint; None for the latest.
    data_dir: where the dataset is now, when it moved since training (default: the saved
      config.dataset.data_dir).
    split: 'test' or, for a run with a validation split, 'valid'.
    best: evaluate the run's best checkpoint (its selected epoch; validation runs only)
      instead of one of its latest.
  Returns:
    dict with workdir, step, epoch and batch (`checkpoint_epoch`: epochs numbered as in
    metrics.jsonl), split, top_k, hr, ndcg, mrr (full_* with eval_full_ranking),
    num_users, eval_candidates_hash (of the split's candidates), seed.
  Raises:
    UserError: no such workdir, no checkpoint, unknown step, data that does not match.
  """
  workdir = _checked_workdir(workdir, split)
  ckpts, step = _open_checkpoints(workdir, step, best)
  try:
    explicit = step is not None
    step = _find_step(ckpts, workdir, step)
    # The named step only; else the latest, then older ones past any damaged step.
    candidates = [step] if explicit else sorted(ckpts.all_steps(), reverse=True)
    step, meta = _readable_meta(ckpts, candidates, explicit)
    candidates = candidates[candidates.index(step) :]
    config, seed = _saved_config(meta, data_dir, split, workdir)
    mesh = steps.make_mesh(0)
    # Any eval batch gives the same sums; round it up to a multiple of this device count.
    config.eval_batch_size = -(-int(config.eval_batch_size) // mesh.size) * mesh.size
    config_checks.validate_config(config, 1)  # model and eval fields; batch_size is not used here
    dataset = data_lib.load(config.dataset, config.validation)
    config_checks.validate_against_data(config, dataset)
    model = models.create_model(config.model, dataset.num_users, dataset.num_items, config.dtype)
    init_key, data_key, _ = steps.make_keys(seed, mesh)
    abstract = _abstract_state(config, model, mesh, init_key)
    try:
      step, state, meta = _restore_intact(ckpts, abstract, candidates, explicit)
    except ckpt_lib.Mismatch as e:
      raise UserError(
        f'the checkpoint at step {step} does not match its config and dataset '
        f'({dataset.name}: {dataset.num_users} users, {dataset.num_items} items): {e}'
      ) from None
  finally:
    ckpts.close()

  data = sampling.to_device(dataset, NamedSharding(mesh, P()))
  eval_step = steps.make_eval_step(
    config, mesh, model, dataset.num_users, dataset.num_items, split=split
  )
  result, digest = steps.evaluate(
    eval_step, state.params, data, data_key, dataset.num_users, int(config.eval_batch_size)
  )
  epoch, batch = checkpoint_epoch(
    int(step), pipeline.steps_per_epoch(dataset.num_train, config.num_neg, config.batch_size)
  )
  return {
    'workdir': workdir,
    'step': int(step),
    'epoch': epoch,
    'batch': batch,
    'split': split,
    'top_k': int(config.top_k),
    **result,
    'num_users': dataset.num_users,
    'eval_candidates_hash': digest,
    'seed': seed,
  }


def _checked_workdir(workdir: str, split: str) -> str:
  if not workdir:
    raise UserError('pass --workdir=DIR, the run directory of a train command.')
  workdir = os.path.abspath(os.path.expanduser(workdir))
  if not os.path.isdir(workdir):
    raise UserError(f'workdir {workdir!r} does not exist.')
  if not os.path.isdir(os.path.join(workdir, 'checkpoints')):
    raise UserError(
      f'{workdir!r} has no checkpoints folder: it is not the workdir of a '
      f'train command, or no checkpoint was saved yet.'
    )
  if split not in pipeline.SPLITS:
    raise UserError(f'--split={split!r}: use one of {", ".join(pipeline.SPLITS)}.')
  return workdir


def _open_checkpoints(workdir: str, step: int | None, best: bool):
  """(read-only checkpoints, step): the latest ones, or with `best` the best one (and its
  step, when none was named)."""
  ckpts = ckpt_lib.Checkpoints(workdir, 1, read_only=True)
  if not best:
    return ckpts, step
  try:
    _find_step(ckpts, workdir, None)  # one checkpoint at least
    newest = sorted(ckpts.all_steps(), reverse=True)
    saved = _readable_meta(ckpts, newest, explicit=False)[1]['config']
  finally:
    ckpts.close()
  if saved.get('validation', 'none') == 'none':
    raise UserError(
      f'{workdir!r} was trained without a validation split, so it has no '
      'selected epoch; drop --best.'
    )
  ckpts = ckpt_lib.Checkpoints(
    workdir, 1, read_only=True, best_metric=f'valid_{saved["select_metric"]}'
  )
  return ckpts, ckpts.best_step() if step is None else step


def _saved_config(meta: dict, data_dir: str | None, split: str, workdir: str):
  """(config, seed) the checkpoint was trained with; `data_dir` where the data is now."""
  config = ml_collections.ConfigDict(meta['config'])
  if data_dir:
    config.dataset.data_dir = data_dir
  if split == 'valid' and config.validation == 'none':
    raise UserError(
      f'{workdir!r} was trained without a validation split '
      '(config.validation=none); use --split=test.'
    )
  return config, int(meta['seed'])


def _abstract_state(config, model, mesh, init_key):
  """The TrainState's shapes, replicated over `mesh` (evaluation reads whole tables)."""
  shapes = jax.eval_shape(
    functools.partial(steps.create_train_state, config, model, layout=mesh), init_key
  )
  replicated = NamedSharding(mesh, P())
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), shapes)
