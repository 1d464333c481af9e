"""Tests of validated search and model comparison (experiments/search.py, compare.py,
`sweep --select`): the selection rule, the coordinate search, the statistics, and the
commands run as a user would on tiny data.

The honesty rule is tested end to end: the same comparison on two datasets that differ
only in their test split (the NCF paper's file layout keeps the test items and negatives
in their own files) trains the same search points, selects the same settings, and only
its test metrics differ.
"""

import math
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from experiments import compare, search, sweep
from tests.experiments_test import PNG, PYTHON, REPO, read_csv, read_json, run, write

# ----------------------------------------------------------------------------------------
# The selection rule.


def rows(*valid):
  return [{'valid_hr': hr, 'valid_ndcg': ndcg, 'status': 'done'} for hr, ndcg in valid]


def test_select_takes_the_best_validation_metric_then_the_other_then_the_first():
  assert search.select(rows((0.5, 0.3), (0.6, 0.1), (0.55, 0.9)), 'hr') == 1
  assert search.select(rows((0.5, 0.3), (0.6, 0.1), (0.55, 0.9)), 'ndcg') == 2
  assert search.select(rows((0.6, 0.3), (0.6, 0.4), (0.6, 0.4)), 'hr') == 1  # NDCG, then first
  assert search.select(rows((0.6, 0.4), (0.6, 0.4)), 'hr') == 0  # the incumbent keeps a tie


def test_select_skips_unfinished_points_and_says_none_when_nothing_finished():
  r = rows((0.9, 0.9), (0.5, 0.5), (None, None))
  r[0]['status'] = 'failed (exit 1)'
  assert search.select(r, 'hr') == 1
  assert search.select([r[0], r[2]], 'hr') is None
  with pytest.raises(ValueError):
    search.select(r, 'mrr')


def test_test_metrics_that_would_change_the_choice_do_not():
  r = rows((0.60, 0.40), (0.58, 0.39))
  r[0].update(test_hr=0.10, test_ndcg=0.05)  # the test split would pick point 1
  r[1].update(test_hr=0.90, test_ndcg=0.80)
  assert search.select(r, 'hr') == 0
  assert search.select([{k: v for k, v in x.items() if 'test' not in k} for x in r], 'hr') == 0


# ----------------------------------------------------------------------------------------
# The coordinate search.


def tiny_base():
  from configs import default
  from ncf_jax import config_checks

  config = default.get_config()
  config.validation = 'leave_one_out'
  config.learning_rate = 0.002
  return config_checks.resolve_model_defaults(config)


def apply(config, setting):
  return compare.resolved(config, setting)


def fake_evaluate(calls, peak_lr=0.016, peak_l2=1e-3):
  """Validation HR peaked at (peak_lr, peak_l2); records every setting trained."""

  def evaluate(settings):
    out = []
    for s in settings:
      calls.append(s)
      c = apply(tiny_base(), s)
      hr = 0.7 - 0.05 * abs(math.log2(c.learning_rate / peak_lr))
      hr -= 0.01 * abs(math.log10(max(c.model.l2, 1e-6) / peak_l2))
      out.append({'valid_hr': round(hr, 6), 'valid_ndcg': 0.4, 'status': 'done'})
    return out

  return evaluate


def test_the_search_follows_the_winning_edge_and_trains_each_setting_once():
  calls = []
  axes = [search.default_space('neumf')[0], search.default_space('neumf')[1]]
  chosen, trials = search.coordinate_search(tiny_base(), axes, fake_evaluate(calls), apply, 'hr')
  lrs = [s.get('config.learning_rate', 0.002) for s in calls[:5]]
  # 0.001, 0.002, 0.004, then up one step at a time to 0.016, the grid's end (8x).
  assert lrs == [0.001, 0.002, 0.004, 0.008, 0.016]
  assert chosen == {'config.learning_rate': 0.016, 'config.model.l2': 0.001}
  names = [sweep.point_name(s) for s in calls]
  assert len(names) == len(set(names))  # the l2 axis's incumbent is the lr winner: not rerun
  assert [t.axis for t in trials].count('learning_rate') == 5
  assert all('test_hr' not in t.row for t in trials)


