r"""Model comparison over seeds, each model's hyperparameters selected on validation only.

  python -m experiments.compare --config=configs/ncf_paper.py \
      --models=popularity,mf,gmf,mlp,neumf,neumf_pretrained --num_seeds=3 --workdir=DIR
  python -m experiments.compare ... --search=none       # the config's own settings
  python -m experiments.compare ... --parallel=2        # 2 runs at once

For each model of --models:
  1. search (--search=default, or a file defining get_space(model)): a coordinate search
     (experiments/search.py) whose points train in DIR/<model>/search/<setting> with
     config.test_at_end=False, so no search point ever evaluates the test split; the
     winner is chosen by the validation metric alone;
  2. seeds: the selected setting trains with seeds config.seed .. config.seed + N - 1 in
     DIR/<model>/seed=<s>; each run tests its own selected epoch once, at the end;
  3. DIR/results.{csv,md,json} and results.png: per model the mean, standard deviation and
     95 % interval (Student's t) over seeds of test HR@K, NDCG@K and MRR@K, the selected
     hyperparameters, epochs and seconds; results.md also lists every search point with
     its validation metrics.

`popularity` trains nothing (experiments/popularity.py scores by training counts on the
runs' own candidates). `neumf_pretrained` is the NCF paper's recipe: GMF and MLP are
searched and trained first (their rows are the `gmf` and `mlp` models), then NeuMF starts
from their selected epochs' parameters (the final layer an alpha = 0.5 mix) and trains
with plain SGD, the optimizer the paper switches to; its search covers that learning rate.
Seed s of neumf_pretrained starts from seed s of GMF and of MLP.

Every run is a sweep point (experiments/sweep.py): resumable, skipped when finished, its
own process and log. Ctrl-C stops the running points with a checkpoint; rerun the same
command to continue: the search retraces its finished points and goes on.
"""

from collections.abc import Sequence
import csv
import json
import math
import os
import statistics
import subprocess
import sys
from typing import Any

from absl import app, flags
import ml_collections

from experiments import plots, search, sweep
from ncf_jax import config_checks, config_paths
from ncf_jax.errors import UserError, exit_on_user_error, parse_flags
from ncf_jax.train import provenance

FLAGS = flags.FLAGS
MODELS = ('popularity', 'mf', 'gmf', 'mlp', 'neumf', 'neumf_pretrained')
METRICS = ('hr', 'ndcg', 'mrr')
# neumf_pretrained's starting SGD rate per sample of a batch (the loss is a batch mean):
# a fine-tune, about 1/20 of configs/mf_baseline.py's 0.002 per sample from scratch.
PRETRAINED_SGD_RATE_PER_SAMPLE = 1e-4
# Fields that say what a model's selected setting is (results' `selected`).
SHOWN = (
  'learning_rate',
  'optimizer',
  'model.l2',
  'model.mf_dim',
  'model.mlp_layers',
  'model.dropout',
  'num_neg',
  'batch_size',
)


class Interrupted(UserError):
  pass


# ----------------------------------------------------------------------------------------
# Statistics.


def t_quantile_975(df: int) -> float:
  """The 0.975 quantile of Student's t with `df` degrees of freedom."""
  from scipy import stats  # a dependency of jax; imported here only

  return float(stats.t.ppf(0.975, df))


def summarize(values: Sequence[float | None]) -> dict[str, Any]:
  """mean, std (sample), ci95 ([lo, hi], mean +- t * std / sqrt(n)) and n of the values
  that exist; std and ci95 are None below 2 values."""
  xs = [float(v) for v in values if v is not None and math.isfinite(v)]
  n = len(xs)
  mean = statistics.fmean(xs) if xs else None
  std = statistics.stdev(xs) if n >= 2 else None
  ci95 = None
  if mean is not None and std is not None:
    half = t_quantile_975(n - 1) * std / math.sqrt(n)
    ci95 = [mean - half, mean + half]
  return {'mean': mean, 'std': std, 'ci95': ci95, 'n': n}


