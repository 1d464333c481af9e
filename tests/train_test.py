"""End-to-end training: learning, determinism across runs and device counts, eval exactness."""

import collections
import json
import os
import subprocess
import sys

import _train_helpers as h
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from ncf_jax import baselines, config_checks, models, pipeline, sampling, steps, train
from ncf_jax import data as data_lib
from ncf_jax.train import pretrained

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('data'))


def tiny_config(data_dir, **overrides):
  """_train_helpers' TINY config, 2 epochs on one device; `a.b=v` overrides set field a.b."""
  config = h.tiny_config(data_dir, **{'num_epochs': 2, 'num_devices': 1, **overrides})
  return config_checks.resolve_model_defaults(config)  # some tests build the model directly


def _run(config, workdir):
  state = train.train_and_evaluate(config, str(workdir))
  with open(os.path.join(workdir, 'summary.json')) as f:
    summary = json.load(f)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    history = [json.loads(line) for line in f]
  return state, summary, history


def test_default_config_learns_close_to_the_oracle_and_far_above_popularity(tmp_path):
  config = default.get_config()
  config.dataset.data_dir = str(tmp_path / 'data')
  config.num_devices = 1  # the 8 forced host devices only slow a 2-core machine down
  _, summary, history = _run(config, tmp_path / 'run')
  dataset = data_lib.load(config.dataset)
  _, data_key, _ = steps.make_keys(int(config.seed), steps.make_mesh(1))
  score = lambda scorer: baselines.evaluate_scorer(
    dataset, data_key, scorer, num_neg=config.eval_num_neg, top_k=config.top_k
  )['hr']
  oracle, popularity = (
    score(baselines.oracle_scorer(dataset)),
    score(baselines.popularity_scorer(dataset)),
  )
  final_hr = history[-1]['hr']
  assert final_hr >= 0.9 * oracle, (final_hr, oracle)
  assert final_hr >= popularity + 0.1, (final_hr, popularity)
  assert history[-1]['train_loss'] < history[0]['train_loss']
  assert summary['epochs_done'] == config.num_epochs


def test_same_seed_gives_identical_params_metrics_and_pipeline_hashes(data_dir, tmp_path):
  _, s1, h1 = _run(tiny_config(data_dir), tmp_path / 'a')
  _, s2, h2 = _run(tiny_config(data_dir), tmp_path / 'b')
  assert s1['params_hash'] == s2['params_hash']
  drop = lambda h: [
    {k: v for k, v in r.items() if 'wall' not in k and 'per_sec' not in k} for r in h
  ]
  assert drop(h1) == drop(h2)
  _, s3, h3 = _run(tiny_config(data_dir, seed=1), tmp_path / 'c')
  assert s3['params_hash'] != s1['params_hash']
  assert h3[0]['pipeline_hash_all'] != h1[0]['pipeline_hash_all']
  assert s3['eval_candidates_hash'] != s1['eval_candidates_hash']


@pytest.mark.slow  # CI: multidevice_cli_test's 8 x 4096 run, hashing_test, gradients_test
def test_one_and_eight_devices_see_identical_batches_and_agree_on_metrics(data_dir, tmp_path):
  _, s1, h1 = _run(tiny_config(data_dir, num_devices=1), tmp_path / 'one')
  _, s8, h8 = _run(tiny_config(data_dir, num_devices=8), tmp_path / 'eight')
  assert s8['num_devices'] == 8
  for a, b in zip(h1, h8):
    assert a['pipeline_hash_first'] == b['pipeline_hash_first']
    assert a['pipeline_hash_all'] == b['pipeline_hash_all']
    # Same samples; only the order of float reductions differs between 1 and 8 devices.
    np.testing.assert_allclose(a['train_loss'], b['train_loss'], rtol=2e-3)
    np.testing.assert_allclose(a['hr'], b['hr'], atol=0.02)
  assert s1['eval_candidates_hash'] == s8['eval_candidates_hash']