def test_default_spaces_hold_each_model_and_keep_valid_shapes():
  base = tiny_base()
  for model in ('mf', 'gmf', 'mlp', 'neumf'):
    config = apply(base, {'config.model.name': model})
    names = [a.name for a in search.default_space(model)]
    assert names == ['learning_rate', 'model.l2', 'embedding size', 'num_neg']
    for axis in search.default_space(model):
      grid, current = axis.grid(config)
      assert search.normalise(grid[current], config) == {}  # the config's own value
      for setting in grid:
        apply(config, setting)  # every grid point is a valid config
        layers = setting.get('config.model.mlp_layers')
        assert layers is None or layers[0] % 2 == 0
  assert [a.name for a in search.default_space('neumf_pretrained')] == ['learning_rate']
  grid, current = search.default_space('mf')[3].grid(base)
  assert [g['config.num_neg'] for g in grid] == [1, 2, 4, 8, 16] and current == 2


def test_summaries_give_the_sample_std_and_a_student_t_interval():
  s = compare.summarize([0.6, 0.7, 0.8, None])
  assert s['n'] == 3 and s['mean'] == pytest.approx(0.7) and s['std'] == pytest.approx(0.1)
  half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t(0.975, 2)
  assert s['ci95'] == pytest.approx([0.7 - half, 0.7 + half])
  assert compare.summarize([0.5]) == {'mean': 0.5, 'std': None, 'ci95': None, 'n': 1}


# ----------------------------------------------------------------------------------------
# The commands, on a tiny dataset in the NCF paper's file layout.

USERS, ITEMS, PER_USER, NEG = 60, 80, 14, 20
TINY_SPACE = """
from experiments import search

def get_space(model):
  return [search.scaled('learning_rate', (0, 1))]
"""


def write_paper_files(folder, swap_test: bool) -> str:
  """`<folder>/toy.*`: the same training file either way; with `swap_test` each user's
  test item trades places with its first test negative (still never a training item)."""
  rng = np.random.default_rng(7)
  topics = rng.integers(0, 4, ITEMS)
  train, test, negs = [], [], []
  for u in range(USERS):
    liked = np.flatnonzero(topics == u % 4)
    items = rng.choice(liked, min(PER_USER + 1, len(liked)), replace=False)
    train += [f'{u}\t{i}\t5\t{1000 + t}' for t, i in enumerate(items[:-1])]
    others = rng.choice(np.setdiff1d(np.arange(ITEMS), items), NEG, replace=False)
    held = int(items[-1])
    if swap_test:
      held, others[0] = int(others[0]), held
    test.append(f'{u}\t{held}\t5\t2000')
    negs.append(f'({u},{held})\t' + '\t'.join(map(str, others)))
  os.makedirs(folder, exist_ok=True)
  prefix = os.path.join(folder, 'toy')
  write(prefix + '.train.rating', '\n'.join(train) + '\n')
  write(prefix + '.test.rating', '\n'.join(test) + '\n')
  write(prefix + '.test.negative', '\n'.join(negs) + '\n')
  return prefix


def compare_args(prefix, workdir, space, *extra):
  return (
    '--config=configs/default.py',
    '--config.dataset.name=file',
    '--config.dataset.format=ncf_paper',
    f'--config.dataset.path={prefix}',
    f'--config.dataset.data_dir={os.path.dirname(prefix)}/cache',
    '--config.dataset.min_ratings=5',
    '--config.validation=leave_one_out',
    '--config.num_epochs=2',
    '--config.batch_size=256',
    '--config.eval_batch_size=64',
    f'--config.eval_num_neg={NEG}',
    '--models=popularity,gmf',
    '--num_seeds=2',
    f'--search={space}',
    f'--workdir={workdir}',
    *extra,
  )


