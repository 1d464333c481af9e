"""Benchmark section `train`: the MLPerf NeuMF train step and evaluation.

Train-step samples/s of the MLPerf NeuMF (138,493 x 26,744 tables at --scale=1, batch read
inside the step from the epoch built on device) at each of --batch_sizes (default 65,536
and 1,048,576); the fraction of the compute ceiling (FLOPS_PER_SAMPLE / measured fp32
matmul FLOP/s); at the smallest batch a per-part breakdown (sampling, embedding gathers,
forward, forward+backward, dense Adam update) and the hash's cost on a train step; eval
users/s with 999 negatives; and NVIDIA's PyTorch NeuMF module (eager and fused Adam) when
torch is installed, as `peer_ratio_torch`.
"""
import time
from typing import Any, Dict, Sequence

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import jax.numpy as jnp
import numpy as np

from configs import mlperf
from ncf_jax import config_checks
from ncf_jax import data
from ncf_jax import dispatch
from ncf_jax import metrics as metrics_lib
from ncf_jax import models
from ncf_jax import pipeline
from ncf_jax import sampling
from ncf_jax import steps
from ncf_jax.benchmark import common
from ncf_jax.benchmark import peers
from ncf_jax.benchmark import timing

FLOPS_PER_SAMPLE = 639_744   # MLPerf NeuMF dense layers, forward + backward (3 x 2 x MACs)


def _on_cpu() -> bool:
  return jax.devices()[0].platform == 'cpu'


def _with(config, **fields):
  """A copy of `config` with `fields` set (each measurement states what it changes)."""
  config = config.copy_and_resolve_references()
  config.update(fields)
  return config


def _matmul_flops_per_sec() -> float:
  """fp32 FLOP/s of one square matmul (2048 on CPU, 8192 on accelerators)."""
  n = 2048 if _on_cpu() else 8192
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  sec = timing.timed(jax.jit(lambda a: a @ a), a, repeats=3)
  return 2 * n ** 3 / sec


def _step_rates(config, model, dev, mesh, keys, sizes: Sequence[int],
                flops: float) -> Dict[str, float]:
  """Steady-state samples/s of the compiled train step at each batch size, then hashed.

  The epoch's build happens once per epoch and is not in these rates.
  """
  init_key, data_key, dropout_key = keys
  out = {}
  for batch, hashed in [(b, False) for b in sizes] + [(sizes[0], True)]:
    cfg = _with(config, batch_size=batch, hash_pipeline=hashed)
    state = steps.create_train_state(cfg, model, init_key, mesh)
    step = steps.make_train_step(cfg, mesh)
    items = steps.make_epoch_items(cfg, mesh, dev.num_train)(dev, data_key, np.int32(0))
    n = (3 if batch > 100_000 else 10) if _on_cpu() else 20

    in_flight = dispatch.InFlight(dispatch.in_flight_limit(mesh.devices.flat))

    def run(state):
      for s in range(n):
        state, out = step(state, dev, items, (data_key, dropout_key), np.int32(0),
                          np.int32(s))
        in_flight.add(out['train_loss'])
      return state
    state = run(state)   # compile + warm up
    jax.block_until_ready(state)
    t = time.perf_counter()
    state = jax.block_until_ready(run(state))
    rate = n * batch / (time.perf_counter() - t)
    del state
    if hashed:   # the hash-of-batches diagnostic's cost on a real train epoch
      out[f'train_samples_per_sec_b{batch}_hashed'] = rate
      out['hash_overhead_fraction_of_train'] = out[f'train_samples_per_sec_b{batch}'] / rate - 1
      continue
    out[f'train_samples_per_sec_b{batch}'] = rate
    out[f'compute_ceiling_fraction_b{batch}'] = rate * FLOPS_PER_SAMPLE / flops
  return out


