"""Row-wise sharded embedding tables (`config.sharding='sharded'`, TorchRec's row-wise).

Every embedding table (a Flax `nn.Embed`'s `embedding` parameter, and its Adam moments)
is split by rows over the `data` axis: rows padded with zeros up to a multiple of the
device count, device d holding rows [d * R, (d + 1) * R). Dense layers stay replicated.
Padding rows are never read, their gradient is zero, so Adam leaves them at zero.

A lookup crosses devices inside shard_map (`lookup`): the ids of every device are
all-gathered, each device reads the rows it owns (zero for the others) and a
psum_scatter returns each device its own ids' rows. Exactly one device contributes each
row, so the rows are bit-identical to a replicated table's. Autodiff of that gives each
device the gradient of its own rows from every device's samples (the transpose of the
psum_scatter is an all-gather), so the tables need no gradient all-reduce.

The model code is unchanged: `apply` runs `model.apply` with the `nn.Embed` modules
intercepted (`flax.linen.intercept_methods`) so that they read the sharded tables.
"""

from collections.abc import Callable
import contextlib
import dataclasses
from typing import Any

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

# The parameter name of an embedding table (flax.linen.Embed).
TABLE = 'embedding'


def _key_name(k) -> str:
  return str(getattr(k, 'key', getattr(k, 'name', k)))


def is_table_path(path) -> bool:
  """Whether a pytree path (of params, or of a TrainState) names an embedding table."""
  return any(_key_name(k) == TABLE for k in path)


