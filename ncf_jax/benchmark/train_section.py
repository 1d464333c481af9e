"""Benchmark section `train`: the MLPerf NeuMF train step and evaluation.

Train-step samples/s of the MLPerf NeuMF (138,493 x 26,744 tables at --scale=1, batch read
inside the step from the epoch built on device) at each of --batch_sizes (default 65,536
and 1,048,576), interleaved round by round with the same step at
`model.first_layer='concat'` and NVIDIA's PyTorch NeuMF module (eager, fused Adam,
torch.compile, SparseAdam; --torch_variants) when torch is installed: ours is the median
of the rounds, each peer its best, `peer_ratio_torch_b<B>` their ratio. Also the fraction
of the compute ceiling (FLOPS_PER_SAMPLE / measured fp32 matmul FLOP/s); at the smallest
batch a per-part breakdown (sampling, embedding gathers, forward, forward+backward, dense
Adam update), the hash's cost on a train step and the bytes one device holds
(`bytes_per_device_{params,opt_state,data,epoch}`, as in summary.json); eval users/s with
999 negatives.
"""

from collections.abc import Sequence
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from configs import mlperf
from ncf_jax import config_checks, data, dispatch, memory, models, pipeline, sampling, steps
from ncf_jax import metrics as metrics_lib
from ncf_jax.benchmark import common, peers, timing

FLOPS_PER_SAMPLE = 639_744  # MLPerf NeuMF dense layers, forward + backward (3 x 2 x MACs)


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
  return 2 * n**3 / sec


def _ours(config, model, dev, items, mesh, keys, batch: int, hashed: bool = False):
  """run(n) -> seconds for n compiled train steps at `batch` (sampling included).

  The steps read batches 0..n-1 of epoch 0 from `items` (the epoch, built once per batch
  size and not timed), `config.steps_per_call` per launch; the state carries over
  between calls.
  """
  _, data_key, dropout_key = keys
  cfg = _with(config, batch_size=batch, hash_pipeline=hashed)
  k = int(cfg.steps_per_call)
  holder = [steps.create_train_state(cfg, model, keys[0], mesh)]
  step = steps.make_train_step(cfg, mesh, num_steps=k)
  in_flight = dispatch.InFlight(dispatch.in_flight_limit(mesh.devices.flat))

  def run(n: int) -> float:
    t = time.perf_counter()
    state = holder[0]
    for s in range(0, n, k):
      state, out = step(state, dev, items, (data_key, dropout_key), np.int32(0), np.int32(s))
      in_flight.add(out['train_loss'])
    holder[0] = jax.block_until_ready(state)
    return time.perf_counter() - t

  # What one device holds for this contender, as summary.json's `bytes_per_device`.
  run.bytes_per_device = memory.bytes_per_device(  # type: ignore[attr-defined]
    params=holder[0].params, opt_state=holder[0].opt_state, data=dev, epoch=items
  )
  return run


def _interleaved(contenders, rounds: int) -> dict[str, list]:
  """{name: samples/s of each round} for {name: (run, n, batch)}, timed in turn.

  One untimed round first (compiles, warms caches), then `rounds` rounds in which every
  contender runs its n steps once, so that all sides see the same machine load.
  """
  rates: dict[str, list[float]] = {name: [] for name in contenders}
  for r in range(rounds + 1):
    for name, (run, n, batch) in contenders.items():
      sec = run(n)
      if r:
        rates[name].append(n * batch / sec)
  return rates


