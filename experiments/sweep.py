r"""Hyperparameter sweeps: each point of a sweep file trains in its own sub-workdir.

  python -m experiments.sweep --config=configs/default.py \
      --sweep=experiments/sweeps/synthetic_lr.py --workdir=runs/synthetic_lr
  python -m experiments.sweep ... --config.num_epochs=4     # applies to every point
  python -m experiments.sweep ... --parallel=4               # 4 points at once

A sweep file defines `get_sweep()`, a list of {'config.<field>': value} dicts (build them
with experiments/hyper.py). Point i runs

  python -m ncf_jax.train --config=<--config of this command> <its --config.* flags>
      <point i's overrides as --config.* flags> --workdir=WORKDIR/<name>

where <name> is made from the point's overrides (e.g. `learning_rate=0.001,seed=0`), so a
rerun of the same command finds every point's folder again: a finished point (summary.json
present, not preempted, and config.json equal to the point's config) is skipped, an
interrupted one resumes from its checkpoints, and the others start. Then WORKDIR gets
results.csv and results.md (one row per point) and curves.png (HR@K by epoch).

Each point runs in its own process rather than in this one: JAX keeps per-process state
(backends, device memory, compiled programs) that one point would otherwise leave to the
next; a point that fails (NaN loss, out of memory) stops only itself; on TPU the sweep
process must not hold the chips at all; each point leaves a full log (train.log) and the
exact command that reproduces it (command.txt); and `--parallel` needs processes anyway.
The price is a few seconds of start-up per point.

Every point is checked before anything trains: unknown fields, values of the wrong type
and values `ncf_jax.train` would reject stop the sweep with one message.

Ctrl-C (or SIGTERM) is passed on as SIGTERM to the running points, which save a
checkpoint and exit; rerun the same command to continue.
"""

from collections.abc import Sequence
import contextlib
import copy
import csv
import dataclasses
import difflib
import hashlib
import importlib.util
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from typing import Any

from absl import app, flags
import ml_collections
from ml_collections import config_flags

from experiments import plots, search

# Sweeps and seed studies reuse ncf_jax.train's --config (config_flags) and --workdir
# flags (launch.define_run_flags), so `--config.x=y` means exactly what it means for a run.
from ncf_jax import config_checks, config_paths, launch
from ncf_jax.config_paths import MISSING
from ncf_jax.errors import UserError, exit_on_user_error, parse_flags

FLAGS = flags.FLAGS
PREFIX = 'config.'


# ----------------------------------------------------------------------------------------
# Sweep files and points.


def load_file(path: str, flag: str):
  """The Python module of a file named by `--<flag>=path`; a UserError when it fails to load."""
  name = f'_{flag}_' + re.sub(r'\W', '_', os.path.splitext(os.path.basename(path))[0])
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None or spec.loader is None:
    raise UserError(f'--{flag}={path!r} is not a Python file.')
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f'--{flag}={path!r} failed to load: {type(e).__name__}: {e}') from None
  return module


def load_sweep(path: str) -> list[dict[str, Any]]:
  """The points of a sweep file: `get_sweep()`, checked to be a list of config dicts."""
  if not path:
    raise UserError('pass --sweep=experiments/sweeps/<name>.py.')
  if not os.path.isfile(path):
    raise UserError(f'--sweep={path!r}: no such file (sweep files live in experiments/sweeps/).')
  get_sweep = getattr(load_file(path, 'sweep'), 'get_sweep', None)
  if not callable(get_sweep):
    raise UserError(
      f'{path} has no get_sweep(); define one that returns a list of '
      "{'config.<field>': value} dicts (see experiments/hyper.py)."
    )
  try:
    points = get_sweep()
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f'{path}: get_sweep() raised {type(e).__name__}: {e}') from None
  if (
    not isinstance(points, (list, tuple))
    or not points
    or not all(isinstance(p, dict) for p in points)
  ):
    raise UserError(
      f'{path}: get_sweep() must return a non-empty list of dicts, got {type(points).__name__}.'
    )
  for i, point in enumerate(points):
    for key in point:
      if not isinstance(key, str) or not key.startswith(PREFIX) or key == PREFIX:
        raise UserError(
          f'{path}: point {i} has key {key!r}; every key names a config '
          "field and starts with 'config.', e.g. 'config.learning_rate'."
        )
  return [dict(p) for p in points]


