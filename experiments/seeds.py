r"""Seed studies, the MLPerf way: time to the quality target over seeds 0..N-1.

  python -m experiments.seeds --config=configs/mlperf.py --num_seeds=10 --workdir=DIR
  python -m experiments.seeds --config=configs/default.py --config.hr_threshold=0.65 \
      --num_seeds=5 --workdir=runs/seeds_synthetic

Seed s trains in DIR/seed=<s> (resumable; a finished run is not rerun, exactly as in
experiments.sweep, which this module reuses). Every `--config.x=y` of this command reaches
every run. Then DIR gets:

  seeds.md / seeds.csv  per seed: epochs and seconds to config.hr_threshold, the maximum
                        test HR over epochs; the MLPerf summary (the fastest and the
                        slowest run dropped, the mean of the rest, over the runs that
                        reached the target) and the spread (std, min, max, how many
                        reached the target);
  seeds.png             box plots of epochs and seconds to the target.

MLPerf v0.5 timed NCF this way: of 100 runs, the first 50 that converged count, and the
result is the mean after dropping the fastest and the slowest (docs/mlperf.md §3.5).

Determinism: seed 0 is trained a second time in DIR/determinism_seed=0 and its final
`params_hash` (summary.json) must equal seed 0's. seeds.md says PASS or FAIL; FAIL (or a
run that fails) makes the command exit non-zero.
"""

from collections.abc import Sequence
import csv
import math
import os
import statistics
from typing import Any

from absl import app, flags

from experiments import plots, sweep
from ncf_jax import launch
from ncf_jax.errors import UserError, exit_on_user_error, parse_flags

FLAGS = flags.FLAGS
RERUN = 'determinism_seed=0'


def mlperf_summary(values: Sequence[float | None]) -> dict[str, Any]:
  """Summary of per-run times to the target; None marks a run that never reached it.

  Returns runs, converged, mlperf_mean (the converged values with the single fastest and
  single slowest dropped, then averaged; needs >= 3 converged runs, else None), mean, std
  (sample standard deviation, >= 2 runs), min and max, all over the converged runs.
  """
  done = sorted(float(v) for v in values if v is not None and math.isfinite(v))
  return {
    'runs': len(values),
    'converged': len(done),
    'mlperf_mean': statistics.fmean(done[1:-1]) if len(done) >= 3 else None,
    'mean': statistics.fmean(done) if done else None,
    'std': statistics.stdev(done) if len(done) >= 2 else None,
    'min': done[0] if done else None,
    'max': done[-1] if done else None,
  }


def determinism(first: dict[str, Any], rerun: dict[str, Any]) -> dict[str, Any]:
  """PASS when seed 0 and its rerun both finished with the same params_hash."""
  a, b = first.get('params_hash'), rerun.get('params_hash')
  both = first['status'] == 'done' and rerun['status'] == 'done'
  return {
    'passed': bool(both and a and a == b),
    'seed0': a,
    'rerun': b,
    'reason': '' if both else f'seed 0 is {first["status"]}, its rerun is {rerun["status"]}',
  }


