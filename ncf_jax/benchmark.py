r"""Benchmarks: timing lives here, never in tests.

  python -m ncf_jax.benchmark                        # every section, full scale
  python -m ncf_jax.benchmark --sections=data --scale=0.05 --json

A section is a function `(Args) -> dict` of figures, registered in SECTIONS; `--json`
prints one JSON object with the figures of the chosen sections (stable keys, in order).

Section `data` (ml-20m scale at --scale=1): the synthetic generator writes a 20M-row
`ratings.csv` in the exact ml-20m layout into a scratch folder; then, each in a fresh
subprocess (so peak RSS is per measurement): a bare `pyarrow.csv.read_csv` of the file,
our parse + preprocess, a first `data.prepare` (hash + parse + preprocess + cache write)
and a cache-hit `data.load`. Targets (2-core machine): preprocess <= 20 s and <= 4x the
bare parse, cache load <= 2 s, peak RSS <= 3 GB, generation <= 30 s.

Section `sampler` (on the JAX backend): training negatives/s as the train loop makes them
(an epoch's slots in slot order, `pipeline.epoch_items`, positives' copies included) against
the rate of merely drawing as many random integers (`sampler_vs_random_ratio`, target
>= 0.6) and a vectorised NumPy bisection in the same order (`sampler_vs_numpy_ratio`,
target >= 3); the same two ratios in the visiting order (users at random, `train_batch`'s
path); a whole epoch's batches (built, then read) and all users' eval candidates against
the same number of raw draws (targets <= 2x); the hash's cost on batch generation; the
device form's size over the int32 dataset (target <= 2); and a breakdown at 2**20 lanes
(randint, our draw, one random read, the permutation, the sampler in either order) in ms.

Section `train`: train-step samples/s of the MLPerf NeuMF (138,493 x 26,744 tables, batch
read inside the step from the epoch built on device) at batch 65,536 and 1,048,576; the fraction of the compute
ceiling (639,744 FLOPs per sample / measured fp32 matmul FLOP/s); a per-part breakdown
(sampling, embedding gathers, forward, forward+backward, dense Adam update); the hash's
cost on a train step; eval users/s with 999 negatives; and NVIDIA's PyTorch NeuMF module
(eager and fused Adam) when torch is installed, as `peer_ratio_torch`.
"""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict

from absl import app
from absl import flags
import ml_collections
from ml_collections import config_flags

from ncf_jax.errors import exit_on_user_error
from ncf_jax.errors import parse_flags
from ncf_jax.errors import UserError

def define_flags() -> None:
  """Defines the benchmark command's flags (only when run as a command)."""
  config_flags.DEFINE_config_file('config', 'configs/mlperf.py', 'Config whose model, dtype '
                                  'and optimizer the train section times.', lock_config=True)
  flags.DEFINE_list('batch_sizes', ['65536', '1048576'],
                    'Global batch sizes the train section times (the smallest also gets the '
                    'breakdown, the hash cost and the PyTorch peer).')
  flags.DEFINE_list('sections', None, 'Sections to run (default: all).')
  flags.DEFINE_float('scale', 1.0, 'Problem size relative to ml-20m (e.g. 0.05).')
  flags.DEFINE_bool('json', False, 'Print one JSON object instead of a table.')
  flags.DEFINE_string('workdir', None,
                      'Scratch folder (default: a new temp folder, deleted after).')


@dataclasses.dataclass(frozen=True)
class Args:
  """What every section gets."""
  scale: float    # problem size relative to ml-20m
  workdir: str    # scratch folder the section may fill
  config: Any = None        # train section: model, dtype and optimizer (mlperf.py default)
  batch_sizes: tuple = (65536, 1048576)   # train section: global batch sizes to time


# ml-20m: users, rated movies, ratings / users.
ML20M_USERS, ML20M_ITEMS, ML20M_MEAN = 138_493, 26_744, 20_000_263 / 138_493
_GB = 1e9


