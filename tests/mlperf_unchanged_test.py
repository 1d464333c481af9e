"""The MLPerf path (config.validation='none') behaves exactly as before the validation split.

Values computed at commit 8bc3c03 (before issue 12: validation split, early stopping,
per-row L2, SGD, MRR) with JAX 0.10.2 on this repository's x86-64 CPU: configs/mlperf.py
shrunk to the tiny synthetic set, one device, hr_threshold 0.6. The pipeline and candidate
hashes are integer computations and hold on any platform; params_hash and the metrics are
float results, which another CPU or XLA version may round differently: recompute them
there by running this config at 8bc3c03 (`git worktree add /tmp/base 8bc3c03`).
"""

import json
import os

import _train_helpers as h
import pytest

from configs import mlperf
from ncf_jax import train

PINNED_EPOCHS = [  # epoch: (pipeline_hash_first, pipeline_hash_all, hr, ndcg, train_loss)
  (
    '6957becea54c92ce',
    '3335fcc7a9f0e0ff',
    0.44666666666666666,
    0.2255877431233724,
    0.4990207850933075,
  ),
  ('22d91a8e37100244', 'fdae3661853a5843', 0.47, 0.25469472249348957, 0.4772309958934784),
  (
    '9688983cd52b8d44',
    '1c5db0b3bb61e0ac',
    0.5233333333333333,
    0.28530362447102864,
    0.460609495639801,
  ),
  ('b7c378608728a384', '821467b6aeefd452', 0.54, 0.31769261678059896, 0.4260900318622589),
  (
    '7c25f8d721a0e566',
    'c15b1ca471e577f1',
    0.6733333333333333,
    0.4109203847249349,
    0.3836202621459961,
  ),
]
PINNED_EVAL_CANDIDATES_HASH = '8894b8d0d5979609'
PINNED_PARAMS_HASH = 'a223b341e4211ced'


def _config(data_dir):
  # first_layer='concat': the pinned values are that commit's arithmetic; the projected
  # first layer (a float reordering) is pinned against it in first_layer_test.py.
  return h.tiny_config(
    data_dir,
    base=mlperf.get_config('runlocal'),
    num_epochs=6,
    hr_threshold=0.6,
    num_devices=1,
    model__first_layer='concat',
  )


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp('mlperf')
  config = _config(str(root / 'data'))
  assert config.validation == 'none' and config.match_mlperf
  train.train_and_evaluate(config, str(root / 'run'))
  with open(root / 'run' / 'summary.json') as f:
    summary = json.load(f)
  with open(root / 'run' / 'metrics.jsonl') as f:
    history = [json.loads(line) for line in f]
  return summary, history, root / 'run'


def test_mlperf_pipeline_hashes_and_candidates_are_unchanged(run):
  summary, history, _ = run
  assert [(r['pipeline_hash_first'], r['pipeline_hash_all']) for r in history] == [
    p[:2] for p in PINNED_EPOCHS
  ]
  assert summary['eval_candidates_hash'] == PINNED_EVAL_CANDIDATES_HASH


def test_mlperf_run_evaluates_the_test_split_every_epoch_and_stops_at_the_threshold(run):
  summary, history, workdir = run
  assert [r['epoch'] for r in history] == list(range(5))
  for r, (_, _, hr, ndcg, loss) in zip(history, PINNED_EPOCHS):
    assert r['hr'] == pytest.approx(hr, abs=1e-9)
    assert r['ndcg'] == pytest.approx(ndcg, rel=1e-6)
    assert r['train_loss'] == pytest.approx(loss, rel=1e-6)
    assert not any(k.startswith('valid_') for k in r)
  assert summary['params_hash'] == PINNED_PARAMS_HASH
  assert (summary['epochs_done'], summary['epochs_to_target']) == (5, 5)
  # No selection: the result is the final parameters' test metric, and the maximum over
  # epochs is named as what it is.
  assert summary['best_epoch'] is None and summary['valid_hr'] is None
  assert summary['test_hr'] == history[-1]['hr']
  assert summary['test_hr_max_over_epochs'] == max(r['hr'] for r in history)
  assert 'best_hr' not in summary
  assert not os.path.exists(workdir / 'best_checkpoint')