def _current_value(config: ml_collections.ConfigDict, field: str, config_arg: str):
  node = config_paths.get(config, field, MISSING)
  if node is MISSING:
    close = difflib.get_close_matches(field, config_paths.leaf_paths(config), n=3)
    hint = f'; did you mean {", ".join(PREFIX + c for c in close)}?' if close else '.'
    raise UserError(f'{PREFIX}{field} is not a field of {config_arg}{hint}')
  if config_paths.is_group(node):
    raise UserError(
      f'{PREFIX}{field} is a group of fields in {config_arg}; set its '
      f'fields (e.g. {PREFIX}{field}.{next(iter(node.keys()), "x")}).'
    )
  return node


def apply_overrides(
  config: ml_collections.ConfigDict, overrides: dict[str, Any], config_arg: str
) -> ml_collections.ConfigDict:
  """A copy of `config` with {'config.a.b': value} applied; UserError on a bad key/value."""
  config = copy.deepcopy(config)
  for key, value in overrides.items():
    field = key[len(PREFIX) :]
    current = _current_value(config, field, config_arg)
    if value is None:
      raise UserError(
        f'{key}=None: None cannot be passed to ncf_jax.train as a '
        'command-line override; leave the field out instead.'
      )
    if current is not None and isinstance(value, bool) != isinstance(current, bool):
      raise UserError(
        f'{key}={value!r} has the wrong type: {config_arg} holds '
        f'{type(current).__name__} {current!r} there.'
      )
    format_value(value)  # raises for types a command line cannot carry
    try:
      config_paths.set_value(config, field, value)
    except (KeyError, TypeError, ValueError) as e:
      raise UserError(f'{key}={value!r} has the wrong type: {e}') from None
  return config


def format_value(value: Any) -> str:
  """A value as `--config.x=<here>` text that config_flags parses back to the same value."""
  if isinstance(value, (bool, int)):
    return str(value)
  if isinstance(value, float):
    return repr(value)
  if isinstance(value, str):
    return value
  if isinstance(value, (tuple, list)) and all(
    isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
  ):
    return repr(tuple(value))
  raise UserError(
    f'sweep value {value!r} ({type(value).__name__}) cannot be passed on a '
    'command line; use numbers, strings, booleans or tuples of numbers.'
  )


def _name_value(value: Any) -> str:
  if isinstance(value, (tuple, list)):
    return '-'.join(_name_value(v) for v in value)
  return repr(value) if isinstance(value, float) else str(value)


def point_name(overrides: dict[str, Any]) -> str:
  """Filesystem-safe folder name from a point's overrides, e.g. 'learning_rate=0.001,seed=0'.

  Keys are sorted, so reordering a sweep file's axes keeps every point's folder.
  """
  text = ','.join(f'{k[len(PREFIX) :]}={_name_value(v)}' for k, v in sorted(overrides.items()))
  name = re.sub(r'[^A-Za-z0-9._=+,-]', '_', text) or 'base'
  if len(name) > 120:  # keep paths short; the hash keeps long names distinct
    name = f'{name[:100]}-{hashlib.sha1(text.encode()).hexdigest()[:8]}'
  return name


@dataclasses.dataclass
class Point:
  """One run of a sweep or seed study."""

  name: str  # sub-workdir name
  overrides: dict[str, Any]  # the point's own {'config.x': value}
  config: ml_collections.ConfigDict  # the base config with every override applied
  workdir: str  # absolute
  command: list[str]  # the ncf_jax.train command line
  returncode: int | None = None  # of this invocation; None: not run now
  seconds: float = 0.0  # wall time of this invocation


def base_overrides() -> dict[str, Any]:
  """The `--config.x=y` flags of this command as {'config.x': parsed value}."""
  values = config_flags.get_override_values(FLAGS['config'])
  return {PREFIX + k: v for k, v in values.items()}


def config_arg() -> str:
  """The `--config` argument as given (with any `:variant`)."""
  return config_flags.get_config_filename(FLAGS['config'])


