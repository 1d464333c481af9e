"""Benchmark section `data` (ml-20m scale at --scale=1), on the host only.

The synthetic generator writes a 20M-row `ratings.csv` in the exact ml-20m layout into a
scratch folder; then, each in a fresh process (so peak RSS is per measurement): a bare
`pyarrow.csv.read_csv` of the file, our parse + preprocess, a first `data.prepare` (hash +
parse + preprocess + cache write) and a cache-hit `data.load`. Targets (2-core machine):
preprocess <= 20 s and <= 4x the bare parse, cache load <= 2 s, peak RSS <= 3 GB,
generation <= 30 s.
"""

from collections.abc import Callable
import json
import os
import subprocess
import sys
import time
from typing import Any

import pyarrow.csv as pacsv

from configs import default
from ncf_jax import data
from ncf_jax.benchmark import common
from ncf_jax.data import synthetic
from ncf_jax.data.sources import grouplens

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _generate(params, path):
  t = time.perf_counter()
  gen = synthetic.generate(**params)
  out = dict(sec=time.perf_counter() - t, rows=len(gen), peak_rss_gb=common.peak_rss_gb())
  t = time.perf_counter()
  synthetic.write_grouplens_csv(gen, path, params['seed'])
  return dict(out, write_sec=time.perf_counter() - t, bytes=os.path.getsize(path))


def _bare_parse(path):
  t = time.perf_counter()
  table = pacsv.read_csv(path)
  return dict(sec=time.perf_counter() - t, rows=table.num_rows, peak_rss_gb=common.peak_rss_gb())


def _preprocess(name, data_dir):
  t = time.perf_counter()
  ratings = grouplens.read_ratings(grouplens.locate(name, data_dir))
  parsed = time.perf_counter()
  ds, _ = data.preprocess(
    ratings.users, ratings.items, ratings.timestamps, name=name, min_ratings=20, where=ratings.where
  )
  return dict(
    sec=time.perf_counter() - t,
    parse_sec=parsed - t,
    rows=len(ratings),
    num_users=ds.num_users,
    num_items=ds.num_items,
    num_train=ds.num_train,
    peak_rss_gb=common.peak_rss_gb(),
  )


def _prepare(name, data_dir, force):
  config = default.get_dataset_config()
  config.name, config.data_dir = name, data_dir
  t = time.perf_counter()
  prepared = data.prepare(config, force=force)
  return dict(
    sec=time.perf_counter() - t,
    built=prepared.built,
    peak_rss_gb=common.peak_rss_gb(),
    cache_bytes=os.path.getsize(prepared.cache_path),
  )


# One measurement each; `_measure` runs it in a fresh process and returns its figures.
_MEASUREMENTS: dict[str, Callable[..., dict[str, Any]]] = {
  'generate': _generate,
  'bare_parse': _bare_parse,
  'preprocess': _preprocess,
  'prepare': lambda name, data_dir: _prepare(name, data_dir, force=True),
  'load': lambda name, data_dir: _prepare(name, data_dir, force=False),
}


def worker_main() -> None:
  """Entry point of a measurement process: argv[1] is the JSON [kind, kwargs]."""
  kind, kwargs = json.loads(sys.argv[1])
  print(json.dumps(_MEASUREMENTS[kind](**kwargs)))


def _measure(kind: str, **kwargs) -> dict[str, Any]:
  """Runs one measurement in a fresh interpreter (own peak RSS, cold imports)."""
  proc = subprocess.run(
    [
      sys.executable,
      '-c',
      'from ncf_jax.benchmark import data_section; data_section.worker_main()',
      json.dumps([kind, kwargs]),
    ],
    cwd=_REPO,
    capture_output=True,
    text=True,
    check=False,
  )
  if proc.returncode != 0:
    raise RuntimeError(f'benchmark worker {kind} failed:\n{proc.stderr[-4000:]}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


def run(args: common.Args) -> dict[str, Any]:
  """Parse + preprocess an ml-20m-sized ratings.csv vs a bare pyarrow parse; cache; RSS."""
  params = dict(
    num_users=max(1, round(common.ML20M_USERS * args.scale)),
    num_items=max(320, round(common.ML20M_ITEMS * args.scale)),
    mean_interactions=round(common.ML20M_MEAN, 1),
    num_topics=16,
    seed=0,
  )
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
