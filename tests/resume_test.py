"""Checkpoints, resume after SIGKILL, SIGTERM and Ctrl-C, config checks, `ncf_jax.evaluate`.

Runs go through the real command (`python -m ncf_jax.train`, 2 CPU devices). A run that
must be interrupted mid-epoch uses tests/_train_worker.py: the same `main` with each step
slowed down, so the signal reliably lands inside an epoch.
"""

import json
import os
import shutil
import signal
import sys
import time

import _train_helpers as h
import pytest

from ncf_jax import checkpoint as ckpt_lib
from ncf_jax import evaluate as evaluate_lib
from ncf_jax import train
from ncf_jax.errors import UserError

SPE = h.STEPS_PER_EPOCH
FLAGS = dict(log_every_steps=5)
DELAY = dict(NCF_TEST_STEP_DELAY=0.05)  # 40 steps -> ~2 s per epoch


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('data'))


@pytest.fixture(scope='module')
def reference(tmp_path_factory, data_dir):
  """An uninterrupted 3-epoch run: workdir, summary, metrics."""
  workdir = str(tmp_path_factory.mktemp('reference'))
  out = h.run(h.train_cmd(workdir, data_dir, **FLAGS), log=workdir + '.log')
  assert out.returncode == 0, out.stdout[-3000:]
  return workdir, h.summary(workdir), h.metrics(workdir)


def test_uninterrupted_run_keeps_the_last_checkpoints_with_everything(reference):
  workdir, summary, metrics = reference
  assert h.checkpoint_steps(workdir) == [SPE, 2 * SPE, 3 * SPE]  # keep_checkpoints = 3
  assert [r['epoch'] for r in metrics] == [0, 1, 2]
  assert summary['epochs_done'] == 3 and not summary['preempted']
  ck = ckpt_lib.Checkpoints(workdir, 3, read_only=True)
  meta = ck.restore_meta(2 * SPE)
  ck.close()
  assert meta['seed'] == 0 and meta['epoch'] == 2
  assert meta['config']['batch_size'] == 1024
  assert meta['history'] == metrics[:2]
  assert meta['test_hr_max_over_epochs'] == max(r['hr'] for r in metrics[:2])


def _kill_in_epoch_1_then_resume(tmp_path, data_dir, fields) -> str:
  """SIGKILL mid-epoch 1 (epoch 0 saved), a half-written save left over, then the same
  command again; returns the workdir of the resumed run."""
  workdir, log = str(tmp_path / 'run'), str(tmp_path / 'killed.log')
  proc = h.start(h.train_cmd(workdir, data_dir, worker=True, **fields), log, **DELAY)
  try:
    h.wait_for_line(proc, log, f'epoch 2 step 5/{SPE}')
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
  finally:
    h.stop(proc)
  assert h.checkpoint_steps(workdir) == [SPE]
  assert len(h.metrics(workdir)) == 1
  assert not os.path.exists(os.path.join(workdir, 'summary.json'))
  # A kill during a save leaves orbax's temporary folder: it must be ignored.
  ckdir = os.path.join(workdir, 'checkpoints')
  partial = os.path.join(ckdir, f'{2 * SPE}.orbax-checkpoint-tmp')
  shutil.copytree(os.path.join(ckdir, str(SPE)), partial)
  os.remove(os.path.join(partial, 'commit_success.txt'))

  out = h.run(h.train_cmd(workdir, data_dir, **fields), log=str(tmp_path / 'resumed.log'))
  assert out.returncode == 0, out.stdout[-3000:]
  assert f'Resuming from checkpoint at step {SPE}' in out.stdout
  return workdir


def _assert_same_run(workdir, ref_summary, ref_metrics):
  assert h.summary(workdir)['params_hash'] == ref_summary['params_hash']
  assert h.summary(workdir)['eval_candidates_hash'] == ref_summary['eval_candidates_hash']
  h.assert_same_epochs(h.metrics(workdir), ref_metrics)


@pytest.mark.slow  # CI time: the sharded SIGKILL test below runs the same kill and resume
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path, data_dir, reference):
  _, ref_summary, ref_metrics = reference
  workdir = _kill_in_epoch_1_then_resume(tmp_path, data_dir, FLAGS)
  _assert_same_run(workdir, ref_summary, ref_metrics)
  assert h.checkpoint_steps(workdir) == [SPE, 2 * SPE, 3 * SPE]


