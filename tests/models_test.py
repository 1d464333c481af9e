"""Model shapes, parameter counts, initialisation and pre-training composition."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ncf_jax import models


def _cfg(name, mf_dim=8, layers=(16, 8, 4), embed_init_std=0.01):
  return ml_collections.ConfigDict(
    dict(
      name=name,
      mf_dim=mf_dim,
      mlp_layers=layers,
      dropout=0.0,
      l2=0.0,
      embed_init_std=embed_init_std,
    )
  )


def _init(model, key=0):
  z = jnp.zeros((3,), jnp.int32)
  return model.init(jax.random.key(key), z, z)['params']


def test_mlperf_neumf_has_the_reference_parameter_count():
  model = models.create_model(_cfg('neumf', 64, (256, 256, 128, 64)), 138493, 26744, 'float32')
  shapes = jax.eval_shape(lambda: _init(model))
  assert models.num_params(shapes) == 31_832_577  # docs/mlperf.md 4.1


@pytest.mark.parametrize(
  'name,expected',
  [
    ('neumf', {'gmf', 'mlp', 'mlp_0', 'mlp_1', 'final'}),
    ('gmf', {'gmf', 'final'}),
    ('mlp', {'mlp', 'mlp_0', 'mlp_1', 'final'}),
    ('mf', {'mf', 'user_bias', 'item_bias', 'global_bias'}),
  ],
)
def test_each_model_scores_a_batch_with_its_own_parameters(name, expected):
  model = models.create_model(_cfg(name), 7, 11, 'float32')
  params = _init(model)
  assert set(params) == expected
  users, items = jnp.array([0, 6, 3]), jnp.array([10, 0, 5])
  out = model.apply({'params': params}, users, items)
  assert out.shape == (3,) and out.dtype == jnp.float32


def test_initialisation_follows_the_mlperf_reference():
  params = _init(models.create_model(_cfg('neumf', 64, (256, 256, 128, 64)), 5000, 3000, 'float32'))
  emb = np.asarray(params['gmf']['gmf_user']['embedding'])
  assert abs(emb.std() - 0.01) < 0.001
  k = np.asarray(params['mlp_0']['kernel'])
  assert np.abs(k).max() <= np.sqrt(6 / (256 + 256)) + 1e-6  # Glorot uniform
  final = np.asarray(params['final']['kernel'])
  assert np.abs(final).max() <= np.sqrt(3 / 128) + 1e-6  # LeCun uniform
  assert np.abs(np.asarray(params['mlp_0']['bias'])).max() <= 1 / np.sqrt(256) + 1e-6


def test_bfloat16_computes_in_bf16_but_keeps_float32_params():
  model = models.create_model(_cfg('neumf'), 7, 11, 'bfloat16')
  params = _init(model)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  out = model.apply({'params': params}, jnp.array([1]), jnp.array([2]))
  assert out.dtype == jnp.float32


def test_dropout_only_acts_when_not_deterministic():
  cfg = _cfg('mlp')
  cfg.dropout = 0.5
  model = models.create_model(cfg, 7, 11, 'float32')
  params = _init(model)
  u, i = jnp.arange(7), jnp.arange(7)
  a = model.apply({'params': params}, u, i)
  np.testing.assert_array_equal(a, model.apply({'params': params}, u, i))
  b = model.apply(
    {'params': params}, u, i, deterministic=False, rngs={'dropout': jax.random.key(1)}
  )
  assert not np.allclose(a, b)


def test_neumf_from_pretrained_copies_towers_and_mixes_the_final_layer():
  neumf = _init(models.create_model(_cfg('neumf'), 7, 11, 'float32'), 0)
  gmf = _init(models.create_model(_cfg('gmf'), 7, 11, 'float32'), 1)
  mlp = _init(models.create_model(_cfg('mlp'), 7, 11, 'float32'), 2)
  out = models.neumf_from_pretrained(neumf, gmf, mlp, alpha=0.5)
  np.testing.assert_array_equal(
    out['gmf']['gmf_user']['embedding'], gmf['gmf']['gmf_user']['embedding']
  )
  np.testing.assert_array_equal(out['mlp_1']['kernel'], mlp['mlp_1']['kernel'])
  np.testing.assert_allclose(out['final']['kernel'][:8], 0.5 * gmf['final']['kernel'])
  np.testing.assert_allclose(out['final']['kernel'][8:], 0.5 * mlp['final']['kernel'])
  assert jax.tree.structure(out) == jax.tree.structure(neumf)


def test_embed_init_std_scales_every_embedding_table_and_leaves_the_biases_at_zero():
  params = _init(models.create_model(_cfg('mf', 64, embed_init_std=0.1), 400, 300, 'float32'))
  for table in ('mf_user', 'mf_item'):
    assert np.std(params['mf'][table]['embedding']) == pytest.approx(0.1, rel=0.05)
  assert not np.any(params['user_bias']['embedding']) and not np.any(params['global_bias'])


@pytest.mark.parametrize('name', ['neumf', 'mf'])
def test_embedding_rows_sq_sums_the_rows_a_sample_reads(name):
  params = _init(models.create_model(_cfg(name), 7, 11, 'float32'), key=3)
  params = jax.tree.map(lambda x: x + 0.5, params)  # non-zero biases too
  users, items = jnp.array([0, 6, 3]), jnp.array([10, 0, 5])
  got = np.asarray(models.embedding_rows_sq(params, users, items))
  if name == 'mf':
    tables = [
      ('mf', 'mf_user', users),
      ('mf', 'mf_item', items),
      ('user_bias', None, users),
      ('item_bias', None, items),
    ]
  else:
    tables = [
      (t, f'{t}_{side}', ids)
      for t in ('gmf', 'mlp')
      for side, ids in (('user', users), ('item', items))
    ]
  want = 0
  for outer, inner, ids in tables:
    table = params[outer][inner] if inner else params[outer]
    want = want + np.sum(np.square(np.asarray(table['embedding'])[np.asarray(ids)]), axis=1)
  np.testing.assert_allclose(got, want, rtol=1e-6)
