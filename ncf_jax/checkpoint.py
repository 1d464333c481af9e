"""Checkpoints via orbax: atomic, last N kept, config-checked resume, the best epoch kept.

A checkpoint holds the whole TrainState (params, optimizer state, global step, the epoch's
running loss and pipeline-hash accumulators) and, as JSON, the run's seed, config and
per-epoch metrics. orbax writes to a temporary directory and renames it when complete, so
a kill during a save leaves the previous checkpoint intact.

WORKDIR/checkpoints holds the latest `keep_checkpoints` (what a resume restores). A run
with a validation split also keeps WORKDIR/best_checkpoint: the state of its best epoch
so far, saved with its validation metric; orbax's `best_fn` keeps that one alone.

Every saved step records a digest of each array it holds (`hashing.tree_digests`, computed
on device) in its meta; `restore` recomputes them from what it read. A step that cannot
be read or fails its digest raises `Damaged`; `restore_newest_intact` then sets it aside
(moved to WORKDIR/damaged_checkpoints, never deleted) and falls back to the next older one.

A checkpoint restores into any table layout (`config.sharding`, any device count): arrays
whose saved row count differs from the target's (row-sharded tables are zero-padded to a
multiple of the device count) are read whole and re-padded or cut to the target's rows,
then placed with the target's shardings (`restore`).
"""

import errno
import os
import shutil
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import orbax.checkpoint as ocp

from configs import default as default_config
from ncf_jax import config_paths, hashing, writers
from ncf_jax import sharding as sharding_lib
from ncf_jax.errors import UserError

# Fields that may differ between the saved run and a resumed one: declared with the
# fields, in configs/default.py (this name stays for the docs and older callers).
RESUMABLE_FIELDS = default_config.RESUMABLE_FIELDS

# Folders under the workdir: the latest checkpoints, and the best epoch's.
LATEST_DIR, BEST_DIR = 'checkpoints', 'best_checkpoint'
# Where damaged steps are moved (renamed, never deleted).
DAMAGED_DIR = 'damaged_checkpoints'
# orbax's own log records (tracebacks of a failed save), kept out of the terminal.
LIBRARY_LOG = 'checkpoint_errors.log'


class Damaged(Exception):
  """A saved step that cannot be read, or whose arrays fail their recorded digests."""

  def __init__(self, step: int, reason: str):
    super().__init__(f'step {step}: {reason}')
    self.step, self.reason = step, reason


class Mismatch(UserError):
  """A readable checkpoint whose arrays do not fit this config and dataset."""


def _first_line(e: BaseException) -> str:
  text = ' '.join(str(e).split()) or type(e).__name__
  return f'{type(e).__name__}: {text[:200]}'


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
  """JSON-safe dict of a config (tuples become lists)."""
  return config_paths.to_json_dict(config)


def check_compatible(saved: dict, config: ml_collections.ConfigDict, seed: int) -> None:
  """Raises UserError naming every field that a resume may not change."""
  now = config_paths.flatten(config_to_dict(config))
  before = config_paths.flatten(saved['config'])
  diffs = []
  for k in sorted(set(now) | set(before)):
    if k in default_config.RESUMABLE_FIELDS or k == 'seed':
      continue
    if now.get(k) != before.get(k):
      diffs.append(f'{k}: saved {before.get(k)!r}, now {now.get(k)!r}')
  if config.seed is not None and 0 <= int(config.seed) != int(saved['seed']):
    diffs.append(f'seed: saved {saved["seed"]!r}, now {config.seed!r}')
  if diffs:
    raise UserError(
      'cannot resume: the workdir holds a run with a different config ('
      + '; '.join(diffs)
      + '). Use a new --workdir, or restore those values. Fields that may change on '
      'resume: ' + ', '.join(default_config.RESUMABLE_FIELDS) + '.'
    )
  del seed