def make_points(
  config: ml_collections.ConfigDict,
  config_file: str,
  base: dict[str, Any],
  overrides_list: Sequence[dict[str, Any]],
  workdir: str,
  names: Sequence[str] | None = None,
) -> list[Point]:
  """Checks every point (fields, types, train's own checks) before anything trains."""
  workdir = os.path.abspath(workdir)
  points: list[Point] = []
  seen: dict[str, int] = {}  # point name -> index
  for i, overrides in enumerate(overrides_list):
    name = names[i] if names else point_name(overrides)
    if name in seen:
      raise UserError(f'points {seen[name]} and {i} are the same ({name}); remove one.')
    seen[name] = i
    try:
      # Resolved as train resolves it, so is_finished compares the values config.json holds.
      point_config = config_checks.resolve_model_defaults(
        apply_overrides(config, overrides, config_file)
      )
      config_checks.validate_config(point_config, 1)  # device counts are checked by each run
    except UserError as e:
      raise UserError(f'sweep point {i} ({name}): {e}') from None
    flat = {**base, **overrides}  # the point's own values win over this command's
    run_dir = os.path.join(workdir, name)
    command = (
      [sys.executable, '-m', 'ncf_jax.train', f'--config={config_file}']
      + [f'--{k}={format_value(v)}' for k, v in flat.items()]
      + [f'--workdir={run_dir}']
    )
    points.append(Point(name, dict(overrides), point_config, run_dir, command))
  return points


# ----------------------------------------------------------------------------------------
# Reading runs back.


def _read_json(path: str) -> dict | None:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def read_history(workdir: str) -> list[dict]:
  """The per-epoch records of a run (metrics.jsonl); [] when there are none."""
  try:
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      return [json.loads(line) for line in f if line.strip()]
  except (OSError, ValueError):
    return []


def read_summary(workdir: str) -> dict | None:
  return _read_json(os.path.join(workdir, 'summary.json'))


def is_finished(point: Point) -> bool:
  """summary.json present and not preempted, from a run of exactly this point's config."""
  summary = read_summary(point.workdir)
  saved = _read_json(os.path.join(point.workdir, 'config.json'))
  if not summary or summary.get('preempted') or saved is None:
    return False
  expected = config_paths.to_json_dict(point.config)
  # Extra keys a run records besides its config (e.g. resolved_seed) do not count.
  return {k: saved.get(k) for k in expected} == expected


def steady_samples_per_sec(history: list[dict]) -> float | None:
  """Median train samples/s over the epochs after the first (which includes compiling)."""
  rates = [r.get('train_samples_per_sec') for r in history]
  later = [x for x in rates[1:] if x]
  rates = later or [x for x in rates if x]
  return statistics.median(rates) if rates else None


def point_result(point: Point) -> dict[str, Any]:
  """One results row: the run's summary and curve, and its status in this invocation."""
  summary = read_summary(point.workdir) or {}
  history = read_history(point.workdir)
  if point.returncode not in (None, 0):
    status = f'failed (exit {point.returncode})'
  elif summary and not summary.get('preempted'):
    status = 'done'
  elif summary or history:
    status = 'interrupted'
  else:
    status = 'not run'
  final = summary.get('final') or (history[-1] if history else {})

  def max_over_epochs(key):
    if summary:
      return summary.get(f'test_{key}_max_over_epochs')
    return max([r[key] for r in history if r.get(key) is not None], default=None)

  return {
    'name': point.name,
    'overrides': point.overrides,
    'status': status,
    'epochs_done': summary.get('epochs_done', len(history) or None),
    # The selected epoch (validation runs), its validation HR and the run's test HR.
    'best_epoch': summary.get('best_epoch'),
    'valid_hr': summary.get('valid_hr'),
    'valid_ndcg': summary.get('valid_ndcg'),
    'test_hr': summary.get('test_hr'),
    # The test maximum over epochs (runs without validation): not a selected result.
    'test_hr_max_over_epochs': max_over_epochs('hr'),
    'test_ndcg_max_over_epochs': max_over_epochs('ndcg'),
    'final_hr': final.get('hr'),
    'epochs_to_target': summary.get('epochs_to_target'),
    'seconds_to_target': summary.get('seconds_to_target'),
    'samples_per_sec': steady_samples_per_sec(history),
    'params_hash': summary.get('params_hash'),
    'workdir': point.workdir,
    'history': history,
  }


