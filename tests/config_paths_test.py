"""ncf_jax.config_paths: get, set, flatten and the unknown-field messages built on them."""

import pytest

from configs import default
from experiments import sweep
from ncf_jax import checkpoint, config_paths, errors

DEFAULT_FILE_HINT = 'Every field is defined, with a comment, in configs/default.py.'


def test_get_reads_leaves_groups_and_the_config_itself():
  config = default.get_config()
  assert config_paths.get(config, 'model.mlp_layers') == (64, 32, 16)
  assert config_paths.get(config, ['dataset', 'name']) == 'synthetic'
  assert config_paths.get(config, 'model') is config.model
  assert config_paths.get(config, '') is config
  assert config_paths.get(config, 'model.embed_init_std') is None  # a placeholder's None
  assert config_paths.get(config, 'seed') == 0  # a FieldReference's value


@pytest.mark.parametrize('path', ['model.mf_dimm', 'modle.mf_dim', 'num_epochs.x', 'zzz'])
def test_get_of_an_unknown_path_raises_or_returns_the_default(path):
  config = default.get_config()
  with pytest.raises(KeyError, match=path):
    config_paths.get(config, path)
  assert config_paths.get(config, path, config_paths.MISSING) is config_paths.MISSING
  assert config_paths.get(config, path, None) is None


def test_get_reads_the_json_form_too():
  saved = config_paths.to_json_dict(default.get_config())
  assert config_paths.get(saved, 'model.mlp_layers') == [64, 32, 16]
  assert config_paths.get(saved, 'model.nope', 7) == 7


def test_set_value_and_override_set_in_place_with_configdict_rules():
  config = default.get_config()
  config_paths.set_value(config, 'model.mf_dim', 8)
  config_paths.set_value(config, 'model.embed_init_std', 0.05)  # placeholder(float)
  config_paths.set_value(config, 'seed', 3)  # FieldReference
  assert (config.model.mf_dim, config.model.embed_init_std, config.seed) == (8, 0.05, 3)
  assert config_paths.override(config, {'num_epochs': 1, 'dataset.name': 'ml-1m'}) is config
  assert (config.num_epochs, config.dataset.name) == (1, 'ml-1m')
  with pytest.raises(KeyError):
    config_paths.set_value(config, 'modle.mf_dim', 8)
  with pytest.raises(TypeError):
    config_paths.set_value(config, 'model.mf_dim', 'wide')


def test_override_on_a_locked_config_refuses_new_fields():
  config = default.get_config()
  config.lock()
  with pytest.raises(KeyError, match='Did you mean "mf_dim"'):
    config_paths.override(config, {'model.mf_dimm': 8})


def test_flatten_names_every_leaf_of_the_config_and_of_its_json_form():
  config = default.get_config()
  flat = config_paths.flatten(config)
  assert flat['model.mlp_layers'] == (64, 32, 16)
  assert flat['dataset.name'] == 'synthetic'
  assert 'model' not in flat and 'dataset' not in flat
  groups = ('model', 'dataset')
  count = sum(len(config[g]) for g in groups) + len(config) - len(groups)
  assert len(flat) == count
  assert config_paths.leaf_paths(config) == list(flat)
  json_flat = config_paths.flatten(config_paths.to_json_dict(config))
  assert set(json_flat) == set(flat)
  assert json_flat['model.mlp_layers'] == [64, 32, 16]
  assert config_paths.flatten({'a': {}, 'b': {'c': 1}}) == {'b.c': 1}


def test_first_unknown_is_the_index_of_the_missing_part():
  config = default.get_config()
  assert config_paths.first_unknown(config, 'modle.mf_dim') == 0
  assert config_paths.first_unknown(config, 'model.mf_dimm') == 1
  assert config_paths.first_unknown(config, 'model.mf_dim') is None
  assert config_paths.first_unknown(config, 'num_epochs.x') is None  # below a leaf


def test_from_keywords_spells_keyword_arguments_as_paths():
  assert config_paths.from_keywords({'model__first_layer': 'concat', 'num_epochs': 1}) == {
    'model.first_layer': 'concat',
    'num_epochs': 1,
  }


@pytest.mark.parametrize(
  'path, message',
  [
    (
      'model.mf_dimm',
      'unknown config field config.model.mf_dimm (from --config.model.mf_dimm=3): '
      f'did you mean config.model.mf_dim? {DEFAULT_FILE_HINT}',
    ),
    (
      'modle.mf_dim',
      'unknown config field config.modle (from --config.modle.mf_dim=3): '
      f'did you mean config.model? {DEFAULT_FILE_HINT}',
    ),
    ('zzz', f'unknown config field config.zzz (from --config.zzz=3). {DEFAULT_FILE_HINT}'),
  ],
)
def test_unknown_command_line_field_names_the_closest(path, message):
  argv = ['train', '--config=configs/default.py', f'--config.{path}=3']
  got = errors._flag_error_message(KeyError(path), argv, {}, load=default.get_config)
  assert got == message


@pytest.mark.parametrize(
  'path, message',
  [
    (
      'model.mf_dimm',
      'config.model.mf_dimm is not a field of configs/default.py; '
      'did you mean config.model.mf_dim, config.model.name?',
    ),
    (
      'num_epochs.x',
      'config.num_epochs.x is not a field of configs/default.py; '
      'did you mean config.num_epochs, config.num_devices?',
    ),
    ('zzz', 'config.zzz is not a field of configs/default.py.'),
    (
      'model',
      'config.model is a group of fields in configs/default.py; '
      'set its fields (e.g. config.model.dropout).',
    ),
  ],
)
def test_unknown_sweep_field_names_the_closest(path, message):
  with pytest.raises(errors.UserError) as e:
    sweep.apply_overrides(default.get_config(), {f'config.{path}': 3}, 'configs/default.py')
  assert str(e.value) == message


def test_resumable_fields_are_declared_with_the_fields():
  """configs/default.py declares them; each names a leaf; checkpoint reads them there."""
  config = default.get_config()
  assert checkpoint.RESUMABLE_FIELDS is default.RESUMABLE_FIELDS
  assert len(set(default.RESUMABLE_FIELDS)) == len(default.RESUMABLE_FIELDS)
  leaves = set(config_paths.leaf_paths(config))
  assert set(default.RESUMABLE_FIELDS) <= leaves


def test_check_compatible_ignores_resumable_fields_and_names_the_others():
  config = default.get_config()
  saved = {'config': checkpoint.config_to_dict(config), 'seed': 0}
  now = default.get_config()
  for path in checkpoint.RESUMABLE_FIELDS:
    value = config_paths.get(now, path)
    changed = {bool: lambda v: not v, int: lambda v: v + 1, str: lambda v: v + 'x'}
    if type(value) in changed:
      config_paths.set_value(now, path, changed[type(value)](value))
  now.hr_threshold = 0.5
  checkpoint.check_compatible(saved, now, 0)  # only resumable fields differ
  now.model.mlp_layers = (32, 16)
  with pytest.raises(errors.UserError) as e:
    checkpoint.check_compatible(saved, now, 0)
  assert str(e.value) == (
    'cannot resume: the workdir holds a run with a different config (model.mlp_layers: '
    'saved [64, 32, 16], now [32, 16]). Use a new --workdir, or restore those values. '
    f'Fields that may change on resume: {", ".join(default.RESUMABLE_FIELDS)}.'
  )