def _save_failure_detail(error: BaseException, directory: str) -> str:
  """The cause of a failed save, in one line: a full disk is named as such.

  orbax/tensorstore wrap the OS error (sometimes in an asyncio error from a worker), so
  the chain is searched for ENOSPC, and the free space is checked as a last resort.
  """
  seen: set[int] = set()
  cur: BaseException | None = error
  while cur is not None and id(cur) not in seen:
    seen.add(id(cur))
    if (isinstance(cur, OSError) and cur.errno == errno.ENOSPC) or (
      'No space left on device' in str(cur)
    ):
      return 'No space left on device'
    cur = cur.__cause__ or cur.__context__
  try:
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    if free < (16 << 20):
      return f'No space left on device (only {free} bytes free there)'
  except OSError:
    pass
  detail = (str(error).splitlines() or [type(error).__name__])[0]
  if len(detail) > 400:  # tensorstore: the path first, the cause (errno) last
    detail = detail[:150] + ' ... ' + detail[-250:]
  return detail


class Checkpoints:
  """The checkpoints of one workdir: the latest ones, or (`best_metric`) the best one."""

  def __init__(
    self, workdir: str, keep: int, read_only: bool = False, best_metric: str | None = None
  ):
    """`read_only` (evaluation, pretrained weights): never saves, deletes or cleans up, so
    it is safe while a train command is writing to the same workdir.

    With `best_metric` (a key of the metrics passed to `save`), this is the workdir's
    best checkpoint: orbax keeps the one checkpoint with the highest value of it.
    """
    self.directory = os.path.abspath(os.path.join(workdir, BEST_DIR if best_metric else LATEST_DIR))
    self.workdir = os.path.abspath(workdir)
    self.read_only = read_only
    self.verified: set[int] = set()  # steps saved here, or restored and matching their digests
    best = {}
    if best_metric:
      best = dict(
        best_fn=lambda metrics: metrics[best_metric],
        best_mode='max',
        keep_checkpoints_without_metrics=False,
      )
      keep = 1
    if read_only:
      options = ocp.CheckpointManagerOptions(
        max_to_keep=None,
        save_interval_steps=0,
        create=False,
        read_only=True,
        enable_async_checkpointing=False,
        **best,
      )
    else:
      options = ocp.CheckpointManagerOptions(
        max_to_keep=max(1, int(keep)),
        create=True,
        enable_async_checkpointing=False,
        cleanup_tmp_directories=True,
        **best,
      )
    self.manager = ocp.CheckpointManager(
      self.directory, options=options, item_names=('state', 'meta')
    )
    # The cleanup of unfinished saves runs in a thread; finish it now (milliseconds), or a
    # run that fails right away (missing data) exits mid-cleanup with an orbax traceback.
    wait_cleanup = getattr(self.manager, '_maybe_await_cleanup_tmp_directory', None)
    if wait_cleanup is not None:
      wait_cleanup()

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self):
    return list(self.manager.all_steps())

  def best_step(self) -> int | None:
    """The step with the highest `best_metric` (a best checkpoint's only one)."""
    return self.manager.best_step()

  def delete_after(self, step: int | None) -> None:
    """Deletes the checkpoints after global step `step` (all of them for None).

    A run killed between saving its best and its latest checkpoint leaves a best one
    from an epoch that the resumed run trains again; it is saved again then.
    """
    for s in self.all_steps():
      if step is None or s > step:
        self.manager.delete(s)

  def save(self, step: int, state: Any, meta: dict, metrics: dict | None = None) -> None:
    """Saves synchronously; a failure leaves earlier checkpoints as they were."""
    meta = dict(meta, digests=hashing.tree_digests(state))
    log = os.path.join(self.workdir, LIBRARY_LOG)
    try:
      with writers.library_logs_to(log):
        self.manager.save(
          step,
          args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
          metrics=metrics,
          force=True,
        )
        self.manager.wait_until_finished()
      self.verified.add(step)
    except (OSError, ValueError) as e:  # tensorstore reports I/O errors as ValueError
      writers.swallow_closed_loop_errors(log)
      detail = _save_failure_detail(e, self.directory)
      raise UserError(
        f'could not save the checkpoint of step {step} in {self.directory}: {detail}. '
        f'Earlier checkpoints are intact ({self.all_steps() or "none"}); free space or '
        f'fix permissions, then rerun the same command to resume (details: {log}).'
      ) from None

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
    """(state laid out as `abstract_state`'s shapes and shardings, meta) at `step`.

    Arrays saved with other row counts (another table layout) are adapted (`_relayout`).

    Raises:
      Damaged: the step cannot be read, or an array differs from its recorded digest.
    """
    step = self.latest_step() if step is None else step
    assert step is not None
    try:
      saved = _saved_shapes(self._state_metadata(step), abstract_state)
      read = abstract_state if saved is None else jax.tree.map(_as_saved, abstract_state, saved)
      restored = self.manager.restore(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardRestore(read), meta=ocp.args.JsonRestore()),
      )
    except (KeyboardInterrupt, SystemExit, UserError):
      raise
    except Exception as e:  # orbax, tensorstore and the OS each raise their own kinds
      raise Damaged(step, _first_line(e)) from None
    meta = dict(restored['meta'])
    _verify(step, restored['state'], meta.pop('digests', None))
    self.verified.add(step)
    state = restored['state']
    if saved is not None:
      state = _relayout(state, abstract_state, self.directory, step)
    return state, meta

  def set_aside(self, step: int) -> str:
    """Moves a damaged step out of the way (never deletes it); returns where it went."""
    src = os.path.join(self.directory, str(step))
    dst = os.path.join(
      self.workdir, DAMAGED_DIR, f'{os.path.basename(self.directory)}-{step}-{int(time.time())}'
    )
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.move(src, dst)
    self.manager.reload()
    return dst

  def restore_newest_intact(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
    """(step, state, meta) of the newest step that reads and passes its digests, or None
    when there is no step at all.

    Each damaged step gets one warning line and is set aside (left in place when read-only).

    Raises:
      UserError: there were steps, and none of them is intact.
    """
    damaged = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        state, meta = self.restore(abstract_state, step)
        return step, state, meta
      except Damaged as e:
        damaged.append(self._report_damaged(e))
    if damaged:
      raise UserError(
        f'no intact checkpoint in {self.directory}: ' + '; '.join(damaged) + '. Start again '
        'in a new --workdir (or rerun this command to start this one over).'
      )
    return None

  def _report_damaged(self, e: Damaged) -> str:
    where = 'left in place (read-only)'
    if not self.read_only:
      where = f'set aside in {self.set_aside(e.step)}'
    logging.warning(
      'Checkpoint step %d in %s is damaged (%s); %s.', e.step, self.directory, e.reason, where
    )
    return f'step {e.step} is damaged ({e.reason}), {where}'

  def last_verified(self) -> int | None:
    """The newest step saved by this process or checked against its digests, if any."""
    kept = set(self.all_steps()) & self.verified
    return max(kept) if kept else None

  def _state_metadata(self, step: int):
    """The saved state's tree metadata (shapes), read without restoring any array.

    Read with a handler of its own: a manager that has not saved or restored the item
    yet has no handler for it and returns None.
    """
    path = ocp.path.step.build_step_path(
      self.manager.directory, ocp.path.step.standard_name_format(), step
    )
    return ocp.StandardCheckpointHandler().metadata(path / 'state')

  def restore_meta(self, step: int | None = None) -> dict:
    """The step's JSON meta (seed, config, history, digests).

    Raises:
      Damaged: it cannot be read.
    """
    step = self.latest_step() if step is None else step
    assert step is not None
    try:
      meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      meta = meta['meta']
    except (KeyboardInterrupt, SystemExit):
      raise
    except Exception as e:
      raise Damaged(step, _first_line(e)) from None
    if not isinstance(meta, dict):
      raise Damaged(step, 'its meta is not a JSON object')
    return {k: v for k, v in meta.items() if k != 'digests'}

  def newest_readable_meta(self) -> tuple[int, dict] | None:
    """(step, meta) of the newest step whose meta reads; damaged ones are set aside."""
    for step in sorted(self.all_steps(), reverse=True):
      try:
        meta = self.restore_meta(step)
        if 'seed' not in meta or 'config' not in meta:
          raise Damaged(step, 'its meta has no seed or config')
        return step, meta
      except Damaged as e:
        self._report_damaged(e)
    return None

  def close(self):
    self.manager.close()


def _verify(step: int, state: Any, want: dict | None) -> None:
  """Raises Damaged when `state` (as read) differs from the digests saved with it.

  A checkpoint saved before digests were recorded has none: it is used unchecked.
  """
  if not want:
    logging.info('Checkpoint step %d was saved without digests: not verified.', step)
    return
  got = hashing.tree_digests(state)
  bad = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
  if bad:
    raise Damaged(step, f'{len(bad)} array(s) differ from their saved digests, e.g. {bad[0]}')


def _saved_shapes(metadata, abstract_state):
  """A tree like `abstract_state` of the saved shapes, or None when they are its own.

  Only the first (row) dimension may differ: other differences mean the checkpoint holds
  another model (a UserError, not damage).
  """
  tree = getattr(metadata, 'tree', metadata)
  differs, mismatched = [], []

  def shape_of(path, want):
    node = tree
    try:
      for k in path:
        node = node[k.idx if hasattr(k, 'idx') else getattr(k, 'key', getattr(k, 'name', k))]
    except (KeyError, IndexError, TypeError):
      return want.shape
    shape = tuple(getattr(node, 'shape', want.shape) or ())
    if (
      len(shape) == len(want.shape) >= 1
      and shape[1:] == tuple(want.shape[1:])
      and shape[0] != want.shape[0]
    ):
      differs.append(path)
      return shape
    if shape != tuple(want.shape) and hasattr(node, 'shape'):
      mismatched.append(f'{jax.tree_util.keystr(path)}: saved {shape}, now {tuple(want.shape)}')
    return tuple(want.shape)

  shapes = jax.tree_util.tree_map_with_path(shape_of, abstract_state)
  if mismatched:
    raise Mismatch(
      'the checkpoint holds arrays of other shapes than this config and dataset give ('
      + '; '.join(mismatched[:3])
      + '): it belongs to another model or dataset.'
    )
  return shapes if differs else None


def _as_saved(want, shape):
  """What to read a leaf as: its saved shape; sharded like the target where that divides."""
  if tuple(shape) == tuple(want.shape):
    return want
  sharding = want.sharding
  try:
    sharding.shard_shape(tuple(shape))
  except (ValueError, AttributeError):
    sharding = NamedSharding(want.sharding.mesh, P())
  return jax.ShapeDtypeStruct(tuple(shape), want.dtype, sharding=sharding)


def _relayout(state, abstract_state, directory: str, step: int):
  """`state` with each array's rows zero-padded or cut to `abstract_state`'s, as placed.

  Cut rows must be zero (padding of a row-sharded table): anything else means the
  checkpoint belongs to other data, which is an error, not a silent truncation.
  """

  def fix(x, want):
    cut = x[want.shape[0] :] if x.ndim and x.shape[0] > want.shape[0] else jnp.zeros((0,), x.dtype)
    return sharding_lib.fit_rows(x, want), jnp.any(cut != 0)

  out_shardings = jax.tree.map(
    lambda w: (w.sharding, NamedSharding(w.sharding.mesh, P())), abstract_state
  )
  out = jax.jit(lambda s: jax.tree.map(fix, s, abstract_state), out_shardings=out_shardings)(state)
  treedef = jax.tree.structure(abstract_state)
  pairs = treedef.flatten_up_to(out)  # type: ignore[attr-defined]  # in jaxlib, not its stubs
  if any(bool(jax.device_get(bad)) for _, bad in pairs):
    raise Mismatch(
      f'the checkpoint of step {step} in {directory} has non-zero rows past '
      'this run\'s tables: it belongs to another dataset or model size.'
    )
  return jax.tree.unflatten(treedef, [x for x, _ in pairs])
