"""Failure handling: non-finite loss, invalid configs, unwritable workdir, disk full while
saving, a dataset cache deleted before a resume, out of memory.

Each failure must give one clear message (a UserError; exit code 2 from the command) and
leave every checkpoint saved before it intact and restorable.
"""

import errno
import json
import os
import shutil
import subprocess
import sys

import _train_helpers as h
import jax
import optax
from orbax.checkpoint._src.handlers import standard_checkpoint_handler
import pytest

from ncf_jax import checkpoint as ckpt_lib
from ncf_jax import steps, train
from ncf_jax.errors import UserError

SPE = h.STEPS_PER_EPOCH


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('data'))


def config(data_dir, **overrides):
  """TINY on 2 of this process's devices."""
  return h.tiny_config(data_dir, **dict(dict(num_devices=2), **overrides))


@pytest.fixture(scope='module')
def baseline(tmp_path_factory, data_dir):
  """An uninterrupted in-process 3-epoch run: (workdir, params_hash)."""
  workdir = str(tmp_path_factory.mktemp('baseline'))
  train.train_and_evaluate(config(data_dir), workdir)
  assert h.checkpoint_steps(workdir) == [SPE, 2 * SPE, 3 * SPE]
  return workdir, h.summary(workdir)['params_hash']


def rewind(baseline, dest, step=SPE):
  """A copy of the baseline workdir whose latest checkpoint is `step` (resumable)."""
  shutil.copytree(baseline[0], dest)
  for s in h.checkpoint_steps(dest):
    if s > step:
      shutil.rmtree(os.path.join(dest, 'checkpoints', str(s)))
  return str(dest)


@pytest.fixture
def no_expensive_work(monkeypatch):
  """Fails the test if model init or compilation starts."""

  def boom(*args, **kwargs):
    raise AssertionError('expensive work started before the config was rejected')

  monkeypatch.setattr(steps, 'make_keys', boom)
  monkeypatch.setattr(steps, 'create_train_state', boom)
  monkeypatch.setattr(steps, 'make_train_step', boom)


# ----------------------------------------------------------------------------------------
# Non-finite loss.


@pytest.mark.slow  # CI time: the next test names the step in process; ux_test the exit codes
def test_nan_loss_stops_the_command_naming_the_step(tmp_path, data_dir):
  workdir = str(tmp_path / 'run')
  out = h.run(h.train_cmd(workdir, data_dir, learning_rate=1e30, log_every_steps=1))
  assert out.returncode == 2, out.stderr[-3000:]
  assert 'Traceback' not in out.stderr
  assert 'the training loss became NaN or inf at global step' in out.stderr
  assert 'no checkpoint had been saved yet' in out.stderr
  assert 'learning_rate' in out.stderr
  assert h.checkpoint_steps(workdir) == []


def test_nan_loss_after_a_checkpoint_leaves_it_untouched(tmp_path, data_dir, baseline, monkeypatch):
  workdir = rewind(baseline, tmp_path / 'run')
  before = h.tree_digest(os.path.join(workdir, 'checkpoints'))
  # The same run resumed with a huge learning rate (the config itself may not change).
  monkeypatch.setattr(steps.state, 'make_optimizer', lambda c: optax.adam(1e30))
  with pytest.raises(UserError) as e:
    train.train_and_evaluate(config(data_dir, log_every_steps=1), workdir)
  msg = str(e.value)
  assert 'NaN or inf at global step' in msg
  bad = int(msg.split('global step ')[1].split(';')[0])
  assert SPE <= bad < SPE + 5, msg
  assert f'last checkpoint that passed its digest check (step {SPE})' in msg and 'is intact' in msg
  assert h.checkpoint_steps(workdir) == [SPE]
  assert h.tree_digest(os.path.join(workdir, 'checkpoints')) == before


# ----------------------------------------------------------------------------------------
# Invalid configs: one message naming the field, the value and the allowed range.


def test_invalid_config_from_the_command_line(tmp_path):
  workdir, data = str(tmp_path / 'run'), str(tmp_path / 'data')
  out = h.run(h.train_cmd(workdir, data, batch_size=1001), devices=2, timeout=120)
  assert out.returncode == 2
  err = out.stderr.strip().splitlines()
  assert err[-1] == (
    'error: config.batch_size=1001 is invalid: it must be a positive '
    'multiple of the global device count (2).'
  ), out.stderr[-2000:]
  assert 'Traceback' not in out.stderr
  assert not os.path.exists(workdir) and not os.path.exists(data)  # before any work