# ----------------------------------------------------------------------------------------
# Runs.


def run_row(point: sweep.Point) -> dict[str, Any]:
  """One seed's row: the run's selected epoch, its validation and test metrics."""
  summary = sweep.read_summary(point.workdir) or {}
  result = sweep.point_result(point)
  final = summary.get('final') or {}
  return {
    'seed': int(point.config.seed),
    **{f'test_{m}': summary.get(f'test_{m}') for m in METRICS},
    **{f'valid_{m}': summary.get(f'valid_{m}') for m in METRICS},
    'best_epoch': summary.get('best_epoch'),
    'epochs_done': summary.get('epochs_done'),
    'seconds': final.get('total_wall_s'),
    'params_hash': summary.get('params_hash'),
    'status': result['status'],
    'workdir': point.workdir,
  }


def search_row(point: sweep.Point, setting: search.Setting) -> dict[str, Any]:
  """A search point's row: validation metrics only (its run never read the test split)."""
  summary = sweep.read_summary(point.workdir) or {}
  row = {
    'name': point.name,
    'setting': setting,
    **{f'valid_{m}': summary.get(f'valid_{m}') for m in METRICS},
    'best_epoch': summary.get('best_epoch'),
    'epochs_done': summary.get('epochs_done'),
    'status': sweep.point_result(point)['status'],
    'workdir': point.workdir,
  }
  if summary.get('test_hr') is not None:  # never from this command; a stale folder
    raise UserError(
      f'{point.workdir} holds test metrics, so it was not trained as a search point '
      '(config.test_at_end=False); remove that folder and rerun.'
    )
  return row


class Runner:
  """Trains points (sweep processes) for one comparison: its config, flags and devices."""

  def __init__(self, config, config_file: str, base: dict, workdir: str, envs):
    self.config, self.config_file, self.base = config, config_file, base
    self.workdir, self.envs = os.path.abspath(workdir), envs

  def points(self, overrides: list[dict], folder: str, names: list[str]) -> list[sweep.Point]:
    return sweep.make_points(
      self.config, self.config_file, self.base, overrides, os.path.join(self.workdir, folder),
      names=names,
    )  # fmt: skip

  def run(self, points: list[sweep.Point]) -> None:
    if not sweep.run_points(points, self.envs):
      raise Interrupted(
        'interrupted: the running points saved checkpoints; rerun the same command to continue.'
      )

  def popularity(self, seeds: list[int]) -> list[dict]:
    folder = os.path.join(self.workdir, 'popularity')
    command = (
      [sys.executable, '-m', 'experiments.popularity', f'--config={self.config_file}']
      + [f'--{k}={sweep.format_value(v)}' for k, v in self.base.items()]
      + [f'--seeds={",".join(map(str, seeds))}', f'--workdir={folder}']
    )
    print(f'popularity: scoring seeds {seeds[0]}..{seeds[-1]}', flush=True)
    proc = subprocess.run(command, env=self.envs[0], capture_output=True, text=True, check=False)
    if proc.returncode:
      raise UserError(f'the popularity baseline failed: {proc.stderr.strip()[-600:]}')
    rows = []
    for s in seeds:
      with open(os.path.join(folder, f'seed={s}', 'summary.json')) as f:
        summary = json.load(f)
      rows.append(
        {
          'seed': s,
          **{f'{p}_{m}': summary.get(f'{p}_{m}') for p in ('test', 'valid') for m in METRICS},
          'best_epoch': None,
          'epochs_done': 0,
          'seconds': None,
          'params_hash': None,
          'status': 'done',
          'workdir': os.path.join(folder, f'seed={s}'),
        }
      )
    return rows


# ----------------------------------------------------------------------------------------
# Models.


