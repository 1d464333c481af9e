"""Multi-process training: 2 processes x 2 CPU devices (gloo) against 1 process x 4 devices.

Both processes run the real command with --coordinator_address/--num_processes/
--process_id on 127.0.0.1. The global batch is the same, and a sample depends only on
(seed, epoch, position), so the pipeline hashes must be identical; losses and metrics
agree to float tolerance (the all-reduce sums in another order). The two-process run
draws its seed (seed=-1): process 0 draws it and sends it, and the one-process run reuses
it, so a seed that differed on process 1 would change its half of every batch. The
SIGTERM run shards tables and data over the two processes (`config.sharding='sharded'`).
"""

import os
import re
import signal
import subprocess
import time

import _train_helpers as h
import pytest

from ncf_jax import evaluate as evaluate_lib
from ncf_jax import train

SPE = h.STEPS_PER_EPOCH
EPOCHS = 2
TIMEOUT = 300  # per launch; a run takes ~20-40 s on 2 busy cores


def launch(workdir, data_dir, log_prefix, *, worker=False, seed=0, fields=None, **env_extra):
  """Starts process 0 and 1 of a 2-process run; returns the Popen objects and log paths."""
  port = h.free_port()
  procs, logs = [], []
  for i in range(2):
    log = f'{log_prefix}.{i}.log'
    flags = [f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}']
    procs.append(
      h.start(
        h.train_cmd(
          workdir,
          data_dir,
          worker=worker,
          extra=flags,
          num_epochs=EPOCHS,
          log_every_steps=5,
          seed=seed,
          **(fields or {}),
        ),
        log,
        devices=2,
        **env_extra,
      )
    )
    logs.append(log)
  return procs, logs


def wait_all(procs, logs, timeout=TIMEOUT):
  deadline = time.time() + timeout
  try:
    for p in procs:
      p.wait(max(1, deadline - time.time()))
  except subprocess.TimeoutExpired:
    raise AssertionError(
      'multi-process run timed out:\n' + '\n----\n'.join(h.read(log)[-2000:] for log in logs)
    ) from None
  finally:
    for p in procs:
      h.stop(p)
  for p, log in zip(procs, logs):
    assert p.returncode == 0, h.read(log)[-3000:]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """(two-process workdir, one-process 4-device workdir, data dir, logs, drawn seeds)."""
  root = tmp_path_factory.mktemp('multihost')
  data_dir = str(root / 'data')
  two, one = str(root / 'two'), str(root / 'one')
  procs, logs = launch(two, data_dir, str(root / 'two'), seed=-1)
  wait_all(procs, logs)
  seeds = [re.findall(r'drew seed (\d+)', h.read(log)) for log in logs]
  assert len(seeds[0]) == 1, seeds
  out = h.run(
    h.train_cmd(one, data_dir, num_epochs=EPOCHS, log_every_steps=5, seed=int(seeds[0][0])),
    devices=4,
    timeout=TIMEOUT,
    log=str(root / 'one.log'),
  )
  assert out.returncode == 0, out.stdout[-3000:]
  return two, one, data_dir, logs, seeds


def test_two_processes_match_one_process_with_the_same_global_batch(runs):
  two, one, _, logs, seeds = runs
  s2, s1 = h.summary(two), h.summary(one)
  assert seeds[0] == seeds[1] and s2['seed'] == s1['seed'] == int(seeds[0][0])
  assert (s2['num_processes'], s2['num_devices']) == (2, 4)
  assert (s1['num_processes'], s1['num_devices']) == (1, 4)
  for log in logs:
    assert 'JAX process' in h.read(log) and 'of 2, 2 local devices of 4' in h.read(log)
  m2, m1 = h.metrics(two), h.metrics(one)
  h.assert_same_epochs(m2, m1, keys=h.HASH_KEYS)  # the same batches, bit for bit
  assert s2['eval_candidates_hash'] == s1['eval_candidates_hash']
  for a, b in zip(m2, m1):
    assert a['train_loss'] == pytest.approx(b['train_loss'], rel=1e-5)
    assert a['hr'] == pytest.approx(b['hr'], abs=1e-4)
    assert a['ndcg'] == pytest.approx(b['ndcg'], abs=1e-4)


def test_only_process_zero_writes_and_the_checkpoints_restore(runs):
  two, one, _, _, _ = runs
  assert sorted(os.listdir(two)) == sorted(os.listdir(one))
  assert len(os.listdir(os.path.join(two, 'tensorboard'))) == 1  # one writer
  assert not [n for n in os.listdir(two) if '.tmp' in n or n.startswith('.write_test')]
  assert h.checkpoint_steps(two) == [SPE, EPOCHS * SPE]
  # The multi-process checkpoint restores in one process (8 devices here) and reproduces
  # the final eval of the run.
  result = evaluate_lib.evaluate_checkpoint(two)
  final = h.metrics(two)[-1]
  assert result['step'] == EPOCHS * SPE
  assert result['hr'] == pytest.approx(final['hr'], abs=1e-4)
  assert result['ndcg'] == pytest.approx(final['ndcg'], abs=1e-4)
  assert result['eval_candidates_hash'] == h.summary(two)['eval_candidates_hash']


def test_sigterm_to_one_process_stops_both_at_one_step(runs, tmp_path):
  """A preemption notice reaching one host first: every process saves the same step.

  This run shards its tables and data over the 2 x 2 devices (config.sharding), and
  resumes replicated in one process: the same batches as the replicated 2-process run.
  """
  two, _, data_dir, _, seeds = runs
  seed = int(seeds[0][0])  # the uninterrupted run's
  workdir = str(tmp_path / 'run')
  procs, logs = launch(
    workdir,
    data_dir,
    str(tmp_path / 'term'),
    worker=True,
    seed=seed,
    fields={'sharding': 'sharded'},
    NCF_TEST_STEP_DELAY=0.05,
  )
  try:
    h.wait_for_line(procs[0], logs[0], f'epoch 2 step 5/{SPE}', timeout=TIMEOUT)
  except AssertionError:
    for p in procs:
      h.stop(p)
    raise
  procs[0].send_signal(signal.SIGTERM)
  wait_all(procs, logs, timeout=120)  # both exit 0
  steps = h.checkpoint_steps(workdir)
  assert len(steps) == 2 and SPE + 5 <= steps[1] < 2 * SPE, steps
  for log in logs:
    assert f'SIGTERM: saved a checkpoint at step {steps[1]} ' in h.read(log)
  assert h.summary(workdir)['preempted'] is True

  # Resume in this process on 4 of its devices (the device count may change on resume):
  # the same batches, so the same pipeline hashes as the uninterrupted 2-process run.
  config = h.tiny_config(data_dir, num_epochs=EPOCHS, log_every_steps=5, num_devices=4, seed=seed)
  train.train_and_evaluate(config, workdir)
  h.assert_same_epochs(h.metrics(workdir), h.metrics(two), keys=h.HASH_KEYS)
  for a, b in zip(h.metrics(workdir), h.metrics(two)):
    assert a['train_loss'] == pytest.approx(b['train_loss'], rel=1e-5)
    assert a['hr'] == pytest.approx(b['hr'], abs=1e-4)
