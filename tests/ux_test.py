"""The first hour of a new user: what a run shows and what a mistake says.

Log lines visible (once) from plain Python and from the command; no JAX backend-probe
noise; a progress bar that follows the device; flag errors in one clean line; an
evaluation that numbers epochs as metrics.jsonl does; no empty workdir left by a failed
start; and the one `Done:` line at the end.
"""

import json
import logging as std_logging
import subprocess
import sys
import textwrap

import _train_helpers as h
import pytest

from ncf_jax import evaluate as evaluate_lib
from ncf_jax import steps, train, writers
from ncf_jax.errors import UserError

SPE = h.STEPS_PER_EPOCH


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('data'))


def _env_without_platforms():
  """The test env, but JAX picks its platform itself (so it probes for a TPU)."""
  env = h.env(1)
  del env['JAX_PLATFORMS']
  return env


def _python(script: str, *args) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, '-c', textwrap.dedent(script), *args],
    cwd=h.REPO,
    env=_env_without_platforms(),
    capture_output=True,
    text=True,
    timeout=300,
  )


def _tpu_probe_lines(text: str):
  return [line for line in text.splitlines() if "backend 'tpu'" in line]


# ----------------------------------------------------------------------------------------
# Log lines from plain Python and from the command.


@pytest.mark.slow  # CI time: the command's log lines are checked by the next test
def test_a_python_caller_sees_every_run_line_once_unless_it_set_up_logging(tmp_path, data_dir):
  # Two runs in one process: first as the README's snippet (no logging set up), then
  # resumed for one more epoch after the caller asked the root logger for INFO lines.
  out = _python(
    '''
      import logging, sys
      sys.path.insert(0, 'tests')
      import _train_helpers as h
      from ncf_jax import train
      workdir, data_dir = sys.argv[1:]
      train.train_and_evaluate(h.tiny_config(data_dir, num_epochs=1), workdir)
      print('-- caller sets up logging --', file=sys.stderr, flush=True)
      logging.getLogger().setLevel(logging.INFO)
      train.train_and_evaluate(h.tiny_config(data_dir, num_epochs=2), workdir)
      ''',
    str(tmp_path / 'run'),
    data_dir,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  first, second = out.stderr.split('-- caller sets up logging --')
  assert first.count('Iteration 1: HR = ') == 1, first[-3000:]
  assert first.count('[params_hash] ') == 1
  assert first.count('[pipeline_hash] All batches hash: ') == 1
  epoch0 = h.metrics(str(tmp_path / 'run'))[0]  # the first run's result
  done = [line for line in first.splitlines() if 'Done: ' in line]
  assert len(done) == 1, first[-3000:]
  assert (
    done[0]
    .split('] ', 1)[1]
    .startswith(
      f'Done: {tmp_path / "run"} - HR@10 {epoch0["hr"]:.4f}, NDCG@10 '
      f'{epoch0["ndcg"]:.4f} (epoch 1), '
    )
  )
  assert done[0].endswith(' s; summary.json')
  assert not _tpu_probe_lines(out.stderr)
  # The caller's own handler (absl's basicConfig one) shows the lines, once, in its format.
  assert second.count('Iteration 2: HR = ') == 1, second[-3000:]
  assert second.count('INFO:absl:Iteration 2: HR = ') == 1
  assert second.count('[params_hash] ') == 1


def test_the_commands_log_each_line_once_without_library_noise(tmp_path, data_dir):
  workdir = str(tmp_path / 'run')
  cmd = h.train_cmd(workdir, data_dir, num_epochs=1, hash_pipeline=False)
  out = subprocess.run(
    cmd, cwd=h.REPO, env=_env_without_platforms(), capture_output=True, text=True, timeout=300
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stderr.count('Iteration 1: HR = ') == 1, out.stderr[-3000:]
  assert out.stderr.count('[params_hash] ') == 1
  assert out.stderr.count(f'Done: {workdir} - HR@10 ') == 1
  assert not _tpu_probe_lines(out.stderr), out.stderr[-3000:]
  # Provenance: the command line, the config file, the checkout and the times.
  with open(f'{workdir}/command.txt') as f:
    assert f.read().startswith('python -m ncf_jax.train --workdir=')
  for name in ('config.json', 'summary.json'):
    with open(f'{workdir}/{name}') as f:
      origin = json.load(f)['provenance']
    assert origin['argv'][1:] == cmd[3:] and origin['config_file'].endswith('configs/default.py')
    assert {'version', 'git_commit', 'git_dirty', 'host', 'process_count', 'started'} <= set(origin)
  assert 'ended' in origin

  # evaluate: no orbax "read only" warning, and the epoch of metrics.jsonl.
  out = subprocess.run(
    [sys.executable, '-m', 'ncf_jax.evaluate', f'--workdir={workdir}'],
    cwd=h.REPO,
    env=_env_without_platforms(),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'read only' not in out.stderr and not _tpu_probe_lines(out.stderr), out.stderr
  epoch = h.metrics(workdir)[-1]['epoch']
  assert f'checkpoint step {SPE} (end of epoch {epoch + 1}) of ' in out.stdout  # from 1
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result['epoch'] == epoch == 0 and result['batch'] is None


def test_checkpoint_epochs_are_numbered_as_in_metrics_jsonl():
  assert evaluate_lib.checkpoint_epoch(40, 40) == (
    0,
    None,
  )  # end of epoch 0 (metrics.jsonl's count)
  assert evaluate_lib.checkpoint_epoch(120, 40) == (2, None)
  assert evaluate_lib.checkpoint_epoch(57, 40) == (1, 17)  # SIGTERM in epoch 1
  assert evaluate_lib.checkpoint_epoch(0, 40) == (None, 0)


def test_visible_logs_leaves_a_caller_s_own_logging_alone(monkeypatch):
  absl_logger = std_logging.getLogger('absl')
  # Under pytest the root logger has pytest's capture handlers: a set-up caller.
  assert std_logging.getLogger().handlers
  with writers.visible_logs():
    assert not absl_logger.handlers and absl_logger.propagate
  # A bare process: the run gets a stderr handler, which goes away after it.
  monkeypatch.setattr(std_logging.getLogger(), 'handlers', [])
  monkeypatch.setattr(std_logging.getLogger(), 'level', std_logging.WARNING)
  with writers.visible_logs():
    assert len(absl_logger.handlers) == 1 and not absl_logger.propagate
    assert absl_logger.level == std_logging.INFO
  assert not absl_logger.handlers and absl_logger.propagate
  assert absl_logger.level == std_logging.NOTSET


# ----------------------------------------------------------------------------------------
# The progress bar follows the device.


class _FakeDevice:
  """Step results that become ready `lag` dispatches later, or when waited for."""

  def __init__(self, lag):
    self.lag, self.dispatched, self.waited = lag, 0, 0

  def token(self):
    device = self
    index = self.dispatched
    self.dispatched += 1

    class Token:
      def is_ready(self):
        return index + device.lag < device.dispatched or index < device.waited

      def block_until_ready(self):
        device.waited = max(device.waited, index + 1)
        return self

    return Token()

  def finished(self):
    return min(self.dispatched, max(self.dispatched - self.lag, self.waited))


class _RecordingBar:
  def __init__(self, device, total):
    self.device, self.total, self.n, self.closed, self.seen = device, total, 0, False, []

  def update(self, k):
    self.n += k
    assert self.n <= self.device.finished(), 'the bar ran ahead of the device'
    self.seen.append((self.device.dispatched, self.n))

  def close(self):
    self.closed = True


def test_the_bar_counts_finished_steps_not_dispatched_ones():
  device = _FakeDevice(lag=5)
  bar = _RecordingBar(device, 20)
  progress = writers.DeviceProgress(bar)
  for _ in range(20):
    progress.add(device.token())
    assert bar.n == max(device.dispatched - 5, 0)
  progress.close()
  assert bar.n == 20 and bar.closed


def test_the_train_loop_advances_the_bar_with_the_device(tmp_path, data_dir, monkeypatch):
  device = _FakeDevice(lag=7)
  bars = []
  real_make_train_step = steps.make_train_step

  def make_slow_step(config, mesh, **kwargs):
    step = real_make_train_step(config, mesh, **kwargs)

    def slow_step(*args):
      state, out = step(*args)
      return state, dict(out, train_loss=device.token())

    return slow_step

  def recording_bar(total, initial, desc, enabled, every_s):
    bars.append(_RecordingBar(device, total))
    return bars[-1]

  monkeypatch.setattr(steps, 'make_train_step', make_slow_step)
  monkeypatch.setattr(writers, '_bar', recording_bar)
  train.train_and_evaluate(
    h.tiny_config(data_dir, num_epochs=1, hash_pipeline=False, num_devices=1), str(tmp_path / 'run')
  )
  (bar,) = bars
  assert bar.total == SPE and bar.n == SPE and bar.closed
  assert any(n < dispatched for dispatched, n in bar.seen)  # it lagged the dispatch


def test_without_a_terminal_progress_is_periodic_log_lines(caplog):
  caplog.set_level(std_logging.INFO)
  device = _FakeDevice(lag=0)
  progress = writers.progress(10, 0, 'epoch 3', enabled=True, every_s=0)
  for _ in range(10):
    progress.add(device.token())
  progress.close()
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith('epoch 3: ')]
  assert len(lines) >= 9 and lines[-1].startswith('epoch 3: 10/10 steps (100%)'), lines


# ----------------------------------------------------------------------------------------
# Flag errors: one line, the field, and what to do.


def _train_flags(*args):
  return subprocess.run(
    [sys.executable, '-m', 'ncf_jax.train', *args],
    cwd=h.REPO,
    env=h.env(1),
    capture_output=True,
    text=True,
    timeout=120,
  )


@pytest.mark.parametrize(
  'args, expected',
  [
    (
      ['--config=configs/default.py', '--config.num_epoch=3'],
      'error: unknown config field config.num_epoch (from --config.num_epoch=3): did you '
      'mean config.num_epochs?',
    ),
    (
      ['--config.num_epoch=3'],  # no --config: ml_collections applies it at definition
      'error: unknown config field config.num_epoch (from --config.num_epoch=3): did you '
      'mean config.num_epochs?',
    ),
    (
      ['--config=configs/mlperf.py', '--config.model.mf_dm=8'],
      'error: unknown config field config.model.mf_dm (from --config.model.mf_dm=8): did '
      'you mean config.model.mf_dim?',
    ),
    (
      ['--config=configs/default.py', '--config.batch_size=abc'],
      "error: config.batch_size takes an integer (8192 in configs/default.py), not 'abc' "
      '(from --config.batch_size=abc).',
    ),
    (
      ['--config=configs/default.py', '--config.hash_pipeline=maybe'],
      "error: config.hash_pipeline takes true or false (False in configs/default.py), not 'maybe'",
    ),
    (['--workdri=runs/x'], 'error: unknown flag --workdri; did you mean --workdir?'),
  ],
)
def test_a_bad_flag_is_one_clean_line_naming_the_field(args, expected):
  out = _train_flags(*args)
  assert out.returncode == 2
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(expected), out.stderr
  assert '\\' not in lines[0] and 'Traceback' not in out.stderr


@pytest.mark.parametrize('module', ['ncf_jax.prepare', 'ncf_jax.benchmark'])
def test_the_other_commands_give_the_same_line_for_a_typo_without_config(module):
  out = subprocess.run(
    [sys.executable, '-m', module, '--config.num_epoch=3'],
    cwd=h.REPO,
    env=h.env(1),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert out.returncode == 2
  assert out.stderr.strip().splitlines() == [
    'error: unknown config field config.num_epoch (from --config.num_epoch=3): did you '
    'mean config.num_epochs? Every field is defined, with a comment, in '
    'configs/default.py.'
  ], out.stderr


# ----------------------------------------------------------------------------------------
# A failed start leaves no empty workdir; it never removes what was there.


def test_a_run_that_fails_before_training_leaves_no_empty_workdir(tmp_path, monkeypatch):
  missing = h.tiny_config(str(tmp_path / 'no_data'), dataset__name='ml-1m')
  new = tmp_path / 'new' / 'run'
  with pytest.raises(UserError, match='ml-1m'):
    train.train_and_evaluate(missing, str(new))
  assert not (tmp_path / 'new').exists()

  existing = tmp_path / 'existing'
  existing.mkdir()
  (tmp_path / 'parent').mkdir()
  (tmp_path / 'parent' / 'notes.txt').write_text('mine')
  for workdir in (existing, tmp_path / 'parent' / 'run'):
    with pytest.raises(UserError):
      train.train_and_evaluate(missing, str(workdir))
  assert existing.is_dir()  # it was there before the run
  assert (tmp_path / 'parent' / 'notes.txt').read_text() == 'mine'
  assert not (tmp_path / 'parent' / 'run').exists()

  monkeypatch.chdir(tmp_path)  # no --workdir: runs/<date>-... and runs/ itself
  with pytest.raises(UserError):
    train.train_and_evaluate(missing, None)
  assert not (tmp_path / 'runs').exists()


# ----------------------------------------------------------------------------------------
# The last line.


def _summary(**overrides):
  base = {
    'workdir': '/abs/runs/demo',
    'validation': 'none',
    'preempted': False,
    'test_hr': 0.68771,
    'test_ndcg': 0.46552,
    'valid_hr': None,
    'valid_ndcg': None,
    'best_epoch': None,
  }
  return dict(base, **overrides)


def test_the_done_line_names_the_workdir_and_the_headline_metrics():
  history = [{'epoch': 6, 'hr': 0.6}, {'epoch': 7, 'hr': 0.68771}]
  assert train.done_line('runs/demo', _summary(), history, 10, 8.06) == (
    'Done: runs/demo - HR@10 0.6877, NDCG@10 0.4655 (epoch 8), 8.1 s; summary.json'
  )
  validated = _summary(validation='leave_one_out', best_epoch=4, valid_hr=0.7, valid_ndcg=0.5)
  assert train.done_line('runs/v', validated, [], 10, 20.0) == (
    'Done: runs/v - test HR@10 0.6877, NDCG@10 0.4655 (selected epoch 5), 20.0 s; summary.json'
  )
  stopped = dict(validated, preempted=True, test_hr=None, test_ndcg=None)
  assert train.done_line('runs/v', stopped, [], 10, 3.0) == (
    'Stopped (SIGTERM): runs/v - valid HR@10 0.7000, NDCG@10 0.5000 (best epoch so '
    'far: 5), 3.0 s; summary.json; rerun the same command to resume.'
  )
  assert 'no epoch evaluated yet' in train.done_line(
    'runs/x', _summary(test_hr=None, test_ndcg=None, preempted=True), [], 10, 1.0
  )