def padded_rows(rows: int, ndev: int) -> int:
  """`rows` rounded up to a multiple of `ndev`."""
  return -(-int(rows) // ndev) * ndev


def pad_tables(tree, ndev: int):
  """`tree` with each table's rows zero-padded to a multiple of `ndev` (others as is)."""

  def pad(path, x):
    if not is_table_path(path):
      return x
    extra = padded_rows(x.shape[0], ndev) - x.shape[0]
    return jnp.pad(x, ((0, extra),) + ((0, 0),) * (x.ndim - 1)) if extra else x

  return jax.tree_util.tree_map_with_path(pad, tree)


def fit_rows(x, like):
  """`x` with its rows zero-padded or cut to `like`'s (a table saved in another layout).

  Arrays of `like`'s shape, or of other trailing dimensions, are returned as they are.
  """
  if x.ndim < 1 or x.shape[1:] != like.shape[1:] or x.shape[0] == like.shape[0]:
    return x
  if x.shape[0] > like.shape[0]:
    return x[: like.shape[0]]
  return jnp.pad(x, ((0, like.shape[0] - x.shape[0]),) + ((0, 0),) * (x.ndim - 1))


def model_shapes(model):
  """Abstract params of `model` (the unpadded rows of its tables)."""
  dummy = jnp.zeros((2,), jnp.int32)
  return jax.eval_shape(lambda: model.init({'params': jax.random.key(0)}, dummy, dummy))['params']


def gathered(tree, mesh: Mesh):
  """`tree` replicated on every device of `mesh` (collective: every process calls it), so
  that each process can read it whole (a table split over other hosts' devices)."""
  return jax.jit(lambda t: t, out_shardings=NamedSharding(mesh, P()))(tree)


def unpadded(tree, like):
  """`tree`'s tables cut to `like`'s rows (host arrays; the padding of a sharded layout)."""
  return jax.tree.map(
    lambda x, y: x[: y.shape[0]] if np.ndim(x) and x.shape[1:] == y.shape[1:] else x, tree, like
  )


def specs(tree):
  """PartitionSpecs of a params tree or a TrainState: tables by rows, the rest whole."""
  return jax.tree_util.tree_map_with_path(
    lambda path, _: P('data') if is_table_path(path) else P(), tree
  )


def shardings(tree, mesh: Mesh):
  """NamedShardings of `specs(tree)` on `mesh`."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs(tree))


def split_tables(params) -> tuple[dict[tuple[str, ...], Any], Any]:
  """({module path: table}, the other parameters) of a Flax params dict."""
  flat = traverse_util.flatten_dict(params)
  tables = {k[:-1]: v for k, v in flat.items() if k[-1] == TABLE}
  dense = traverse_util.unflatten_dict({k: v for k, v in flat.items() if k[-1] != TABLE})
  return tables, dense


def merge_tables(tables: dict[tuple[str, ...], Any], dense):
  """The params dict that `split_tables` split into `tables` and `dense`."""
  flat = traverse_util.flatten_dict(dense)
  flat.update({k + (TABLE,): v for k, v in tables.items()})
  return traverse_util.unflatten_dict(flat)


def lookup(shard: jax.Array, ids: jax.Array, axis: str = 'data') -> jax.Array:
  """Rows `ids` of a row-sharded table, inside shard_map; `shard` is this device's part.

  Returns float [*ids.shape, features], what `table[ids]` gives with the whole table.
  """
  rows = shard.shape[0]
  flat = ids.reshape(-1).astype(jnp.int32)
  if axis not in _varying(flat):  # e.g. an item grid that is the same on every device
    flat = jax.lax.pcast(flat, axis, to='varying')
  every = jax.lax.all_gather(flat, axis, tiled=True)
  local = every - jax.lax.axis_index(axis) * rows
  owned = (local >= 0) & (local < rows)
  part = jnp.where(owned[:, None], shard[jnp.clip(local, 0, rows - 1)], 0)
  out = jax.lax.psum_scatter(part, axis, scatter_dimension=0, tiled=True)
  return out.reshape(ids.shape + shard.shape[1:])


def _varying(value) -> frozenset:
  aval = jax.typeof(value)
  mat = getattr(aval, 'mat', None)
  if mat is not None and hasattr(mat, 'varying'):
    return frozenset(mat.varying)
  return frozenset(getattr(aval, 'vma', ()))


@contextlib.contextmanager
def sharded_lookups(tables: dict[tuple[str, ...], jax.Array], axis: str = 'data'):
  """Within: every `nn.Embed` reads its rows from `tables` (module path -> shard)."""

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if not isinstance(module, nn.Embed):
      return next_fun(*args, **kwargs)
    if context.method_name == 'setup':  # its table is a shard in `tables`, not a param
      return None
    if context.method_name != '__call__':  # an invariant of ncf_jax.models, not user input
      raise RuntimeError(
        f'sharded tables are read through Embed.__call__ only; '
        f'{module.path} called {context.method_name}'
      )
    return lookup(tables[tuple(module.path)], args[0], axis)

  with nn.intercept_methods(interceptor):
    yield


@dataclasses.dataclass(frozen=True)
class ShardedApply:
  """`apply_fn` (a model's `apply`) for params whose tables are this device's shards.

  Only inside shard_map over `data`, with every device calling it on its own inputs. A
  frozen dataclass, so that two of one model compare equal (a TrainState's `apply_fn` is
  part of its tree structure: jit caches and shard_map specs match on it).
  """

  apply_fn: Callable

  def __call__(self, variables, *args, **kwargs):
    tables, dense = split_tables(variables['params'])
    with sharded_lookups(tables):
      return self.apply_fn({**variables, 'params': dense}, *args, **kwargs)


def embedding_rows_sq(params, users: jax.Array, items: jax.Array) -> jax.Array:
  """`models.embedding_rows_sq` for sharded tables: per sample, the read rows' squares."""
  total = jnp.zeros(jnp.shape(users), jnp.float32)
  for path, shard in split_tables(params)[0].items():
    owner = path[-1]
    if ('user' in owner) == ('item' in owner):
      raise ValueError(f'embedding table {owner!r} names neither users nor items')
    rows = lookup(shard, users if 'user' in owner else items)
    total = total + jnp.sum(jnp.square(rows.astype(jnp.float32)), axis=-1)
  return total