SHARDED = dict(FLAGS, sharding='sharded', num_epochs=2)


def test_sigkill_mid_epoch_then_resume_is_bit_exact_with_sharded_tables_and_data(
  tmp_path, data_dir
):
  # Tables, Adam moments, the sampler's data and the epoch split over 2 devices: the
  # resumed run's parameters are bit-identical to an uninterrupted sharded run's.
  ref = str(tmp_path / 'reference')
  out = h.run(h.train_cmd(ref, data_dir, **SHARDED), log=ref + '.log')
  assert out.returncode == 0, out.stdout[-3000:]
  workdir = _kill_in_epoch_1_then_resume(tmp_path, data_dir, SHARDED)
  _assert_same_run(workdir, h.summary(ref), h.metrics(ref))


@pytest.mark.parametrize(
  'sig, name, code', [(signal.SIGTERM, 'SIGTERM', 0), (signal.SIGINT, 'Ctrl-C', 130)]
)
def test_sigterm_or_ctrl_c_saves_mid_epoch_and_resumes_exactly(
  tmp_path, data_dir, reference, sig, name, code
):
  # SIGTERM (a preemption) exits 0; Ctrl-C exits 130, an interrupt, after the same save.
  _, ref_summary, ref_metrics = reference
  workdir, log = str(tmp_path / 'run'), str(tmp_path / 'terminated.log')
  proc = h.start(h.train_cmd(workdir, data_dir, worker=True, **FLAGS), log, **DELAY)
  try:
    h.wait_for_line(proc, log, f'epoch 2 step 5/{SPE}')
    t0 = time.time()
    proc.send_signal(sig)
    rc = proc.wait(60)
    took = time.time() - t0
  finally:
    h.stop(proc)
  assert rc == code, h.read(log)[-3000:]
  assert took < 30, took
  steps = h.checkpoint_steps(workdir)
  assert steps[0] == SPE and len(steps) == 2 and SPE + 5 <= steps[1] < 2 * SPE, steps
  assert f'{name}: saved a checkpoint at step' in h.read(log)
  assert f'Stopped ({name}): ' in h.read(log)
  assert 'Traceback' not in h.read(log)
  assert h.summary(workdir)['preempted'] is True
  assert h.summary(workdir)['stop_reason'] == name
  assert len(h.metrics(workdir)) == 1

  out = h.run(h.train_cmd(workdir, data_dir, **FLAGS), log=str(tmp_path / 'resumed.log'))
  assert out.returncode == 0, out.stdout[-3000:]
  assert f'Resuming from checkpoint at step {steps[1]}' in out.stdout
  summary = h.summary(workdir)
  assert summary['params_hash'] == ref_summary['params_hash']
  assert not summary['preempted']
  h.assert_same_epochs(h.metrics(workdir), ref_metrics)


@pytest.mark.slow  # CI time; sharding_test (slow) runs the hash replay too
def test_turning_the_hash_on_at_a_mid_epoch_resume_still_hashes_the_whole_epoch(
  tmp_path, data_dir, reference
):
  """The batches before the checkpoint are replayed through the digest, so the logged
  hashes equal an uninterrupted hashed run's instead of covering part of the epoch."""
  _, _, ref_metrics = reference
  workdir, log = str(tmp_path / 'run'), str(tmp_path / 'unhashed.log')
  proc = h.start(
    h.train_cmd(workdir, data_dir, worker=True, hash_pipeline=False, **FLAGS), log, **DELAY
  )
  try:
    h.wait_for_line(proc, log, f'epoch 2 step 10/{SPE}')
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0, h.read(log)[-3000:]
  finally:
    h.stop(proc)
  steps = h.checkpoint_steps(workdir)
  assert len(steps) == 2 and SPE + 10 <= steps[1] < 2 * SPE, steps
  assert 'pipeline_hash_all' not in h.metrics(workdir)[0]

  out = h.run(h.train_cmd(workdir, data_dir, **FLAGS), log=str(tmp_path / 'resumed.log'))
  assert out.returncode == 0, out.stdout[-3000:]
  assert 'recomputing their digests' in out.stdout
  got = h.metrics(workdir)
  h.assert_same_epochs(got[1:], ref_metrics[1:])  # epochs 1 and 2: every key, hashes too


