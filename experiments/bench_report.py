r"""Benchmark JSON results -> one Markdown table, a column per file.

  mkdir -p runs/bench
  python -m ncf_jax.benchmark --sections=data --scale=0.01 --json > runs/bench/cpu.json
  python -m experiments.bench_report runs/bench/*.json --out=runs/bench/table.md

Each file holds one JSON object from `python -m ncf_jax.benchmark --json` (a file whose
last line is that object, after log lines, is read too). A column is headed by the
file's `backend` and `device` (else its file name). Rows: the known keys below, in this
order and with their units, then any other key found, with a unit read off its suffix
(so a figure added to the benchmark later still shows). A key a file lacks is '—'; a
known key no file has is left out.
"""

from collections.abc import Sequence
import json
import math
import os
import sys
from typing import Any

from absl import app, flags

from ncf_jax.errors import UserError, exit_on_user_error

# (key, unit, what it is), in table order.
KNOWN: list[tuple[str, str, str]] = [
  ('backend', '', 'JAX backend'),
  ('device', '', 'device kind'),
  ('num_devices', '', 'devices used'),
  ('jax_version', '', 'JAX version'),
  # Headline figures.
  ('train_samples_per_sec', 'samples/s', 'training throughput'),
  ('compute_ceiling_samples_per_sec', 'samples/s', 'throughput the matmul rate allows'),
  ('compute_ceiling_fraction', 'fraction', 'share of the compute ceiling reached'),
  ('peer_ratio_torch', 'x', 'throughput relative to the PyTorch peer'),
  ('matmul_flops_per_sec', 'FLOP/s', 'measured matmul rate'),
  # Sampler, epoch pipeline, evaluation candidates.
  ('sampler_negatives_per_sec', 'negatives/s', 'on-device negative sampler'),
  ('numpy_bisection_negatives_per_sec', 'negatives/s', 'NumPy bisection sampler'),
  ('sampler_vs_numpy_ratio', 'x', 'sampler / NumPy sampler'),
  ('random_draws_per_sec', 'draws/s', 'bare uniform draws'),
  ('sampler_vs_random_ratio', 'x', 'sampler / bare draws'),
  ('sampler_random_order_negatives_per_sec', 'negatives/s', 'sampler, users at random'),
  ('sampler_random_order_vs_random_ratio', 'x', 'sampler at random / bare draws'),
  ('sampler_random_order_vs_numpy_ratio', 'x', 'sampler at random / NumPy at random'),
  ('epoch_samples', 'samples', 'samples in one epoch'),
  ('epoch_batches_sec', 's', 'one epoch of batches'),
  ('epoch_batches_hashed_sec', 's', 'one epoch of batches, hashed'),
  ('hash_overhead_fraction_of_batches', 'fraction', 'hashing cost'),
  ('epoch_random_draws_sec', 's', 'the same number of bare draws'),
  ('epoch_vs_random_ratio', 'x', 'epoch / bare draws'),
  ('epoch_batches_per_position_sec', 's', 'one epoch of train_batch calls'),
  ('eval_users_per_sec', 'users/s', 'evaluation throughput'),
  ('eval_num_neg', 'items', 'evaluation negatives per user'),
  ('eval_candidates_sec', 's', 'all evaluation candidates'),
  ('eval_random_draws_sec', 's', 'the same number of bare draws'),
  ('eval_candidates_vs_random_ratio', 'x', 'candidates / bare draws'),
  ('device_data_bytes', 'bytes', 'dataset arrays on the device'),
  ('device_data_vs_int32_ratio', 'x', 'versus plain int32 arrays'),
  # Data preparation.
  ('data_preprocess_sec', 's', 'parse + MLPerf preprocessing'),
  ('data_bare_parse_sec', 's', 'bare pyarrow CSV parse'),
  ('data_parse_sec', 's', 'our CSV parse'),
  ('data_preprocess_parse_ratio', 'x', 'preprocess time / bare parse time'),
  ('data_prepare_sec', 's', 'first prepare (hash, parse, preprocess, cache write)'),
  ('data_cache_load_sec', 's', 'processed-cache load'),
  ('data_peak_rss_gb', 'GB', 'peak RSS of the data steps'),
  ('data_preprocess_peak_rss_gb', 'GB', 'peak RSS, preprocess'),
  ('data_prepare_peak_rss_gb', 'GB', 'peak RSS, first prepare'),
  ('data_cache_load_peak_rss_gb', 'GB', 'peak RSS, cache load'),
  ('data_bare_parse_peak_rss_gb', 'GB', 'peak RSS, bare parse'),
  ('data_cache_bytes', 'bytes', 'processed cache size'),
  ('data_csv_bytes', 'bytes', 'ratings.csv size'),
  ('data_num_users', 'users', 'users after preprocessing'),
  ('data_num_items', 'items', 'items after preprocessing'),
  ('data_num_train', 'ratings', 'training positives'),
  ('scale', 'x ml-20m', 'problem size'),
]
_KNOWN_UNITS = {k: u for k, u, _ in KNOWN}
_HEADER_KEYS = ('backend', 'device')
_SUFFIX_UNITS = [
  ('_per_sec', '/s'),
  ('_sec', 's'),
  ('_ms', 'ms'),
  ('_gb', 'GB'),
  ('_bytes', 'bytes'),
  ('_fraction', 'fraction'),
  ('_ratio', 'x'),
  ('_rows', 'rows'),
  ('_num_users', 'users'),
  ('_num_items', 'items'),
]