def _step_rates(
  config,
  model,
  dev,
  mesh,
  keys,
  sizes: Sequence[int],
  flops: float,
  num_users: int,
  num_items: int,
  torch_variants: Sequence[str],
) -> dict[str, Any]:
  """Ours against the PyTorch peer at each batch size, interleaved in one process.

  Per batch: ours as configured (median of the rounds), ours with
  `model.first_layer='concat'` (the reference's arithmetic, before the projection) when
  the config projects, the hashed step at the smallest batch, and each PyTorch variant
  (best of the rounds). `peer_ratio_torch_b<B>` is ours' median over the best dense-Adam
  variant's best; SparseAdam (lazy updates) has its own ratio.
  """
  out = {}
  rounds = 3
  on_cpu = _on_cpu()
  for batch in sizes:
    n = (1 if batch > 100_000 else 5) if on_cpu else 20
    n = -(-n // int(config.steps_per_call)) * int(config.steps_per_call)
    # The epoch does not depend on the batch size or the model: one for all contenders.
    items = steps.make_epoch_items(config, mesh, dev)(dev, keys[1], np.int32(0))
    contenders = {'ours': (_ours(config, model, dev, items, mesh, keys, batch), n, batch)}
    if batch == sizes[0]:
      out.update(
        {f'bytes_per_device_{k}': v for k, v in contenders['ours'][0].bytes_per_device.items()}
      )
    if config.model.first_layer != 'concat' and config.model.name in ('neumf', 'mlp'):
      plain = models.create_model(
        _with(config.model, first_layer='concat'), num_users, num_items, config.dtype
      )
      contenders['concat'] = (_ours(config, plain, dev, items, mesh, keys, batch), n, batch)
    if batch == sizes[0]:
      contenders['hashed'] = (
        _ours(config, model, dev, items, mesh, keys, batch, hashed=True),
        n,
        batch,
      )
    runners, info = peers.torch_neumf(num_users, num_items, batch, torch_variants)
    out.update(info)
    for name, run in runners.items():
      contenders[f'torch_{name}'] = (run, n, batch)
    rates = _interleaved(contenders, rounds)
    ours = float(np.median(rates.pop('ours')))
    out[f'train_samples_per_sec_b{batch}'] = ours
    out[f'compute_ceiling_fraction_b{batch}'] = ours * FLOPS_PER_SAMPLE / flops
    if 'concat' in rates:
      out[f'train_samples_per_sec_b{batch}_concat'] = float(np.median(rates.pop('concat')))
      out[f'first_layer_speedup_b{batch}'] = ours / out[f'train_samples_per_sec_b{batch}_concat']
    if 'hashed' in rates:  # the hash-of-batches diagnostic's cost on a real train step
      hashed = float(np.median(rates.pop('hashed')))
      out[f'train_samples_per_sec_b{batch}_hashed'] = hashed
      out['hash_overhead_fraction_of_train'] = ours / hashed - 1
    for name, r in rates.items():
      out[f'{name}_samples_per_sec_b{batch}'] = max(r)
    dense = {k: max(r) for k, r in rates.items() if k != 'torch_sparse_adam'}
    if dense:
      best = max(dense, key=lambda k: dense[k])
      out[f'peer_best_b{batch}'] = best
      out[f'peer_ratio_torch_b{batch}'] = ours / dense[best]
    if 'torch_sparse_adam' in rates:
      out[f'peer_ratio_torch_sparse_adam_b{batch}'] = ours / max(rates['torch_sparse_adam'])
    out['timing_rounds'] = rounds
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
  gen = jax.jit(
    lambda d, it: pipeline.batch_from_items(d, it, data_key, 0, 0, batch_size=batch, num_neg=4)
  )
  b = gen(dev1, items1)

  def loss(params, b):
    logits = model.apply({'params': params}, b['user'], b['item'])
    return metrics_lib.bce_sum(logits, b['label'], b['valid']) / batch

  fwd = jax.jit(loss)
  grad = jax.jit(jax.grad(loss))
  g = grad(state.params, b)
  upd = jax.jit(lambda s, g: s.apply_gradients(grads=g), donate_argnums=0)
  gather = jax.jit(
    lambda p, b: [
      p['gmf']['gmf_user']['embedding'][b['user']],
      p['gmf']['gmf_item']['embedding'][b['item']],
      p['mlp']['mlp_user']['embedding'][b['user']],
      p['mlp']['mlp_item']['embedding'][b['item']],
    ]
  )
  out: dict[str, float] = {'breakdown_batch': batch}
  out['breakdown_sampling_ms'] = 1e3 * timing.timed(gen, dev1, items1, repeats=3)
  out['breakdown_embedding_gather_ms'] = 1e3 * timing.timed(gather, state.params, b, repeats=3)
  out['breakdown_forward_ms'] = 1e3 * timing.timed(fwd, state.params, b, repeats=3)
  out['breakdown_forward_backward_ms'] = 1e3 * timing.timed(grad, state.params, b, repeats=3)
  holder = [state]  # the update donates its state: each call takes the last one's

  def update():
    holder[0] = upd(holder[0], g)
    return holder[0].step

  out['breakdown_adam_update_ms'] = 1e3 * timing.timed(update, repeats=3)
  return out, holder[0].params


def _eval_rate(config, model, ds: data.Dataset, dev, mesh, data_key, params) -> dict[str, Any]:
  """Evaluation users/s with 999 sampled negatives each (fewer if the items run out)."""
  config = _with(
    config,
    eval_batch_size=(1024 if _on_cpu() else 8192) * mesh.size,
    eval_num_neg=int(min(config.eval_num_neg, ds.num_items - ds.user_degrees().max() - 1)),
  )
  eval_step = steps.make_eval_step(config, mesh, model, ds.num_users, ds.num_items)
  params = jax.device_put(params, NamedSharding(mesh, P()))
  nb = 4 if _on_cpu() else 16
  sec = timing.timed(
    lambda: [
      eval_step(params, dev, data_key, np.int32(i * config.eval_batch_size)) for i in range(nb)
    ]
  )
  return {
    'eval_users_per_sec': nb * config.eval_batch_size / sec,
    'eval_num_neg': config.eval_num_neg,
  }


def run(args: common.Args) -> dict[str, Any]:
  """Train-step samples/s (MLPerf NeuMF, sampling included), ceiling fraction, breakdown."""
  ds = common.scaled_dataset(args)
  # At --scale=1 the tables have ml-20m's sizes: they dominate the optimizer's cost.
  num_users, num_items = ds.num_users, ds.num_items
  config = config_checks.resolve_model_defaults(
    mlperf.get_config() if args.config is None else args.config
  )
  mesh = steps.make_mesh()
  dev = sampling.to_device(ds, NamedSharding(mesh, P()))
  model = models.create_model(config.model, num_users, num_items, config.dtype)
  keys = steps.make_keys(0, mesh)
  flops = _matmul_flops_per_sec()
  out = {
    **timing.backend(),
    'model': config.model.name,
    'dtype': config.dtype,
    'train_num_users': num_users,
    'train_num_items': num_items,
    'matmul_flops_per_sec': flops,
    'compute_ceiling_samples_per_sec': flops / FLOPS_PER_SAMPLE,
  }
  sizes = sorted({int(b) for b in args.batch_sizes})
  small, large = sizes[0], sizes[-1]
  out.update(
    _step_rates(
      config, model, dev, mesh, keys, sizes, flops, num_users, num_items, args.torch_variants
    )
  )
  breakdown, params = _breakdown(config, model, ds, keys, small)
  out.update(breakdown)
  out.update(_eval_rate(config, model, ds, dev, mesh, keys[1], params))

  if f'peer_ratio_torch_b{small}' in out:
    out['peer_ratio_torch'] = out[f'peer_ratio_torch_b{small}']
  out['train_samples_per_sec'] = out[f'train_samples_per_sec_b{large}']
  out['compute_ceiling_fraction'] = out[f'compute_ceiling_fraction_b{large}']
  out['peak_host_rss_gb'] = common.peak_rss_gb()
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    out['peak_device_memory_gb'] = stats['peak_bytes_in_use'] / common.GB
  return out
