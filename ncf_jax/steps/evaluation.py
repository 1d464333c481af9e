"""Evaluation: the compiled eval step (sampled and full ranking), its host loop, params_hash."""

import hashlib
from typing import Any, cast

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
import numpy as np

from ncf_jax import dispatch, hashing, parallel, pipeline, sampling, sharding
from ncf_jax import metrics as metrics_lib
from ncf_jax.parallel import AXIS


def make_eval_step(
  config,
  layout: parallel.Layout | Mesh,
  model,
  num_users: int,
  num_items: int,
  split: str = 'test',
):
  """Compiled eval of `split` for users [first, first + eval_batch_size): sums, counts, digest.

  `split` is 'test' or 'valid' (`pipeline.SPLITS`); each has its own candidates
  (`pipeline.eval_batch`). With sharded tables the params' tables are split by rows
  (padded to this mesh; another layout is resharded on the way in), every score's rows
  are looked up across devices, and each device evaluates the users of its part of the
  data (`Layout.eval_users`). `step.layout` is `layout`, which `evaluate` reads.
  """
  layout = parallel.as_layout(config, layout)
  apply = layout.apply_fn(model.apply)
  specs = layout.state_specs(sharding.model_shapes(model))
  local = int(config.eval_batch_size) // layout.ndev
  num_neg, top_k = int(config.eval_num_neg), int(config.top_k)
  match_mlperf = bool(config.match_mlperf)
  full = bool(config.eval_full_ranking)
  chunk = int(config.full_ranking_chunk)

  def per_device(params, data, data_key, first):
    users, valid, base, data = layout.eval_users(data, first, local, num_users)
    items, mask = pipeline.eval_batch(
      data, data_key, users, num_neg=num_neg, match_mlperf=match_mlperf, split=split, user_base=base
    )
    scores = apply({'params': params}, jnp.broadcast_to(users[:, None], items.shape), items)
    rank = metrics_lib.positive_rank(scores, mask, items if match_mlperf else None)
    out = metrics_lib.ranking_sums(rank, valid, top_k)
    cols = 1 + num_neg
    position = users[:, None].astype(jnp.uint32) * jnp.uint32(cols) + jnp.arange(
      cols, dtype=jnp.uint32
    )
    out['digest'] = hashing.array_digest(items, position, mask=valid[:, None])
    if full:
      positive, excluded = pipeline.held_out(data, users - base, split)
      rank = full_rank(model, params, data, users, positive, excluded, chunk, apply, base)
      fsums = metrics_lib.ranking_sums(rank, valid, top_k)
      out.update({f'full_{k}': v for k, v in fsums.items() if k != 'count'})
      out['full_recall_sum'] = metrics_lib.recall_sum(
        rank[:, None], jnp.ones((local, 1), bool), valid, top_k
      )
    return jax.tree.map(lambda x: jax.lax.psum(x, AXIS), out)

  step = jax.jit(
    jax.shard_map(
      per_device,
      mesh=layout.mesh,
      in_specs=(specs, layout.data_spec, P(), P()),
      out_specs=P(),
    )
  )
  cast(Any, step).layout = layout  # what `evaluate` reads
  return step


def full_rank(
  model,
  params,
  data: sampling.DeviceData,
  users,
  positive,
  excluded,
  chunk: int,
  apply_fn=None,
  user_base=0,
):
  """Rank of each user's `positive` item among all items that are candidates for it.

  Candidates are every item but the user's training positives and the `excluded`
  held-out items (`pipeline.held_out`, the positive among them); ties count against the
  positive. Items are scored `chunk` at a time (users x chunk pairs in memory, not
  users x num_items), and the count does not depend on `chunk`. `apply_fn`: how to score
  (default `model.apply`; sharded tables pass their own). `data` may hold users
  [user_base, ...) only (`data_shards`).
  """
  apply_fn = model.apply if apply_fn is None else apply_fn
  num_items = data.num_items
  b = users.shape[0]
  s_pos = apply_fn({'params': params}, users, positive)
  n_chunks = -(-num_items // chunk)

  def body(c, above):
    items = c * chunk + jnp.arange(chunk, dtype=jnp.int32)
    inside = items < num_items
    items = jnp.minimum(items, num_items - 1)
    grid_u = jnp.broadcast_to(users[:, None], (b, chunk))
    grid_i = jnp.broadcast_to(items[None, :], (b, chunk))
    scores = apply_fn({'params': params}, grid_u, grid_i)
    _, is_pos = sampling.rank_positives(data, grid_u - user_base, grid_i)
    competes = inside[None, :] & ~is_pos
    for item in excluded:
      competes &= grid_i != item[:, None]
    return above + jnp.sum(competes & (scores >= s_pos[:, None]), axis=1, dtype=jnp.int32)

  # zeros_like(users): the count varies over the mesh like the users (inside shard_map).
  return jax.lax.fori_loop(0, n_chunks, body, jnp.zeros_like(users, jnp.int32))


def evaluate(
  eval_step,
  params,
  data,
  data_key,
  num_users: int,
  eval_batch_size: int,
  in_flight: dispatch.InFlight | None = None,
):
  """Runs all eval batches; returns host floats: hr, ndcg, mrr (+ full_*) and the digest.

  `eval_step` is `make_eval_step`'s (its layout says how many users a pass covers).
  Launches are reported to `in_flight` (default: the bound for `params`' devices).
  """
  if in_flight is None:
    devices = jax.tree.leaves(params)[0].sharding.device_set
    in_flight = dispatch.InFlight(dispatch.in_flight_limit(list(devices)))
  totals = None
  for first in range(0, eval_step.layout.eval_span(data, num_users), eval_batch_size):
    out = eval_step(params, data, data_key, np.int32(first))
    in_flight.add(out['count'])
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    in_flight.add(totals['count'])
  assert totals is not None, 'no users to evaluate'
  # Digests are sums over (user, column) positions: independent of the eval batch size.
  chain = hashing.chain(hashing.init(), totals.pop('digest'))
  totals = {k: float(v) for k, v in jax.device_get(totals).items()}
  count = totals.pop('count')
  result = {k[: -len('_sum')]: v / count for k, v in totals.items()}
  return result, hashing.hexdigest(chain)


def params_hash(params, layout: parallel.Layout | Mesh, model) -> str:
  """Hex digest of the parameters' bytes (once per run; collective: every process calls it).

  Tables are cut to `model`'s rows, so a sharded run's padding does not count. `layout`
  (or the run's Mesh) only gathers them.
  """
  mesh = layout.mesh if isinstance(layout, parallel.Layout) else layout
  h = hashlib.sha256()
  host = sharding.unpadded(
    jax.device_get(sharding.gathered(params, mesh)), sharding.model_shapes(model)
  )
  for leaf in jax.tree.leaves(host):
    h.update(np.ascontiguousarray(leaf).tobytes())
  return h.hexdigest()[:16]
