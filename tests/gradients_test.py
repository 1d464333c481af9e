"""The applied update is that of the global batch mean, whatever the device count.

Raw gradients (not Adam's normalised updates, which hide a constant factor) are compared
on 1 and 8 CPU devices against a one-device `jax.grad` of the global batch mean; a
scale-sensitive Adam (eps=100, where the update is proportional to the gradient) then
compares parameters after one real train step. With model dropout, the masks come from
each sample's global position, so the gradients agree across device counts too.
"""

import _train_helpers as h
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from configs import default
from ncf_jax import config_checks, models, pipeline, sampling, steps
from ncf_jax import data as data_lib
from ncf_jax import metrics as metrics_lib

# 2 devices: the all-reduce test here, multihost_test (2 x 2) and resume_test run them.
DEVICE_COUNTS = (1, 8)


def small_config(data_dir, **overrides):
  c = default.get_config()
  c.dataset.data_dir = data_dir
  c.dataset.synthetic_num_users = 120
  c.dataset.synthetic_num_items = 90
  c.dataset.synthetic_mean_interactions = 25.0
  c.batch_size = 512
  c.eval_batch_size = 64
  c.eval_num_neg = 20
  return config_checks.resolve_model_defaults(h.set_fields(c, overrides))


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  return data_lib.load(small_config(str(tmp_path_factory.mktemp('data'))).dataset)


_SETUPS = {}


def _setup(config, dataset, ndev):
  """(mesh, model, state, data, items, keys) on the first `ndev` devices.

  Everything but the state (which holds the optimizer) is built once per device count.
  """
  if ndev not in _SETUPS:
    mesh = steps.make_mesh(ndev)
    init_key, data_key, dropout_key = steps.make_keys(0, mesh)
    data = sampling.to_device(dataset, NamedSharding(mesh, P()))
    items = steps.make_epoch_items(config, mesh, data)(data, data_key, np.int32(0))
    _SETUPS[ndev] = mesh, init_key, data, items, (data_key, dropout_key)
  mesh, init_key, data, items, keys = _SETUPS[ndev]
  model = models.create_model(config.model, dataset.num_users, dataset.num_items, 'float32')
  state = steps.create_train_state(config, model, init_key, mesh)
  return mesh, model, state, data, items, keys


_GRAD_STEPS = {}


def _grad_step(config, mesh, model, ndev):
  """One compiled gradient program per (config, device count): the tests reuse them."""
  key = (ndev, config.to_json())
  if key not in _GRAD_STEPS:
    _GRAD_STEPS[key] = steps.make_grad_step(config, mesh, model.apply)
  return _GRAD_STEPS[key]


def _grads(config, dataset, ndev, step=1, global_step=None):
  mesh, model, state, data, items, keys = _setup(config, dataset, ndev)
  grad_step = _grad_step(config, mesh, model, ndev)
  global_step = step if global_step is None else global_step
  grads = grad_step(
    state.params, data, items, keys, np.int32(0), np.int32(step), np.int32(global_step)
  )
  return jax.device_get(grads), jax.device_get(state.params), model, keys


def _assert_trees_close(a, b, rtol=2e-5, atol=1e-7):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


def test_raw_gradients_equal_the_global_batch_mean_gradient_on_1_and_8_devices(dataset):
  config = small_config('unused')
  got = {n: _grads(config, dataset, n) for n in DEVICE_COUNTS}
  grads1, params, model, (data_key, _) = got[1]

  # The reference: the whole global batch on one device, plain jax.grad of its mean.
  data = sampling.to_device(dataset)
  batch = pipeline.train_batch(
    data, data_key, 0, 1, batch_size=config.batch_size, num_neg=config.num_neg
  )

  def mean_loss(p):
    logits = model.apply({'params': p}, batch['user'], batch['item'])
    return metrics_lib.bce_sum(logits, batch['label'], batch['valid']) / jnp.sum(batch['valid'])

  want = jax.device_get(jax.grad(mean_loss)(params))
  for n in DEVICE_COUNTS:
    _assert_trees_close(got[n][0], want)
  norm = sum(float(np.sum(np.square(g))) for g in jax.tree.leaves(want))
  assert norm > 0


def test_gradients_of_a_padded_last_batch_are_its_valid_samples_mean(dataset):
  config = small_config('unused')
  last = pipeline.steps_per_epoch(dataset.num_train, config.num_neg, config.batch_size) - 1
  assert pipeline.epoch_size(dataset.num_train, config.num_neg) % config.batch_size
  g1 = _grads(config, dataset, 1, step=last)[0]
  g8 = _grads(config, dataset, 8, step=last)[0]
  _assert_trees_close(g8, g1)


def _touched_rows_gradient(params, batch, l2):
  """d/dp of l2 * mean over valid samples of the squared norms of the rows each reads."""
  valid = batch['valid']
  n = valid.sum()
  users = np.bincount(
    batch['user'][valid], minlength=params['gmf']['gmf_user']['embedding'].shape[0]
  )
  items = np.bincount(
    batch['item'][valid], minlength=params['gmf']['gmf_item']['embedding'].shape[0]
  )

  def rows(path, p):
    name = jax.tree_util.keystr(path)
    if 'embedding' not in name:
      return np.zeros_like(p)
    counts = users if 'user' in name else items
    return 2 * l2 * p * counts[:, None] / n

  return jax.tree_util.tree_map_with_path(rows, params)


