"""`config.steps_per_call`: k steps per compiled call give the run of one step per call.

Bit for bit: parameters, per-epoch losses and pipeline hashes, checkpoints. k=3 does not
divide the 40 steps of an epoch, so every epoch also runs its remainder one step a call.
"""

import os
import signal

import jax
import numpy as np
import pytest

from ncf_jax import checkpoint as ckpt_lib
from ncf_jax import config_checks, steps, train
from ncf_jax.errors import UserError
from tests import _train_helpers as h

FLAGS = dict(num_epochs=2, log_every_steps=5)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('data'))


def _run(workdir, data_dir, **overrides):
  return train.train_and_evaluate(h.tiny_config(data_dir, **dict(FLAGS, **overrides)), workdir)


def _checkpoints(workdir):
  """{step: host copy of the saved TrainState tree}."""
  ck = ckpt_lib.Checkpoints(workdir, 10)
  out = {}
  for step in h.checkpoint_steps(workdir):
    out[step] = jax.device_get(
      ck.manager.restore(
        step, args=ckpt_lib.ocp.args.Composite(state=ckpt_lib.ocp.args.StandardRestore())
      )['state']
    )
  ck.close()
  return out


def _assert_same_run(got, want):
  assert h.summary(got)['params_hash'] == h.summary(want)['params_hash']
  h.assert_same_epochs(h.metrics(got), h.metrics(want))
  a, b = _checkpoints(got), _checkpoints(want)
  assert sorted(a) == sorted(b) and a
  for step in a:
    for x, y in zip(jax.tree.leaves(a[step]), jax.tree.leaves(b[step]), strict=True):
      np.testing.assert_array_equal(x, y)


@pytest.fixture(scope='module')
def reference(tmp_path_factory, data_dir):
  """{devices: workdir} of one step per call, made when first asked for."""
  made = {}

  def get(devices):
    if devices not in made:
      made[devices] = str(tmp_path_factory.mktemp(f'k1_{devices}dev'))
      _run(made[devices], data_dir, num_devices=devices)
    return made[devices]

  return get


@pytest.mark.parametrize('devices', [pytest.param(1, marks=pytest.mark.slow), 2])
def test_three_steps_per_call_equal_one_step_per_call(
  tmp_path, data_dir, reference, monkeypatch, devices
):
  built = []
  make = steps.make_train_step

  def capture(*args, **kwargs):
    built.append(make(*args, **kwargs))
    return built[-1]

  monkeypatch.setattr(steps, 'make_train_step', capture)
  workdir = str(tmp_path / 'k3')
  _run(workdir, data_dir, num_devices=devices, steps_per_call=3)
  # Two programs (3 steps, and 1 for each epoch's last 40 % 3 steps), each compiled once.
  assert [fn._cache_size() for fn in built] == [1, 1]
  _assert_same_run(workdir, reference(devices))


def test_resume_mid_epoch_with_three_steps_per_call_equals_uninterrupted(
  tmp_path, data_dir, reference, monkeypatch
):
  # A one-step-per-call run on 2 devices stopped by SIGTERM after 8 steps (the loop
  # checks it before each call): a checkpoint at step 8, not a multiple of 3.
  make = steps.make_train_step

  def sigterm_after_8(*args, **kwargs):
    fn, calls = make(*args, **kwargs), [0]

    def step(*a):
      out = fn(*a)
      calls[0] += 1
      if calls[0] == 8:
        os.kill(os.getpid(), signal.SIGTERM)
      return out

    return step

  monkeypatch.setattr(steps, 'make_train_step', sigterm_after_8)
  workdir = str(tmp_path / 'run')
  _run(workdir, data_dir, num_devices=2)
  assert h.checkpoint_steps(workdir) == [8] and h.summary(workdir)['preempted']
  monkeypatch.setattr(steps, 'make_train_step', make)
  _run(workdir, data_dir, num_devices=2, steps_per_call=3)  # 8..37 three a call, 38, 39
  assert not h.summary(workdir)['preempted']
  ref = reference(2)
  assert h.summary(workdir)['params_hash'] == h.summary(ref)['params_hash']
  h.assert_same_epochs(h.metrics(workdir), h.metrics(ref))
  want, got = _checkpoints(ref), _checkpoints(workdir)
  assert set(want) & set(got)
  for step in set(want) & set(got):
    for x, y in zip(jax.tree.leaves(got[step]), jax.tree.leaves(want[step]), strict=True):
      np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize('value', [0, -2])
def test_steps_per_call_below_one_is_one_user_error(data_dir, value):
  config = h.tiny_config(data_dir, steps_per_call=value)
  with pytest.raises(
    UserError,
    match=r'^config\.steps_per_call=-?\d+ is invalid: it must '
    r'be >= 1\.$',
  ):
    config_checks.validate_config(config, 1)


@pytest.mark.slow  # CI time: failures_test names the step with one step per call
def test_a_nan_loss_names_the_same_step_with_three_steps_per_call(tmp_path, data_dir):
  errors = []
  for k in (1, 3):
    with pytest.raises(UserError, match='NaN or inf at global step') as e:
      _run(
        str(tmp_path / f'k{k}'),
        data_dir,
        num_devices=1,
        num_epochs=1,
        learning_rate=1e30,
        log_every_steps=1,
        steps_per_call=k,
      )
    errors.append(str(e.value))
  # Step 1 is inside the first 3-step call: the step body records it, not the loop.
  assert errors[0] == errors[1] and 'global step 1;' in errors[1], errors
