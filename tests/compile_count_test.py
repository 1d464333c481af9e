"""Each compiled program of a run compiles once: across epochs, and after a resume.

A recompile (a weakly typed scalar, an argument whose shape, dtype or sharding changes
between calls, a restored state laid out unlike a fresh one) costs seconds per program
on a CPU and minutes on large models, and shows in no result: only in the jit caches.
"""

import pytest

from ncf_jax import steps, train
from tests import _train_helpers as h


@pytest.fixture
def captured(monkeypatch):
  """The jitted functions that train.py builds: {'train_step': [...], 'epoch': [...]}."""
  got = {'train_step': [], 'epoch': []}
  make_train_step, make_epoch_items = steps.make_train_step, steps.make_epoch_items

  def train_step(*args, **kwargs):
    fn = make_train_step(*args, **kwargs)
    got['train_step'].append(fn)
    return fn

  def epoch_items(*args, **kwargs):
    build = make_epoch_items(*args, **kwargs)
    got['epoch'].extend(build.programs)
    return build

  monkeypatch.setattr(steps, 'make_train_step', train_step)
  monkeypatch.setattr(steps, 'make_epoch_items', epoch_items)
  return got


def _compiles(got):
  """{kind: [cache size of each captured program]}; an unused program counts 0."""
  return {k: [fn._cache_size() for fn in fns] for k, fns in got.items()}


def _assert_once(got):
  sizes = _compiles(got)
  assert sizes['train_step'] and sizes['epoch'], sizes
  assert all(n <= 1 for ns in sizes.values() for n in ns), sizes
  assert max(sizes['train_step']) == 1 and all(n == 1 for n in sizes['epoch']), sizes
  for fns in got.values():
    fns.clear()


# 1 device is slow (CI time): the 2-device run compiles the same programs.
@pytest.mark.parametrize('devices', [pytest.param(1, marks=pytest.mark.slow), 2])
def test_train_step_and_epoch_builder_compile_once_across_epochs_and_a_resume(
  tmp_path, captured, devices
):
  data_dir, workdir = str(tmp_path / 'data'), str(tmp_path / 'run')
  config = h.tiny_config(data_dir, num_devices=devices, num_epochs=2, eval_every_epochs=2)
  train.train_and_evaluate(config, workdir)
  _assert_once(captured)
  # Stopped after epoch 1 (num_epochs=1), then resumed in the same process for epoch 2.
  workdir = str(tmp_path / 'resumed')
  train.train_and_evaluate(h.tiny_config(data_dir, num_devices=devices, num_epochs=1), workdir)
  _assert_once(captured)
  train.train_and_evaluate(h.tiny_config(data_dir, num_devices=devices, num_epochs=2), workdir)
  _assert_once(captured)
