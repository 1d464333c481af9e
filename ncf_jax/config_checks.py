"""Config checks that run before any expensive work: one UserError naming field and range."""

import ml_collections

from ncf_jax import config_paths, models, parallel, pipeline, sampling, steps
from ncf_jax import data as data_lib
from ncf_jax.errors import UserError

# Values of config.select_metric.
SELECT_METRICS = ('hr', 'ndcg')
INT32_MAX = 2**31 - 1


def resolve_model_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` whose None fields named in `models.DEFAULTS` take the model's value.

  Run once, before anything reads those fields, so that config.json, checkpoints (and so
  resume and `ncf_jax.evaluate`) record the values a run used. A value the config sets
  wins; a config without None fields is returned unchanged (as a copy).
  """
  name = config.model.name
  if name not in models.DEFAULTS:
    raise UserError(
      f'config.model.name={name!r} is invalid: use one of {", ".join(models.MODEL_NAMES)}.'
    )
  resolved = config.copy_and_resolve_references()
  for path, value in models.DEFAULTS[name].items():
    if config_paths.get(resolved, path) is None:
      config_paths.set_value(resolved, path, value)
  return resolved


def _bad(field, value, allowed):
  raise UserError(f'config.{field}={value!r} is invalid: {allowed}.')


def validate_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Raises UserError naming the field, its value and the allowed range.

  Checks the values a run will use: None fields take the model's defaults first.
  """
  if config.model.name not in models.MODEL_NAMES:
    _bad('model.name', config.model.name, f'use one of {", ".join(models.MODEL_NAMES)}')
  config = resolve_model_defaults(config)
  _check_sizes(config, num_devices)
  _check_optimizer(config)
  _check_model(config)
  _check_protocol(config)
  _check_loop(config)
  _validate_sharding(config, _bad)


def _check_sizes(config, num_devices: int) -> None:
  """Batch sizes, negatives and top_k."""
  for f in ('batch_size', 'eval_batch_size', 'num_neg', 'eval_num_neg'):
    if int(config[f]) > INT32_MAX:  # sizes travel into the compiled steps as int32
      _bad(f, config[f], f'it must be at most {INT32_MAX:,} (int32)')
  if int(config.batch_size) <= 0 or int(config.batch_size) % num_devices:
    _bad(
      'batch_size',
      config.batch_size,
      f'it must be a positive multiple of the global device count ({num_devices})',
    )
  if int(config.eval_batch_size) <= 0 or int(config.eval_batch_size) % num_devices:
    _bad(
      'eval_batch_size',
      config.eval_batch_size,
      f'it must be a positive multiple of the global device count ({num_devices})',
    )
  if int(config.num_neg) < 1:
    _bad('num_neg', config.num_neg, 'it must be >= 1')
  if int(config.eval_num_neg) < 1:
    _bad('eval_num_neg', config.eval_num_neg, 'it must be >= 1')
  if not 1 <= int(config.top_k) <= int(config.eval_num_neg) + 1:
    _bad(
      'top_k', config.top_k, f'it must be in [1, eval_num_neg + 1 = {int(config.eval_num_neg) + 1}]'
    )


def _check_optimizer(config) -> None:
  """The optimizer, its settings and the epoch count."""
  if config.optimizer not in steps.OPTIMIZERS:
    _bad('optimizer', config.optimizer, f'use one of {", ".join(steps.OPTIMIZERS)}')
  if not float(config.learning_rate) > 0:
    _bad('learning_rate', config.learning_rate, 'it must be > 0')
  for f in ('beta1', 'beta2'):
    if not 0 <= float(config[f]) < 1:
      _bad(f, config[f], 'it must be in [0, 1)')
  if not float(config.eps) >= 0:
    _bad('eps', config.eps, 'it must be >= 0')
  if int(config.num_epochs) < 1:
    _bad('num_epochs', config.num_epochs, 'it must be >= 1')


def _check_model(config) -> None:
  """The model's shapes, regularisation and initialisation."""
  if config.dtype not in ('float32', 'bfloat16'):
    _bad('dtype', config.dtype, "use 'float32' or 'bfloat16'")
  if config.model.first_layer not in models.FIRST_LAYERS:
    _bad(
      'model.first_layer', config.model.first_layer, f'use one of {", ".join(models.FIRST_LAYERS)}'
    )
  layers = config.model.mlp_layers
  if isinstance(layers, str) or not all(
    isinstance(w, int) and not isinstance(w, bool) for w in layers
  ):
    _bad('model.mlp_layers', layers, "a tuple of integer widths, e.g. '(64,32,16)'")
  layers = tuple(layers)
  if config.model.name in ('neumf', 'mlp') and (
    len(layers) < 1 or layers[0] % 2 or min(layers) < 1
  ):
    _bad('model.mlp_layers', layers, 'positive widths; the first (user+item) must be even')
  if int(config.model.mf_dim) < 1:
    _bad('model.mf_dim', config.model.mf_dim, 'it must be >= 1')
  if not 0 <= float(config.model.dropout) < 1:
    _bad('model.dropout', config.model.dropout, 'it must be in [0, 1)')
  for f in ('model.l2', 'model.l2_params'):
    if not float(config_paths.get(config, f)) >= 0:
      _bad(f, config_paths.get(config, f), 'it must be >= 0')
  if not float(config.model.embed_init_std) > 0:
    _bad('model.embed_init_std', config.model.embed_init_std, 'it must be > 0')


def _check_protocol(config) -> None:
  """The evaluation protocol: the quality target, the validation split, the data."""
  if config.hr_threshold is not None and not 0 < float(config.hr_threshold) <= 1:
    _bad('hr_threshold', config.hr_threshold, 'it must be in (0, 1] or None')
  if config.validation not in data_lib.VALIDATIONS:
    _bad('validation', config.validation, f'use one of {", ".join(data_lib.VALIDATIONS)}')
  data_lib.check_config(config.dataset)  # each source checks its own fields; no data read
  if config.select_metric not in SELECT_METRICS:
    _bad('select_metric', config.select_metric, f'use one of {", ".join(SELECT_METRICS)}')
  if int(config.early_stop_patience) < 0:
    _bad(
      'early_stop_patience', config.early_stop_patience, 'it must be >= 0 (0: no early stopping)'
    )
  if int(config.full_ranking_chunk) < 1:
    _bad('full_ranking_chunk', config.full_ranking_chunk, 'it must be >= 1')
  if config.validation == 'none':
    if int(config.early_stop_patience):
      _bad(
        'early_stop_patience',
        config.early_stop_patience,
        'early stopping reads the validation split: set config.validation=leave_one_out, or use 0',
      )
    if not config.test_at_end:
      _bad(
        'test_at_end',
        config.test_at_end,
        'without a validation split the test split is what each epoch evaluates: use True, '
        'or set config.validation=leave_one_out',
      )
  else:
    if config.hr_threshold is not None:
      _bad(
        'hr_threshold',
        config.hr_threshold,
        'it stops on the test HR, which a run with a '
        'validation split reads only once, at the end: use None (stop with '
        'early_stop_patience)',
      )
    if config.match_mlperf:
      _bad(
        'match_mlperf',
        config.match_mlperf,
        'the MLPerf reference has no validation split: use False with validation=leave_one_out',
      )


def _check_loop(config) -> None:
  """How the loop runs: evaluation and checkpoint cadence, and when it stops."""
  if not float(config.divergence_factor) >= 0:
    _bad('divergence_factor', config.divergence_factor, 'it must be >= 0 (0 = never stop)')
  for f in ('eval_every_epochs', 'keep_checkpoints', 'steps_per_call'):
    if int(config[f]) < 1:
      _bad(f, config[f], 'it must be >= 1')
  if not float(config.stall_timeout_s) >= 0:
    _bad('stall_timeout_s', config.stall_timeout_s, 'it must be >= 0 (0 disables it)')
  for f in ('log_every_steps', 'checkpoint_every_epochs'):
    if int(config[f]) < 0:
      _bad(f, config[f], 'it must be >= 0')


def _validate_sharding(config, bad) -> None:
  """config.sharding and the combinations its layout does not support."""
  parallel.validate_config(config, bad)


def validate_against_data(config, dataset: data_lib.Dataset) -> None:
  """Checks that need the dataset: sizes the index arithmetic holds, enough candidates.

  The limits are those of docs/scale.md ("Indices past 32 bits"); each refusal names
  the limit, the dataset's figure and what to change.
  """
  _check_index_limits(config, dataset)
  degrees = dataset.user_degrees()
  worst = int(degrees.max()) if degrees.size else 0
  held = 0 if config.match_mlperf else 1 + (dataset.valid_items is not None)
  candidates = dataset.num_items - worst - held
  if int(config.eval_num_neg) > candidates:
    raise UserError(
      f'config.eval_num_neg={config.eval_num_neg} is invalid: the most active user has '
      f'{worst} training positives, leaving only {candidates} candidate negatives of '
      f'{dataset.num_items} items; use eval_num_neg <= {candidates}.'
    )
  if (config.model.pretrained_gmf or config.model.pretrained_mlp) and config.model.name != 'neumf':
    raise UserError('config.model.pretrained_gmf/pretrained_mlp need model.name=neumf.')


def _check_index_limits(config, dataset) -> None:
  """Raises UserError for sizes past what the sampler's int32/uint32/Wide indices hold."""
  int32_max = sampling.INT32_MAX
  n_users, n_items, n_train = dataset.num_users, dataset.num_items, dataset.num_train
  name = getattr(dataset, 'name', 'the dataset')
  if n_users + 1 > int32_max or n_items > int32_max:
    raise UserError(
      f'{name} has {n_users:,} users and {n_items:,} items: user ids (and the offsets '
      f'table of num_users + 1 entries) and item ids are int32, so at most '
      f'{int32_max - 1:,} users and {int32_max:,} items; use a smaller catalogue.'
    )
  if n_train + n_users > int32_max:
    raise UserError(
      f'{name} has {n_train:,} training positives and {n_users:,} users: the sampler '
      f'indexes positives and its bitmap words (num_train + num_users entries) with '
      f'int32, so num_train + num_users <= {int32_max:,}; subsample the positives.'
    )
  num_neg, batch = int(config.num_neg), int(config.batch_size)
  slots = pipeline.epoch_size(n_train, num_neg)
  steps = pipeline.steps_per_epoch(n_train, num_neg, batch)
  if steps * batch > sampling.MAX_WIDE_SLOTS:
    raise UserError(
      f'an epoch of {name} has {slots:,} slots ({n_train:,} positives x (1 + '
      f'config.num_neg={num_neg})), {steps * batch:,} with the last batch padded: epoch '
      f'positions are exact up to 2**40 = {sampling.MAX_WIDE_SLOTS:,}; lower num_neg.'
    )
  if steps > int32_max:
    raise UserError(
      f'config.batch_size={batch} gives {steps:,} steps per epoch of {name}: step '
      f'numbers are int32 (at most {int32_max:,}); use a larger batch_size.'
    )
  if pipeline.wide_positions(n_train, num_neg, batch) and 1 + num_neg > 1 << 16:
    raise UserError(
      f'config.num_neg={num_neg} is invalid for {name}: its epoch has {slots:,} slots, '
      f'past 2**32 - 2**17, where a slot is split into (positive, negative number) by '
      f'16-bit long division, so 1 + num_neg <= 65536; use num_neg <= 65535.'
    )
  cols = 1 + int(config.eval_num_neg)
  if n_users * cols > 1 << 32:
    raise UserError(
      f'config.eval_num_neg={config.eval_num_neg} is invalid for {name}: its '
      f'{n_users:,} users x (1 + eval_num_neg) = {n_users * cols:,} candidates pass '
      f'2**32, the range of the uint32 candidate counters and hash positions; use '
      f'eval_num_neg <= {(1 << 32) // max(n_users, 1) - 1}.'
    )


def fixed_seed(config) -> int | None:
  """The seed the config fixes, or None when it asks for a drawn one (None or < 0)."""
  if config.seed is None or int(config.seed) < 0:
    return None
  return int(config.seed)
