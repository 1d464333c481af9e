"""Fault injection: what a run does when it is interrupted, doubled or denied its folder.

Each test sets up one fault from the table in docs/training.md ("What survives what") on
the tiny config, through the real command where the exit code and the terminal output are
the behaviour, and checks that the run says one line and loses nothing.
"""

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile

import _train_helpers as h
import pytest

from ncf_jax import checkpoint as ckpt_lib
from ncf_jax import evaluate as evaluate_lib
from ncf_jax import train
from ncf_jax.errors import UserError
from ncf_jax.train.workdir import WorkdirLock

SPE = h.STEPS_PER_EPOCH
DELAY = dict(NCF_TEST_STEP_DELAY=0.05)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('data'))


def _error_lines(text: str) -> list[str]:
  return [line for line in text.splitlines() if line.startswith('error:')]


def test_a_second_run_on_a_busy_workdir_stops_at_once_naming_the_holder(tmp_path, data_dir):
  workdir = str(tmp_path / 'run')
  os.makedirs(os.path.join(workdir, 'checkpoints'))
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    f.write('{"epoch": 0}\n')
  holder = WorkdirLock(workdir)  # this process plays the running train command
  assert holder.acquire() is None
  try:
    before = h.tree_digest(workdir)
    out = h.run(h.train_cmd(workdir, data_dir))
    assert out.returncode == 2, out.stderr[-3000:]
    (line,) = _error_lines(out.stderr)
    assert 'is in use by another run (host ' in line and f'pid {os.getpid()}, since ' in line
    assert 'Traceback' not in out.stderr
    assert h.tree_digest(workdir) == before
    with pytest.raises(UserError, match='in use by another run'):
      train.train_and_evaluate(h.tiny_config(data_dir), workdir)  # in-process callers too
    assert h.tree_digest(workdir) == before
  finally:
    holder.release()


def test_the_workdir_lock_is_released_when_its_holder_is_killed(tmp_path):
  workdir = str(tmp_path)
  code = (
    'import sys, time; from ncf_jax.train.workdir import WorkdirLock; '
    'lock = WorkdirLock(sys.argv[1]); assert lock.acquire() is None; '
    'print("locked", flush=True); time.sleep(120)'
  )
  proc = subprocess.Popen(
    [sys.executable, '-c', code, workdir], cwd=h.REPO, stdout=subprocess.PIPE, text=True
  )
  try:
    assert proc.stdout is not None and proc.stdout.readline().strip() == 'locked'
    assert 'pid' in WorkdirLock(workdir).acquire()  # held: the holder is named
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
  finally:
    h.stop(proc)
  lock = WorkdirLock(workdir)
  assert lock.acquire() is None  # no stale lock after a SIGKILL
  lock.release()


def test_a_second_ctrl_c_aborts_at_once_with_one_line(tmp_path, data_dir):
  # Slow steps: the second Ctrl-C lands before the step that would honour the first ends
  # (two signals sent back to back would merge into one).
  workdir, log = str(tmp_path / 'run'), str(tmp_path / 'run.log')
  cmd = h.train_cmd(workdir, data_dir, worker=True, log_every_steps=5)
  proc = h.start(cmd, log, NCF_TEST_STEP_DELAY=0.5)
  try:
    h.wait_for_line(proc, log, f'epoch 1 step 5/{SPE}')
    proc.send_signal(signal.SIGINT)
    h.wait_for_line(proc, log, 'press Ctrl-C again to abort')
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(60)
  finally:
    h.stop(proc)
  text = h.read(log)
  assert rc == 130, text[-3000:]
  assert 'Traceback' not in text
  assert _error_lines(text) == [
    'error: interrupted (Ctrl-C) before the run could save; checkpoints saved before it '
    'are intact. Rerun the same command to resume.'
  ]
  assert h.checkpoint_steps(workdir) == []  # nothing was saved
  lock = WorkdirLock(workdir)
  assert lock.acquire() is None
  lock.release()


def _deny_writes_under(monkeypatch, folder: str) -> None:
  """Makes `folder` refuse new files: chmod for a user, a refusing mkstemp for root (whose
  permission override ignores chmod; the test's Python may not be reachable by another
  user)."""
  os.chmod(folder, 0o555)
  if os.geteuid() != 0:
    return
  real = tempfile.mkstemp

  def mkstemp(*args, **kwargs):
    if os.path.abspath(kwargs.get('dir') or '') == os.path.abspath(folder):
      raise PermissionError(13, 'Permission denied')
    return real(*args, **kwargs)

  monkeypatch.setattr(tempfile, 'mkstemp', mkstemp)


