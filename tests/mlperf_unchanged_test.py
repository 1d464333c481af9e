"""The MLPerf path (config.validation='none') behaves exactly as before the validation split.

What is pinned holds on every machine: the pipeline and candidate hashes are integer
computations (values computed at commit 8bc3c03, before issue 12: validation split, early
stopping, per-row L2, SGD, MRR; configs/mlperf.py shrunk to the tiny synthetic set, one
device, hr_threshold 0.6). Float results (losses, metrics, params_hash) depend on the CPU,
the BLAS and the XLA version, so they are never pinned: the run's metrics are instead
recomputed in the same process by a plain NumPy reading of the MLPerf rule (docs/mlperf.md
§3.4) from the final parameters' scores on the same candidates.
"""

import json
import os

import _train_helpers as h
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mlperf
from ncf_jax import config_checks, models, pipeline, sampling, steps, train
from ncf_jax import data as data_lib

PINNED_PIPELINE_HASHES = [  # per epoch: (pipeline_hash_first, pipeline_hash_all)
  ('6957becea54c92ce', '3335fcc7a9f0e0ff'),
  ('22d91a8e37100244', 'fdae3661853a5843'),
  ('9688983cd52b8d44', '1c5db0b3bb61e0ac'),
  ('b7c378608728a384', '821467b6aeefd452'),
  ('7c25f8d721a0e566', 'c15b1ca471e577f1'),
]
PINNED_EVAL_CANDIDATES_HASH = '8894b8d0d5979609'


def _config(data_dir):
  # first_layer='concat': the pinned hashes are that commit's configuration; the projected
  # first layer (a float reordering) is compared with it in first_layer_test.py.
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
  state = train.train_and_evaluate(config, str(root / 'run'))
  with open(root / 'run' / 'summary.json') as f:
    summary = json.load(f)
  with open(root / 'run' / 'metrics.jsonl') as f:
    history = [json.loads(line) for line in f]
  return config, state, summary, history, root / 'run'


def _reference_metrics(config, params, seed):
  """HR@K and NDCG@K by the MLPerf rule, read plainly: the test item's rank is the count
  of distinct candidate negatives scoring at least as high (a drawn copy of the test item
  and repeated draws count once: the candidates' mask). A trained model's float scores of
  two distinct items are never exactly equal, so the reference's tie order (a negative
  drawn after the test item ranks below it) does not arise here; metrics_test pins it."""
  config = config_checks.resolve_model_defaults(config)
  dataset = data_lib.load(config.dataset, config.validation)
  model = models.create_model(config.model, dataset.num_users, dataset.num_items, config.dtype)
  mesh = steps.make_mesh(1)
  _, data_key, _ = steps.make_keys(seed, mesh)
  data = sampling.to_device(dataset)
  users = jnp.arange(dataset.num_users, dtype=jnp.int32)
  items, mask = jax.jit(
    lambda d, u: pipeline.eval_batch(
      d, data_key, u, num_neg=int(config.eval_num_neg), match_mlperf=True, split='test'
    )
  )(data, users)
  scores = np.asarray(
    jax.jit(model.apply)({'params': params}, jnp.broadcast_to(users[:, None], items.shape), items)
  )
  mask = np.asarray(mask)
  ranks = np.array([np.sum((s[1:] >= s[0]) & m[1:]) for s, m in zip(scores, mask)])
  hit = ranks < int(config.top_k)
  return hit.mean(), np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).mean(), dataset.num_users


def test_mlperf_pipeline_hashes_and_candidates_are_unchanged(run):
  _, _, summary, history, _ = run
  assert [(r['pipeline_hash_first'], r['pipeline_hash_all']) for r in history] == (
    PINNED_PIPELINE_HASHES
  )
  assert summary['eval_candidates_hash'] == PINNED_EVAL_CANDIDATES_HASH


def test_mlperf_run_evaluates_the_test_split_every_epoch_and_stops_at_the_threshold(run):
  config, _, summary, history, workdir = run
  # The tiny set's HR climbs from about 0.45 to about 0.67 over these epochs: the stop at
  # 0.6 after epoch 4 has a wide margin on any machine.
  assert [r['epoch'] for r in history] == list(range(5))
  for r in history:
    assert not any(k.startswith('valid_') for k in r)
    assert 0.0 < r['hr'] <= 1.0 and 0.0 < r['ndcg'] <= r['hr'] and np.isfinite(r['train_loss'])
  assert all(r['hr'] < config.hr_threshold for r in history[:-1])
  assert history[-1]['hr'] >= config.hr_threshold
  assert history[-1]['train_loss'] < history[0]['train_loss'] < np.log(2.0)
  assert (summary['epochs_done'], summary['epochs_to_target']) == (5, 5)
  # No selection: the result is the final parameters' test metric, and the maximum over
  # epochs is named as what it is.
  assert summary['best_epoch'] is None and summary['valid_hr'] is None
  assert summary['test_hr'] == history[-1]['hr']
  assert summary['test_hr_max_over_epochs'] == max(r['hr'] for r in history)
  assert 'best_hr' not in summary
  assert not os.path.exists(workdir / 'best_checkpoint')


def test_mlperf_metrics_equal_a_plain_reading_of_the_rule_on_the_final_parameters(run):
  config, state, summary, history, _ = run
  hr, ndcg, num_users = _reference_metrics(config, jax.device_get(state.params), summary['seed'])
  # One user's rank may flip where the two programs round a near-tie differently.
  assert history[-1]['hr'] == pytest.approx(hr, abs=1.0 / num_users + 1e-9)
  assert history[-1]['ndcg'] == pytest.approx(ndcg, abs=1.0 / num_users)