def read_result(path: str) -> dict[str, Any]:
  """The JSON object in `path` (the whole file, else its last non-empty line)."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError as e:
    raise UserError(f'cannot read {path}: {e.strerror}.') from None
  lines = [line for line in text.splitlines() if line.strip()]
  for candidate in (text, lines[-1] if lines else ''):
    try:
      value = json.loads(candidate)
    except ValueError:
      continue
    if isinstance(value, dict):
      return value
    raise UserError(
      f'{path} holds a JSON {type(value).__name__}, not an object of benchmark figures.'
    )
  raise UserError(f'{path} is not JSON; write it with `python -m ncf_jax.benchmark --json > FILE`.')


def unit(key: str) -> str:
  if key in _KNOWN_UNITS:
    return _KNOWN_UNITS[key]
  return next((u for suffix, u in _SUFFIX_UNITS if key.endswith(suffix)), '')


def format_value(value: Any) -> str:
  """Cell text: thousands separators for big numbers, 3 significant digits for small."""
  if value is None:
    return '—'
  if isinstance(value, bool):
    return 'yes' if value else 'no'
  if isinstance(value, int):
    return f'{value:,}'
  if isinstance(value, float):
    if not math.isfinite(value):
      return str(value)
    if abs(value) >= 1000:
      return f'{value:,.0f}'
    if abs(value) >= 10:
      return f'{value:.1f}'
    return f'{value:.3g}'
  return str(value).replace('|', '\\|').replace('\n', ' ')


def column_names(paths: Sequence[str], results: Sequence[dict[str, Any]]) -> list[str]:
  names = []
  for path, result in zip(paths, results):
    parts: list[str] = []
    for k in _HEADER_KEYS:
      text = str(result.get(k) or '')
      if text and text.lower() not in (p.lower() for p in parts):
        parts.append(text)
    names.append(' '.join(parts) or os.path.splitext(os.path.basename(path))[0])
  counts = {n: names.count(n) for n in names}
  return [
    f'{n} ({os.path.basename(p)})' if counts[n] > 1 else n  # same backend twice
    for n, p in zip(names, paths)
  ]


def render(paths: Sequence[str], results: Sequence[dict[str, Any]]) -> str:
  """The Markdown table: a row per key (known keys first), a column per result."""
  present = set().union(*(r.keys() for r in results)) if results else set()
  keys = [k for k, _, _ in KNOWN if k in present]
  keys += sorted(present - set(keys))
  header = ['figure', 'unit'] + [n.replace('|', '\\|') for n in column_names(paths, results)]
  lines = ['| ' + ' | '.join(header) + ' |', '|:---|:---|' + '---:|' * len(results)]
  for key in keys:
    cells = [format_value(r.get(key)) for r in results]
    lines.append('| ' + ' | '.join([f'`{key}`', unit(key)] + cells) + ' |')
  return '\n'.join(lines) + '\n'


def define_flags() -> None:
  # Defined only when run as a command, so that importing this module defines no flags.
  flags.DEFINE_string('out', None, 'Write the table here (default: print it).')


@exit_on_user_error
def main(argv):
  paths = argv[1:]
  if not paths:
    raise UserError(
      'pass the JSON files: python -m experiments.bench_report '
      'runs/bench/*.json [--out=runs/bench/table.md]'
    )
  table = render(paths, [read_result(p) for p in paths])
  out = flags.FLAGS.out
  if out:
    os.makedirs(os.path.dirname(out) or '.', exist_ok=True)  # e.g. --out=runs/bench/table.md
    with open(out, 'w') as f:
      f.write(table)
    print(f'Wrote {out}: {len(paths)} result file(s).')
  else:
    sys.stdout.write(table)


if __name__ == '__main__':
  define_flags()
  app.run(main)