def _breakdown(config, model, ds: data.Dataset, keys, batch: int):
  """(ms per part of one step at `batch`, the params after one update), on one device.

  Each part is compiled alone: reading the batch, the embedding gathers, the forward,
  forward + backward, and the dense Adam update.
  """
  init_key, data_key, _ = keys
  config = _with(config, batch_size=batch, hash_pipeline=False)
  state = steps.create_train_state(config, model, init_key, steps.make_mesh(1))
  dev1 = sampling.to_device(ds)
  items1 = jax.jit(lambda d: pipeline.epoch_items(d, data_key, 0, num_neg=4))(dev1)
  gen = jax.jit(lambda d, it: pipeline.batch_from_items(d, it, data_key, 0, 0,
                                                        batch_size=batch, num_neg=4))
  b = gen(dev1, items1)

  def loss(params, b):
    logits = model.apply({'params': params}, b['user'], b['item'])
    return metrics_lib.bce_sum(logits, b['label'], b['valid']) / batch
  fwd = jax.jit(loss)
  grad = jax.jit(jax.grad(loss))
  g = grad(state.params, b)
  upd = jax.jit(lambda s, g: s.apply_gradients(grads=g), donate_argnums=0)
  gather = jax.jit(lambda p, b: [p['gmf']['gmf_user']['embedding'][b['user']],
                                 p['gmf']['gmf_item']['embedding'][b['item']],
                                 p['mlp']['mlp_user']['embedding'][b['user']],
                                 p['mlp']['mlp_item']['embedding'][b['item']]])
  out = {'breakdown_batch': batch}
  out['breakdown_sampling_ms'] = 1e3 * timing.timed(gen, dev1, items1, repeats=3)
  out['breakdown_embedding_gather_ms'] = 1e3 * timing.timed(gather, state.params, b, repeats=3)
  out['breakdown_forward_ms'] = 1e3 * timing.timed(fwd, state.params, b, repeats=3)
  out['breakdown_forward_backward_ms'] = 1e3 * timing.timed(grad, state.params, b, repeats=3)
  holder = [state]   # the update donates its state: each call takes the last one's

  def update():
    holder[0] = upd(holder[0], g)
    return holder[0].step
  out['breakdown_adam_update_ms'] = 1e3 * timing.timed(update, repeats=3)
  return out, holder[0].params


def _eval_rate(config, model, ds: data.Dataset, dev, mesh, data_key,
               params) -> Dict[str, Any]:
  """Evaluation users/s with 999 sampled negatives each (fewer if the items run out)."""
  config = _with(
      config, eval_batch_size=(1024 if _on_cpu() else 8192) * mesh.size,
      eval_num_neg=int(min(config.eval_num_neg, ds.num_items - ds.user_degrees().max() - 1)))
  eval_step = steps.make_eval_step(config, mesh, model, ds.num_users, ds.num_items)
  params = jax.device_put(params, NamedSharding(mesh, P()))
  nb = 4 if _on_cpu() else 16
  sec = timing.timed(lambda: [eval_step(params, dev, data_key,
                                        np.int32(i * config.eval_batch_size))
                              for i in range(nb)])
  return {'eval_users_per_sec': nb * config.eval_batch_size / sec,
          'eval_num_neg': config.eval_num_neg}


def run(args: common.Args) -> Dict[str, Any]:
  """Train-step samples/s (MLPerf NeuMF, sampling included), ceiling fraction, breakdown."""
  ds = common.scaled_dataset(args)
  # At --scale=1 the tables have ml-20m's sizes: they dominate the optimizer's cost.
  num_users, num_items = ds.num_users, ds.num_items
  config = config_checks.resolve_model_defaults(
      mlperf.get_config() if args.config is None else args.config)
  mesh = steps.make_mesh()
  dev = sampling.to_device(ds, NamedSharding(mesh, P()))
  model = models.create_model(config.model, num_users, num_items, config.dtype)
  keys = steps.make_keys(0, mesh)
  flops = _matmul_flops_per_sec()
  out = {**timing.backend(), 'model': config.model.name, 'dtype': config.dtype,
         'train_num_users': num_users, 'train_num_items': num_items,
         'matmul_flops_per_sec': flops,
         'compute_ceiling_samples_per_sec': flops / FLOPS_PER_SAMPLE}
  sizes = sorted(set(int(b) for b in args.batch_sizes))
  small, large = sizes[0], sizes[-1]
  out.update(_step_rates(config, model, dev, mesh, keys, sizes, flops))
  breakdown, params = _breakdown(config, model, ds, keys, small)
  out.update(breakdown)
  out.update(_eval_rate(config, model, ds, dev, mesh, keys[1], params))

  peer = peers.torch_neumf(num_users, num_items, small)
  out.update(peer)
  best = max([v for k, v in peer.items() if k.endswith('_samples_per_sec')], default=None)
  if best:
    out['peer_ratio_torch'] = out[f'train_samples_per_sec_b{small}'] / best
  out['train_samples_per_sec'] = out[f'train_samples_per_sec_b{large}']
  out['compute_ceiling_fraction'] = out[f'compute_ceiling_fraction_b{large}']
  out['peak_host_rss_gb'] = common.peak_rss_gb()
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    out['peak_device_memory_gb'] = stats['peak_bytes_in_use'] / common.GB
  return out
