"""NCF models in Flax: NeuMF, GMF, MLP (He et al. 2017) and dot-product MF (Rendle et al. 2020).

Each maps (users, items) int32 [B] to logits [B]. Initialisation follows the MLPerf
reference (docs/mlperf.md 4.2): embeddings N(0, 0.01) (`embed_init_std`; the MLP's
default is 0.1, see DEFAULTS); MLP kernels Glorot uniform;
the final kernel LeCun uniform; biases uniform(+-1/sqrt(fan_in)) (PyTorch's Linear
default). Parameters are float32; `dtype` is the compute dtype. No loss, no data here.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

MODEL_NAMES = ('neumf', 'gmf', 'mlp', 'mf')
# Values of model.first_layer: how the MLP tower's first layer reads its embeddings.
FIRST_LAYERS = ('auto', 'concat', 'projected')

# The MLPerf reference's embedding initialisation: N(0, 0.01).
EMBED_INIT_STD = 0.01

# Per model, the value of each config field a config leaves None (`config_checks.
# resolve_model_defaults`). NeuMF keeps the values it always had; the others were chosen
# by validation HR@10 on synthetic data seed 1 at configs/default.py's sizes (Adam, batch
# 8192, 8 epochs; docs/training.md#per-model-defaults). At NeuMF's 0.002 they stay on the
# popularity plateau for most of the 8 epochs: GMF and MF are bilinear and start with
# logits ~1e-4 apart, and a 10x wider init does not help them, a larger rate does; the
# MLP's 0.01 embeddings are small against its first layer's biases, so until they grow it
# is additive in user and item (popularity), and it needs both a larger rate and init.
DEFAULTS = {
  'neumf': {'learning_rate': 0.002, 'model.embed_init_std': EMBED_INIT_STD},
  'gmf': {'learning_rate': 0.016, 'model.embed_init_std': EMBED_INIT_STD},
  'mlp': {'learning_rate': 0.032, 'model.embed_init_std': 0.1},
  'mf': {'learning_rate': 0.008, 'model.embed_init_std': EMBED_INIT_STD},
}


def _torch_bias_init(fan_in: int):
  bound = 1.0 / np.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _dense(features: int, fan_in: int, kernel_init, dtype, name: str) -> nn.Dense:
  return nn.Dense(
    features,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=kernel_init,
    bias_init=_torch_bias_init(fan_in),
    name=name,
  )


class _Embedding(nn.Module):
  """A user table and an item table of one width, gathered and cast to `dtype`.

  With `tables=True` it returns the two whole float32 tables instead (same parameters).
  """

  num_users: int
  num_items: int
  features: int
  prefix: str
  dtype: Any = jnp.float32
  init_std: float = EMBED_INIT_STD

  @nn.compact
  def __call__(self, users, items, tables: bool = False):
    init = nn.initializers.normal(stddev=self.init_std)
    u = nn.Embed(
      self.num_users,
      self.features,
      embedding_init=init,
      param_dtype=jnp.float32,
      name=f'{self.prefix}_user',
    )
    i = nn.Embed(
      self.num_items,
      self.features,
      embedding_init=init,
      param_dtype=jnp.float32,
      name=f'{self.prefix}_item',
    )
    if tables:
      return u.embedding, i.embedding
    return u(users).astype(self.dtype), i(items).astype(self.dtype)


def projected_tables(
  first_layer: str, num_users: int, num_items: int, samples: int
) -> tuple[bool, bool]:
  """(project the user table, project the item table) for the MLP's first layer.

  `samples` is how many (user, item) pairs one compiled call scores per device. The layer
  is linear in concat(p_u, q_i), so p_u @ W_u can come from a projected table T @ W_u
  (one product per row, then a gather) instead of one product per sample: it pays when
  the table has fewer rows than the samples that read it ('auto'), since both cost
  rows-or-samples x d x width multiply-adds forward and twice that backward.
  'concat' never projects (one product on the concatenation, as the reference does);
  'projected' always projects both.
  """
  if first_layer not in FIRST_LAYERS:
    raise ValueError(f'unknown model.first_layer {first_layer!r}')
  if first_layer == 'concat':
    return False, False
  if first_layer == 'projected':
    return True, True
  return num_users < samples, num_items < samples


class _FirstLayer(nn.Module):
  """The MLP tower's first Dense on concat(p_u, q_i), with either table projected.

  Parameters are nn.Dense's (kernel [2d, width] Glorot uniform, bias), so checkpoints and
  initialisation do not depend on the projection. concat(p_u, q_i) @ W = p_u @ W[:d] +
  q_i @ W[d:]: a projected half is (table @ W_half)[ids], the other table_[ids] @ W_half.
  Same values up to float summation order.
  """

  features: int
  fan_in: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, user_table, item_table, users, items, project: tuple[bool, bool]):
    kernel = self.param(
      'kernel', nn.initializers.glorot_uniform(), (self.fan_in, self.features), jnp.float32
    ).astype(self.dtype)
    bias = self.param('bias', _torch_bias_init(self.fan_in), (self.features,), jnp.float32)
    d = user_table.shape[1]

    def half(table, ids, w, projected):
      if projected:
        return (table.astype(self.dtype) @ w)[ids]
      return table[ids].astype(self.dtype) @ w

    return (
      half(user_table, users, kernel[:d], project[0])
      + half(item_table, items, kernel[d:], project[1])
      + bias.astype(self.dtype)
    )


class NeuMF(nn.Module):
  """GMF and/or MLP towers concatenated into one dense logit.

  `use_gmf` / `use_mlp` select the NCF paper's three instantiations: both is NeuMF.
  `first_layer` ('auto', 'concat', 'projected') chooses per call, from the number of
  pairs it scores, whether the first MLP layer reads projected tables
  (`projected_tables`); the parameters are the same either way.
  """

  num_users: int
  num_items: int
  mf_dim: int = 64
  mlp_layers: Sequence[int] = (256, 256, 128, 64)
  dropout: float = 0.0
  use_gmf: bool = True
  use_mlp: bool = True
  dtype: Any = jnp.float32
  embed_init_std: float = EMBED_INIT_STD
  first_layer: str = 'concat'

  @nn.compact
  def __call__(self, users, items, deterministic: bool = True):
    towers = []
    if self.use_gmf:
      gu, gi = _Embedding(
        self.num_users,
        self.num_items,
        self.mf_dim,
        'gmf',
        self.dtype,
        self.embed_init_std,
        name='gmf',
      )(users, items)
      towers.append(gu * gi)
    if self.use_mlp:
      embed = _Embedding(
        self.num_users,
        self.num_items,
        self.mlp_layers[0] // 2,
        'mlp',
        self.dtype,
        self.embed_init_std,
        name='mlp',
      )
      project = projected_tables(
        self.first_layer, self.num_users, self.num_items, int(np.prod(jnp.shape(users)))
      )
      if any(project):
        user_table, item_table = embed(users, items, tables=True)
        x = _FirstLayer(self.mlp_layers[1], self.mlp_layers[0], self.dtype, name='mlp_0')(
          user_table, item_table, users, items, project
        )
      else:
        mu, mi = embed(users, items)
        x = jnp.concatenate([mu, mi], axis=-1)
      for n, (fan_in, width) in enumerate(zip(self.mlp_layers[:-1], self.mlp_layers[1:])):
        if n or not any(project):
          x = _dense(width, fan_in, nn.initializers.glorot_uniform(), self.dtype, f'mlp_{n}')(x)
        x = nn.relu(x)
        if self.dropout > 0:
          x = nn.Dropout(self.dropout, deterministic=deterministic)(x)
      towers.append(x)
    h = jnp.concatenate(towers, axis=-1) if len(towers) > 1 else towers[0]
    logits = _dense(1, h.shape[-1], nn.initializers.lecun_uniform(), self.dtype, 'final')(h)
    return logits[..., 0].astype(jnp.float32)


class MF(nn.Module):
  """Dot-product matrix factorisation with user, item and global biases."""

  num_users: int
  num_items: int
  mf_dim: int = 64
  dtype: Any = jnp.float32
  embed_init_std: float = EMBED_INIT_STD

  @nn.compact
  def __call__(self, users, items, deterministic: bool = True):
    del deterministic
    pu, qi = _Embedding(
      self.num_users, self.num_items, self.mf_dim, 'mf', self.dtype, self.embed_init_std, name='mf'
    )(users, items)
    bu = nn.Embed(self.num_users, 1, embedding_init=nn.initializers.zeros, name='user_bias')(users)[
      ..., 0
    ]
    bi = nn.Embed(self.num_items, 1, embedding_init=nn.initializers.zeros, name='item_bias')(items)[
      ..., 0
    ]
    g = self.param('global_bias', nn.initializers.zeros, ())
    dot = jnp.sum(pu * qi, axis=-1).astype(jnp.float32)
    return dot + bu + bi + g


def create_model(model_config, num_users: int, num_items: int, dtype: str) -> nn.Module:
  """The model named by `model_config.name`, sized from config and dataset."""
  name = model_config.name
  layers = tuple(int(w) for w in model_config.mlp_layers)
  jdtype = jnp.dtype(dtype)
  init_std = float(model_config.embed_init_std)
  first_layer = str(model_config.get('first_layer', 'concat'))  # absent: the reference's
  if first_layer not in FIRST_LAYERS:
    raise ValueError(f'unknown model.first_layer {first_layer!r}')
  if name == 'mf':
    return MF(num_users, num_items, int(model_config.mf_dim), jdtype, init_std)
  if name not in MODEL_NAMES:
    raise ValueError(f'unknown model {name!r}')
  return NeuMF(
    num_users,
    num_items,
    mf_dim=int(model_config.mf_dim),
    mlp_layers=layers,
    dropout=float(model_config.dropout),
    use_gmf=name in ('neumf', 'gmf'),
    use_mlp=name in ('neumf', 'mlp'),
    dtype=jdtype,
    embed_init_std=init_std,
    first_layer=first_layer,
  )


def num_params(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def embedding_rows_sq(params, users: jax.Array, items: jax.Array) -> jax.Array:
  """Per sample, the sum of squares of the embedding rows that scoring it reads.

  Every user table's row of the sample's user and every item table's row of its item
  (GMF, MLP or MF tables and MF's bias tables): the rows an L2 "on the rows a batch
  touches" penalises. float32, the shape of `users`.
  """
  total = jnp.zeros(jnp.shape(users), jnp.float32)
  for path, table in jax.tree_util.tree_leaves_with_path(params):
    names = [getattr(k, 'key', str(k)) for k in path]
    if names[-1] != 'embedding':
      continue
    owner = names[-2]
    if ('user' in owner) == ('item' in owner):
      raise ValueError(f'embedding table {owner!r} names neither users nor items')
    rows = table[users if 'user' in owner else items]
    total = total + jnp.sum(jnp.square(rows.astype(jnp.float32)), axis=-1)
  return total


def neumf_from_pretrained(neumf_params, gmf_params, mlp_params, alpha: float = 0.5):
  """NeuMF parameters from trained GMF and MLP parameters (NCF paper section 3.4.1).

  Towers are copied; the final layer is [alpha * h_gmf, (1 - alpha) * h_mlp] and its bias
  the same mix of the two biases.
  """
  params = jax.tree.map(lambda x: x, neumf_params)
  params = dict(params)
  if gmf_params is not None:
    params['gmf'] = gmf_params['gmf']
  if mlp_params is not None:
    params['mlp'] = mlp_params['mlp']
    for k, v in mlp_params.items():
      if k.startswith('mlp_'):
        params[k] = v
  if gmf_params is not None and mlp_params is not None:
    kernel = jnp.concatenate(
      [alpha * gmf_params['final']['kernel'], (1 - alpha) * mlp_params['final']['kernel']], axis=0
    )
    bias = alpha * gmf_params['final']['bias'] + (1 - alpha) * mlp_params['final']['bias']
    params['final'] = {'kernel': kernel, 'bias': bias}
  return params