def write_report(
  points: Sequence[sweep.Point],
  workdir: str,
  *,
  config_file: str,
  hr_threshold: float,
  top_k: int,
  command: str,
) -> dict[str, Any]:
  """seeds.md, seeds.csv and seeds.png; returns the summaries and the determinism check."""
  results = [sweep.point_result(p) for p in points]
  seeds, rerun = results[:-1], results[-1]
  for r, p in zip(results, points):
    r['seed'] = int(p.config.seed)
  epochs = mlperf_summary([r['epochs_to_target'] for r in seeds])
  seconds = mlperf_summary([r['seconds_to_target'] for r in seeds])
  check = determinism(seeds[0], rerun)

  columns = [
    'seed',
    'epochs_to_target',
    'seconds_to_target',
    'test_hr_max_over_epochs',
    'test_ndcg_max_over_epochs',
    'epochs_done',
    'params_hash',
    'status',
  ]
  with open(os.path.join(workdir, 'seeds.csv'), 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(columns)
    for r in seeds:
      writer.writerow(['' if r[c] is None else r[c] for c in columns])

  fmt = sweep.fmt
  per_seed = sweep.markdown_table(
    [
      'seed',
      'epochs to target',
      's to target',
      f'max test HR@{top_k} over epochs',
      'epochs',
      'status',
    ],
    [
      [
        str(r['seed']),
        fmt(r['epochs_to_target'], ''),
        fmt(r['seconds_to_target'], 'seconds'),
        fmt(r['test_hr_max_over_epochs'], 'metric'),
        fmt(r['epochs_done'], ''),
        r['status'],
      ]
      for r in seeds
    ],
    ['r'] * 5 + ['l'],
  )

  def line(name, s, kind):
    return [
      name,
      f'{s["converged"]} of {s["runs"]}',
      fmt(s['mlperf_mean'], kind),
      fmt(s['mean'], kind),
      fmt(s['std'], kind),
      fmt(s['min'], kind),
      fmt(s['max'], kind),
    ]

  summary = sweep.markdown_table(
    [
      'to the target',
      'reached it',
      'MLPerf mean (drop fastest + slowest)',
      'mean',
      'std',
      'min',
      'max',
    ],
    [line('epochs', epochs, 'epochs'), line('seconds', seconds, 'seconds')],
    ['l'] + ['r'] * 6,
  )
  verdict = 'PASS' if check['passed'] else 'FAIL'
  detail = (
    f'seed 0 params_hash `{check["seed0"]}`, rerun (`{RERUN}`) params_hash `{check["rerun"]}`'
  )
  if check['reason']:
    detail += f' ({check["reason"]})'
  with open(os.path.join(workdir, 'seeds.md'), 'w') as f:
    f.write(
      f'# Seed study: {len(seeds)} seeds of `{config_file}`\n\n'
      f'Target: HR@{top_k} >= {hr_threshold} (config.hr_threshold). '
      f'Command: `{command}`\n\n{per_seed}\n{summary}\n'
      'MLPerf mean: over the runs that reached the target, the fastest and the slowest '
      'dropped (needs 3); std is the sample standard deviation.\n\n'
      f'Determinism (seed 0 trained twice): **{verdict}**: {detail}.\n\n'
      '![epochs and seconds to the target](seeds.png)\n'
    )
  plots.seed_boxplot(
    [
      ('epochs to target', [r['epochs_to_target'] for r in seeds]),
      ('seconds to target', [r['seconds_to_target'] for r in seeds]),
    ],
    os.path.join(workdir, 'seeds.png'),
    title=f'{len(seeds)} seeds, HR@{top_k} >= {hr_threshold}',
  )
  return {'epochs': epochs, 'seconds': seconds, 'determinism': check, 'results': results}


def define_flags() -> None:
  launch.define_run_flags()  # --config and --workdir as for a train run
  flags.DEFINE_integer('num_seeds', 10, 'Seeds 0..num_seeds-1 are trained.')
  flags.DEFINE_integer('parallel', 1, 'Runs at once, each on its share of the devices.')


@exit_on_user_error
def main(argv):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  config, config_file, base, workdir = sweep.base_config()
  if FLAGS.num_seeds < 1:
    raise UserError(f'--num_seeds={FLAGS.num_seeds}; it must be >= 1.')
  if 'config.seed' in base:
    raise UserError('--config.seed is set by the study (seeds 0..num_seeds-1); drop it.')
  if config.hr_threshold is None:
    raise UserError(
      f'{config_file} has config.hr_threshold=None: a seed study measures '
      'the time to that target; pass --config.hr_threshold=<HR>.'
    )
  overrides = [{'config.seed': s} for s in range(FLAGS.num_seeds)] + [{'config.seed': 0}]
  names = [sweep.point_name(o) for o in overrides[:-1]] + [RERUN]
  points = sweep.make_points(config, config_file, base, overrides, workdir, names=names)
  envs = sweep.prepare_envs(FLAGS.parallel)
  os.makedirs(workdir, exist_ok=True)
  print(
    f'Seed study: {FLAGS.num_seeds} seeds + a rerun of seed 0 in {os.path.abspath(workdir)}',
    flush=True,
  )
  completed = sweep.run_points(points, envs)
  report = write_report(
    points,
    workdir,
    config_file=config_file,
    hr_threshold=config.hr_threshold,
    top_k=int(config.top_k),
    command=sweep.this_command('experiments.seeds'),
  )
  e, check = report['epochs'], report['determinism']
  print(
    f'Reached HR >= {config.hr_threshold}: {e["converged"]} of {e["runs"]} runs; '
    f'MLPerf mean epochs {sweep.fmt(e["mlperf_mean"], "epochs")}, seconds '
    f'{sweep.fmt(report["seconds"]["mlperf_mean"], "seconds")}. Determinism: '
    f'{"PASS" if check["passed"] else "FAIL"}. Wrote {workdir}/seeds.md.',
    flush=True,
  )
  if not completed:
    raise UserError(
      'interrupted: the running seeds saved checkpoints; rerun the same command to continue.'
    )
  failed = [p for p, r in zip(points, report['results']) if r['status'].startswith('failed')]
  if failed:
    raise UserError(
      f'{len(failed)} runs failed: '
      + '; '.join(f'{p.name} ({sweep.failure_reason(p)})' for p in failed)
      + '. Their logs: <run>/train.log.'
    )
  if not check['passed']:
    raise UserError(
      f'determinism check FAILED: seed 0 gave params_hash {check["seed0"]}, '
      f'its rerun {check["rerun"]}. {check["reason"]}'.strip()
    )


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=parse_flags)