def _worker(kind: str, kwargs: Dict[str, Any]) -> Dict[str, Any]:
  """One measurement, run in a fresh process by `_measure`; returns its figures."""
  import resource  # pylint: disable=g-import-not-at-top
  # pylint: disable=g-import-not-at-top
  from ncf_jax import data
  from ncf_jax import movielens
  from ncf_jax import synthetic
  # pylint: enable=g-import-not-at-top

  def rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / _GB

  out = {}
  if kind == 'generate':
    t = time.perf_counter()
    gen = synthetic.generate(**kwargs['params'])
    out.update(sec=time.perf_counter() - t, rows=len(gen), peak_rss_gb=rss_gb())
    t = time.perf_counter()
    synthetic.write_grouplens_csv(gen, kwargs['path'], kwargs['params']['seed'])
    out.update(write_sec=time.perf_counter() - t, bytes=os.path.getsize(kwargs['path']))
  elif kind == 'bare_parse':
    import pyarrow.csv as pacsv  # pylint: disable=g-import-not-at-top
    t = time.perf_counter()
    table = pacsv.read_csv(kwargs['path'])
    out.update(sec=time.perf_counter() - t, rows=table.num_rows, peak_rss_gb=rss_gb())
  elif kind == 'preprocess':
    t = time.perf_counter()
    ratings = movielens.read_ratings(movielens.locate(kwargs['name'], kwargs['data_dir']))
    parsed = time.perf_counter()
    ds, _ = data.preprocess(ratings.users, ratings.items, ratings.timestamps,
                            name=kwargs['name'], min_ratings=20, where=ratings.where)
    out.update(sec=time.perf_counter() - t, parse_sec=parsed - t, rows=len(ratings),
               num_users=ds.num_users, num_items=ds.num_items, num_train=ds.num_train,
               peak_rss_gb=rss_gb())
  elif kind in ('prepare', 'load'):
    from configs import default  # pylint: disable=g-import-not-at-top
    config = default.get_dataset_config()
    config.name, config.data_dir = kwargs['name'], kwargs['data_dir']
    t = time.perf_counter()
    prepared = data.prepare(config, force=kind == 'prepare')
    out.update(sec=time.perf_counter() - t, built=prepared.built, peak_rss_gb=rss_gb(),
               cache_bytes=os.path.getsize(prepared.cache_path))
  else:
    raise ValueError(kind)
  return out


def _worker_main() -> None:
  kind, kwargs = json.loads(sys.argv[1])
  print(json.dumps(_worker(kind, kwargs)))


def _measure(kind: str, **kwargs) -> Dict[str, Any]:
  """Runs `_worker(kind, kwargs)` in a fresh interpreter (own peak RSS, cold imports)."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(
      [sys.executable, '-c', 'from ncf_jax import benchmark; benchmark._worker_main()',
       json.dumps([kind, kwargs])], cwd=repo, capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    raise RuntimeError(f'benchmark worker {kind} failed:\n{proc.stderr[-4000:]}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


def data_section(args: Args) -> Dict[str, Any]:
  """Parse + preprocess an ml-20m-sized ratings.csv vs a bare pyarrow parse; cache; RSS."""
  params = dict(num_users=max(1, round(ML20M_USERS * args.scale)),
                num_items=max(320, round(ML20M_ITEMS * args.scale)),
                mean_interactions=round(ML20M_MEAN, 1), num_topics=16, seed=0)
  name = 'ml-25m'  # the ml-20m csv layout, without ml-20m's published-size check
  data_dir = os.path.join(args.workdir, 'data')
  path = os.path.join(data_dir, 'ml-25m', 'ratings.csv')
  os.makedirs(os.path.dirname(path), exist_ok=True)
  gen = _measure('generate', params=params, path=path)
  bare = _measure('bare_parse', path=path)
  pre = _measure('preprocess', name=name, data_dir=data_dir)
  first = _measure('prepare', name=name, data_dir=data_dir)
  load = _measure('load', name=name, data_dir=data_dir)
  if load['built']:
    raise RuntimeError('the cache-hit measurement rebuilt the cache')
  return {
      'scale': args.scale,
      'synthetic_num_users': params['num_users'],
      'synthetic_num_items': params['num_items'],
      'synthetic_rows': gen['rows'],
      'synthetic_generate_sec': gen['sec'],
      'synthetic_peak_rss_gb': gen['peak_rss_gb'],
      'synthetic_write_csv_sec': gen['write_sec'],
      'data_csv_bytes': gen['bytes'],
      'data_num_users': pre['num_users'],
      'data_num_items': pre['num_items'],
      'data_num_train': pre['num_train'],
      'data_bare_parse_sec': bare['sec'],
      'data_bare_parse_peak_rss_gb': bare['peak_rss_gb'],
      'data_parse_sec': pre['parse_sec'],
      'data_preprocess_sec': pre['sec'],
      'data_preprocess_parse_ratio': pre['sec'] / bare['sec'],
      'data_preprocess_peak_rss_gb': pre['peak_rss_gb'],
      'data_prepare_sec': first['sec'],
      'data_prepare_peak_rss_gb': first['peak_rss_gb'],
      'data_cache_bytes': load['cache_bytes'],
      'data_cache_load_sec': load['sec'],
      'data_cache_load_peak_rss_gb': load['peak_rss_gb'],
      'data_peak_rss_gb': max(pre['peak_rss_gb'], first['peak_rss_gb'], load['peak_rss_gb']),
  }


# ----------------------------------------------------------------------------------------
# Sections on the JAX backend (whatever `jax.devices()` is: CPU here, GPU/TPU when lent).

def _timed(fn, *args, repeats: int = 1):
  """Best wall time of `fn(*args)` over `repeats` runs after one warm-up (compile)."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.block_until_ready(fn(*args))
  best = float('inf')
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t)
  return best


