r"""Benchmark section `modes`: both `config.sharding` modes on 1, 2, 4 and 8 devices.

  python -m ncf_jax.benchmark --sections=modes [--scale=0.05] [--json]
  python -m ncf_jax.benchmark.modes_section --counts=1,2 --batch=1024 --steps=1 \
      --scale=0.001 --workdir=/tmp/modes --json        # the section alone, any counts

What it measures, per device count N and mode ('replicated': data parallel, everything
replicated; 'sharded': the embedding tables and their Adam moments split by rows over the
devices, and the sampler's data split): train-step samples/s of the MLPerf NeuMF at
ml-20m's sizes (--scale=1), built the way the train loop builds it (the mode's
`parallel.make_layout`, its `device_data` and `model_config`, `steps.make_epoch_items`,
`steps.create_train_state`, `steps.make_train_step(like=...)`; the sharded mode reads its
tables unprojected, `model.first_layer='concat'`, as `ncf_jax.train` does), and the bytes one device holds of the params, the Adam state, the
sampler's data and the epoch's items (`memory.bytes_per_device`, as in summary.json).
Samples/s is n x batch / seconds of n steps after one untimed warm-up call (compile); the
epoch is built once, untimed. The batch is the smallest of --batch_sizes (default 65,536:
the config's 1,048,576 takes minutes per step on 2 CPU cores shared by 8 fake devices).

Why subprocesses: a JAX CPU process's device count is fixed when its backend starts
(XLA_FLAGS=--xla_force_host_platform_device_count=N), so on CPU each N runs in its own
interpreter (`--worker`), which prints one JSON line of figures that the parent merges; a
worker that fails (e.g. out of memory) gives `modes_error_d{N}` (its last stderr line)
instead of failing the benchmark. Fresh processes also keep one N's memory out of the
next's. On an accelerator the counts run in this process on the first N real devices
(`steps.make_mesh(N)`); counts above the device count are skipped (`modes_skipped`).
Each run builds the first mode, times it and frees it before the second (no peak of both).
"""

import argparse
from collections.abc import Sequence
import gc
import json
import os
import pickle
import re
import subprocess
import sys
import time
from typing import Any

# Device counts the section measures (the worker takes any via --counts / --devices).
DEVICE_COUNTS = (1, 2, 4, 8)
MODES = ('replicated', 'sharded')
# Timed steps after the warm-up call: few on CPU (fake devices share its cores).
CPU_STEPS, ACCELERATOR_STEPS = 3, 20
# A worker that has not printed its figures after this long is reported as failed.
WORKER_TIMEOUT_S = 3600
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_COUNT_FLAG = '--xla_force_host_platform_device_count'


def _mlperf_config(config=None):
  from configs import mlperf
  from ncf_jax import config_checks

  return config_checks.resolve_model_defaults(mlperf.get_config() if config is None else config)


def _measure_mode(
  config, dataset, mode: str, num_devices: int, batch: int, num_steps: int
) -> dict[str, Any]:
  """{samples_per_sec, bytes_per_device, first_layer} of `mode` on the first N devices."""
  import jax
  import numpy as np

  from ncf_jax import config_checks, dispatch, memory, models, parallel, pipeline, steps

  config = config.copy_and_resolve_references()
  config.update(dict(batch_size=batch, sharding=mode, num_devices=num_devices, hash_pipeline=False))
  mesh = steps.make_mesh(num_devices)
  config_checks.validate_config(config, mesh.size)
  layout = parallel.make_layout(config, mesh)
  model_config = layout.model_config(config.model)  # as ncf_jax.train
  model = models.create_model(model_config, dataset.num_users, dataset.num_items, config.dtype)
  init_key, data_key, dropout_key = steps.make_keys(0, mesh)
  in_flight = dispatch.InFlight(dispatch.in_flight_limit(list(mesh.devices.flat)))
  data = layout.device_data(dataset)
  build = steps.make_epoch_items(config, layout, data)
  items = build(data, data_key, np.int32(0), in_flight)  # not timed
  state = steps.create_train_state(config, model, init_key, layout)
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
  )
  step = steps.make_train_step(config, layout, like=abstract)
  per_epoch = pipeline.steps_per_epoch(dataset.num_train, config.num_neg, batch)
  keys = (data_key, dropout_key)

  state, out = step(state, data, items, keys, np.int32(0), np.int32(0))  # compiles
  jax.block_until_ready((state, out))
  t = time.perf_counter()
  for s in range(1, num_steps + 1):
    state, out = step(state, data, items, keys, np.int32(0), np.int32(s % per_epoch))
    in_flight.add(out['train_loss'])
  jax.block_until_ready((state, out))
  sec = time.perf_counter() - t
  result = {
    'samples_per_sec': num_steps * batch / sec,
    'bytes_per_device': memory.bytes_per_device(
      params=state.params, opt_state=state.opt_state, data=data, epoch=items
    ),
    'first_layer': str(model_config.first_layer),
    'train_loss': float(out['train_loss']),
  }
  del state, out, items, data, step, build, abstract, in_flight
  gc.collect()
  return result


