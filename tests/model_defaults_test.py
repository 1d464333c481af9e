"""Per-model defaults: None config fields take the model's values, and every model learns.

The learning test runs each of gmf, mlp and mf at configs/default.py unchanged (default
data, default epochs as the cap) and stops as soon as the test HR@10 reaches popularity +
0.1 (`hr_threshold`): after 3, 4 and 3 epochs, most of the time being compilation. NeuMF at
the default config is train_test.py's
test_default_config_learns_close_to_the_oracle_and_far_above_popularity (all 8 epochs, the
same bound), so it is not trained again here.
"""

import json
import os

import pytest

from configs import default, mf_baseline, mlperf, ncf_paper
from ncf_jax import baselines, config_checks, models, steps, train
from ncf_jax import data as data_lib
from ncf_jax.errors import UserError


def _default(name):
  config = default.get_config()
  config.model.name = name
  return config


def test_every_model_has_defaults_and_neumf_keeps_the_values_it_always_had():
  assert set(models.DEFAULTS) == set(models.MODEL_NAMES)
  assert models.DEFAULTS['neumf'] == {'learning_rate': 0.002, 'model.embed_init_std': 0.01}


@pytest.mark.parametrize('name', models.MODEL_NAMES)
def test_none_fields_take_the_models_defaults_and_the_input_is_unchanged(name):
  config = _default(name)
  assert config.learning_rate is None and config.model.embed_init_std is None
  resolved = config_checks.resolve_model_defaults(config)
  assert resolved.learning_rate == models.DEFAULTS[name]['learning_rate']
  assert resolved.model.embed_init_std == models.DEFAULTS[name]['model.embed_init_std']
  assert config.learning_rate is None and config.model.embed_init_std is None
  assert config_checks.resolve_model_defaults(resolved) == resolved  # idempotent


def test_a_value_the_config_sets_wins_over_the_models_default():
  config = _default('gmf')
  config.learning_rate = 0.0005
  resolved = config_checks.resolve_model_defaults(config)
  assert resolved.learning_rate == 0.0005
  assert resolved.model.embed_init_std == models.DEFAULTS['gmf']['model.embed_init_std']


def test_an_unknown_model_is_one_user_error_naming_the_field():
  with pytest.raises(
    UserError,
    match=r"config.model.name='nope' is invalid: use one of "
    r'neumf, gmf, mlp, mf',
  ):
    config_checks.resolve_model_defaults(_default('nope'))


def test_a_config_field_left_none_is_checked_at_its_resolved_value():
  config_checks.validate_config(_default('mlp'), 1)
  config = _default('mf')
  config.learning_rate = -1.0
  with pytest.raises(UserError, match='config.learning_rate=-1.0 is invalid'):
    config_checks.validate_config(config, 1)


@pytest.mark.parametrize(
  'get_config, lr, init_std',
  [
    (mlperf.get_config, 0.0045, 0.01),
    (lambda: mlperf.get_config('reference'), 0.0005, 0.01),
    (ncf_paper.get_config, 0.001, 0.01),
    (mf_baseline.get_config, 0.002 * 1024, 0.1),
  ],
)
def test_the_named_configs_resolve_to_the_values_they_always_had(get_config, lr, init_std):
  resolved = config_checks.resolve_model_defaults(get_config())
  assert resolved.learning_rate == pytest.approx(lr)
  assert resolved.model.embed_init_std == init_std


@pytest.fixture(scope='module')
def default_runs(tmp_path_factory):
  """train(name) -> (workdir, config, history): each model trained once at the default
  config and data, stopped once the test HR@10 reaches the default data's popularity HR@10
  + 0.1 (num_epochs, 8, is the cap); `popularity` is that baseline on the run's candidates."""
  data_dir = str(tmp_path_factory.mktemp('data'))
  config = default.get_config()
  config.dataset.data_dir = data_dir
  dataset = data_lib.load(config.dataset)
  _, data_key, _ = steps.make_keys(int(config.seed), steps.make_mesh(1))
  popularity = baselines.evaluate_scorer(
    dataset,
    data_key,
    baselines.popularity_scorer(dataset),
    num_neg=config.eval_num_neg,
    top_k=config.top_k,
  )['hr']
  done = {}

  def train_model(name):
    if name not in done:
      config = _default(name)
      config.dataset.data_dir = data_dir
      config.num_devices = 1  # the 8 forced host devices only slow a 2-core machine down
      config.hr_threshold = popularity + 0.1
      workdir = str(tmp_path_factory.mktemp(name))
      train.train_and_evaluate(config, workdir)
      with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        done[name] = workdir, config, [json.loads(line) for line in f]
    return done[name]

  train_model.popularity = popularity
  return train_model


@pytest.mark.parametrize('name', ['gmf', 'mlp', 'mf'])
def test_each_model_at_the_default_config_beats_popularity_by_0_1(name, default_runs):
  workdir, _, history = default_runs(name)
  popularity = default_runs.popularity
  assert max(r['hr'] for r in history) >= popularity + 0.1, (history, popularity)
  assert len(history) <= default.get_config().num_epochs
  with open(os.path.join(workdir, 'config.json')) as f:
    saved = json.load(f)  # the run records the values it resolved
  assert saved['learning_rate'] == models.DEFAULTS[name]['learning_rate']
  assert saved['model']['embed_init_std'] == models.DEFAULTS[name]['model.embed_init_std']


def test_resume_and_evaluate_read_the_resolved_values_the_run_recorded(default_runs):
  """None and the value it resolved to are the same run; another value is not."""
  from ncf_jax import evaluate as evaluate_lib

  workdir, config, history = default_runs('gmf')
  result = evaluate_lib.evaluate_checkpoint(workdir)
  assert result['hr'] == history[-1]['hr']
  config = config.copy_and_resolve_references()
  config.learning_rate = models.DEFAULTS['gmf']['learning_rate']
  train.train_and_evaluate(config, workdir)  # resumes: the target is already reached
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    assert [json.loads(line) for line in f] == history
  config.learning_rate = 0.5
  with pytest.raises(UserError, match='cannot resume.*learning_rate: saved 0.016, now 0.5'):
    train.train_and_evaluate(config, workdir)