def _scaled_dataset(args: Args):
  """ml-20m-sized synthetic data (scaled), built once into the scratch folder's cache."""
  from configs import default  # pylint: disable=g-import-not-at-top
  from ncf_jax import data  # pylint: disable=g-import-not-at-top
  cfg = default.get_dataset_config()
  cfg.name = 'synthetic'
  cfg.data_dir = os.path.join(args.workdir, 'synthetic')
  cfg.synthetic_num_users = max(100, round(ML20M_USERS * args.scale))
  cfg.synthetic_num_items = max(1000, round(ML20M_ITEMS * args.scale))
  cfg.synthetic_mean_interactions = round(ML20M_MEAN, 1)
  return data.load(cfg)


def _backend() -> Dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  dev = jax.devices()[0]
  return {'backend': dev.platform, 'device': getattr(dev, 'device_kind', str(dev)),
          'num_devices': jax.device_count(), 'jax_version': jax.__version__}


def _numpy_bisection_negatives(dataset, users, seed=0):
  """The peer: a per-user bisection, vectorised in NumPy.

  This is the approach of TensorFlow's 2019 NCF pipeline: per element, bisect the user's
  sorted positives (here their shifted values p_k - k) with NumPy array steps and return
  the r-th non-positive, r + j. Same distribution as ours (exact uniform over the
  non-positives), another bijection from r to items.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  offsets = dataset.user_offsets.astype(np.int64)
  degrees = np.diff(offsets)
  local = np.arange(dataset.num_train) - np.repeat(offsets[:-1], degrees)
  shifted = (dataset.train_items - local).astype(np.int32)
  steps = int(np.ceil(np.log2(degrees.max() + 1)))
  last = dataset.num_train - 1
  rng = np.random.default_rng(seed)

  def draw(u):
    off, deg = offsets[u], degrees[u]
    r = rng.integers(0, dataset.num_items - deg)
    lo, hi = np.zeros_like(deg), deg.copy()
    for _ in range(steps):
      mid = (lo + hi) >> 1
      le = shifted[np.minimum(off + mid, last)] <= r
      active = lo < hi
      lo = np.where(active & le, mid + 1, lo)
      hi = np.where(active & ~le, mid, hi)
    return r + lo
  return draw


def sampler_section(args: Args) -> Dict[str, Any]:
  """Negatives/s vs raw random draws and a NumPy bisection; epoch and eval generation."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ncf_jax import hashing  # pylint: disable=g-import-not-at-top
  from ncf_jax import pipeline  # pylint: disable=g-import-not-at-top
  from ncf_jax import sampling  # pylint: disable=g-import-not-at-top

  ds = _scaled_dataset(args)
  dev = sampling.to_device(ds)
  key = jax.random.key(0, impl='threefry2x32')
  kp = sampling.keypair(key)
  num_neg = 4
  n_slots = pipeline.epoch_size(ds.num_train, num_neg)
  num_neg_total = num_neg * ds.num_train
  chunk = 1 << 22

  # Training negatives as the train loop makes them: its epoch builder (every slot of an
  # epoch, the positives' copies included, in slot order, EPOCH_CHUNK slots a call).
  # Raw draws: as many random integers as the epoch has negatives, in calls of the same
  # size. Best of 3 each, alternating, since the machine is shared.
  from ncf_jax import train  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict({'num_neg': num_neg})
  build = train.make_epoch_items(config, train.make_mesh(1), ds.num_train)
  epoch_chunk = min(pipeline.EPOCH_CHUNK, n_slots)

  @jax.jit
  def chunk_draws(i):
    return jax.random.randint(jax.random.fold_in(key, i), (epoch_chunk,), 0, ds.num_items)
  neg_sec = draw_sec = float('inf')
  for _ in range(3):
    neg_sec = min(neg_sec, _timed(build, dev, key, np.int32(0)))
    draw_sec = min(draw_sec, _timed(
        lambda: [chunk_draws(i) for i in range(-(-num_neg_total // epoch_chunk))]))

  @jax.jit
  def draws(i):
    return jax.random.randint(jax.random.fold_in(key, i), (chunk,), 0, ds.num_items)

  # The same sampler in the visiting order (users at random): `train_batch`'s path.
  users = jax.random.randint(jax.random.key(1), (chunk,), 0, ds.num_train)
  users = jax.jit(lambda d, k: d.train_users[k])(dev, users)

  @jax.jit
  def negatives(d, u, i):
    counters = jnp.uint32(i) * jnp.uint32(chunk) + jnp.arange(chunk, dtype=jnp.uint32)
    return sampling.sample_negatives(d, kp, u, counters)
  rand_chunks = 4
  rand_sec = _timed(lambda: [negatives(dev, users, i) for i in range(rand_chunks)], repeats=3)
  rand_draw_sec = _timed(lambda: [draws(i) for i in range(rand_chunks)], repeats=3)

  # The NumPy peer in both orders, on one chunk each.
  host_users = np.asarray(users)
  slot_users = ds.train_users[np.minimum(np.arange(chunk) // (1 + num_neg), ds.num_train - 1)]
  np_draw = _numpy_bisection_negatives(ds, host_users)
  np_sec = _timed(lambda: [np_draw(host_users) for _ in range(2)]) / (2 * chunk)
  np_slot_sec = _timed(lambda: [np_draw(slot_users) for _ in range(2)]) / (2 * chunk)

  # A whole epoch's batches, without the model, as the train loop makes them: the epoch's
  # items in slot order, then every batch reads them. And the pure per-position path.
  batch = 1 << 20
  steps = pipeline.steps_per_epoch(ds.num_train, num_neg, batch)

  @jax.jit
  def read_batch(d, items, step):
    return pipeline.batch_from_items(d, items, key, 0, step, batch_size=batch,
                                     num_neg=num_neg)

  @jax.jit
  def read_batch_hashed(d, items, step, chain):
    b = pipeline.batch_from_items(d, items, key, 0, step, batch_size=batch, num_neg=num_neg)
    return hashing.chain(chain, hashing.batch_digest(b, jnp.arange(batch, dtype=jnp.uint32)))

  @jax.jit
  def position_batch(d, step):
    return pipeline.train_batch(d, key, 0, step, batch_size=batch, num_neg=num_neg)

  @jax.jit
  def epoch_draws(i):
    return jax.random.randint(jax.random.fold_in(key, i), (batch,), 0, ds.num_items)

  def run_epoch():
    items = build(dev, key, np.int32(0))
    return [read_batch(dev, items, np.int32(s)) for s in range(steps)]

  def run_epoch_hashed():
    items = build(dev, key, np.int32(0))
    chain = hashing.init()
    for s in range(steps):
      chain = read_batch_hashed(dev, items, np.int32(s), chain)
    return chain

  epoch_sec = _timed(run_epoch, repeats=2)
  epoch_hashed_sec = _timed(run_epoch_hashed, repeats=2)
  epoch_position_sec = _timed(lambda: [position_batch(dev, np.int32(s)) for s in range(steps)])
  epoch_draw_sec = _timed(lambda: [epoch_draws(i) for i in range(steps)], repeats=2)

  # Eval candidates for all users, 999 each (fewer if a small --scale leaves fewer items).
  eval_neg = int(min(999, ds.num_items - ds.user_degrees().max() - 1))
  eval_users = 4096
  eval_batches = -(-ds.num_users // eval_users)

  @jax.jit
  def eval_cands(d, first):
    u = jnp.minimum(first + jnp.arange(eval_users, dtype=jnp.int32), ds.num_users - 1)
    return pipeline.eval_batch(d, key, u, num_neg=eval_neg)[0]

  @jax.jit
  def eval_draws(i):
    return jax.random.randint(jax.random.fold_in(key, i), (eval_users, eval_neg), 0,
                              ds.num_items)

  eval_sec = _timed(lambda: [eval_cands(dev, np.int32(i * eval_users))
                             for i in range(eval_batches)])
  eval_draw_sec = _timed(lambda: [eval_draws(i) for i in range(eval_batches)])

  # Where a negative's time goes, at 2**20 lanes: primitives and parts.
  lanes = 1 << 20
  bu = users[:lanes]
  su = dev.train_users[(jnp.arange(lanes) + (n_slots // 2)) // (1 + num_neg)]
  lane_ids = jnp.arange(lanes, dtype=jnp.uint32)
  read_idx = jax.random.randint(jax.random.key(2), (lanes,), 0, ds.num_train)
  # Every part takes its inputs as arguments, so XLA cannot fold it into a constant.
  parts = {
      'randint': lambda d, i: jax.random.randint(jax.random.fold_in(key, i[0]), (lanes,),
                                                 0, ds.num_items),
      'draw': lambda d, i: sampling.uniform_below(sampling.random_words(kp, i, 0)[0],
                                                  jnp.uint32(ds.num_items)),
      'random_read': lambda d, i: d.positive_items(read_idx + i.astype(jnp.int32) * 0),
      'permute': lambda d, i: sampling.permute(i, n_slots, sampling.round_keys(kp)),
      'sampler_random_order': lambda d, i: sampling.sample_negatives(d, kp, bu, i),
      'sampler_slot_order': lambda d, i: sampling.sample_negatives(d, kp, su, i),
  }
  breakdown = {}
  for name, fn in parts.items():
    breakdown[f'breakdown_{name}_ms_per_2e20'] = 1e3 * _timed(jax.jit(fn), dev, lane_ids,
                                                               repeats=3)

  device_bytes = sum(x.nbytes for x in jax.tree.leaves(dev))
  int32_bytes = 4 * (2 * ds.num_train + 2 * ds.num_users + 1)
  return {
      **_backend(),
      'sampler_num_users': ds.num_users, 'sampler_num_items': ds.num_items,
      'sampler_num_train': ds.num_train,
      'epoch_items_build_sec': neg_sec,
      'sampler_negatives_per_sec': num_neg_total / neg_sec,
      'random_draws_per_sec': num_neg_total / draw_sec,
      'sampler_vs_random_ratio': draw_sec / neg_sec,
      'numpy_bisection_negatives_per_sec': 1.0 / np_slot_sec,
      'sampler_vs_numpy_ratio': (num_neg_total / neg_sec) * np_slot_sec,
      'sampler_random_order_negatives_per_sec': rand_chunks * chunk / rand_sec,
      'sampler_random_order_vs_random_ratio': rand_draw_sec / rand_sec,
      'numpy_bisection_random_order_negatives_per_sec': 1.0 / np_sec,
      'sampler_random_order_vs_numpy_ratio': (rand_chunks * chunk / rand_sec) * np_sec,
      'epoch_samples': n_slots,
      'epoch_batches_sec': epoch_sec,
      'epoch_random_draws_sec': epoch_draw_sec,
      'epoch_vs_random_ratio': epoch_sec / epoch_draw_sec,
      'epoch_batches_per_position_sec': epoch_position_sec,
      'epoch_batches_hashed_sec': epoch_hashed_sec,
      'hash_overhead_fraction_of_batches': epoch_hashed_sec / epoch_sec - 1.0,
      'eval_num_neg': eval_neg,
      'eval_candidates_sec': eval_sec,
      'eval_random_draws_sec': eval_draw_sec,
      'eval_candidates_vs_random_ratio': eval_sec / eval_draw_sec,
      **breakdown,
      'device_data_bytes': device_bytes,
      'device_data_vs_int32_ratio': device_bytes / int32_bytes,
  }


FLOPS_PER_SAMPLE = 639_744   # MLPerf NeuMF dense layers, forward + backward (3 x 2 x MACs)


def _matmul_flops_per_sec() -> float:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  n = 2048 if jax.devices()[0].platform == 'cpu' else 8192
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  mm = jax.jit(lambda a: a @ a)
  sec = _timed(mm, a, repeats=3)
  return 2 * n ** 3 / sec


def _torch_peer(num_users: int, num_items: int, batch: int) -> Dict[str, Any]:
  """NVIDIA's MLPerf NeuMF module (PyTorch, CPU): samples/s of one Adam step."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return {'torch_note': 'torch not installed: peer skipped'}
  from torch import nn  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count() or 1)

  class NeuMF(nn.Module):
    def __init__(self):
      super().__init__()
      self.mf_user, self.mf_item = nn.Embedding(num_users, 64), nn.Embedding(num_items, 64)
      self.mlp_user = nn.Embedding(num_users, 128)
      self.mlp_item = nn.Embedding(num_items, 128)
      self.mlp = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(),
                               nn.Linear(128, 64), nn.ReLU())
      self.final = nn.Linear(128, 1)

    def forward(self, u, i):
      gmf = self.mf_user(u) * self.mf_item(i)
      mlp = self.mlp(torch.cat([self.mlp_user(u), self.mlp_item(i)], dim=1))
      return self.final(torch.cat([gmf, mlp], dim=1)).squeeze(1)

  out = {}
  u = torch.randint(0, num_users, (batch,))
  i = torch.randint(0, num_items, (batch,))
  y = torch.randint(0, 2, (batch,)).float()
  loss_fn = nn.BCEWithLogitsLoss()
  for name, fused in (('eager', False), ('fused_adam', True)):
    model = NeuMF()
    try:
      opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)
    except (RuntimeError, TypeError):
      continue
    def step():
      opt.zero_grad(set_to_none=True)
      loss_fn(model(u, i), y).backward()
      opt.step()
    step()
    t = time.perf_counter()
    for _ in range(3):
      step()
    out[f'torch_{name}_samples_per_sec'] = 3 * batch / (time.perf_counter() - t)
  out['torch_version'] = torch.__version__
  return out


def train_section(args: Args) -> Dict[str, Any]:
  """Train-step samples/s (MLPerf NeuMF, sampling included), ceiling fraction, breakdown."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from configs import mlperf  # pylint: disable=g-import-not-at-top
  from ncf_jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  from ncf_jax import models  # pylint: disable=g-import-not-at-top
  from ncf_jax import pipeline  # pylint: disable=g-import-not-at-top
  from ncf_jax import sampling  # pylint: disable=g-import-not-at-top
  from ncf_jax import dispatch  # pylint: disable=g-import-not-at-top
  from ncf_jax import train  # pylint: disable=g-import-not-at-top

  import resource  # pylint: disable=g-import-not-at-top
  ds = _scaled_dataset(args)
  # At --scale=1 the tables have ml-20m's sizes: they dominate the optimizer's cost.
  num_users, num_items = ds.num_users, ds.num_items
  config = mlperf.get_config() if args.config is None else args.config.copy_and_resolve_references()
  mesh = train.make_mesh()
  dev = sampling.to_device(ds, NamedSharding(mesh, P()))
  model = models.create_model(config.model, num_users, num_items, config.dtype)
  init_key, data_key, dropout_key = train.make_keys(0, mesh)
  flops = _matmul_flops_per_sec()
  out = {**_backend(), 'model': config.model.name, 'dtype': config.dtype,
         'train_num_users': num_users, 'train_num_items': num_items,
         'matmul_flops_per_sec': flops,
         'compute_ceiling_samples_per_sec': flops / FLOPS_PER_SAMPLE}
  cpu = jax.devices()[0].platform == 'cpu'
  sizes = sorted(set(int(b) for b in args.batch_sizes))
  small, large = sizes[0], sizes[-1]
  runs = [(b, False) for b in sizes] + [(small, True)]
  for batch, hashed in runs:
    config.batch_size = batch
    config.hash_pipeline = hashed
    state = train.create_train_state(config, model, init_key, mesh)
    step = train.make_train_step(config, mesh)
    items = train.make_epoch_items(config, mesh, dev.num_train)(dev, data_key, np.int32(0))
    n = (3 if batch > 100_000 else 10) if cpu else 20

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
  config.hash_pipeline = False

  # Where the time goes at the smallest batch (one device, each part compiled alone).
  batch = small
  config.batch_size = batch
  state = train.create_train_state(config, model, init_key, train.make_mesh(1))
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
  out['breakdown_batch'] = batch
  out['breakdown_sampling_ms'] = 1e3 * _timed(gen, dev1, items1, repeats=3)
  out['breakdown_embedding_gather_ms'] = 1e3 * _timed(gather, state.params, b, repeats=3)
  out['breakdown_forward_ms'] = 1e3 * _timed(fwd, state.params, b, repeats=3)
  out['breakdown_forward_backward_ms'] = 1e3 * _timed(grad, state.params, b, repeats=3)
  holder = [state]

  def update():
    holder[0] = upd(holder[0], g)
    return holder[0].step
  out['breakdown_adam_update_ms'] = 1e3 * _timed(update, repeats=3)

  # Evaluation throughput: users/s with 999 sampled negatives each.
  config.eval_batch_size = 1024 * mesh.size if cpu else 8192 * mesh.size
  config.eval_num_neg = int(min(config.eval_num_neg,
                                ds.num_items - ds.user_degrees().max() - 1))
  eval_step = train.make_eval_step(config, mesh, model, ds.num_users, ds.num_items)
  params = holder[0].params
  params = jax.device_put(params, NamedSharding(mesh, P()))
  nb = 4 if cpu else 16
  sec = _timed(lambda: [eval_step(params, dev, data_key, np.int32(i * config.eval_batch_size))
                        for i in range(nb)])
  out['eval_users_per_sec'] = nb * config.eval_batch_size / sec
  out['eval_num_neg'] = config.eval_num_neg

  peer = _torch_peer(num_users, num_items, small)
  out.update(peer)
  best = max([v for k, v in peer.items() if k.endswith('_samples_per_sec')], default=None)
  if best:
    out['peer_ratio_torch'] = out[f'train_samples_per_sec_b{small}'] / best
  out['train_samples_per_sec'] = out[f'train_samples_per_sec_b{large}']
  out['compute_ceiling_fraction'] = out[f'compute_ceiling_fraction_b{large}']
  out['peak_host_rss_gb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / _GB
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    out['peak_device_memory_gb'] = stats['peak_bytes_in_use'] / _GB
  return out


SECTIONS: Dict[str, Callable[[Args], Dict[str, Any]]] = {
    'data': data_section,
    'sampler': sampler_section,
    'train': train_section,
}


@exit_on_user_error
def main(argv):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments {" ".join(argv[1:])!r}.')
  FLAGS = flags.FLAGS
  names = FLAGS.sections or list(SECTIONS)
  unknown = [n for n in names if n not in SECTIONS]
  if unknown:
    raise UserError(f'unknown --sections {", ".join(unknown)}; valid: {", ".join(SECTIONS)}.')
  if not FLAGS.scale > 0:
    raise UserError(f'--scale is {FLAGS.scale}; it must be > 0.')
  workdir = FLAGS.workdir or tempfile.mkdtemp(prefix='ncf_jax_benchmark_')
  os.makedirs(workdir, exist_ok=True)
  figures = {}
  try:
    for n in names:
      figures.update(SECTIONS[n](Args(scale=FLAGS.scale, workdir=workdir, config=FLAGS.config,
                                         batch_sizes=tuple(int(b) for b in FLAGS.batch_sizes))))
  finally:
    if FLAGS.workdir is None:
      shutil.rmtree(workdir, ignore_errors=True)
  if FLAGS.json:
    print(json.dumps(figures))
  else:
    width = max(map(len, figures))
    for k, v in figures.items():
      print(f'{k:<{width}}  {v:.3f}' if isinstance(v, float) else f'{k:<{width}}  {v}')


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=parse_flags)