def test_a_read_only_checkpoints_folder_is_refused_before_anything_compiles(tmp_path, monkeypatch):
  workdir, data_dir = str(tmp_path / 'run'), str(tmp_path / 'data')
  os.makedirs(os.path.join(workdir, 'checkpoints'))
  _deny_writes_under(monkeypatch, os.path.join(workdir, 'checkpoints'))
  try:
    with pytest.raises(UserError) as e:
      train.train_and_evaluate(h.tiny_config(data_dir), workdir)
    assert 'checkpoints' in str(e.value) and 'is not writable (Permission denied)' in str(e.value)
    assert not os.path.exists(data_dir)  # refused before the data was even read
  finally:
    os.chmod(os.path.join(workdir, 'checkpoints'), 0o755)


def test_a_config_file_with_a_syntax_error_is_one_line(tmp_path):
  bad = tmp_path / 'bad_config.py'
  bad.write_text('def get_config(:\n  pass\n')
  out = h.run(
    [sys.executable, '-m', 'ncf_jax.train', f'--config={bad}', f'--workdir={tmp_path / "run"}']
  )
  assert out.returncode == 2 and 'Traceback' not in out.stderr, out.stderr[-3000:]
  assert _error_lines(out.stderr) == [
    f'error: cannot load the config file: {bad}, line 1: invalid syntax; fix the file, or '
    'pass another --config.'
  ]
  assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize(
  'field, value, says',
  [
    ('model__mlp_layers', ('abc',), 'a tuple of integer widths'),
    ('batch_size', 2**31, 'it must be at most 2,147,483,647 (int32)'),
  ],
)
def test_values_the_compiled_steps_cannot_take_are_refused_before_the_workdir(
  tmp_path, data_dir, field, value, says
):
  workdir = tmp_path / 'new' / 'run'
  with pytest.raises(UserError, match=re.escape(f'is invalid: {says}')):
    train.train_and_evaluate(h.tiny_config(data_dir, **{field: value}), str(workdir))
  assert not (tmp_path / 'new').exists()


def _file_size_limit(limit: int):
  """preexec_fn: files of this process may not grow past `limit` bytes (EFBIG, as a full
  disk gives ENOSPC), without the SIGXFSZ that would kill it."""

  def apply():
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

  return apply


def test_a_failed_save_is_one_line_with_orbax_tracebacks_kept_in_a_file(tmp_path):
  workdir, data_dir = str(tmp_path / 'run'), str(tmp_path / 'data')
  prepared = h.run([sys.executable, '-m', 'ncf_jax.prepare'] + h.config_flags(data_dir))
  assert prepared.returncode == 0, prepared.stderr[-2000:]
  out = subprocess.run(
    h.train_cmd(workdir, data_dir, num_epochs=1), cwd=h.REPO, env=h.env(2), text=True,
    capture_output=True, timeout=240, preexec_fn=_file_size_limit(60_000),
  )  # fmt: skip
  assert out.returncode == 2, out.stderr[-3000:]
  (line,) = _error_lines(out.stderr)
  assert 'could not save the checkpoint of step' in line and 'checkpoint_errors.log' in line
  assert 'Traceback' not in out.stderr and len(out.stderr.splitlines()) < 40
  with open(os.path.join(workdir, 'checkpoint_errors.log')) as f:
    assert 'Traceback' in f.read()  # the details are kept, out of the terminal


# ----------------------------------------------------------------------------------------
# Damaged checkpoints: the newest step damaged, the older ones intact.


@pytest.fixture(scope='module')
def finished(tmp_path_factory, data_dir):
  """An uninterrupted in-process 2-epoch run: (workdir, params_hash)."""
  workdir = str(tmp_path_factory.mktemp('finished'))
  train.train_and_evaluate(h.tiny_config(data_dir, num_epochs=2), workdir)
  assert h.checkpoint_steps(workdir) == [SPE, 2 * SPE]
  return workdir, h.summary(workdir)['params_hash']


def _largest_data_file(step_dir: str) -> str:
  files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, 'state')) for f in fs]
  return max(files, key=os.path.getsize)


