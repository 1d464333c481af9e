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

from ncf_jax.errors import exit_on_user_error
from ncf_jax.errors import UserError

_SECTIONS = flags.DEFINE_list('sections', None, 'Sections to run (default: all).')
_SCALE = flags.DEFINE_float('scale', 1.0, 'Problem size relative to ml-20m (e.g. 0.05).')
_JSON = flags.DEFINE_bool('json', False, 'Print one JSON object instead of a table.')
_WORKDIR = flags.DEFINE_string('workdir', None,
                               'Scratch folder (default: a new temp folder, deleted after).')


@dataclasses.dataclass(frozen=True)
class Args:
  """What every section gets."""
  scale: float    # problem size relative to ml-20m
  workdir: str    # scratch folder the section may fill


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


SECTIONS: Dict[str, Callable[[Args], Dict[str, Any]]] = {
    'data': data_section,
}


@exit_on_user_error
def main(argv):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments {" ".join(argv[1:])!r}.')
  names = _SECTIONS.value or list(SECTIONS)
  unknown = [n for n in names if n not in SECTIONS]
  if unknown:
    raise UserError(f'unknown --sections {", ".join(unknown)}; valid: {", ".join(SECTIONS)}.')
  if not _SCALE.value > 0:
    raise UserError(f'--scale is {_SCALE.value}; it must be > 0.')
  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix='ncf_jax_benchmark_')
  os.makedirs(workdir, exist_ok=True)
  figures = {}
  try:
    for n in names:
      figures.update(SECTIONS[n](Args(scale=_SCALE.value, workdir=workdir)))
  finally:
    if _WORKDIR.value is None:
      shutil.rmtree(workdir, ignore_errors=True)
  if _JSON.value:
    print(json.dumps(figures))
  else:
    width = max(map(len, figures))
    for k, v in figures.items():
      print(f'{k:<{width}}  {v:.3f}' if isinstance(v, float) else f'{k:<{width}}  {v}')


if __name__ == '__main__':
  app.run(main)
