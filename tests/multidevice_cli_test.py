"""The command line on the default config: any device count gives the 1-device hashes.

Each run is `python -m ncf_jax.train --config=configs/default.py` for one epoch with
`hash_pipeline=True` (1.15 M samples, 280-560 steps), as a user would type it. Before
the in-flight bound (ncf_jax/dispatch.py), the combinations in HUNG aborted in XLA's
all-reduce rendezvous on this 2-core machine. One of them runs in CI (8 devices at batch
4096: the most devices over the cores, at the depth that aborted); the other four, the rest
of the matrix and 2 processes x 2 devices (gloo) against 1 process x 4 devices with a
drawn seed are marked slow (tests/multihost_test.py runs the latter on the tiny config in
CI).
"""

import os
import re

import _train_helpers as h
import pytest

DEFAULT = os.path.join(h.REPO, 'configs', 'default.py')
# (devices, batch size, hash_pipeline) that aborted before the fix (issue 11's table).
HUNG = [(2, 4096, True), (4, 4096, True), (4, 4096, False), (4, 2048, True), (8, 4096, True)]
IN_CI = [(8, 4096, True)]
OTHERS = [c for c in HUNG if c not in IN_CI] + [(2, 2048, True), (8, 2048, True), (2, 4096, False)]
TIMEOUT = 400


def default_cmd(workdir, data_dir, batch_size, hashed=True, extra=()):
  return [
    h.sys.executable,
    '-m',
    'ncf_jax.train',
    f'--config={DEFAULT}',
    f'--workdir={workdir}',
    '--config.num_epochs=1',
    f'--config.batch_size={batch_size}',
    f'--config.hash_pipeline={hashed}',
    f'--config.dataset.data_dir={data_dir}',
  ] + list(extra)


def hash_lines(text):
  """The `[pipeline_hash] ...` messages of a run's log, in order."""
  return re.findall(r'\[pipeline_hash\] (.*)', text)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('data'))


class _Reference(dict):
  """{batch size: the 1-device run's hash lines}, each run the first time it is asked for."""

  def __init__(self, root, data_dir):
    super().__init__()
    self.root, self.data_dir = root, data_dir

  def __missing__(self, batch):
    workdir = str(self.root / f'b{batch}')
    run = h.run(
      default_cmd(workdir, self.data_dir, batch), devices=1, timeout=TIMEOUT, log=workdir + '.log'
    )
    assert run.returncode == 0, run.stdout[-3000:]
    self[batch] = hash_lines(run.stdout)
    assert len(self[batch]) == 4, run.stdout[-3000:]  # first, all, count, eval candidates
    return self[batch]


@pytest.fixture(scope='module')
def reference(tmp_path_factory, data_dir):
  return _Reference(tmp_path_factory.mktemp('one_device'), data_dir)


def _check(devices, batch, hashed, tmp_path, data_dir, reference):
  workdir = str(tmp_path / 'run')
  run = h.run(
    default_cmd(workdir, data_dir, batch, hashed),
    devices=devices,
    timeout=TIMEOUT,
    log=workdir + '.log',
  )
  assert run.returncode == 0, run.stdout[-3000:]
  assert h.summary(workdir)['num_devices'] == devices
  if hashed:
    assert hash_lines(run.stdout) == reference[batch]
  else:
    assert not hash_lines(run.stdout) and h.metrics(workdir)[0]['hr'] > 0


@pytest.mark.parametrize('devices,batch,hashed', IN_CI)
def test_runs_that_hung_before_finish_with_the_one_device_hashes(
  devices, batch, hashed, tmp_path, data_dir, reference
):
  _check(devices, batch, hashed, tmp_path, data_dir, reference)


@pytest.mark.slow
@pytest.mark.parametrize('devices,batch,hashed', OTHERS)
def test_the_rest_of_the_device_matrix_matches_one_device(
  devices, batch, hashed, tmp_path, data_dir, reference
):
  _check(devices, batch, hashed, tmp_path, data_dir, reference)


@pytest.mark.slow  # multihost_test draws the seed of its 2-process run too, in CI
def test_two_processes_of_two_devices_with_a_drawn_seed_equal_one_process_of_four(
  tmp_path, data_dir
):
  """seed=-1: process 0 draws the seed and sends it; a different seed on process 1
  would change its half of every batch, and so the hashes."""
  port = h.free_port()
  two = str(tmp_path / 'two')
  procs, logs = [], []
  for i in range(2):
    logs.append(str(tmp_path / f'two.{i}.log'))
    flags = [
      f'--coordinator_address=127.0.0.1:{port}',
      '--num_processes=2',
      f'--process_id={i}',
      '--config.seed=-1',
    ]
    procs.append(h.start(default_cmd(two, data_dir, 4096, extra=flags), logs[-1], devices=2))
  try:
    for p in procs:
      p.wait(TIMEOUT)
  finally:
    for p in procs:
      h.stop(p)
  texts = [h.read(log) for log in logs]
  for p, text in zip(procs, texts):
    assert p.returncode == 0, text[-3000:]
  seeds = [re.findall(r'drew seed (\d+)', t) for t in texts]
  assert len(seeds[0]) == 1 and seeds[0] == seeds[1], seeds
  summary = h.summary(two)
  assert (summary['num_processes'], summary['num_devices']) == (2, 4)
  assert summary['seed'] == int(seeds[0][0])

  one = str(tmp_path / 'one')
  run = h.run(
    default_cmd(one, data_dir, 4096, extra=[f'--config.seed={seeds[0][0]}']),
    devices=4,
    timeout=TIMEOUT,
    log=one + '.log',
  )
  assert run.returncode == 0, run.stdout[-3000:]
  assert hash_lines(texts[0]) == hash_lines(run.stdout)
  assert len(hash_lines(run.stdout)) == 4