def measure(config, dataset, num_devices: int, batch: int, num_steps: int) -> dict[str, Any]:
  """Both modes' figures on the first `num_devices` devices, one mode after the other."""
  n = num_devices
  out = {}
  for mode in MODES:
    r = _measure_mode(config, dataset, mode, n, batch, num_steps)
    out[f'modes_samples_per_sec_{mode}_d{n}'] = r['samples_per_sec']
    out[f'modes_bytes_per_device_{mode}_d{n}'] = sum(r['bytes_per_device'].values())
    for part, v in r['bytes_per_device'].items():
      out[f'modes_bytes_per_device_{mode}_d{n}_{part}'] = v
    out[f'modes_first_layer_{mode}_d{n}'] = r['first_layer']
    out[f'modes_train_loss_{mode}_d{n}'] = r['train_loss']
  rep, sh = (f'modes_bytes_per_device_{m}_d{n}' for m in MODES)
  out[f'modes_sharded_memory_ratio_d{n}'] = out[sh] / out[rep]
  out[f'modes_sharded_throughput_ratio_d{n}'] = (
    out[f'modes_samples_per_sec_sharded_d{n}'] / out[f'modes_samples_per_sec_replicated_d{n}']
  )
  return out


def worker_env(num_devices: int, base: dict | None = None) -> dict:
  """`base` (os.environ) on CPU with exactly `num_devices` host devices."""
  env = dict(os.environ if base is None else base)
  kept = [f for f in env.get('XLA_FLAGS', '').split() if not f.startswith(_COUNT_FLAG)]
  env['XLA_FLAGS'] = ' '.join(kept + [f'{_COUNT_FLAG}={num_devices}'])
  env['JAX_PLATFORMS'] = 'cpu'
  return env


def worker_figures(num_devices: int, returncode: int, stdout: str, stderr: str) -> dict[str, Any]:
  """The figures a worker printed (its last stdout line), or `modes_error_d{N}`."""
  lines = [line for line in (stdout or '').splitlines() if line.strip()]
  if returncode == 0 and lines:
    try:
      return json.loads(lines[-1])
    except ValueError:
      pass
  err = [line.strip() for line in (stderr or '').splitlines() if line.strip()]
  status = (
    f'killed by signal {-returncode}'
    if returncode < 0  # 9: the OOM killer?
    else f'exit status {returncode}'
  )
  return {f'modes_error_d{num_devices}': f'{status}: {err[-1] if err else "no output"}'}


def _run_worker(
  num_devices: int,
  scale: float,
  workdir: str,
  batch: int,
  num_steps: int,
  config_path: str | None,
  timeout_s: float,
) -> dict[str, Any]:
  cmd = [
    sys.executable,
    '-m',
    'ncf_jax.benchmark.modes_section',
    '--worker',
    f'--devices={num_devices}',
    f'--scale={scale!r}',
    f'--workdir={workdir}',
    f'--batch={batch}',
    f'--steps={num_steps}',
  ]
  if config_path:
    cmd.append(f'--config_pickle={config_path}')
  try:
    proc = subprocess.run(
      cmd,
      cwd=_REPO,
      env=worker_env(num_devices),
      capture_output=True,
      text=True,
      timeout=timeout_s,
      check=False,
    )
  except subprocess.TimeoutExpired:
    return {f'modes_error_d{num_devices}': f'no figures after {timeout_s:.0f} s (killed)'}
  return worker_figures(num_devices, proc.returncode, proc.stdout, proc.stderr)