@pytest.mark.parametrize(
  'overrides, expected',
  [
    (
      dict(batch_size=1022, num_devices=4),
      'config.batch_size=1022 is invalid: it must be a positive multiple of the global '
      'device count (4)',
    ),
    (dict(num_neg=0), 'config.num_neg=0 is invalid: it must be >= 1'),
    (
      dict(model__name='transformer'),
      "config.model.name='transformer' is invalid: use one of neumf, gmf, mlp, mf",
    ),
    (dict(learning_rate=-0.001), 'config.learning_rate=-0.001 is invalid: it must be > 0'),
    (dict(top_k=52), 'config.top_k=52 is invalid: it must be in [1, eval_num_neg + 1 = 51]'),
    (dict(optimizer='adagrad'), "config.optimizer='adagrad' is invalid: use one of adam, sgd"),
    (
      dict(validation='kfold'),
      "config.validation='kfold' is invalid: use one of none, leave_one_out",
    ),
    (
      dict(validation='leave_one_out', select_metric='loss'),
      "config.select_metric='loss' is invalid: use one of hr, ndcg",
    ),
    (
      dict(early_stop_patience=3),
      'config.early_stop_patience=3 is invalid: early stopping '
      'reads the validation split: set config.validation=leave_one_out, or use 0',
    ),
    (
      dict(validation='leave_one_out', hr_threshold=0.5),
      'config.hr_threshold=0.5 is invalid: it stops on the test HR',
    ),
    (
      dict(validation='leave_one_out', match_mlperf=True),
      'config.match_mlperf=True is invalid: the MLPerf reference has no validation split',
    ),
    (dict(model__l2=-1.0), 'config.model.l2=-1.0 is invalid: it must be >= 0'),
    (dict(model__embed_init_std=0.0), 'config.model.embed_init_std=0.0 is invalid: it must be > 0'),
    (dict(full_ranking_chunk=0), 'config.full_ranking_chunk=0 is invalid: it must be >= 1'),
  ],
)
def test_invalid_config_before_any_work(tmp_path, data_dir, no_expensive_work, overrides, expected):
  workdir = str(tmp_path / 'run')
  with pytest.raises(UserError) as e:
    train.train_and_evaluate(config(data_dir, **overrides), workdir)
  assert expected in str(e.value)
  assert not os.path.exists(workdir)


def test_invalid_dataset_values_before_any_compilation(tmp_path, data_dir, no_expensive_work):
  with pytest.raises(UserError) as e:
    train.train_and_evaluate(config(data_dir, dataset__name='ml-2m'), str(tmp_path / 'a'))
  assert "unknown dataset name 'ml-2m' (config.dataset.name); valid names:" in str(e.value)
  assert 'ml-1m' in str(e.value)
  # Candidates: 200 items minus the most active user's positives.
  with pytest.raises(UserError) as e:
    train.train_and_evaluate(config(data_dir, eval_num_neg=199), str(tmp_path / 'b'))
  msg = str(e.value)
  assert msg.startswith('config.eval_num_neg=199 is invalid: the most active user has ')
  assert 'use eval_num_neg <= ' in msg
  assert h.checkpoint_steps(str(tmp_path / 'b')) == []


# ----------------------------------------------------------------------------------------
# Workdir and disk.


def test_unwritable_workdir(tmp_path, data_dir, no_expensive_work):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a folder')
  with pytest.raises(UserError, match=r'workdir .* is not writable .*pass a --workdir'):
    train.train_and_evaluate(config(data_dir), str(blocker / 'run'))
  if os.geteuid() != 0:  # root ignores permissions
    locked = tmp_path / 'locked'
    locked.mkdir(mode=0o500)
    with pytest.raises(UserError, match='is not writable'):
      train.train_and_evaluate(config(data_dir), str(locked / 'run'))