def _damage(step_dir: str, kind: str, monkeypatch) -> None:
  data = _largest_data_file(step_dir)
  if kind == 'data_file_truncated':
    os.truncate(data, os.path.getsize(data) // 2)
  elif kind == 'meta_truncated':
    meta = os.path.join(step_dir, 'meta', 'metadata')
    os.truncate(meta, os.path.getsize(meta) // 2)
  elif kind == 'state_metadata_missing':
    os.remove(os.path.join(step_dir, 'state', '_METADATA'))
  elif kind == 'files_zeroed':
    for root, _, files in os.walk(step_dir):
      for f in files:
        path = os.path.join(root, f)
        with open(path, 'r+b') as fh:
          fh.write(bytes(os.path.getsize(path)))
  elif kind == 'one_bit_flipped':
    with open(data, 'r+b') as fh:
      fh.seek(os.path.getsize(data) // 2)
      byte = fh.read(1)[0]
      fh.seek(-1, 1)
      fh.write(bytes([byte ^ 0x10]))
  elif kind == 'array_differs_from_its_digest':  # as a bit flip that still decodes would
    meta_path = os.path.join(step_dir, 'meta', 'metadata')
    with open(meta_path) as fh:
      meta = json.load(fh)
    path = sorted(meta['digests'])[0]
    meta['digests'][path] = f'{int(meta["digests"][path], 16) ^ 1:016x}'
    with open(meta_path, 'w') as fh:
      json.dump(meta, fh)
  elif kind == 'step_folder_unreadable':
    os.chmod(step_dir, 0)
    if os.geteuid() == 0:  # root reads it anyway: make the read fail as it would for a user
      step = int(os.path.basename(step_dir))
      real = ckpt_lib.Checkpoints._state_metadata

      def unreadable(self, s):
        if s == step:
          raise PermissionError(13, 'Permission denied', step_dir)
        return real(self, s)

      monkeypatch.setattr(ckpt_lib.Checkpoints, '_state_metadata', unreadable)
  else:
    raise ValueError(kind)


# CI time: three kinds run by default (a read error, a digest mismatch, a folder that
# cannot be read); the others take the same path and run with `-m slow`.
_SLOW = pytest.mark.slow
DAMAGE = [
  'data_file_truncated',
  pytest.param('meta_truncated', marks=_SLOW),
  pytest.param('state_metadata_missing', marks=_SLOW),
  pytest.param('files_zeroed', marks=_SLOW),
  pytest.param('one_bit_flipped', marks=_SLOW),
  'array_differs_from_its_digest',
  'step_folder_unreadable',
]


@pytest.mark.parametrize('kind', DAMAGE)
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_run_resumes_exactly(
  tmp_path, data_dir, finished, kind, monkeypatch
):
  workdir = str(tmp_path / 'run')
  shutil.copytree(finished[0], workdir)
  os.remove(os.path.join(workdir, 'summary.json'))
  _damage(os.path.join(workdir, 'checkpoints', str(2 * SPE)), kind, monkeypatch)
  train.train_and_evaluate(h.tiny_config(data_dir, num_epochs=2), workdir)
  assert h.summary(workdir)['params_hash'] == finished[1]  # epoch 1 trained again, exactly
  assert h.checkpoint_steps(workdir) == [SPE, 2 * SPE]
  (aside,) = os.listdir(os.path.join(workdir, ckpt_lib.DAMAGED_DIR))
  assert aside.startswith(f'checkpoints-{2 * SPE}-')  # moved, never deleted
  os.chmod(os.path.join(workdir, ckpt_lib.DAMAGED_DIR, aside), 0o755)


def test_evaluate_skips_a_damaged_latest_step_and_names_a_damaged_chosen_one(tmp_path, finished):
  workdir = str(tmp_path / 'run')
  shutil.copytree(finished[0], workdir)
  _damage(os.path.join(workdir, 'checkpoints', str(2 * SPE)), 'one_bit_flipped', None)
  assert evaluate_lib.evaluate_checkpoint(workdir)['step'] == SPE
  with pytest.raises(UserError, match=f'the checkpoint at step {2 * SPE} in .* is damaged'):
    evaluate_lib.evaluate_checkpoint(workdir, step=2 * SPE)
  assert h.checkpoint_steps(workdir) == [SPE, 2 * SPE]  # evaluate only reads


def test_no_intact_checkpoint_is_one_error_and_nothing_is_deleted(tmp_path, data_dir, finished):
  workdir = str(tmp_path / 'run')
  shutil.copytree(finished[0], workdir)
  for step in (SPE, 2 * SPE):
    _damage(os.path.join(workdir, 'checkpoints', str(step)), 'data_file_truncated', None)
  with pytest.raises(UserError, match='no intact checkpoint in .*: step 80 is damaged'):
    train.train_and_evaluate(h.tiny_config(data_dir, num_epochs=2), workdir)
  assert len(os.listdir(os.path.join(workdir, ckpt_lib.DAMAGED_DIR))) == 2


def test_a_diverging_loss_stops_the_run_with_one_line(tmp_path, data_dir):
  # Adam at learning rate 10: the epoch's mean loss reaches ~1e5, far from both 6.93 and
  # float overflow (a NaN or inf has its own message).
  config = h.tiny_config(data_dir, learning_rate=10.0, num_epochs=2)
  with pytest.raises(UserError, match=r'the training loss diverged: .* at global step 40') as e:
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert 'no checkpoint had been saved yet' in str(e.value)
  assert 'config.divergence_factor' in str(e.value)