def test_a_tiny_comparison_selects_on_validation_resumes_and_ignores_the_test_split(tmp_path):
  space = write(tmp_path / 'space.py', TINY_SPACE)
  a = write_paper_files(str(tmp_path / 'a'), swap_test=False)
  b = write_paper_files(str(tmp_path / 'b'), swap_test=True)

  # Interrupted once the first run has started, then resumed by the same command.
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'JAX_DISABLE_MOST_OPTIMIZATIONS': '1'}
  env['XLA_FLAGS'] = ''
  args = compare_args(a, str(tmp_path / 'ra'), space)
  proc = subprocess.Popen(
    [PYTHON, '-m', 'experiments.compare', *args],
    cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
  )  # fmt: skip
  assert proc.stdout is not None
  for line in proc.stdout:
    if 'learning_rate=' in line and 'started' in line:  # the second search point
      time.sleep(2.0)
      proc.send_signal(signal.SIGINT)
      break
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 2, err[-2000:]
  assert 'rerun the same command to continue' in err
  code, out, err = run('experiments.compare', *args)
  assert code == 0, err[-3000:]
  assert 'finished earlier, skipped' in out

  code, _, err = run('experiments.compare', *compare_args(b, str(tmp_path / 'rb'), space))
  assert code == 0, err[-3000:]
  ra, rb = (read_json(tmp_path / r / 'results.json') for r in ('ra', 'rb'))

  # results.json has the promised shape.
  assert list(ra['models']) == ['popularity', 'gmf']
  gmf = ra['models']['gmf']
  for m in ('test_hr', 'test_ndcg', 'test_mrr'):
    assert set(gmf[m]) >= {'mean', 'std', 'ci95'} and len(gmf[m]['ci95']) == 2
    assert gmf[m]['ci95'][0] <= gmf[m]['mean'] <= gmf[m]['ci95'][1]
  assert gmf['selected']['learning_rate'] in (0.016, 0.032)
  assert [r['seed'] for r in gmf['seeds']] == [0, 1]
  assert ra['models']['popularity']['selected'] == {}
  assert all(r['status'] == 'done' for m in ra['models'].values() for r in m['seeds'])
  for name in ('results.md', 'results.csv'):
    assert os.path.getsize(tmp_path / 'ra' / name) > 0
  assert (tmp_path / 'ra' / 'results.png').read_bytes()[:8] == PNG
  assert [r['model'] for r in read_csv(tmp_path / 'ra' / 'results.csv')] == ['popularity', 'gmf']
  report = (tmp_path / 'ra' / 'results.md').read_text()
  assert report.count('**selected**') == 1  # the winner among gmf's search points

  # No search point read the test split; each seed run tested once.
  search_dir = tmp_path / 'ra' / 'gmf' / 'search'
  for point in os.listdir(search_dir):
    summary = read_json(search_dir / point / 'summary.json')
    assert summary['test_hr'] is None and summary['test_at_end'] is False
  assert read_json(tmp_path / 'ra' / 'gmf' / 'seed=1' / 'summary.json')['test_hr'] is not None

  # Another test split: the same search, the same selection, other test metrics.
  strip = lambda m: [{k: v for k, v in t.items() if k != 'workdir'} for t in m['search']]
  assert strip(ra['models']['gmf']) == strip(rb['models']['gmf'])
  assert ra['models']['gmf']['selected'] == rb['models']['gmf']['selected']
  hashes = lambda r: [s['params_hash'] for s in r['models']['gmf']['seeds']]
  assert hashes(ra) == hashes(rb)
  assert ra['models']['gmf']['test_hr'] != rb['models']['gmf']['test_hr']
  assert ra['models']['popularity']['test_hr'] != rb['models']['popularity']['test_hr']


def test_a_selecting_sweep_tests_only_its_winner(tmp_path):
  prefix = write_paper_files(str(tmp_path / 'a'), swap_test=False)
  sweep_file = write(
    tmp_path / 'lr.py',
    'def get_sweep():\n'
    "  return [{'config.learning_rate': 0.004}, {'config.learning_rate': 0.032}]\n",
  )
  args = [a for a in compare_args(prefix, str(tmp_path / 'sw'), '') if a.startswith('--config')]
  code, out, err = run(
    'experiments.sweep', *args, '--select', f'--sweep={sweep_file}', f'--workdir={tmp_path}/sw'
  )
  assert code == 0, err[-3000:]
  chosen = read_json(tmp_path / 'sw' / 'selected.json')
  rows = read_csv(tmp_path / 'sw' / 'results.csv')
  assert 'test_hr' not in rows[0]
  valid = [float(r['valid_hr']) for r in rows]
  assert chosen['name'] == rows[int(np.argmax(valid))]['name']
  assert [r['selected'] for r in rows].count('True') == 1
  for r in rows:
    assert read_json(tmp_path / 'sw' / r['name'] / 'summary.json')['test_hr'] is None
  assert 0 <= chosen['test_hr'] <= 1 and 'Selected on validation HR@10' in out
  assert 'Selected on validation' in (tmp_path / 'sw' / 'results.md').read_text()


