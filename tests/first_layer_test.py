"""model.first_layer: the projected first MLP layer is the plain model, computed another way.

concat(p_u, q_i) @ W = (P @ W_u)[u] + (Q @ W_i)[i]: same parameters, same initialisation,
the same logits, loss and gradients up to float rounding, and the run's batches and
pipeline hashes do not depend on it.
"""

import json

import _train_helpers as h
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default
from ncf_jax import config_checks, models, train
from ncf_jax import metrics as metrics_lib
from ncf_jax.errors import UserError

NUM_USERS, NUM_ITEMS = 300, 120


def _model(name='neumf', first_layer='concat', dtype='float32'):
  c = ml_collections.ConfigDict(
    dict(
      name=name,
      mf_dim=8,
      mlp_layers=(32, 16, 8),
      dropout=0.0,
      embed_init_std=0.1,
      first_layer=first_layer,
    )
  )
  return models.create_model(c, NUM_USERS, NUM_ITEMS, dtype)


def _batch(n, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  return (
    jax.random.randint(k1, (n,), 0, NUM_USERS),
    jax.random.randint(k2, (n,), 0, NUM_ITEMS),
    (jax.random.uniform(k3, (n,)) < 0.2).astype(jnp.float32),
  )


def _loss_and_grads(model, params, batch):
  users, items, labels = batch

  def loss(p):
    logits = model.apply({'params': p}, users, items)
    return metrics_lib.bce_sum(logits, labels, jnp.ones_like(labels, bool)) / labels.size

  return jax.jit(jax.value_and_grad(loss))(params)


def test_auto_projects_a_table_only_when_it_has_fewer_rows_than_the_pairs_a_call_scores():
  assert models.projected_tables('auto', 1000, 100, 500) == (False, True)
  assert models.projected_tables('auto', 1000, 100, 1001) == (True, True)
  assert models.projected_tables('auto', 1000, 100, 100) == (False, False)
  assert models.projected_tables('concat', 10, 10, 10**6) == (False, False)
  assert models.projected_tables('projected', 10**6, 10**6, 1) == (True, True)
  with pytest.raises(ValueError, match='first_layer'):
    models.projected_tables('fused', 10, 10, 10)


@pytest.mark.parametrize('name', ['neumf', 'mlp'])
def test_every_first_layer_initialises_the_same_parameters(name):
  dummy = jnp.zeros((2,), jnp.int32)
  inits = [
    jax.device_get(_model(name, f).init(jax.random.key(3), dummy, dummy)['params'])
    for f in models.FIRST_LAYERS
  ]
  for other in inits[1:]:
    assert jax.tree.structure(other) == jax.tree.structure(inits[0])
    for a, b in zip(jax.tree.leaves(other), jax.tree.leaves(inits[0])):
      np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
  'name,first_layer,samples,projected',
  [
    ('neumf', 'auto', 200, (False, True)),  # between the two table sizes: items only
    ('neumf', 'auto', 4096, (True, True)),
    ('neumf', 'projected', 64, (True, True)),  # fewer samples than rows: projected anyway
    ('mlp', 'auto', 200, (False, True)),
  ],
)
def test_projected_first_layer_gives_the_concat_models_loss_and_gradients(
  name, first_layer, samples, projected
):
  assert models.projected_tables(first_layer, NUM_USERS, NUM_ITEMS, samples) == projected
  plain, fast = _model(name, 'concat'), _model(name, first_layer)
  dummy = jnp.zeros((2,), jnp.int32)
  params = plain.init(jax.random.key(1), dummy, dummy)['params']
  batch = _batch(samples)
  want_loss, want = _loss_and_grads(plain, params, batch)
  got_loss, got = _loss_and_grads(fast, params, batch)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-7, err_msg=jax.tree_util.keystr(path))
  np.testing.assert_allclose(
    fast.apply({'params': params}, *batch[:2]),
    plain.apply({'params': params}, *batch[:2]),
    rtol=1e-5,
    atol=1e-6,
  )


@pytest.mark.slow
def test_projected_first_layer_in_bfloat16_stays_within_bfloat16_rounding():
  plain, fast = _model(dtype='bfloat16'), _model(first_layer='projected', dtype='bfloat16')
  dummy = jnp.zeros((2,), jnp.int32)
  params = plain.init(jax.random.key(2), dummy, dummy)['params']
  users, items, _ = _batch(512)
  exact = _model().apply({'params': params}, users, items)
  for model in (plain, fast):  # both are bfloat16 roundings of the float32 logits
    np.testing.assert_allclose(model.apply({'params': params}, users, items), exact, atol=0.05)


def test_unknown_first_layer_is_one_config_error():
  config = default.get_config()
  config.model.first_layer = 'fused'
  with pytest.raises(
    UserError,
    match=r"config.model.first_layer='fused' is invalid: use one "
    r'of auto, concat, projected',
  ):
    config_checks.validate_config(config, 1)


def _history(workdir):
  with open(workdir / 'metrics.jsonl') as f:
    return [json.loads(line) for line in f]


def test_a_projected_run_has_the_plain_runs_batches_and_nearly_its_losses(tmp_path):
  runs = {}
  for first_layer in ('concat', 'projected'):
    config = h.tiny_config(
      str(tmp_path / 'data'), num_epochs=1, num_devices=1, model__first_layer=first_layer
    )
    train.train_and_evaluate(config, str(tmp_path / first_layer))
    runs[first_layer] = _history(tmp_path / first_layer)
  plain, fast = runs['concat'], runs['projected']
  assert [(r['pipeline_hash_first'], r['pipeline_hash_all']) for r in fast] == [
    (r['pipeline_hash_first'], r['pipeline_hash_all']) for r in plain
  ]
  for a, b in zip(fast, plain):
    assert a['train_loss'] == pytest.approx(b['train_loss'], rel=1e-4)
    assert a['hr'] == pytest.approx(b['hr'], abs=0.02)