def test_resume_refuses_an_incompatible_config_and_allows_resumable_fields(
  tmp_path, data_dir, reference
):
  workdir = str(tmp_path / 'copy')
  shutil.copytree(reference[0], workdir)
  before = h.tree_digest(os.path.join(workdir, 'checkpoints'))
  for overrides, field in [
    (dict(model__mf_dim=8), 'model.mf_dim'),
    (dict(seed=1), 'seed'),
    (dict(dataset__synthetic_num_users=301), 'dataset.synthetic_num_users'),
    (dict(batch_size=2048), 'batch_size'),
  ]:
    config = h.tiny_config(data_dir, num_devices=2, **FLAGS, **overrides)
    with pytest.raises(UserError, match='cannot resume') as e:
      train.train_and_evaluate(config, workdir)
    assert field in str(e.value) and 'num_epochs' in str(e.value)  # names what may change
  assert h.tree_digest(os.path.join(workdir, 'checkpoints')) == before
  # num_epochs (and eval/logging fields) may change: one more epoch.
  config = h.tiny_config(data_dir, num_devices=2, num_epochs=4, eval_batch_size=64, **FLAGS)
  train.train_and_evaluate(config, workdir)
  assert h.checkpoint_steps(workdir) == [2 * SPE, 3 * SPE, 4 * SPE]
  assert [r['epoch'] for r in h.metrics(workdir)] == [0, 1, 2, 3]
  h.assert_same_epochs(h.metrics(workdir)[:3], reference[2])


def test_evaluate_command_reproduces_the_training_eval(tmp_path, reference):
  workdir, summary, metrics = reference
  out = h.run([sys.executable, '-m', 'ncf_jax.evaluate', f'--workdir={workdir}'])
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.strip().splitlines()
  assert 'HR@10 = ' in lines[0] and 'NDCG@10 = ' in lines[0]
  result = json.loads(lines[-1])
  assert result['step'] == 3 * SPE and result['epoch'] == metrics[-1]['epoch'] == 2
  assert result['hr'] == pytest.approx(metrics[-1]['hr'], abs=1e-9)
  assert result['ndcg'] == pytest.approx(metrics[-1]['ndcg'], rel=1e-6)
  assert result['eval_candidates_hash'] == summary['eval_candidates_hash']

  out = h.run([sys.executable, '-m', 'ncf_jax.evaluate', f'--workdir={workdir}', '--step=41'])
  assert out.returncode != 0
  assert 'no checkpoint at step 41' in out.stderr and '40, 80, 120' in out.stderr
  assert 'Traceback' not in out.stderr


def test_evaluate_a_named_step_in_process(reference):
  workdir, summary, metrics = reference
  before = h.tree_digest(workdir)
  result = evaluate_lib.evaluate_checkpoint(workdir, step=SPE)  # 8 devices here
  assert result['epoch'] == metrics[0]['epoch'] == 0 and result['batch'] is None
  assert result['hr'] == pytest.approx(metrics[0]['hr'], abs=1e-9)
  assert result['ndcg'] == pytest.approx(metrics[0]['ndcg'], rel=1e-6)
  assert result['eval_candidates_hash'] == summary['eval_candidates_hash']
  assert h.tree_digest(workdir) == before  # read-only


def test_evaluate_errors_are_clear(tmp_path, reference):
  with pytest.raises(UserError, match='does not exist'):
    evaluate_lib.evaluate_checkpoint(str(tmp_path / 'missing'))
  with pytest.raises(UserError, match='has no checkpoints folder'):
    evaluate_lib.evaluate_checkpoint(str(tmp_path))
  os.makedirs(tmp_path / 'empty' / 'checkpoints')
  with pytest.raises(UserError, match='no checkpoint in'):
    evaluate_lib.evaluate_checkpoint(str(tmp_path / 'empty'))
  with pytest.raises(UserError, match='available steps: 40, 80, 120'):
    evaluate_lib.evaluate_checkpoint(reference[0], step=7)
  # A run without a validation split has neither a selected epoch nor a validation split.
  with pytest.raises(UserError, match='no selected epoch; drop --best'):
    evaluate_lib.evaluate_checkpoint(reference[0], best=True)
  with pytest.raises(UserError, match='use --split=test'):
    evaluate_lib.evaluate_checkpoint(reference[0], split='valid')