def test_l2_penalty_is_counted_once_whatever_the_device_count(dataset):
  # model.l2: per sample, on the embedding rows it reads, averaged like the loss. A row
  # read by k valid samples of an n-sample batch gets 2 * l2 * k / n times itself; layers
  # that are not embeddings get nothing.
  config = small_config('unused', **{'model.l2': 1e-2})
  plain = small_config('unused')
  g1, params, _, (data_key, _) = _grads(config, dataset, 1)
  g8 = _grads(config, dataset, 8)[0]
  base = _grads(plain, dataset, 1)[0]
  _assert_trees_close(g8, g1)
  batch = jax.device_get(
    pipeline.train_batch(
      sampling.to_device(dataset),
      data_key,
      0,
      1,
      batch_size=config.batch_size,
      num_neg=config.num_neg,
    )
  )
  want = _touched_rows_gradient(params, batch, 1e-2)
  assert sum(float(np.abs(x).sum()) for x in jax.tree.leaves(want)) > 0
  _assert_trees_close(jax.tree.map(lambda a, b: a - b, g1, base), want, rtol=1e-4, atol=1e-8)


def test_whole_parameter_l2_is_counted_once_whatever_the_device_count(dataset):
  config = small_config('unused', **{'model.l2_params': 1e-2})
  g1, params, _, _ = _grads(config, dataset, 1)
  g8 = _grads(config, dataset, 8)[0]
  base = _grads(small_config('unused'), dataset, 1)[0]
  _assert_trees_close(g8, g1)
  # d/dp of l2_params * sum(p^2) is 2 * l2_params * p, once per step.
  _assert_trees_close(
    jax.tree.map(lambda a, b: a - b, g1, base),
    jax.tree.map(lambda p: 2 * 1e-2 * p, params),
    rtol=1e-4,
    atol=1e-6,
  )


def test_a_scale_sensitive_update_gives_the_same_parameters_on_1_and_8_devices(dataset):
  # Adam with a huge eps is SGD with lr/eps: an ndev-times gradient would move the
  # parameters ndev times as far.
  config = small_config('unused', eps=100.0, learning_rate=1.0)
  moved = {}
  for n in DEVICE_COUNTS:
    mesh, _, state, data, items, keys = _setup(config, dataset, n)
    before = jax.device_get(state.params)
    step = steps.make_train_step(config, mesh)
    state, out = step(state, data, items, keys, np.int32(0), np.int32(0))
    after = jax.device_get(state.params)
    assert np.isfinite(float(out['train_loss']))
    moved[n] = jax.tree.map(lambda a, b: a - b, after, before)
  # atol: a few float32 ulps of the ~0.01 parameters the ~1e-6 updates are taken from;
  # model.first_layer='auto' projects the tables on 1 device (512 pairs) and not on 8 (64
  # each), so the float sums differ in order.
  for n in DEVICE_COUNTS[1:]:
    _assert_trees_close(moved[n], moved[1], rtol=1e-4, atol=5e-9)
  total = sum(float(np.sum(np.abs(x))) for x in jax.tree.leaves(moved[1]))
  assert total > 0


def test_dropout_masks_and_gradients_do_not_depend_on_the_device_count(dataset):
  config = small_config('unused', **{'model.dropout': 0.5})
  g1 = _grads(config, dataset, 1)[0]
  g8 = _grads(config, dataset, 8)[0]
  _assert_trees_close(g8, g1)
  # Dropout is really on: the gradients differ from those without it, and the same batch
  # at another global step gets other masks.
  g_off = _grads(small_config('unused'), dataset, 1)[0]
  g_other_step = _grads(config, dataset, 1, global_step=7)[0]
  leaf = lambda g: g['mlp_0']['kernel']
  assert not np.allclose(leaf(g1), leaf(g_off))
  assert not np.allclose(leaf(g1), leaf(g_other_step))


def test_the_gradients_cross_devices_in_one_all_reduce(dataset):
  config = small_config('unused')
  mesh, _, state, data, items, keys = _setup(config, dataset, 2)
  step = steps.make_train_step(config, mesh)
  hlo = step.lower(state, data, items, keys, np.int32(0), np.int32(0)).compile().as_text()
  reduces = [
    line.split(' all-reduce')[0]
    for line in hlo.splitlines()
    if ' all-reduce(' in line or ' all-reduce-start(' in line
  ]
  # Each parameter's shape names an output of an all-reduce exactly once (the embedding
  # shapes are unique to their tables).
  for shape in (
    f'f32[{dataset.num_users},{config.model.mf_dim}]',
    f'f32[{dataset.num_items},{config.model.mf_dim}]',
  ):
    assert sum(r.count(shape) for r in reduces) == 1, (shape, reduces)