def resolved(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
  return config_checks.resolve_model_defaults(
    sweep.apply_overrides(config, overrides, 'the compare config')
  )


def shown(config: ml_collections.ConfigDict, name: str) -> dict[str, Any]:
  """The selected hyperparameters of `name` as they were trained."""
  fields = [f for f in SHOWN if not (f == 'model.mlp_layers' and name in ('mf', 'gmf'))]
  fields = [f for f in fields if not (f == 'model.mf_dim' and name == 'mlp')]
  fields = [f for f in fields if not (f == 'model.dropout' and name in ('mf', 'gmf'))]
  out = {}
  for f in fields:
    value = config_paths.get(config, f)
    out[f] = list(value) if isinstance(value, tuple) else value
  return out


class Comparison:
  """The state of one compare command: each model's selected setting and rows."""

  def __init__(self, runner: Runner, seeds: list[int], space):
    self.runner, self.seeds, self.space = runner, seeds, space
    self.selected: dict[str, search.Setting] = {}  # model -> normalised overrides
    self.search_dirs: dict[str, str] = {}  # model -> the selected search point's workdir
    self.trials: dict[str, list[search.Trial]] = {}
    self.rows: dict[str, list[dict]] = {}
    self.configs: dict[str, ml_collections.ConfigDict] = {}

  def model_overrides(self, name: str, seed: int | None) -> dict[str, Any]:
    """What makes the compare config this model (seed: the pre-trained runs' seed; None:
    the selected search points')."""
    if name != 'neumf_pretrained':
      return {'config.model.name': name}
    gmf, mlp = (self.trained_config('gmf'), self.trained_config('mlp'))
    where = {
      m: self.search_dirs[m]
      if seed is None
      else os.path.join(self.runner.workdir, m, f'seed={seed}')
      for m in ('gmf', 'mlp')
    }
    return {
      'config.model.name': 'neumf',
      'config.optimizer': 'sgd',
      'config.learning_rate': search._round(
        PRETRAINED_SGD_RATE_PER_SAMPLE * int(self.runner.config.batch_size)
      ),
      'config.model.mf_dim': int(gmf.model.mf_dim),
      'config.model.mlp_layers': tuple(mlp.model.mlp_layers),
      'config.model.pretrained_gmf': where['gmf'],
      'config.model.pretrained_mlp': where['mlp'],
    }

  def trained_config(self, name: str) -> ml_collections.ConfigDict:
    return resolved(self.runner.config, {**self.model_overrides(name, 0), **self.selected[name]})

  def search_model(self, name: str) -> None:
    axes = self.space(name) if self.space else []
    if not axes:
      self.selected[name], self.trials[name] = {}, []
      return
    base_overrides = self.model_overrides(name, None)
    base = resolved(self.runner.config, base_overrides)
    folder = os.path.join(name, 'search')
    found: dict[str, dict] = {}

    def evaluate(settings: list[search.Setting]) -> list[dict]:
      names = [sweep.point_name(s) for s in settings]
      overrides = [{**base_overrides, **s, 'config.test_at_end': False} for s in settings]
      points = self.runner.points(overrides, folder, names)
      self.runner.run(points)
      rows = [search_row(p, s) for p, s in zip(points, settings)]
      found.update({r['name']: r for r in rows})
      return rows

    print(f'{name}: validated search over {", ".join(a.name for a in axes)}', flush=True)
    try:
      chosen, trials = search.coordinate_search(
        base, axes, evaluate, resolved, str(self.runner.config.select_metric)
      )
    except RuntimeError as e:
      raise UserError(f'{name}: {e}') from None
    self.selected[name], self.trials[name] = chosen, trials
    self.search_dirs[name] = found[sweep.point_name(chosen)]['workdir']
    print(f'{name}: selected {sweep.point_name(chosen)} on validation', flush=True)

  def train_seeds(self, name: str) -> None:
    overrides = [
      {**self.model_overrides(name, s), **self.selected[name], 'config.seed': s} for s in self.seeds
    ]
    points = self.runner.points(overrides, name, [f'seed={s}' for s in self.seeds])
    self.runner.run(points)
    self.rows[name] = [run_row(p) for p in points]
    self.configs[name] = points[0].config

  def run_model(self, name: str) -> None:
    if name == 'popularity':
      self.rows[name] = self.runner.popularity(self.seeds)
      self.selected[name], self.trials[name] = {}, []
      self.configs[name] = self.runner.config
      return
    self.search_model(name)
    self.train_seeds(name)

  def relative(self, row: dict) -> dict:
    """`row` with its workdir relative to the comparison's (results.json moves with it)."""
    return {**row, 'workdir': os.path.relpath(row['workdir'], self.runner.workdir)}

  def model_result(self, name: str) -> dict[str, Any]:
    rows = self.rows[name]
    out: dict[str, Any] = {f'test_{m}': summarize([r[f'test_{m}'] for r in rows]) for m in METRICS}
    out.update({f'valid_{m}': summarize([r[f'valid_{m}'] for r in rows]) for m in METRICS})
    out['selected'] = {} if name == 'popularity' else shown(self.configs[name], name)
    out['selected_overrides'] = {
      k[len(search.PREFIX) :]: _jsonable(v) for k, v in self.selected[name].items()
    }
    out['epochs'] = summarize(
      [r['best_epoch'] + 1 if r['best_epoch'] is not None else None for r in rows]
    )
    out['seconds'] = summarize([r['seconds'] for r in rows])
    out['seeds'] = [self.relative(r) for r in rows]
    out['search'] = [
      {'axis': t.axis, **{k: _jsonable(v) for k, v in self.relative(t.row).items()}}
      for t in self.trials.get(name, [])
    ]
    return out


def _jsonable(value):
  if isinstance(value, tuple):
    return list(value)
  if isinstance(value, dict):
    return {k: _jsonable(v) for k, v in value.items()}
  return value


# ----------------------------------------------------------------------------------------
# Reports.


def _cell(stats: dict) -> str:
  if stats['mean'] is None:
    return sweep.DASH
  if stats['ci95'] is None:
    return f'{stats["mean"]:.4f}'
  lo, hi = stats['ci95']
  return f'{stats["mean"]:.4f} [{lo:.4f}, {hi:.4f}]'


def _std(stats: dict) -> str:
  return sweep.DASH if stats['std'] is None else f'{stats["std"]:.4f}'


def _unprefixed(setting: dict) -> dict:
  return {k.removeprefix(search.PREFIX): v for k, v in setting.items()}


def _setting_text(selected: dict) -> str:
  if not selected:
    return sweep.DASH
  return ', '.join(
    f'{k.removeprefix(search.PREFIX)}={sweep._name_value(v)}' for k, v in selected.items()
  )


def write_reports(result: dict, workdir: str) -> None:
  """results.json, results.csv, results.md and results.png in `workdir`."""
  k = result['top_k']
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(result, f, indent=2, sort_keys=False)
  models = result['models']
  with open(os.path.join(workdir, 'results.csv'), 'w', newline='') as f:
    writer = csv.writer(f)
    header = ['model', 'seeds']
    for m in METRICS:
      header += [f'test_{m}_mean', f'test_{m}_std', f'test_{m}_ci95_lo', f'test_{m}_ci95_hi']
    header += ['valid_hr_mean', 'epochs_mean', 'seconds_mean', 'selected']
    writer.writerow(header)
    for name, r in models.items():
      line = [name, r['test_hr']['n']]
      for m in METRICS:
        s = r[f'test_{m}']
        ci = s['ci95'] or [None, None]
        line += [s['mean'], s['std'], ci[0], ci[1]]
      line += [
        r['valid_hr']['mean'],
        r['epochs']['mean'],
        r['seconds']['mean'],
        json.dumps(r['selected']),
      ]
      writer.writerow(['' if v is None else v for v in line])

  table = sweep.markdown_table(
    ['model', f'test HR@{k} [95 % CI]', 'std', f'test NDCG@{k} [95 % CI]', 'std',
     f'test MRR@{k} [95 % CI]', 'std', f'valid HR@{k}', 'epoch', 's', 'seeds'],
    [
      [name, _cell(r['test_hr']), _std(r['test_hr']), _cell(r['test_ndcg']), _std(r['test_ndcg']),
       _cell(r['test_mrr']), _std(r['test_mrr']), sweep.fmt(r['valid_hr']['mean'], 'metric'),
       sweep.fmt(r['epochs']['mean'], 'epochs'), sweep.fmt(r['seconds']['mean'], 'seconds'),
       str(r['test_hr']['n'])]
      for name, r in models.items()
    ],
    ['l'] + ['r'] * 10,
  )  # fmt: skip
  selected = sweep.markdown_table(
    ['model', 'selected hyperparameters', 'changed by the search'],
    [
      [name, _setting_text(r['selected']), _setting_text(r['selected_overrides'])]
      for name, r in models.items()
      if name != 'popularity'
    ],
    ['l', 'l', 'l'],
  )
  sections = []
  for name, r in models.items():
    if not r['search']:
      continue
    won = r['selected_overrides']
    rows = [
      [t['axis'], _setting_text(t['setting']) if t['setting'] else '(the config)',
       sweep.fmt(t['valid_hr'], 'metric'), sweep.fmt(t['valid_ndcg'], 'metric'),
       sweep.fmt(None if t['best_epoch'] is None else t['best_epoch'] + 1, ''), t['status'],
       '**selected**' if _unprefixed(t['setting']) == won else '']
      for t in r['search']
    ]  # fmt: skip
    sections.append(
      f'### {name}: {len(rows)} search points\n\n'
      + sweep.markdown_table(
        ['axis', 'setting', f'valid HR@{k}', f'valid NDCG@{k}', 'epoch', 'status', ''],
        rows,
        ['l', 'l', 'r', 'r', 'r', 'l', 'l'],
      )
    )
  notes = result['notes']
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write(
      f'# Model comparison: {len(models)} models x {result["num_seeds"]} seeds\n\n'
      f'Command: `{result["command"]}`  \nCommit: `{result["commit"]}`; config '
      f'`{result["config_file"]}`; search: {result["search"]}; selected on validation '
      f'{result["select_metric"].upper()}@{k}.\n\n'
      f'{table}\n'
      'Mean over seeds, with the 95 % interval of the mean (Student\'s t over seeds); std '
      'is the sample standard deviation. `epoch` is the mean selected epoch (counted from '
      '1), `s` the mean training seconds to the end of the run.\n\n'
      f'![test metrics with 95 % intervals](results.png)\n\n## Selected settings\n\n{selected}\n'
      + ('\n' + '\n'.join(notes) + '\n' if notes else '')
      + (
        '\n## Search points (validation only: no search point evaluates the test split)\n\n'
        + '\n'.join(sections)
        if sections
        else ''
      )
    )
  plots.compare_bars(
    [(name, {m: r[f'test_{m}'] for m in METRICS}) for name, r in models.items()],
    os.path.join(workdir, 'results.png'),
    top_k=k,
    title=f'{len(models)} models, {result["num_seeds"]} seeds, test split',
  )


# ----------------------------------------------------------------------------------------
# Command line.


def parse_models(text: Sequence[str]) -> list[str]:
  names = [m.strip() for m in text if m.strip()]
  unknown = [m for m in names if m not in MODELS]
  if unknown or not names:
    raise UserError(
      f'--models={",".join(text)}: unknown model {", ".join(unknown) or "(none given)"}; '
      f'use some of {",".join(MODELS)}.'
    )
  return list(dict.fromkeys(names))


def load_space(arg: str):
  """`default` -> search.default_space; `none` -> None; a .py file -> its get_space."""
  if arg == 'default':
    return search.default_space
  if arg == 'none':
    return None
  if not os.path.isfile(arg):
    raise UserError(f'--search={arg!r}: use default, none, or a file defining get_space(model).')
  get_space = getattr(sweep.load_file(arg, 'search'), 'get_space', None)
  if not callable(get_space):
    raise UserError(f'{arg} has no get_space(model) returning a list of search.Axis.')
  return get_space


def check_config(config, base: dict, config_file: str) -> None:
  for field in ('model.name', 'test_at_end', 'model.pretrained_gmf', 'model.pretrained_mlp'):
    if search.PREFIX + field in base:
      raise UserError(f'--config.{field} is set by the comparison for each model; drop it.')
  if config.validation == 'none':
    raise UserError(
      f'{config_file} has config.validation=none: a comparison selects on a validation '
      'split; pass --config.validation=leave_one_out (configs/ncf_paper.py has one).'
    )
  if int(config.seed) < 0:
    raise UserError('--config.seed=-1: a comparison needs a fixed first seed (e.g. 0).')


def define_flags() -> None:
  from ncf_jax import launch

  launch.define_run_flags()
  flags.DEFINE_list('models', list(MODELS), f'Models to compare, some of {",".join(MODELS)}.')
  flags.DEFINE_integer('num_seeds', 3, 'Seeds config.seed .. config.seed + N - 1 per model.')
  flags.DEFINE_string('search', 'default', 'default, none, or a file defining get_space(model).')
  flags.DEFINE_integer('parallel', 1, 'Runs at once, each on its share of the devices.')


def git_commit() -> str:
  commit, dirty = provenance.git_state()
  return (
    'unknown' if commit is None else commit[:7] + (' (with uncommitted changes)' if dirty else '')
  )


@exit_on_user_error
def main(argv):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  config, config_file, base, workdir = sweep.base_config()
  models = parse_models(FLAGS.models)
  if FLAGS.num_seeds < 1:
    raise UserError(f'--num_seeds={FLAGS.num_seeds}; it must be >= 1.')
  check_config(config, base, config_file)
  commit = git_commit()  # of the code that trains, before anything runs
  space = load_space(FLAGS.search)
  seeds = [int(config.seed) + i for i in range(FLAGS.num_seeds)]
  envs = sweep.prepare_envs(FLAGS.parallel)
  os.makedirs(workdir, exist_ok=True)
  comparison = Comparison(Runner(config, config_file, base, workdir, envs), seeds, space)
  needed = list(models)
  if 'neumf_pretrained' in models:  # its pre-training runs first
    needed = [m for m in MODELS if m in models or m in ('gmf', 'mlp')]
  print(
    f'Comparing {", ".join(models)} over seeds {seeds} in {os.path.abspath(workdir)}', flush=True
  )
  for name in needed:
    comparison.run_model(name)
  notes = []
  extra = [m for m in needed if m not in models]
  if extra:
    notes.append(
      f'{" and ".join(extra)} trained as neumf_pretrained\'s pre-training ({", ".join(os.path.join(workdir, m) for m in extra)}).'
    )
  result = {
    'command': sweep.this_command('experiments.compare'),
    'commit': commit,
    'config_file': config_file,
    'search': FLAGS.search,
    'select_metric': str(config.select_metric),
    'top_k': int(config.top_k),
    'num_seeds': len(seeds),
    'seeds': seeds,
    'notes': notes,
    'models': {name: comparison.model_result(name) for name in models},
  }
  write_reports(result, workdir)
  failed = [
    f'{name} seed {r["seed"]} ({r["status"]})'
    for name in models
    for r in comparison.rows[name]
    if r['status'] != 'done'
  ]
  for name in models:
    s = result['models'][name]['test_hr']
    print(f'{name}: test HR@{result["top_k"]} {_cell(s)} over {s["n"]} seeds', flush=True)
  print(
    f'Wrote {os.path.join(workdir, "results.md")}, results.json, results.csv, results.png.',
    flush=True,
  )
  if failed:
    raise UserError(f'{len(failed)} runs did not finish: {"; ".join(failed)}; see their train.log.')


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=parse_flags)
