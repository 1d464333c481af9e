"""Tests of experiments/: sweeps, seed studies and the benchmark report, run as a user would.

The commands run in subprocesses on tiny synthetic data (one training process at a time);
the pure pieces (hyper, point names, device slices, the MLPerf summary, the report table)
are tested in-process on hand-made inputs.
"""

import csv
import json
import os
import re
import subprocess
import sys

import pytest

from experiments import bench_report, hyper, seeds, sweep
from ncf_jax import config_paths
from ncf_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
TINY = (
  '--config.dataset.synthetic_num_users=300',
  '--config.dataset.synthetic_num_items=200',
  '--config.dataset.synthetic_mean_interactions=30',
  '--config.num_epochs=2',
  '--config.batch_size=1024',
  '--config.eval_batch_size=128',
  '--config.eval_num_neg=50',
)
PNG = b'\x89PNG\r\n\x1a\n'


def run(module, *args, timeout=300):
  """Runs `python -m module args` from the repository root on one CPU device.

  XLA optimisations are off in the runs (about half the time of a tiny run is compiling).
  """
  xla = re.sub(
    r'--xla_force_host_platform_device_count=\d+', '', os.environ.get('XLA_FLAGS', '')
  ).strip()
  env = {
    **os.environ,
    'XLA_FLAGS': xla,
    'JAX_PLATFORMS': 'cpu',
    'JAX_DISABLE_MOST_OPTIMIZATIONS': '1',
  }
  proc = subprocess.run(
    [PYTHON, '-m', module, *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
    check=False,
  )
  return proc.returncode, proc.stdout, proc.stderr


def write(path, text):
  with open(path, 'w') as f:
    f.write(text)
  return str(path)


def read_csv(path):
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


def read_json(path):
  with open(path) as f:
    return json.load(f)


# ----------------------------------------------------------------------------------------
# hyper and points.


def test_hyper_product_varies_the_last_axis_fastest_and_zipit_pairs_axes():
  points = hyper.product(
    [
      hyper.sweep('config.a', [1, 2]),
      hyper.sweep('config.b', ['x', 'y']),
      hyper.fixed('config.c', 0),
    ]
  )
  assert points == [
    {'config.a': 1, 'config.b': 'x', 'config.c': 0},
    {'config.a': 1, 'config.b': 'y', 'config.c': 0},
    {'config.a': 2, 'config.b': 'x', 'config.c': 0},
    {'config.a': 2, 'config.b': 'y', 'config.c': 0},
  ]
  assert hyper.zipit([hyper.sweep('config.a', [1, 2]), hyper.sweep('config.b', [3, 4])]) == [
    {'config.a': 1, 'config.b': 3},
    {'config.a': 2, 'config.b': 4},
  ]
  with pytest.raises(ValueError):
    hyper.zipit([hyper.sweep('config.a', [1, 2]), hyper.sweep('config.b', [3])])
  with pytest.raises(ValueError):
    hyper.product([hyper.sweep('config.a', [1]), hyper.sweep('config.a', [2])])


def test_point_names_are_filesystem_safe_sorted_and_short():
  assert sweep.point_name({'config.seed': 0, 'config.learning_rate': 0.0005}) == (
    'learning_rate=0.0005,seed=0'
  )
  assert sweep.point_name({'config.model.mlp_layers': (64, 32)}) == 'model.mlp_layers=64-32'
  assert sweep.point_name({'config.dataset.data_dir': '/a b/c'}) == 'dataset.data_dir=_a_b_c'
  long_a = sweep.point_name({'config.dataset.data_dir': 'x' * 200 + 'a'})
  long_b = sweep.point_name({'config.dataset.data_dir': 'x' * 200 + 'b'})
  assert len(long_a) <= 120 and long_a != long_b


def test_points_carry_base_flags_then_their_own_overrides_as_train_flags():
  from configs import default

  config = default.get_config()
  config.lock()
  points = sweep.make_points(
    config,
    'configs/default.py',
    {'config.num_epochs': 3, 'config.learning_rate': 0.1},
    [{'config.learning_rate': 0.0005, 'config.model.mlp_layers': (32, 16)}],
    '/tmp/sw',
  )
  command = points[0].command
  assert command[1:4] == ['-m', 'ncf_jax.train', '--config=configs/default.py']
  assert command[-1] == '--workdir=/tmp/sw/learning_rate=0.0005,model.mlp_layers=32-16'
  assert '--config.num_epochs=3' in command
  assert '--config.model.mlp_layers=(32, 16)' in command
  lr_flags = [c for c in command if c.startswith('--config.learning_rate=')]
  assert lr_flags == ['--config.learning_rate=0.0005']  # the point's value wins
  assert points[0].config.model.mlp_layers == (32, 16)


@pytest.mark.parametrize(
  'body, message',
  [
    ('x = 1', 'has no get_sweep()'),
    ('def get_sweep(): return []', 'non-empty list'),
    ("def get_sweep(): return [{'learning_rate': 1.0}]", "starts with 'config.'"),
    (
      "def get_sweep(): return [{'config.learning_rat': 1.0}]",
      'config.learning_rat is not a field of configs/default.py; did you mean '
      'config.learning_rate?',
    ),
    ("def get_sweep(): return [{'config.seed': 'one'}]", 'wrong type'),
    (
      "def get_sweep(): return [{'config.learning_rate': -1.0}]",
      'config.learning_rate=-1.0 is invalid',
    ),
    ("def get_sweep(): return [{'config.seed': 0}, {'config.seed': 0}]", 'are the same'),
    ("def get_sweep(): return [{'config.model': 3}]", 'is a group of fields'),
  ],
)
def test_bad_sweep_points_raise_user_errors(tmp_path, body, message):
  from configs import default

  config = default.get_config()
  config.lock()
  path = write(tmp_path / 'bad.py', body + '\n')
  with pytest.raises(UserError, match=re.escape(message)):
    sweep.make_points(
      config, 'configs/default.py', {}, sweep.load_sweep(path), str(tmp_path / 'wd')
    )


def test_unknown_sweep_file_or_field_exits_with_one_line_before_training(tmp_path):
  bad = write(tmp_path / 'bad.py', "def get_sweep(): return [{'config.nope': 1}]\n")
  workdir = tmp_path / 'wd'
  for args, message in [
    ((f'--sweep={bad}',), 'config.nope is not a field'),
    ((f'--sweep={tmp_path}/missing.py',), 'no such file'),
    (
      ('--sweep=experiments/sweeps/synthetic_lr.py', '--config.model.nope=1'),
      '--config.model.nope=1',
    ),
  ]:
    rc, out, err = run(
      'experiments.sweep', '--config=configs/default.py', *args, f'--workdir={workdir}'
    )
    assert rc == 2, (out, err)
    assert message in err and 'Traceback' not in err, err
    assert not workdir.exists()


def test_device_slices_split_gpus_tpu_chips_and_cpu_devices():
  gpu = sweep.slice_envs({'platform': 'gpu', 'count': 4, 'chips': 4}, 2, {'A': '1'})
  assert [e['CUDA_VISIBLE_DEVICES'] for e in gpu] == ['0,1', '2,3'] and gpu[0]['A'] == '1'
  gpu = sweep.slice_envs(
    {'platform': 'gpu', 'count': 2, 'chips': 2}, 2, {'CUDA_VISIBLE_DEVICES': '5,7'}
  )
  assert [e['CUDA_VISIBLE_DEVICES'] for e in gpu] == ['5', '7']
  tpu = sweep.slice_envs({'platform': 'tpu', 'count': 8, 'chips': 4}, 4, {})
  assert [e['TPU_VISIBLE_CHIPS'] for e in tpu] == ['0', '1', '2', '3']
  assert {e['TPU_CHIPS_PER_PROCESS_BOUNDS'] for e in tpu} == {'1,1,1'}
  assert {e['TPU_PROCESS_BOUNDS'] for e in tpu} == {'1,1,1'}
  assert len({e['TPU_MESH_CONTROLLER_PORT'] for e in tpu}) == 4
  tpu = sweep.slice_envs({'platform': 'tpu', 'count': 4, 'chips': 4}, 2, {})
  assert [e['TPU_VISIBLE_CHIPS'] for e in tpu] == ['0,1', '2,3']
  assert tpu[0]['TPU_CHIPS_PER_PROCESS_BOUNDS'] == '1,2,1'
  cpu = sweep.slice_envs(
    {'platform': 'cpu', 'count': 8, 'chips': 8},
    2,
    {'XLA_FLAGS': '--xla_force_host_platform_device_count=8 --x=1'},
  )
  assert [e['XLA_FLAGS'] for e in cpu] == ['--x=1 --xla_force_host_platform_device_count=4'] * 2
  with pytest.raises(UserError):  # 0 chips a point
    sweep.slice_envs({'platform': 'tpu', 'count': 4, 'chips': 4}, 5, {})
  with pytest.raises(UserError):  # 3 chips a point: no bounds for that
    sweep.slice_envs({'platform': 'tpu', 'count': 6, 'chips': 6}, 2, {})
  with pytest.raises(UserError):
    sweep.slice_envs({'platform': 'gpu', 'count': 1, 'chips': 1}, 2, {})
  assert sweep.slice_envs({'platform': 'gpu', 'count': 8}, 1, {'A': '1'}) == [{'A': '1'}]


# ----------------------------------------------------------------------------------------
# A two-point sweep, run once for the tests below.


@pytest.fixture(scope='module')
def tiny_sweep(tmp_path_factory):
  root = tmp_path_factory.mktemp('sweep')
  sweep_file = write(
    root / 'two_lrs.py',
    (
      'from experiments import hyper\n\n\ndef get_sweep():\n'
      "  return hyper.sweep('config.learning_rate', [0.001, 0.004])\n"
    ),
  )
  args = (
    '--config=configs/default.py',
    f'--sweep={sweep_file}',
    f'--workdir={root}/wd',
    f'--config.dataset.data_dir={root}/data',
    *TINY,
  )
  rc, out, err = run('experiments.sweep', *args)
  assert rc == 0, err[-3000:]
  return {
    'workdir': str(root / 'wd'),
    'args': args,
    'stdout': out,
    'names': ['learning_rate=0.001', 'learning_rate=0.004'],
  }


def test_sweep_writes_a_row_per_point_matching_its_run_and_a_plot(tiny_sweep):
  workdir = tiny_sweep['workdir']
  rows = read_csv(os.path.join(workdir, 'results.csv'))
  assert [r['name'] for r in rows] == tiny_sweep['names']
  assert [r['config.learning_rate'] for r in rows] == ['0.001', '0.004']
  with open(os.path.join(workdir, 'results.md')) as f:
    markdown = f.read()
  for row, name in zip(rows, tiny_sweep['names']):
    summary = read_json(os.path.join(workdir, name, 'summary.json'))
    assert row['status'] == 'done'
    assert float(row['test_hr_max_over_epochs']) == pytest.approx(
      summary['test_hr_max_over_epochs']
    )
    assert float(row['test_ndcg_max_over_epochs']) == pytest.approx(
      summary['test_ndcg_max_over_epochs']
    )
    assert float(row['test_hr']) == pytest.approx(summary['test_hr'])
    assert row['best_epoch'] == '' and 'best_hr' not in row
    assert int(row['epochs_done']) == summary['epochs_done'] == 2
    assert row['params_hash'] == summary['params_hash']
    assert float(row['samples_per_sec']) > 0
    lr = name.split('=')[1]
    assert re.search(
      rf'\| {lr} \| {summary["test_hr_max_over_epochs"]:.4f} '
      rf'\| {summary["test_ndcg_max_over_epochs"]:.4f} '
      r'\| 2 \| — \| — \|',
      markdown,
    ), markdown
  with open(os.path.join(workdir, 'curves.png'), 'rb') as f:
    assert f.read(8) == PNG


def test_sweep_flags_reach_every_point(tiny_sweep):
  for name, lr in zip(tiny_sweep['names'], [0.001, 0.004]):
    config = read_json(os.path.join(tiny_sweep['workdir'], name, 'config.json'))
    assert config['learning_rate'] == lr
    assert config['dataset']['synthetic_num_users'] == 300 and config['num_epochs'] == 2
    with open(os.path.join(tiny_sweep['workdir'], name, 'command.txt')) as f:
      assert f'--config.learning_rate={lr}' in f.read()


def test_sweep_rerun_skips_finished_points(tiny_sweep):
  workdir = tiny_sweep['workdir']
  stamps = [os.path.getmtime(os.path.join(workdir, n, 'summary.json')) for n in tiny_sweep['names']]
  rc, out, err = run('experiments.sweep', *tiny_sweep['args'])
  assert rc == 0, err[-3000:]
  assert out.count('finished earlier, skipped') == 2 and 'started' not in out
  assert stamps == [
    os.path.getmtime(os.path.join(workdir, n, 'summary.json')) for n in tiny_sweep['names']
  ]
  assert len(read_csv(os.path.join(workdir, 'results.csv'))) == 2


def test_sweep_reruns_a_preempted_point_which_resumes_from_its_checkpoint(tiny_sweep):
  run_dir = os.path.join(tiny_sweep['workdir'], tiny_sweep['names'][1])
  path = os.path.join(run_dir, 'summary.json')
  summary = read_json(path)
  write(path, json.dumps({**summary, 'preempted': True}))
  rc, out, err = run('experiments.sweep', *tiny_sweep['args'])
  assert rc == 0, err[-3000:]
  assert f'[2/2] {tiny_sweep["names"][1]}: started' in out
  assert out.count('finished earlier, skipped') == 1
  resumed = read_json(path)
  assert not resumed['preempted']
  assert resumed['params_hash'] == summary['params_hash']  # restored, not retrained
  with open(os.path.join(run_dir, 'train.log')) as f:
    assert 'Resuming from checkpoint' in f.read()


# ----------------------------------------------------------------------------------------
# Seed studies.


def test_mlperf_summary_drops_the_fastest_and_slowest_converged_runs():
  s = seeds.mlperf_summary([10, 2, 5, 7, None, 3])
  assert s['runs'] == 6 and s['converged'] == 5
  assert s['mlperf_mean'] == pytest.approx((3 + 5 + 7) / 3)
  assert s['mean'] == pytest.approx(27 / 5)
  assert s['std'] == pytest.approx(3.209361, abs=1e-6)  # sample std of 2, 3, 5, 7, 10
  assert (s['min'], s['max']) == (2, 10)
  two = seeds.mlperf_summary([4.0, None, 6.0])
  assert two['converged'] == 2 and two['mlperf_mean'] is None and two['mean'] == 5.0
  none = seeds.mlperf_summary([None, None])
  assert none['converged'] == 0 and none['mean'] is None and none['std'] is None


def test_determinism_check_needs_both_runs_done_with_equal_hashes():
  done = {'status': 'done', 'params_hash': 'ab'}
  assert seeds.determinism(done, dict(done))['passed']
  assert not seeds.determinism(done, {**done, 'params_hash': 'cd'})['passed']
  check = seeds.determinism(done, {'status': 'failed (exit 1)', 'params_hash': None})
  assert not check['passed'] and 'failed' in check['reason']


@pytest.fixture(scope='module')
def tiny_seeds(tmp_path_factory):
  root = tmp_path_factory.mktemp('seeds')
  args = (
    '--config=configs/default.py',
    '--num_seeds=3',
    f'--workdir={root}/wd',
    f'--config.dataset.data_dir={root}/data',
    '--config.hr_threshold=0.3',
    *TINY,
  )
  rc, out, err = run('experiments.seeds', *args)
  return {'workdir': str(root / 'wd'), 'args': args, 'rc': rc, 'stdout': out, 'stderr': err}


def test_seed_study_reports_times_mlperf_mean_and_determinism_pass(tiny_seeds):
  assert tiny_seeds['rc'] == 0, tiny_seeds['stderr'][-3000:]
  workdir = tiny_seeds['workdir']
  summaries = [read_json(os.path.join(workdir, f'seed={s}', 'summary.json')) for s in range(3)]
  for s, summary in enumerate(summaries):
    assert summary['seed'] == s
    config = read_json(os.path.join(workdir, f'seed={s}', 'config.json'))
    assert config['dataset']['synthetic_num_users'] == 300 and config['hr_threshold'] == 0.3
  rerun = read_json(os.path.join(workdir, 'determinism_seed=0', 'summary.json'))
  assert rerun['params_hash'] == summaries[0]['params_hash']
  rows = read_csv(os.path.join(workdir, 'seeds.csv'))
  assert [int(r['seed']) for r in rows] == [0, 1, 2]
  assert [r['params_hash'] for r in rows] == [s['params_hash'] for s in summaries]
  with open(os.path.join(workdir, 'seeds.md')) as f:
    markdown = f.read()
  assert '**PASS**' in markdown
  epochs = seeds.mlperf_summary([s['epochs_to_target'] for s in summaries])
  secs = seeds.mlperf_summary([s['seconds_to_target'] for s in summaries])
  assert epochs['converged'] == 3  # HR@10 0.3 is reached in the first epochs
  assert (
    f'| epochs | 3 of 3 | {sweep.fmt(epochs["mlperf_mean"], "epochs")} | '
    f'{sweep.fmt(epochs["mean"], "epochs")} |'
  ) in markdown
  middle = sorted(s['seconds_to_target'] for s in summaries)[1]
  assert f'| seconds | 3 of 3 | {middle:.1f} |' in markdown
  assert secs['mlperf_mean'] == pytest.approx(middle)
  with open(os.path.join(workdir, 'seeds.png'), 'rb') as f:
    assert f.read(8) == PNG


def test_seed_study_exits_nonzero_when_the_rerun_hash_differs(tiny_seeds):
  path = os.path.join(tiny_seeds['workdir'], 'determinism_seed=0', 'summary.json')
  original = read_json(path)
  write(path, json.dumps({**original, 'params_hash': '0' * 16}))
  try:
    rc, out, err = run('experiments.seeds', *tiny_seeds['args'])
  finally:
    write(path, json.dumps(original))
  assert rc == 2 and 'determinism check FAILED' in err and 'Traceback' not in err, err
  assert out.count('finished earlier, skipped') == 4
  with open(os.path.join(tiny_seeds['workdir'], 'seeds.md')) as f:
    assert '**FAIL**' in f.read()


def test_seed_study_needs_a_target_and_owns_the_seed(tmp_path):
  rc, _, err = run(
    'experiments.seeds', '--config=configs/default.py', '--num_seeds=2', f'--workdir={tmp_path}/wd'
  )
  assert rc == 2 and 'hr_threshold=None' in err and 'Traceback' not in err, err
  rc, _, err = run(
    'experiments.seeds',
    '--config=configs/default.py',
    '--num_seeds=2',
    '--config.hr_threshold=0.5',
    '--config.seed=3',
    f'--workdir={tmp_path}/wd',
  )
  assert rc == 2 and '--config.seed is set by the study' in err, err
  assert not (tmp_path / 'wd').exists()


# ----------------------------------------------------------------------------------------
# Benchmark report.


def test_bench_report_makes_a_column_per_file_and_a_row_per_key(tmp_path):
  cpu = write(
    tmp_path / 'cpu.json',
    json.dumps(
      {
        'backend': 'cpu',
        'device': 'cpu',
        'train_samples_per_sec': 1234567.8,
        'data_preprocess_sec': 12.345,
        'new_figure_sec': 0.5,
      }
    ),
  )
  tpu = write(
    tmp_path / 'tpu.json',
    'I0101 a log line\n'
    + json.dumps(
      {
        'backend': 'tpu',
        'device': 'TPU v4',
        'train_samples_per_sec': 98765432,
        'compute_ceiling_fraction': 0.1234,
        'peer_ratio_torch': 3.0,
      }
    )
    + '\n',
  )
  out = tmp_path / 'table.md'
  rc, stdout, err = run('experiments.bench_report', cpu, tpu, f'--out={out}')
  assert rc == 0, err
  lines = out.read_text().splitlines()
  assert lines[0] == '| figure | unit | cpu | tpu TPU v4 |'
  body = {line.split(' | ')[0].strip('| `'): line for line in lines[2:]}
  assert list(body) == [
    'backend',
    'device',
    'train_samples_per_sec',
    'compute_ceiling_fraction',
    'peer_ratio_torch',
    'data_preprocess_sec',
    'new_figure_sec',
  ]  # known order, then others
  assert body['train_samples_per_sec'] == (
    '| `train_samples_per_sec` | samples/s | 1,234,568 | 98,765,432 |'
  )
  assert body['compute_ceiling_fraction'].endswith('| — | 0.123 |')
  assert body['data_preprocess_sec'] == '| `data_preprocess_sec` | s | 12.3 | — |'
  assert body['new_figure_sec'] == '| `new_figure_sec` | s | 0.5 | — |'


def test_bench_report_makes_the_folder_of_its_out_file(tmp_path):
  cpu = write(tmp_path / 'cpu.json', json.dumps({'backend': 'cpu', 'data_parse_sec': 0.5}))
  out = tmp_path / 'new' / 'folder' / 'table.md'
  rc, _, err = run('experiments.bench_report', cpu, f'--out={out}')
  assert rc == 0 and out.read_text().startswith('| figure | unit | cpu |'), err


def test_bench_report_rejects_files_that_are_not_a_json_object(tmp_path):
  with pytest.raises(UserError, match='not JSON'):
    bench_report.read_result(write(tmp_path / 'a.json', 'hello\n'))
  with pytest.raises(UserError, match='JSON list'):
    bench_report.read_result(write(tmp_path / 'b.json', '[1, 2]\n'))
  with pytest.raises(UserError, match='cannot read'):
    bench_report.read_result(str(tmp_path / 'missing.json'))
  same = bench_report.column_names(
    ['x/a.json', 'y/b.json'], [{'backend': 'gpu'}, {'backend': 'gpu'}]
  )
  assert same == ['gpu (a.json)', 'gpu (b.json)']


def test_failure_reason_prefers_the_runs_error_line_then_the_exception(tmp_path):
  point = sweep.Point('p', {}, None, str(tmp_path), [])
  write(
    tmp_path / 'train.log',
    'I1 start\nTraceback (most recent call last):\n  File "x"\n'
    'TypeError: bad carry\n--------------------\nFor simplicity, JAX has removed...\n',
  )
  assert sweep.failure_reason(point) == 'TypeError: bad carry'
  write(tmp_path / 'train.log', 'I1 start\nerror: config.batch_size=3 is invalid.\n')
  assert sweep.failure_reason(point) == 'error: config.batch_size=3 is invalid.'


def test_a_point_counts_as_finished_only_with_a_final_summary_of_its_own_config(tmp_path):
  from configs import default

  config = default.get_config()
  config.lock()
  [point] = sweep.make_points(config, 'configs/default.py', {}, [{'config.seed': 1}], str(tmp_path))
  os.makedirs(point.workdir)
  saved = config_paths.to_json_dict(point.config)  # what train writes to config.json
  summary, config_json = (os.path.join(point.workdir, f) for f in ('summary.json', 'config.json'))
  write(summary, json.dumps({'preempted': False}))
  write(config_json, json.dumps({**saved, 'resolved_seed': 1}))
  assert sweep.is_finished(point)
  write(config_json, json.dumps({**saved, 'learning_rate': 0.1}))
  assert not sweep.is_finished(point)  # the sweep now asks for another config: rerun
  write(config_json, json.dumps(saved))
  write(summary, json.dumps({'preempted': True}))
  assert not sweep.is_finished(point)