def run(
  args,
  counts: Sequence[int] = DEVICE_COUNTS,
  batch: int | None = None,
  num_steps: int | None = None,
  timeout_s: float = WORKER_TIMEOUT_S,
) -> dict[str, Any]:
  """Both modes' samples/s and bytes per device at each of `counts` devices."""
  import jax

  from ncf_jax.benchmark import common, timing

  on_cpu = jax.devices()[0].platform == 'cpu'
  if batch is None:
    batch = min(int(b) for b in args.batch_sizes) if args.batch_sizes else 65536
  if num_steps is None:
    num_steps = CPU_STEPS if on_cpu else ACCELERATOR_STEPS
  config = _mlperf_config(args.config)
  dataset = common.scaled_dataset(args)  # built (cached in args.workdir) before the workers
  out = {
    **timing.backend(),
    'modes_device_counts': ','.join(map(str, counts)),
    'modes_batch': batch,
    'modes_timed_steps': num_steps,
    'modes_num_users': dataset.num_users,
    'modes_num_items': dataset.num_items,
    'modes_num_train': dataset.num_train,
  }
  if on_cpu:
    del dataset
    gc.collect()
    config_path = os.path.join(args.workdir, 'modes_config.pkl')
    with open(config_path, 'wb') as f:
      pickle.dump(config, f)
    for n in counts:
      out.update(_run_worker(n, args.scale, args.workdir, batch, num_steps, config_path, timeout_s))
  else:
    skipped = [n for n in counts if n > jax.device_count()]
    if skipped:
      out['modes_skipped'] = ','.join(map(str, skipped))
    for n in counts:
      if n not in skipped:
        try:
          out.update(measure(config, dataset, n, batch, num_steps))
        except Exception as e:  # pylint: disable=broad-except  (e.g. out of memory)
          out[f'modes_error_d{n}'] = f'{type(e).__name__}: {str(e).splitlines()[0]}'
        gc.collect()
  return out


def _worker(ns) -> None:
  """One device count, in a process whose JAX has exactly that many devices."""
  import jax

  from ncf_jax import writers
  from ncf_jax.benchmark import common

  writers.quiet_library_logs()
  if jax.device_count() != ns.devices:
    raise RuntimeError(f'worker for {ns.devices} devices sees {jax.device_count()}')
  config = None
  if ns.config_pickle:
    with open(ns.config_pickle, 'rb') as f:
      config = pickle.load(f)
  dataset = common.scaled_dataset(common.Args(scale=ns.scale, workdir=ns.workdir))
  out = measure(_mlperf_config(config), dataset, ns.devices, ns.batch, ns.steps)
  out[f'modes_peak_host_rss_gb_d{ns.devices}'] = common.peak_rss_gb()
  print(json.dumps(out), flush=True)


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--worker', action='store_true', help='measure one device count (internal)')
  p.add_argument('--devices', type=int, help='--worker: the device count')
  p.add_argument(
    '--counts', default=','.join(map(str, DEVICE_COUNTS)), help='device counts (comma-separated)'
  )
  p.add_argument('--scale', type=float, default=1.0)
  p.add_argument('--workdir', required=True)
  p.add_argument('--batch', type=int, default=None, help='global batch (default 65536)')
  p.add_argument('--steps', type=int, default=None, help='timed steps (default: 3 on CPU)')
  p.add_argument('--config_pickle', default=None, help='--worker: the resolved config')
  p.add_argument('--json', action='store_true')
  ns = p.parse_args(argv)
  if ns.worker:
    _worker(ns)
    return
  from ncf_jax.benchmark import common

  os.makedirs(ns.workdir, exist_ok=True)
  args = common.Args(scale=ns.scale, workdir=ns.workdir, batch_sizes=(ns.batch or 65536,))
  figures = run(
    args, counts=[int(c) for c in re.split(r'[,\s]+', ns.counts.strip()) if c], num_steps=ns.steps
  )
  if ns.json:
    print(json.dumps(figures))
  else:
    for k, v in figures.items():
      print(f'{k}  {v:.3f}' if isinstance(v, float) else f'{k}  {v}')


if __name__ == '__main__':
  main()
