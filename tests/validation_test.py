"""Validated runs end to end: selection on the validation split, early stopping, the best
checkpoint, one test evaluation at the end, and that selection never reads the test split.

Data: the synthetic generator's overfitting regime (label noise 0.5, ~25 interactions per
user), written as a GroupLens ratings.csv so that a second copy can differ in the test
items alone. At lr 0.01 the default NeuMF peaks on validation within two epochs and then
declines, so the early stop (patience 3) comes a few epochs after the peak.
"""

import dataclasses
import json
import os
import shutil
import signal

import _train_helpers as h
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from configs import default
from ncf_jax import checkpoint as ckpt_lib
from ncf_jax import config_checks, models, pipeline, sampling, steps, train
from ncf_jax import data as data_lib
from ncf_jax import evaluate as evaluate_lib
from ncf_jax.data import synthetic

GEN = dict(num_users=500, num_items=300, mean_interactions=25.0, num_topics=16, seed=0, noise=0.5)
OVERFIT = dict(
  validation='leave_one_out',
  early_stop_patience=3,
  num_epochs=12,
  learning_rate=0.01,
  batch_size=1024,
  eval_batch_size=128,
  eval_num_neg=50,
  seed=0,
)


def _write(gen, data_dir):
  folder = os.path.join(data_dir, 'ml-latest-small')
  os.makedirs(folder, exist_ok=True)
  synthetic.write_grouplens_csv(gen, os.path.join(folder, 'ratings.csv'), seed=0)


def _other_test_items(gen):
  """`gen` with another item in each test row it can change without touching the rest.

  The test row is each user's latest (last in the file among ties). Its item is replaced
  by one the user never rated and that other rows keep in the catalogue, and only where
  the old item has other rows too: the item ids, training positives and validation items
  stay those of `gen`.
  """
  n = len(gen)
  key = gen.timestamps * n + np.arange(n)
  test_row = np.full(gen.num_users, -1, np.int64)
  np.maximum.at(test_row, gen.users, key)
  test_row %= n
  counts = np.bincount(gen.items, minlength=gen.num_items)
  rng = np.random.default_rng(1)
  items = gen.items.copy()
  for u, row in enumerate(test_row):
    if counts[items[row]] < 2:
      continue
    rated = set(gen.items[gen.users == u].tolist())
    free = [i for i in np.flatnonzero(counts > 0) if i not in rated]
    new = int(rng.choice(free))
    counts[items[row]] -= 1
    counts[new] += 1
    items[row] = new
  return dataclasses.replace(gen, items=items)


def _config(data_dir, **overrides):
  c = default.get_config()
  c.dataset.name = 'ml-latest-small'
  c.dataset.data_dir = data_dir
  c.num_devices = 1
  for k, v in dict(OVERFIT, **overrides).items():
    node = c
    *path, leaf = k.split('.')
    for p in path:
      node = node[p]
    node[leaf] = v
  return c


def _read(workdir):
  with open(os.path.join(workdir, 'summary.json')) as f:
    summary = json.load(f)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return summary, [json.loads(line) for line in f]


def _test_hr(config, state):
  """Test HR@K of a state's parameters (the final epoch's, here)."""
  config = config_checks.resolve_model_defaults(config)
  dataset = data_lib.load(config.dataset, config.validation)
  mesh = steps.make_mesh(1)
  model = models.create_model(config.model, dataset.num_users, dataset.num_items, 'float32')
  data = sampling.to_device(dataset, NamedSharding(mesh, P()))
  step = steps.make_eval_step(config, mesh, model, dataset.num_users, dataset.num_items)
  data_key = steps.make_keys(int(config.seed), mesh)[1]
  return steps.evaluate(
    step, state.params, data, data_key, dataset.num_users, int(config.eval_batch_size)
  )[0]['hr']


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """The same run on two datasets that differ only in their test items."""
  root = tmp_path_factory.mktemp('validation')
  gen = synthetic.generate(**GEN)
  out = {}
  for name, g in (('a', gen), ('b', _other_test_items(gen))):
    data_dir = str(root / f'data_{name}')
    _write(g, data_dir)
    config = _config(data_dir)
    workdir = str(root / f'run_{name}')
    state = train.train_and_evaluate(config, workdir)
    out[name] = dict(config=config, workdir=workdir, state=state, data_dir=data_dir)
    out[name]['summary'], out[name]['history'] = _read(workdir)
  return out


def test_the_two_datasets_differ_in_their_test_items_only(runs):
  a, b = (data_lib.load(runs[k]['config'].dataset, 'leave_one_out') for k in 'ab')
  for field in ('train_users', 'train_items', 'user_offsets', 'valid_items'):
    np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
  assert (a.test_items != b.test_items).mean() > 0.5


def test_a_validated_run_logs_validation_metrics_stops_early_and_reports_the_selection(runs):
  summary, history = runs['a']['summary'], runs['a']['history']
  for r in history:
    assert {'valid_hr', 'valid_ndcg', 'valid_mrr'} <= set(r)
    assert 'hr' not in r and 'ndcg' not in r  # no test metric before the end
  best = max(history, key=lambda r: (r['valid_hr'], -r['epoch']))
  last = history[-1]['epoch']
  assert summary['early_stopped'] and last == best['epoch'] + 3 < OVERFIT['num_epochs'] - 1
  assert summary['best_epoch'] == best['epoch']
  assert (summary['valid_hr'], summary['valid_ndcg']) == (best['valid_hr'], best['valid_ndcg'])
  for k in ('test_hr', 'test_ndcg', 'test_mrr'):
    assert 0 < summary[k] < 1
  assert summary['test_hr_max_over_epochs'] is None and 'best_hr' not in summary
  assert summary['valid_candidates_hash'] != summary['eval_candidates_hash']