def failure_reason(point: Point) -> str:
  """The run's own one-line error (`error: ...`), else the last line of its log."""
  try:
    with open(os.path.join(point.workdir, 'train.log'), errors='replace') as f:
      lines = [line.strip() for line in f.readlines()[-200:] if line.strip()]
  except OSError:
    return 'no train.log'
  errors = [line for line in lines if line.startswith('error:')]
  exceptions = [
    line
    for line in lines  # e.g. 'TypeError: ...' ending a traceback
    if re.match(r'[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b', line)
  ]
  return (errors or exceptions or lines or ['empty train.log'])[-1][:400]


# ----------------------------------------------------------------------------------------
# Devices and processes.

_PROBE = (
  'import json, jax; d = jax.local_devices(); print(json.dumps({"platform": '
  'd[0].platform, "count": len(d), "chips": len({tuple(getattr(x, "coords", '
  '(x.id,))) for x in d})}))'
)
_TPU_BOUNDS = {1: '1,1,1', 2: '1,2,1', 4: '2,2,1'}  # chips per process -> bounds
_COUNT_FLAG = re.compile(r'--xla_force_host_platform_device_count=\d+')


def probe_devices(env: dict[str, str]) -> dict[str, Any]:
  """Platform and device/chip counts, asked of a short-lived process (which then lets go
  of the devices: the sweep process itself never starts a JAX backend)."""
  proc = subprocess.run(
    [sys.executable, '-c', _PROBE], env=env, capture_output=True, text=True, check=False
  )
  if proc.returncode:
    raise UserError(f'could not list the JAX devices: {proc.stderr.strip()[-500:]}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


def slice_envs(devices: dict[str, Any], parallel: int, env: dict[str, str]) -> list[dict[str, str]]:
  """One environment per concurrent point, each seeing its own share of the devices.

  GPU: CUDA_VISIBLE_DEVICES. TPU: TPU_VISIBLE_CHIPS (and the older TPU_VISIBLE_DEVICES)
  with TPU_CHIPS_PER_PROCESS_BOUNDS / TPU_PROCESS_BOUNDS for 1, 2 or 4 chips and a mesh
  controller port per process. CPU: --xla_force_host_platform_device_count=<share>.
  """
  if parallel <= 1:
    return [dict(env)]
  platform, count = devices['platform'], int(devices['count'])
  envs = []
  if platform == 'gpu':
    visible = env.get('CUDA_VISIBLE_DEVICES')
    ids = visible.split(',') if visible else [str(i) for i in range(count)]
    per = len(ids) // parallel
    if per < 1:
      raise UserError(f'--parallel={parallel} needs at least {parallel} GPUs; found {len(ids)}.')
    for i in range(parallel):
      envs.append({**env, 'CUDA_VISIBLE_DEVICES': ','.join(ids[i * per : (i + 1) * per])})
  elif platform == 'tpu':
    chips = int(devices['chips'])
    per = chips // parallel
    if per not in _TPU_BOUNDS:
      raise UserError(
        f'--parallel={parallel} on {chips} TPU chips gives {per} chips a '
        f'point; use a --parallel that gives 1, 2 or 4 chips each.'
      )
    for i in range(parallel):
      chip_ids = ','.join(str(c) for c in range(i * per, (i + 1) * per))
      port = str(8476 + i)
      envs.append(
        {
          **env,
          'TPU_VISIBLE_CHIPS': chip_ids,
          'TPU_VISIBLE_DEVICES': chip_ids,
          'TPU_CHIPS_PER_PROCESS_BOUNDS': _TPU_BOUNDS[per],
          'TPU_PROCESS_BOUNDS': '1,1,1',
          'TPU_MESH_CONTROLLER_PORT': port,
          'TPU_MESH_CONTROLLER_ADDRESS': f'localhost:{port}',
        }
      )
  else:
    per = max(1, count // parallel)
    flags_now = _COUNT_FLAG.sub('', env.get('XLA_FLAGS', '')).strip()
    xla = f'{flags_now} --xla_force_host_platform_device_count={per}'.strip()
    envs = [{**env, 'XLA_FLAGS': xla} for _ in range(parallel)]
  return envs


def _say(text: str) -> None:
  print(text, flush=True)


def run_points(points: Sequence[Point], envs: Sequence[dict[str, str]]) -> bool:
  """Runs the points not yet finished, len(envs) at a time; returns False if interrupted.

  Each point's output goes to WORKDIR/<name>/train.log; its command to command.txt.
  """
  total = len(points)
  pending = []
  for i, point in enumerate(points):
    if is_finished(point):
      _say(f'[{i + 1}/{total}] {point.name}: finished earlier, skipped')
    else:
      pending.append((i, point))
  free = list(range(len(envs)))
  # slot -> (index, point, process, log file, start time)
  running: dict[int, tuple[int, Point, subprocess.Popen, Any, float]] = {}
  stop = {'signals': 0}

  def handle(signum, frame):
    del signum, frame
    stop['signals'] += 1
    for _, _, proc, _, _ in running.values():
      proc.send_signal(signal.SIGTERM if stop['signals'] == 1 else signal.SIGKILL)

  previous = {}
  for sig in (signal.SIGINT, signal.SIGTERM):
    with contextlib.suppress(ValueError):  # not the main thread: no handler
      previous[sig] = signal.signal(sig, handle)
  try:
    while pending or running:
      while pending and free and not stop['signals']:
        i, point = pending.pop(0)
        slot = free.pop(0)
        os.makedirs(point.workdir, exist_ok=True)
        text = shlex.join(point.command)
        with open(os.path.join(point.workdir, 'command.txt'), 'w') as f:
          f.write(text + '\n')
        log = open(os.path.join(point.workdir, 'train.log'), 'a')  # noqa: SIM115 (closed when the run ends)
        log.write(f'\n# {time.strftime("%Y-%m-%d %H:%M:%S")} {text}\n')
        log.flush()
        # A new session: a terminal's Ctrl-C reaches only this process, which then
        # asks each run to checkpoint and stop (SIGTERM).
        proc = subprocess.Popen(
          point.command,
          env=envs[slot],
          stdout=log,
          stderr=subprocess.STDOUT,
          start_new_session=True,
        )
        running[slot] = (i, point, proc, log, time.time())
        _say(
          f'[{i + 1}/{total}] {point.name}: started' + (f' (slot {slot})' if len(envs) > 1 else '')
        )
      if not running:
        break
      time.sleep(0.2)
      for slot, (i, point, proc, log, start) in list(running.items()):
        if proc.poll() is None:
          continue
        log.close()
        del running[slot]
        free.append(slot)
        point.returncode, point.seconds = proc.returncode, time.time() - start
        summary = read_summary(point.workdir) or {}
        if proc.returncode == 0 and not summary.get('preempted'):
          _say(
            f'[{i + 1}/{total}] {point.name}: done in {point.seconds:.1f} s, '
            f'{result_line(summary)} after {summary.get("epochs_done")} epochs'
          )
        elif proc.returncode == 0:
          _say(f'[{i + 1}/{total}] {point.name}: stopped, checkpoint saved')
        else:
          _say(
            f'[{i + 1}/{total}] {point.name}: FAILED (exit {proc.returncode}): '
            f'{failure_reason(point)}  [log: {point.workdir}/train.log]'
          )
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
  return not stop['signals']


def result_line(summary: dict) -> str:
  """What a finished run reports: its selected test HR, or the test maximum over epochs."""
  if summary.get('best_epoch') is not None and summary.get('test_hr') is None:
    return (
      f'valid HR {summary.get("valid_hr") or float("nan"):.4f} (epoch '
      f'{summary["best_epoch"]}, test not evaluated)'
    )
  if summary.get('best_epoch') is not None:
    return (
      f'test HR {summary.get("test_hr") or float("nan"):.4f} (epoch '
      f'{summary["best_epoch"]}, selected on validation)'
    )
  value = summary.get('test_hr_max_over_epochs')
  return f'max test HR over epochs {float("nan") if value is None else value:.4f}'


def prepare_envs(parallel: int) -> list[dict[str, str]]:
  if parallel < 1:
    raise UserError(f'--parallel={parallel}; it must be >= 1.')
  env = dict(os.environ)
  if parallel == 1:
    return [env]
  return slice_envs(probe_devices(env), parallel, env)


# ----------------------------------------------------------------------------------------
# Reports.

DASH = '—'


def fmt(value: Any, kind: str) -> str:
  """Markdown cell text; missing values are an em dash."""
  if value is None:
    return DASH
  if kind == 'metric':
    return f'{value:.4f}'
  if kind == 'seconds':
    return f'{value:.1f}'
  if kind == 'rate':
    return f'{value:,.0f}'
  if kind == 'epochs':  # a mean of epoch counts
    return f'{value:.2f}' if value != int(value) else str(int(value))
  return str(value)


def varying_keys(points: Sequence[Point]) -> list[str]:
  """Override keys whose value differs between points (all keys if none differ)."""
  keys = []
  for p in points:
    keys += [k for k in p.overrides if k not in keys]
  varying = [k for k in keys if len({repr(p.overrides.get(k)) for p in points}) > 1]
  return varying or keys


def markdown_table(
  header: Sequence[str], rows: Sequence[Sequence[str]], align: Sequence[str]
) -> str:
  lines = [
    '| ' + ' | '.join(header) + ' |',
    '|' + '|'.join('---:' if a == 'r' else ':---' for a in align) + '|',
  ]
  lines += ['| ' + ' | '.join(r) + ' |' for r in rows]
  return '\n'.join(lines) + '\n'


def write_results(
  points: Sequence[Point],
  workdir: str,
  *,
  title: str,
  preamble: str,
  selected: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
  """results.csv, results.md and curves.png in `workdir`; returns the rows.

  `selected` (a `--select` sweep): the points ran without the test split; the table shows
  their validation metrics and marks the winner, whose test metrics `selected` holds.
  """
  results = [point_result(p) for p in points]
  for r in results:
    r['selected'] = selected is not None and r['name'] == selected['name']
  keys = []
  for p in points:
    keys += [k for k in p.overrides if k not in keys]
  columns = [
    'epochs_done',
    'best_epoch',
    'valid_hr',
    'test_hr',
    'test_hr_max_over_epochs',
    'test_ndcg_max_over_epochs',
    'final_hr',
    'epochs_to_target',
    'seconds_to_target',
    'samples_per_sec',
    'params_hash',
    'status',
  ]
  if selected is not None:  # the search points' test metrics were never computed
    columns = ['valid_ndcg', 'selected'] + [c for c in columns if c != 'test_hr']
  with open(os.path.join(workdir, 'results.csv'), 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['name'] + keys + columns)
    for r in results:
      writer.writerow(
        [r['name']]
        + [format_value(r['overrides'][k]) if k in r['overrides'] else '' for k in keys]
        + ['' if r[c] is None else r[c] for c in columns]
      )

  config = points[0].config
  top_k = int(config.top_k)
  validated = config.validation != 'none'
  shown = varying_keys(points)
  # A `--select` sweep reports validation metrics and marks the winner (its points never
  # read the test split); another validated sweep each point's selected epoch and its test
  # HR; otherwise the test maximum over epochs, named so that nobody takes it for a
  # selected result.
  if selected is not None:
    metric_header = ['best epoch', f'valid HR@{top_k}', f'valid NDCG@{top_k}', 'selected']
    metric_cells = lambda r: [  # noqa: E731
      fmt(r['best_epoch'], ''),
      fmt(r['valid_hr'], 'metric'),
      fmt(r['valid_ndcg'], 'metric'),
      '**selected**' if r['selected'] else '',
    ]
  elif validated:
    metric_header = ['best epoch', f'valid HR@{top_k}', f'test HR@{top_k}']
    metric_cells = lambda r: [  # noqa: E731
      fmt(r['best_epoch'], ''),
      fmt(r['valid_hr'], 'metric'),
      fmt(r['test_hr'], 'metric'),
    ]
  else:
    metric_header = [f'max test HR@{top_k} over epochs', f'max test NDCG@{top_k} over epochs']
    metric_cells = lambda r: [  # noqa: E731
      fmt(r['test_hr_max_over_epochs'], 'metric'),
      fmt(r['test_ndcg_max_over_epochs'], 'metric'),
    ]
  header = (
    [k[len(PREFIX) :] for k in shown]
    + metric_header
    + ['epochs', 'epochs to target', 's to target', 'train samples/s', 'status']
  )
  rows = []
  for r in results:
    rows.append(
      [_name_value(r['overrides'][k]) if k in r['overrides'] else DASH for k in shown]
      + metric_cells(r)
      + [
        fmt(r['epochs_done'], ''),
        fmt(r['epochs_to_target'], ''),
        fmt(r['seconds_to_target'], 'seconds'),
        fmt(r['samples_per_sec'], 'rate'),
        r['status'],
      ]
    )
  table = markdown_table(header, rows, ['r'] * (len(header) - 1) + ['l'])
  notes = (
    f'Target: HR@{top_k} >= {config.hr_threshold} (config.hr_threshold)'
    if config.hr_threshold is not None
    else 'No target (config.hr_threshold is None): epochs/s to target are empty'
  )
  notes += (
    '; train samples/s is the median over epochs after the first (the first includes compilation).'
  )
  if selected is not None:
    preamble += '\n\n' + selected_line(selected, top_k)
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write(f'# {title}\n\n{preamble}\n\n{table}\n{notes}\n\n![HR curves](curves.png)\n')

  curves, styles = [], []
  colour_keys, dash_keys = (shown[:-1], shown[-1:]) if len(shown) > 1 else (shown, [])
  groups: dict[str, dict[str, int]] = {'colour': {}, 'dash': {}}
  for r in results:
    colour = repr([r['overrides'].get(k) for k in colour_keys])
    dash = repr([r['overrides'].get(k) for k in dash_keys])
    styles.append(
      (
        groups['colour'].setdefault(colour, len(groups['colour'])),
        groups['dash'].setdefault(dash, len(groups['dash'])),
      )
    )
    label = (
      ', '.join(
        f'{k[len(PREFIX) :]}={_name_value(r["overrides"][k])}' for k in shown if k in r['overrides']
      )
      or r['name']
    )
    epochs = [h['epoch'] + 1 for h in r['history']]
    curves.append(
      (
        label,
        epochs,
        [h.get('valid_hr' if validated else 'hr') for h in r['history']],
        [h.get('train_loss') for h in r['history']],
      )
    )
  # Colour by every varying key but the last (e.g. the learning rate), line style by the
  # last (e.g. the seed), so that the repeats of a setting share a colour.
  plots.hr_curves(
    curves,
    os.path.join(workdir, 'curves.png'),
    top_k=top_k,
    hr_threshold=config.hr_threshold,
    title=title,
    styles=styles,
  )
  return results


def selected_line(selected: dict[str, Any], top_k: int) -> str:
  """The result of a `--select` sweep, as results.md states it."""
  m = selected['select_metric']
  return (
    f'**Selected on validation {m.upper()}@{top_k}: `{selected["name"]}`** (valid '
    f'{m.upper()}@{top_k} {selected[f"valid_{m}"]:.4f}, epoch {selected["best_epoch"] + 1}). '
    f'Its test split, evaluated once after the selection: HR@{top_k} {selected["test_hr"]:.4f}, '
    f'NDCG@{top_k} {selected["test_ndcg"]:.4f}, MRR@{top_k} {selected["test_mrr"]:.4f}. '
    'No other point evaluated the test split (config.test_at_end=False).'
  )


def evaluate_selected(point: Point, select_metric: str, env: dict[str, str]) -> dict[str, Any]:
  """Tests the selected point's selected epoch (`ncf_jax.evaluate --best --split=test`,
  read-only) and records it in WORKDIR/selected.json."""
  proc = subprocess.run(
    [sys.executable, '-m', 'ncf_jax.evaluate', f'--workdir={point.workdir}', '--best',
     '--split=test'],
    env=env, capture_output=True, text=True, check=False,
  )  # fmt: skip
  if proc.returncode:
    raise UserError(f'testing the selected point {point.name} failed: {proc.stderr.strip()[-500:]}')
  test = json.loads(proc.stdout.strip().splitlines()[-1])
  row = point_result(point)
  selected = {
    'name': point.name,
    'overrides': point.overrides,
    'select_metric': select_metric,
    'best_epoch': row['best_epoch'],
    'valid_hr': row['valid_hr'],
    'valid_ndcg': row['valid_ndcg'],
    **{f'test_{k}': test[k] for k in ('hr', 'ndcg', 'mrr')},
    'test_step': test['step'],
    'workdir': point.workdir,
  }
  with open(os.path.join(os.path.dirname(point.workdir), 'selected.json'), 'w') as f:
    json.dump(selected, f, indent=2, default=list)
  return selected


def this_command(module: str) -> str:
  return shlex.join(['python', '-m', module] + sys.argv[1:])


def base_config() -> tuple[ml_collections.ConfigDict, str, dict[str, Any], str]:
  """(config, --config argument, this command's --config.* overrides, --workdir)."""
  if not FLAGS.workdir:
    raise UserError('pass --workdir=DIR: every run gets a sub-folder of it.')
  return FLAGS.config, config_arg(), base_overrides(), FLAGS.workdir


# ----------------------------------------------------------------------------------------
# Command line.


def define_flags() -> None:
  launch.define_run_flags()  # --config and --workdir mean what they mean for a train run
  flags.DEFINE_string('sweep', None, 'Sweep file defining get_sweep().')
  flags.DEFINE_integer('parallel', 1, 'Points run at once, each on its share of the devices.')
  flags.DEFINE_bool(
    'select',
    False,
    'Validated search: the points run without the test split (config.test_at_end=False), '
    'the best by validation config.select_metric is selected and only it is tested.',
  )


def select_points(config, base: dict[str, Any], overrides_list: list[dict]) -> list[dict]:
  """The overrides a `--select` sweep runs: each point's own, with the test split off."""
  if config.validation == 'none':
    raise UserError(
      '--select chooses on a validation split, and the config has config.validation=none; '
      'pass --config.validation=leave_one_out.'
    )
  if PREFIX + 'test_at_end' in base or any(PREFIX + 'test_at_end' in o for o in overrides_list):
    raise UserError('--select sets config.test_at_end=False for every point; drop that field.')
  return [{**o, PREFIX + 'test_at_end': False} for o in overrides_list]


@exit_on_user_error
def main(argv):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  config, config_file, base, workdir = base_config()
  overrides_list = load_sweep(FLAGS.sweep)
  if FLAGS.select:
    names = [point_name(o) for o in overrides_list]
    run_list = select_points(config, base, overrides_list)
    points = make_points(config, config_file, base, run_list, workdir, names=names)
    for point, own in zip(points, overrides_list):
      point.overrides = own  # the table shows the sweep file's values
  else:
    points = make_points(config, config_file, base, overrides_list, workdir)
  envs = prepare_envs(FLAGS.parallel)
  os.makedirs(workdir, exist_ok=True)
  _say(f'Sweep {FLAGS.sweep}: {len(points)} points in {os.path.abspath(workdir)}')
  completed = run_points(points, envs)
  sweep_name = os.path.splitext(os.path.basename(FLAGS.sweep))[0]
  preamble = (
    f'Sweep `{FLAGS.sweep}` on `{config_file}`, {len(points)} points.\n\n'
    f'Command: `{this_command("experiments.sweep")}`'
  )
  selected = None
  if FLAGS.select and completed:
    won = search.select([point_result(p) for p in points], str(config.select_metric))
    if won is None:
      raise UserError(
        'no point of the sweep finished, so none can be selected; see their train.log.'
      )
    selected = evaluate_selected(points[won], str(config.select_metric), envs[0])
    _say(selected_line(selected, int(config.top_k)).replace('**', '').replace('`', ''))
  results = write_results(
    points, workdir, title=f'Sweep {sweep_name}', preamble=preamble, selected=selected
  )
  _say(f'Wrote {os.path.join(workdir, "results.md")}, results.csv and curves.png.')
  if not completed:
    raise UserError(
      'interrupted: the running points saved checkpoints; rerun the same command to continue.'
    )
  failed = [p for p, r in zip(points, results) if r['status'].startswith('failed')]
  if failed:
    raise UserError(
      f'{len(failed)} of {len(points)} points failed: '
      + '; '.join(f'{p.name} ({failure_reason(p)})' for p in failed)
      + '. Their logs: <point>/train.log.'
    )


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=parse_flags)