@pytest.mark.slow  # the real full disk (tmpfs) below runs in CI; this adds the rerun
def test_disk_full_during_a_save_keeps_the_earlier_checkpoints(
  tmp_path, data_dir, baseline, monkeypatch
):
  workdir = str(tmp_path / 'run')
  calls = []
  real_save = standard_checkpoint_handler.StandardCheckpointHandler.async_save

  async def second_save_fails(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
      raise OSError(errno.ENOSPC, 'No space left on device')
    return await real_save(self, *args, **kwargs)

  monkeypatch.setattr(
    standard_checkpoint_handler.StandardCheckpointHandler, 'async_save', second_save_fails
  )
  with pytest.raises(UserError) as e:
    train.train_and_evaluate(config(data_dir), workdir)
  msg = str(e.value)
  assert f'could not save the checkpoint of step {2 * SPE}' in msg
  assert 'No space left on device' in msg
  assert f'Earlier checkpoints are intact ([{SPE}])' in msg
  assert h.checkpoint_steps(workdir) == [SPE]
  monkeypatch.undo()

  # The earlier checkpoint restores, and rerunning resumes from it to the same result.
  ck = ckpt_lib.Checkpoints(workdir, 3, read_only=True)
  assert ck.latest_step() == SPE and ck.restore_meta()['epoch'] == 1
  ck.close()
  train.train_and_evaluate(config(data_dir), workdir)
  assert h.summary(workdir)['params_hash'] == baseline[1]
  assert h.checkpoint_steps(workdir) == [SPE, 2 * SPE, 3 * SPE]


@pytest.mark.parametrize(
  'error',
  [
    OSError(errno.ENOSPC, 'No space left on device'),
    # What tensorstore raises for the same thing while writing the arrays.
    ValueError(
      'RESOURCE_EXHAUSTED: Error writing "params/0" in OCDBT database at local '
      'file "/x/ocdbt.process_0/": Failed writing: "/x/d/45df": Failed to write '
      '126795 bytes to file 20: No space left on device [os_error_code=\'28\']'
    ),
  ],
)
def test_a_failed_save_is_a_user_error_and_the_previous_checkpoint_restores(
  tmp_path, monkeypatch, error
):
  import jax.numpy as jnp

  ck = ckpt_lib.Checkpoints(str(tmp_path), 3)
  ck.save(1, {'w': jnp.arange(3.0)}, {'epoch': 1})

  async def fail(self, *args, **kwargs):
    raise error

  monkeypatch.setattr(standard_checkpoint_handler.StandardCheckpointHandler, 'async_save', fail)
  with pytest.raises(
    UserError,
    match=r'could not save the checkpoint of step 2 in .*No '
    r'space left on device.*Earlier checkpoints are intact \(\[1\]\)',
  ):
    ck.save(2, {'w': jnp.arange(3.0) + 1}, {'epoch': 2})
  monkeypatch.undo()
  ck.close()
  ck = ckpt_lib.Checkpoints(str(tmp_path), 3)
  state, meta = ck.restore({'w': jax.ShapeDtypeStruct((3,), jnp.float32)})
  assert ck.latest_step() == 1 and meta == {'epoch': 1}
  assert state['w'].tolist() == [0.0, 1.0, 2.0]
  ck.close()


def _mount_tmpfs(path, size):
  if sys.platform != 'linux' or os.geteuid() != 0 or not shutil.which('mount'):
    return False
  os.makedirs(path)
  return (
    subprocess.run(
      ['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', path], capture_output=True
    ).returncode
    == 0
  )


def test_a_really_full_disk_fails_cleanly_from_the_command(tmp_path, data_dir):
  """Needs root and tmpfs (skipped elsewhere): a 600 KiB disk holds one checkpoint."""
  disk = str(tmp_path / 'disk')
  if not _mount_tmpfs(disk, '600k'):
    pytest.skip('cannot mount a small tmpfs here (needs root)')
  try:
    workdir = os.path.join(disk, 'run')
    out = h.run(h.train_cmd(workdir, data_dir))
    assert out.returncode == 2, out.stderr[-3000:]
    # orbax's background threads may print 'Event loop is closed' tracebacks while the
    # process exits after a failed write, interleaved with our line: find ours by content.
    error = [
      l[l.index('error: ') :] for l in out.stderr.splitlines() if 'error: could not save' in l
    ]
    assert len(error) == 1, out.stderr[-3000:]
    assert f'could not save the checkpoint of step {2 * SPE}' in error[0]
    assert 'No space left on device' in error[0]
    assert f'Earlier checkpoints are intact ([{SPE}])' in error[0]
    ck = ckpt_lib.Checkpoints(workdir, 3, read_only=True)
    assert ck.all_steps() == [SPE] and ck.restore_meta()['epoch'] == 1
    ck.close()
  finally:
    subprocess.run(['umount', '-l', disk], capture_output=True)


# ----------------------------------------------------------------------------------------
# Dataset cache.


def test_dataset_cache_deleted_before_a_resume_is_rebuilt_exactly(tmp_path, data_dir, baseline):
  workdir = rewind(baseline, tmp_path / 'run')
  moved = str(tmp_path / 'data')
  shutil.copytree(data_dir, moved)
  shutil.rmtree(os.path.join(moved, 'processed'))
  before = h.tree_digest(os.path.join(workdir, 'checkpoints', str(SPE)))
  # data_dir may change on resume; the synthetic cache is rebuilt from its seed.
  train.train_and_evaluate(config(moved), workdir)
  assert os.listdir(os.path.join(moved, 'processed'))
  assert h.summary(workdir)['params_hash'] == baseline[1]
  assert h.tree_digest(os.path.join(workdir, 'checkpoints', str(SPE))) == before


def test_dataset_that_cannot_be_loaded_on_resume_is_a_clear_error(tmp_path, data_dir, baseline):
  # A run on MovieLens whose files are gone by the time it resumes: rewrite the saved
  # config of a copied run so that it names ml-1m in an empty data_dir.
  workdir = rewind(baseline, tmp_path / 'run')
  empty = str(tmp_path / 'empty')
  os.makedirs(empty)
  meta_path = os.path.join(workdir, 'checkpoints', str(SPE), 'meta', 'metadata')
  meta = json.loads(h.read(meta_path))
  meta['config']['dataset'].update(name='ml-1m', data_dir=empty)
  with open(meta_path, 'w') as f:
    json.dump(meta, f)
  before = h.tree_digest(os.path.join(workdir, 'checkpoints'))
  with pytest.raises(UserError) as e:
    train.train_and_evaluate(config(empty, dataset__name='ml-1m'), workdir)
  assert 'ml-1m' in str(e.value) and empty in str(e.value)
  assert h.tree_digest(os.path.join(workdir, 'checkpoints')) == before


# ----------------------------------------------------------------------------------------
# Out of memory.

OOM = 'RESOURCE_EXHAUSTED: Out of memory while trying to allocate 17179869184 bytes.'


def test_oom_hint_names_the_fields_to_reduce():
  hint = train.oom_hint(jax.errors.JaxRuntimeError(OOM + '\nBufferAssignment ...'))
  assert 'config.batch_size' in hint and 'config.eval_batch_size' in hint
  assert OOM in hint and 'BufferAssignment' not in hint
  assert train.oom_hint(jax.errors.JaxRuntimeError('INTERNAL: something else')) is None


@pytest.mark.parametrize('where', ['compile', 'run'])
def test_out_of_memory_becomes_a_user_error(tmp_path, data_dir, monkeypatch, where):
  def fail(*args, **kwargs):
    raise jax.errors.JaxRuntimeError(OOM)

  if where == 'compile':  # e.g. XLA's buffer assignment while compiling the model init
    monkeypatch.setattr(steps, 'create_train_state', fail)
  else:  # the first train step
    monkeypatch.setattr(steps, 'make_train_step', lambda config, mesh, **kw: fail)
  with pytest.raises(UserError) as e:
    train.train_and_evaluate(config(data_dir), str(tmp_path / 'run'))
  assert 'out of device memory: reduce config.batch_size and/or config.eval_batch_size' in str(
    e.value
  )


def test_other_runtime_errors_are_not_disguised(tmp_path, data_dir, monkeypatch):
  def fail(*args, **kwargs):
    raise jax.errors.JaxRuntimeError('INTERNAL: a real bug')

  monkeypatch.setattr(steps, 'create_train_state', fail)
  with pytest.raises(jax.errors.JaxRuntimeError, match='a real bug'):
    train.train_and_evaluate(config(data_dir), str(tmp_path / 'run'))


# ----------------------------------------------------------------------------------------
# A stalled step (as if a collective or another host hung).


def test_a_stalled_step_ends_the_command_with_one_line_and_keeps_the_checkpoint(tmp_path, data_dir):
  workdir = str(tmp_path / 'run')
  # Call SPE + 10 is batch 10 of epoch 1, after epoch 0's checkpoint at step SPE.
  cmd = h.train_cmd(workdir, data_dir, worker=True, stall_timeout_s=10, num_epochs=2)
  proc = subprocess.run(
    cmd,
    cwd=h.REPO,
    env=h.env(2, NCF_TEST_STALL_AT_CALL=SPE + 10),
    capture_output=True,
    text=True,
    timeout=240,
  )
  assert proc.returncode == 3, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1, proc.stderr[-3000:]
  assert 'no training progress for' in errors[0]
  assert f'epoch 2, batch 10 of {SPE}' in errors[0]
  assert f'the last checkpoint (step {SPE})' in errors[0] and 'rerun the same command' in errors[0]
  assert 'Traceback' not in proc.stderr and 'rendezvous' not in proc.stderr
  assert h.checkpoint_steps(workdir) == [SPE]
  before = h.tree_digest(os.path.join(workdir, 'checkpoints'))

  # The checkpoint is intact: the same command resumes from it and finishes.
  out = h.run(
    h.train_cmd(workdir, data_dir, num_epochs=2), devices=2, log=str(tmp_path / 'resumed.log')
  )
  assert out.returncode == 0, out.stdout[-3000:]
  assert f'Resuming from checkpoint at step {SPE}' in out.stdout
  assert h.checkpoint_steps(workdir) == [SPE, 2 * SPE]
  after = h.tree_digest(os.path.join(workdir, 'checkpoints', str(SPE)))
  assert after == {k[len(f'{SPE}/') :]: v for k, v in before.items()}