def test_the_selected_epoch_tests_at_least_as_well_as_the_last(runs):
  run = runs['a']
  assert run['summary']['best_epoch'] < run['history'][-1]['epoch']  # it did overfit
  last_hr = _test_hr(run['config'], run['state'])  # the final params
  assert run['summary']['test_hr'] >= last_hr, (run['summary']['test_hr'], last_hr)


def test_changing_the_test_items_changes_neither_training_nor_selection(runs):
  a, b = runs['a'], runs['b']
  assert b['summary']['best_epoch'] == a['summary']['best_epoch']
  assert b['summary']['params_hash'] == a['summary']['params_hash']
  drop = lambda hist: [
    {k: v for k, v in r.items() if 'wall' not in k and 'per_sec' not in k} for r in hist
  ]
  assert drop(b['history']) == drop(a['history'])
  assert b['summary']['valid_candidates_hash'] == a['summary']['valid_candidates_hash']
  # The test split itself did change.
  assert b['summary']['eval_candidates_hash'] != a['summary']['eval_candidates_hash']


def test_the_best_checkpoint_is_the_selected_epoch_next_to_the_latest_ones(runs):
  run = runs['a']
  workdir, summary = run['workdir'], run['summary']
  latest = h.checkpoint_steps(workdir)
  best_dir = os.path.join(workdir, ckpt_lib.BEST_DIR)
  best = sorted(int(n) for n in os.listdir(best_dir) if n.isdigit())
  assert len(best) == 1 and len(latest) == 3 and best[0] < latest[0]
  result = evaluate_lib.evaluate_checkpoint(workdir, best=True)
  assert result['epoch'] == summary['best_epoch']  # numbered as in metrics.jsonl
  assert result['hr'] == pytest.approx(summary['test_hr'], abs=1e-9)
  assert result['eval_candidates_hash'] == summary['eval_candidates_hash']
  valid = evaluate_lib.evaluate_checkpoint(workdir, best=True, split='valid')
  assert valid['hr'] == pytest.approx(summary['valid_hr'], abs=1e-9)
  assert valid['eval_candidates_hash'] == summary['valid_candidates_hash']


def test_rerunning_a_finished_validated_run_trains_nothing_and_reports_the_same(runs, tmp_path):
  run = runs['a']
  workdir = str(tmp_path / 'copy')
  shutil.copytree(run['workdir'], workdir)
  train.train_and_evaluate(run['config'], workdir)
  summary, history = _read(workdir)
  assert len(history) == len(run['history'])
  for k in ('best_epoch', 'valid_hr', 'test_hr', 'test_ndcg', 'params_hash'):
    assert summary[k] == run['summary'][k], k


# ----------------------------------------------------------------------------------------
# Preemption: the command line, killed mid-epoch after the best epoch.

CLI = dict(
  validation='leave_one_out',
  early_stop_patience=3,
  num_epochs=12,
  learning_rate=0.01,
  dataset__synthetic_num_users=500,
  dataset__synthetic_num_items=300,
  dataset__synthetic_mean_interactions=25,
  dataset__synthetic_noise=0.5,
  log_every_steps=5,
  hash_pipeline=False,
)


@pytest.mark.slow  # SIGKILL and resume are pinned exactly by resume_test; this adds best_epoch
def test_a_kill_mid_run_then_resume_keeps_the_same_best_epoch(tmp_path):
  data_dir = str(tmp_path / 'data')
  reference = str(tmp_path / 'reference')
  out = h.run(h.train_cmd(reference, data_dir, **CLI), log=reference + '.log')
  assert out.returncode == 0, out.stdout[-3000:]
  ref_summary, ref_history = h.summary(reference), h.metrics(reference)
  best = ref_summary['best_epoch']
  assert ref_summary['early_stopped'] and best < ref_history[-1]['epoch']
  spe = pipeline_steps(data_dir)

  workdir, log = str(tmp_path / 'run'), str(tmp_path / 'killed.log')
  proc = h.start(h.train_cmd(workdir, data_dir, worker=True, **CLI), log, NCF_TEST_STEP_DELAY=0.03)
  try:  # the best epoch is behind it, the stop not yet reached
    h.wait_for_line(proc, log, f'epoch {best + 2} step 5/{spe}')
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
  finally:
    h.stop(proc)
  assert not os.path.exists(os.path.join(workdir, 'summary.json'))
  out = h.run(h.train_cmd(workdir, data_dir, **CLI), log=str(tmp_path / 'resumed.log'))
  assert out.returncode == 0, out.stdout[-3000:]
  assert 'Resuming from checkpoint' in out.stdout
  summary = h.summary(workdir)
  for k in (
    'best_epoch',
    'valid_hr',
    'valid_ndcg',
    'test_hr',
    'test_ndcg',
    'params_hash',
    'epochs_done',
  ):
    assert summary[k] == ref_summary[k], k
  h.assert_same_epochs(
    h.metrics(workdir), ref_history, keys=('valid_hr', 'valid_ndcg', 'train_loss')
  )


def pipeline_steps(data_dir):
  config = h.tiny_config(data_dir, **CLI)
  dataset = data_lib.load(config.dataset, config.validation)
  return pipeline.steps_per_epoch(dataset.num_train, config.num_neg, config.batch_size)