@pytest.mark.parametrize(
  'args, message',
  [
    (('--models=gmf,svd',), 'unknown model svd'),
    (('--config.validation=none',), 'selects on a validation split'),
    (('--config.model.name=mf',), '--config.model.name is set by the comparison'),
    (('--search=nowhere.py',), 'use default, none, or a file'),
    (('--num_seeds=0',), 'it must be >= 1'),
  ],
)
def test_bad_compare_input_is_one_line(tmp_path, args, message):
  base = ('--config=configs/default.py', '--config.validation=leave_one_out')
  code, _, err = run('experiments.compare', *base, f'--workdir={tmp_path}/w', *args)
  assert code == 2 and message in err, err[-2000:]
  assert 'Traceback' not in err


def test_selecting_needs_a_validation_split(tmp_path):
  sweep_file = write(tmp_path / 's.py', "def get_sweep():\n  return [{'config.seed': 0}]\n")
  code, _, err = run(
    'experiments.sweep', '--select', f'--sweep={sweep_file}', f'--workdir={tmp_path}/w'
  )
  assert code == 2 and 'pass --config.validation=leave_one_out' in err, err[-2000:]


@pytest.mark.slow
def test_the_full_comparison_with_the_default_search_and_pretraining(tmp_path):
  """Every model, the default search space, 2 seeds: NeuMF pre-trained from each seed's
  selected GMF and MLP, with the paper's SGD."""
  args = (
    '--config=configs/default.py',
    '--config.validation=leave_one_out',
    '--config.dataset.synthetic_num_users=300',
    '--config.dataset.synthetic_num_items=200',
    '--config.dataset.synthetic_mean_interactions=30',
    f'--config.dataset.data_dir={tmp_path}/data',
    '--config.num_epochs=2',
    '--config.batch_size=1024',
    '--config.eval_batch_size=128',
    '--config.eval_num_neg=50',
    '--num_seeds=2',
    f'--workdir={tmp_path}/full',
  )
  code, _, err = run('experiments.compare', *args, timeout=3600)
  assert code == 0, err[-3000:]
  result = read_json(tmp_path / 'full' / 'results.json')
  assert list(result['models']) == list(compare.MODELS)
  pre = result['models']['neumf_pretrained']
  assert pre['selected']['optimizer'] == 'sgd'
  for s in (0, 1):
    saved = read_json(tmp_path / 'full' / 'neumf_pretrained' / f'seed={s}' / 'config.json')
    assert saved['model']['pretrained_gmf'].endswith(os.path.join('gmf', f'seed={s}'))
    assert saved['model']['pretrained_mlp'].endswith(os.path.join('mlp', f'seed={s}'))
    assert saved['model']['mf_dim'] == result['models']['gmf']['selected']['model.mf_dim']
  for name in ('mf', 'gmf', 'mlp', 'neumf'):
    axes = {t['axis'] for t in result['models'][name]['search']}
    assert axes == {'learning_rate', 'model.l2', 'embedding size', 'num_neg'}


def test_pretraining_starts_from_the_selected_epoch_when_the_run_has_one(tmp_path):
  import shutil

  import jax.numpy as jnp

  from ncf_jax import checkpoint as ckpt_lib
  from ncf_jax.train import pretrained

  meta = {'config': {'model': {'name': 'gmf'}}, 'seed': 0}
  latest = ckpt_lib.Checkpoints(str(tmp_path), 3)
  latest.save(2, {'params': {'w': jnp.full(3, 2.0)}}, meta)
  best = ckpt_lib.Checkpoints(str(tmp_path), 1, best_metric='valid_hr')
  best.save(1, {'params': {'w': jnp.full(3, 1.0)}}, meta, metrics={'valid_hr': 0.5})
  latest.close()
  best.close()
  assert float(pretrained._final_params(str(tmp_path), 'gmf')['w'][0]) == 1.0
  shutil.rmtree(tmp_path / ckpt_lib.BEST_DIR)  # a run without a validation split
  assert float(pretrained._final_params(str(tmp_path), 'gmf')['w'][0]) == 2.0