def _tiny_model_and_data(data_dir, **overrides):
  config = tiny_config(data_dir, **overrides)
  dataset = data_lib.load(config.dataset, config.validation)
  mesh = steps.make_mesh(2)
  model = models.create_model(config.model, dataset.num_users, dataset.num_items, 'float32')
  init_key, data_key, _ = steps.make_keys(0, mesh)
  state = steps.create_train_state(config, model, init_key, mesh)
  data = sampling.to_device(dataset, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  return config, dataset, mesh, model, state.params, data, data_key


def _brute_force(model, params, dataset, items, split):
  """HR, NDCG, MRR on the sampled candidates and HR, MRR, Recall over all candidates."""
  grid_u, grid_i = np.meshgrid(
    np.arange(dataset.num_users), np.arange(dataset.num_items), indexing='ij'
  )
  scores = np.asarray(
    model.apply({'params': params}, jnp.asarray(grid_u.ravel()), jnp.asarray(grid_i.ravel()))
  ).reshape(grid_u.shape)
  held = dataset.valid_items if split == 'valid' else dataset.test_items
  out = collections.defaultdict(list)
  for u in range(dataset.num_users):
    pos = held[u]
    negs = set(items[u, 1:].tolist()) - {pos}  # duplicates and copies count once/not
    rank = sum(scores[u, i] >= scores[u, pos] for i in negs)
    out['hr'].append(rank < 10)
    out['ndcg'].append(1 / np.log2(rank + 2) if rank < 10 else 0.0)
    out['mrr'].append(1 / (rank + 1) if rank < 10 else 0.0)
    # All items but the training positives and the excluded held-out items: the test
    # item competes in validation; test excludes the validation item.
    excluded = set(dataset.train_items[dataset.user_offsets[u] : dataset.user_offsets[u + 1]])
    excluded |= {pos}
    if split == 'test' and dataset.valid_items is not None:
      excluded.add(dataset.valid_items[u])
    others = [i for i in range(dataset.num_items) if i not in excluded]
    full = sum(scores[u, i] >= scores[u, pos] for i in others)
    out['full_hr'].append(full < 10)
    out['full_mrr'].append(1 / (full + 1) if full < 10 else 0.0)
    out['full_recall'].append(float(full < 10))  # one relevant item per user
  return {k: np.mean(v) for k, v in out.items()}


# CI runs two (CI time); the slow two differ only in which held-out items are excluded.
@pytest.mark.parametrize(
  'match_mlperf,validation,split',
  [
    (False, 'none', 'test'),
    pytest.param(True, 'none', 'test', marks=pytest.mark.slow),
    (False, 'leave_one_out', 'valid'),
    pytest.param(False, 'leave_one_out', 'test', marks=pytest.mark.slow),
  ],
)
def test_sampled_and_full_ranking_metrics_match_a_numpy_brute_force(
  data_dir, match_mlperf, validation, split
):
  config, dataset, mesh, model, params, data, data_key = _tiny_model_and_data(
    data_dir,
    eval_full_ranking=True,
    match_mlperf=match_mlperf,
    eval_batch_size=64,
    validation=validation,
    full_ranking_chunk=64,
  )
  eval_step = steps.make_eval_step(
    config, mesh, model, dataset.num_users, dataset.num_items, split=split
  )
  got, _ = steps.evaluate(eval_step, params, data, data_key, dataset.num_users, 64)
  _, items = pipeline.eval_candidates(
    dataset, data_key, num_neg=config.eval_num_neg, match_mlperf=match_mlperf, split=split
  )
  want = _brute_force(model, params, dataset, items, split)
  for k in ('hr', 'full_hr', 'full_recall'):
    np.testing.assert_allclose(got[k], want[k], atol=1e-6, err_msg=k)
  for k in ('ndcg', 'mrr', 'full_mrr'):
    np.testing.assert_allclose(got[k], want[k], atol=1e-5, err_msg=k)


@pytest.mark.slow  # CI: the NumPy brute-force tests check full ranking at one chunk
def test_full_ranking_results_do_not_depend_on_the_chunk_and_memory_is_bounded(data_dir):
  results, temp = {}, {}
  for chunk in (7, 200, 1000):  # 200 items: a ragged last chunk, one exact, one wider
    config, dataset, mesh, model, params, data, data_key = _tiny_model_and_data(
      data_dir, eval_full_ranking=True, eval_batch_size=64, full_ranking_chunk=chunk
    )
    eval_step = steps.make_eval_step(config, mesh, model, dataset.num_users, dataset.num_items)
    results[chunk] = steps.evaluate(eval_step, params, data, data_key, dataset.num_users, 64)
    compiled = eval_step.lower(params, data, data_key, np.int32(0)).compile()
    temp[chunk] = compiled.memory_analysis().temp_size_in_bytes
  assert results[200] == results[7] == results[1000]
  # Scores and activations of users x chunk pairs, not users x all items.
  assert temp[7] * 3 < temp[200] < temp[1000], temp


def test_eval_with_a_padded_last_batch_compiles_once(data_dir):
  config, dataset, mesh, model, params, data, data_key = _tiny_model_and_data(
    data_dir, eval_batch_size=128
  )
  assert dataset.num_users % 128, 'the last eval batch must be padded for this test'
  eval_step = steps.make_eval_step(config, mesh, model, dataset.num_users, dataset.num_items)
  steps.evaluate(eval_step, params, data, data_key, dataset.num_users, 128)
  steps.evaluate(eval_step, params, data, data_key, dataset.num_users, 128)
  assert eval_step._cache_size() == 1


@pytest.mark.slow  # multidevice_cli_test draws a seed (seed=-1) and reruns it in CI
def test_seed_none_draws_a_seed_and_records_it_so_the_run_can_be_repeated(data_dir, tmp_path):
  _, s1, _ = _run(tiny_config(data_dir, seed=None, num_epochs=1), tmp_path / 'drawn')
  _, s2, _ = _run(tiny_config(data_dir, seed=s1['seed'], num_epochs=1), tmp_path / 'again')
  assert s1['params_hash'] == s2['params_hash']


def test_neumf_starts_from_pretrained_gmf_and_mlp_workdirs(data_dir, tmp_path):
  runs = {}
  for name in ('gmf', 'mlp'):
    state, _, _ = _run(tiny_config(data_dir, num_epochs=1, **{'model.name': name}), tmp_path / name)
    runs[name] = jax.device_get(state.params)
  config = tiny_config(
    data_dir,
    num_epochs=1,
    **{
      'model.pretrained_gmf': str(tmp_path / 'gmf'),
      'model.pretrained_mlp': str(tmp_path / 'mlp'),
    },
  )
  dataset = data_lib.load(config.dataset)
  mesh = steps.make_mesh(1)
  model = models.create_model(config.model, dataset.num_users, dataset.num_items, 'float32')
  state = steps.create_train_state(config, model, steps.make_keys(0, mesh)[0], mesh)
  params = jax.device_get(pretrained.load_pretrained(config, state, mesh))
  np.testing.assert_array_equal(
    params['gmf']['gmf_item']['embedding'], runs['gmf']['gmf']['gmf_item']['embedding']
  )
  np.testing.assert_array_equal(params['mlp_0']['kernel'], runs['mlp']['mlp_0']['kernel'])


@pytest.mark.parametrize('name', ['default', 'mlperf', 'ncf_paper', 'mf_baseline'])
def test_every_config_defines_the_public_fields(name):
  import importlib

  config = importlib.import_module(f'configs.{name}').get_config()
  for field in (
    'seed',
    'num_epochs',
    'batch_size',
    'eval_batch_size',
    'learning_rate',
    'beta1',
    'beta2',
    'eps',
    'num_neg',
    'eval_num_neg',
    'top_k',
    'hr_threshold',
    'match_mlperf',
    'hash_pipeline',
    'eval_full_ranking',
    'dtype',
    'optimizer',
    'validation',
    'select_metric',
    'early_stop_patience',
    'full_ranking_chunk',
  ):
    assert field in config, field
  for field in ('name', 'mf_dim', 'mlp_layers', 'dropout', 'l2', 'l2_params', 'embed_init_std'):
    assert field in config.model
  for field in ('name', 'source', 'data_dir', 'download', 'min_ratings'):
    assert field in config.dataset


def test_mlperf_config_matches_the_published_settings():
  from configs import mlperf

  c, ref = mlperf.get_config(), mlperf.get_config('reference')
  assert (c.batch_size, c.learning_rate, c.beta1, c.beta2, c.eps) == (
    1048576,
    0.0045,
    0.25,
    0.5,
    1e-8,
  )
  assert (ref.batch_size, ref.learning_rate, ref.beta1, ref.beta2) == (2048, 0.0005, 0.9, 0.999)
  assert (c.eval_num_neg, c.top_k, c.hr_threshold, c.num_epochs, c.match_mlperf) == (
    999,
    10,
    0.635,
    20,
    True,
  )
  assert tuple(c.model.mlp_layers) == (256, 256, 128, 64) and c.model.mf_dim == 64


@pytest.mark.parametrize('name', ['ncf_paper', 'mf_baseline'])
def test_research_configs_select_on_validation_and_stop_early_well_below_their_cap(name):
  import importlib

  config = importlib.import_module(f'configs.{name}').get_config()
  config_checks.validate_config(config, 1)
  assert config.validation == 'leave_one_out' and config.hr_threshold is None
  assert config.select_metric == 'hr' and config.early_stop_patience > 0
  assert config.num_epochs >= 5 * config.early_stop_patience
  assert not config.match_mlperf and config.eval_num_neg == 100 and config.top_k == 10


def test_mf_baseline_is_rendle_et_al_2020s_recipe():
  from configs import mf_baseline

  c = mf_baseline.get_config()
  assert (c.model.name, c.optimizer, c.num_neg, c.model.embed_init_std) == ('mf', 'sgd', 8, 0.1)
  # reg 0.005 per example (their update subtracts reg * row) and step 0.002 per example,
  # with a batch-mean loss over batch_size examples.
  assert c.model.l2 == pytest.approx(0.005 / 2) and c.model.l2_params == 0
  assert c.learning_rate == pytest.approx(0.002 * c.batch_size)
  assert 16 <= c.model.mf_dim <= 192 and c.num_epochs == 256


def _cli(*args, cwd=REPO):
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  return subprocess.run(
    [sys.executable, '-m', 'ncf_jax.train', *args],
    cwd=cwd,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_cli_rejects_an_unknown_config_field_by_name(tmp_path):
  out = _cli('--config=configs/default.py', '--config.no_such_field=3', f'--workdir={tmp_path}')
  assert out.returncode != 0
  assert 'no_such_field' in out.stderr
  assert 'Traceback' not in out.stderr


def test_cli_mlperf_without_data_says_how_to_get_it(tmp_path):
  out = _cli(
    '--config=configs/mlperf.py',
    f'--config.dataset.data_dir={tmp_path}',
    f'--workdir={tmp_path / "run"}',
  )
  assert out.returncode != 0
  assert 'Traceback' not in out.stderr
  assert 'download' in out.stderr.lower() and 'ml-20m' in out.stderr


def test_cli_trains_and_writes_its_outputs(data_dir, tmp_path):
  out = _cli(
    '--config=configs/default.py',
    f'--config.dataset.data_dir={data_dir}',
    '--config.dataset.synthetic_num_users=300',
    '--config.dataset.synthetic_num_items=200',
    '--config.dataset.synthetic_mean_interactions=30',
    '--config.num_epochs=1',
    '--config.batch_size=1024',
    '--config.eval_batch_size=128',
    '--config.eval_num_neg=50',
    '--config.hash_pipeline=True',
    f'--workdir={tmp_path / "run"}',
  )
  assert out.returncode == 0, out.stderr[-2000:]
  for line in (
    'Iteration 1: HR = ',
    '[params_hash] ',
    '[pipeline_hash] First batch hash: ',
    '[pipeline_hash] All batches hash: ',
    '[pipeline_hash] Batch count: ',
    '[pipeline_hash] Eval candidates hash: ',
  ):
    assert line in out.stderr, line
  for name in ('config.json', 'metrics.jsonl', 'summary.json'):
    assert (tmp_path / 'run' / name).exists()
  assert list((tmp_path / 'run' / 'tensorboard').iterdir())
  record = json.loads((tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()[0])
  for k in (
    'epoch',
    'hr',
    'ndcg',
    'train_loss',
    'train_samples_per_sec',
    'epoch_wall_s',
    'total_wall_s',
  ):
    assert k in record
  # params_hash reproduces only with the same libraries: the summary names them.
  summary = json.loads((tmp_path / 'run' / 'summary.json').read_text())
  import importlib.metadata as md

  assert summary['versions']['jax'] == jax.__version__
  assert summary['versions']['flax'] == md.version('flax')
  assert summary['versions']['optax'] and summary['versions']['orbax-checkpoint']
  assert summary['platform'] == 'cpu'
