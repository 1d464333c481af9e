"""Row-sharded embedding tables (`config.sharding='sharded'`) against the replicated run.

On 8 CPU devices and tiny data: the same batches (pipeline hashes, also on 1 and 2
devices), the same raw gradients (the tables' are not all-reduced, so their scale is
checked without Adam's normalisation), the same loss curve and parameters to float
tolerance, checkpoints that restore across modes and device counts, and tables, Adam
moments, the sampler's data and the epoch's items at about 1/n of the replicated bytes per
device.
"""

import _train_helpers as h
import jax
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from ncf_jax import checkpoint as ckpt_lib
from ncf_jax import config_checks, hashing, models, parallel, pipeline, sharding, steps, train
from ncf_jax import data as data_lib
from ncf_jax.errors import UserError

# ~3,000 positives -> 30 steps of 512 per epoch; 120 users pad to 120 on 8 devices, 90
# items to 96 (so one table has padding rows and one has none).
SMALL = dict(
  dataset__synthetic_num_users=120,
  dataset__synthetic_num_items=90,
  dataset__synthetic_mean_interactions=25,
  batch_size=512,
  eval_batch_size=64,
  eval_num_neg=20,
  checkpoint_every_epochs=1,
)


def small_config(data_dir, **overrides):
  return h.tiny_config(data_dir, **dict(SMALL, **overrides))


_unpadded = sharding.unpadded  # a sharded run's tables without their padding rows


def _assert_close(a, b, rtol=1e-4, atol=1e-6):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Replicated 2 epochs; sharded 1 epoch then resumed replicated on 2 devices (8 else)."""
  root = tmp_path_factory.mktemp('sharding')
  data_dir = str(root / 'data')
  out = {'data_dir': data_dir}
  out['repl'] = train.train_and_evaluate(small_config(data_dir, num_epochs=2), str(root / 'repl'))
  out['sharded'] = train.train_and_evaluate(
    small_config(data_dir, num_epochs=1, sharding='sharded'), str(root / 'mixed')
  )
  out['sharded_summary'] = h.summary(str(root / 'mixed'))
  out['resumed'] = train.train_and_evaluate(
    small_config(data_dir, num_epochs=2, num_devices=2), str(root / 'mixed')
  )
  out['repl_dir'], out['mixed_dir'] = str(root / 'repl'), str(root / 'mixed')
  return out


@pytest.mark.slow  # three in-process runs: ~100 s on 2 busy cores
def test_both_modes_see_the_same_batches_and_loss_curve(runs):
  repl, mixed = h.metrics(runs['repl_dir']), h.metrics(runs['mixed_dir'])
  # Epoch 0 sharded on 8 devices, epoch 1 replicated on 2, against replicated on 8.
  h.assert_same_epochs(mixed, repl, keys=h.HASH_KEYS)
  for a, b in zip(mixed, repl):
    np.testing.assert_allclose(a['train_loss'], b['train_loss'], rtol=1e-5)
    np.testing.assert_allclose(a['hr'], b['hr'], atol=1e-9)


@pytest.mark.slow  # three in-process runs: ~100 s on 2 busy cores
def test_sharded_tables_are_split_by_rows_and_padding_stays_zero(runs):
  state = runs['sharded']
  table = state.params['gmf']['gmf_item']['embedding']
  assert table.shape == (96, 16) and table.sharding.spec == P('data')
  assert state.opt_state[0].mu['gmf']['gmf_item']['embedding'].sharding.spec == P('data')
  assert state.params['mlp_0']['kernel'].sharding.spec == P()
  # Padding rows: zero in the table and in both Adam moments after a whole epoch.
  for tree in (state.params, state.opt_state[0].mu, state.opt_state[0].nu):
    assert not np.any(np.asarray(tree['gmf']['gmf_item']['embedding'])[90:])


@pytest.mark.slow  # three in-process runs: ~100 s on 2 busy cores
def test_final_parameters_agree_with_the_replicated_run(runs):
  # The 2-epoch run that switched modes (and device counts) after epoch 0.
  got, want = jax.device_get(runs['resumed'].params), jax.device_get(runs['repl'].params)
  assert jax.tree.map(np.shape, got) == jax.tree.map(np.shape, want)
  _assert_close(got, want)
  # Epoch 1 moved them on from epoch 0's: the agreement is not that of unused params.
  init = jax.device_get(runs['sharded'].params)
  assert not np.allclose(
    got['gmf']['gmf_user']['embedding'], np.asarray(init['gmf']['gmf_user']['embedding'])
  )


@pytest.mark.slow  # three in-process runs: ~100 s on 2 busy cores
def test_bytes_per_device_show_tables_and_moments_at_one_nth(runs):
  state = jax.device_get(runs['repl'].params)
  tables, dense = sharding.split_tables(state)
  size = lambda t: sum(x.nbytes for x in jax.tree.leaves(t))
  padded = sum(sharding.padded_rows(x.shape[0], 8) * x[0].nbytes for x in tables.values())
  got = runs['sharded_summary']['bytes_per_device']
  want = h.summary(runs['repl_dir'])['bytes_per_device']
  assert want['params'] == size(tables) + size(dense)
  assert got['params'] == padded // 8 + size(dense)
  # Adam: two moments per parameter plus its int32 step count.
  assert want['opt_state'] == 2 * want['params'] + 4
  assert got['opt_state'] == 2 * got['params'] + 4
  # The sampler's arrays and the epoch's items: each device its part (plus the users on
  # a boundary, held by both devices, and padding to the longest part).
  assert want['data'] / 8 < got['data'] <= 1.25 * want['data'] / 8
  num_neg = small_config(runs['data_dir']).num_neg
  assert got['epoch'] <= want['epoch'] / 8 + 2 * (1 + num_neg)  # uint16 items
  # The bound: 1/8 of the replicated total, plus the dense layers and their
  # Adam moments (replicated), plus 10 %.
  total = lambda b: sum(b.values())
  assert total(got) <= 1.1 * (total(want) / 8 + 3 * size(dense))


def _state(config, model, mode, ndev, seed=0):
  config.sharding = mode
  mesh = steps.make_mesh(ndev)
  layout = parallel.make_layout(config, mesh)
  return steps.create_train_state(config, model, steps.make_keys(seed, mesh)[0], layout)


@pytest.mark.slow  # ~40 s on 2 busy cores: a state built per layout
def test_a_checkpoint_restores_across_modes_and_device_counts(tmp_path):
  # (A resume across modes, with training on both sides, is in the slow tests above.)
  config = config_checks.resolve_model_defaults(small_config(str(tmp_path / 'data')))
  model = models.create_model(config.model, 120, 90, 'float32')
  ckpts = ckpt_lib.Checkpoints(str(tmp_path / 'run'), 3)
  sharded = _state(config, model, 'sharded', 8, seed=1)  # padded to 96 item rows
  ckpts.save(1, sharded, {})
  ckpts.save(2, _state(config, model, 'replicated', 2, seed=2), {})
  replicated = _state(config, model, 'replicated', 2, seed=2)
  for step, saved, targets in (
    (1, sharded, (('replicated', 1), ('sharded', 2))),
    (2, replicated, (('sharded', 8),)),
  ):
    saved = jax.device_get(saved.params)
    for mode, ndev in targets:
      like = _state(config, model, mode, ndev)
      abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like
      )
      state, _ = ckpts.restore(abstract, step)
      assert jax.tree.map(lambda x: (x.shape, x.sharding), state) == jax.tree.map(
        lambda x: (x.shape, x.sharding), like
      ), (mode, ndev)
      got = jax.device_get(state.params)
      _assert_close(_unpadded(got, saved), _unpadded(saved, got), rtol=0, atol=0)
      assert not np.any(np.asarray(got['gmf']['gmf_item']['embedding'])[90:])
  ckpts.close()


def test_cut_rows_that_are_not_padding_are_refused(tmp_path):
  config = config_checks.resolve_model_defaults(small_config(str(tmp_path / 'data')))
  ckpts = ckpt_lib.Checkpoints(str(tmp_path / 'run'), 3)
  ckpts.save(
    1, _state(config, models.create_model(config.model, 120, 95, 'float32'), 'replicated', 1), {}
  )
  like = _state(config, models.create_model(config.model, 120, 90, 'float32'), 'replicated', 1)
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like
  )
  with pytest.raises(UserError, match='non-zero rows past this run'):
    ckpts.restore(abstract, 1)
  ckpts.close()


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('data'))


def test_sharded_gradients_equal_the_replicated_ones_with_both_l2_terms(data_dir):
  # Raw gradients: Adam would hide a constant factor on the tables' (not all-reduced).
  config = config_checks.resolve_model_defaults(
    small_config(data_dir, **{'model.l2': 1e-2, 'model.l2_params': 1e-2})
  )
  dataset = data_lib.load(config.dataset)
  model = models.create_model(config.model, dataset.num_users, dataset.num_items, 'float32')
  grads = {}
  for mode in parallel.MODES:
    config.sharding = mode
    mesh = steps.make_mesh(8)
    init_key, data_key, dropout_key = steps.make_keys(0, mesh)
    layout = parallel.make_layout(config, mesh)
    state = steps.create_train_state(config, model, init_key, layout)
    data = layout.device_data(dataset)
    items = steps.make_epoch_items(config, layout, data)(data, data_key, np.int32(0))
    grad_step = steps.make_grad_step(config, layout, state.apply_fn, like=state.params)
    grads[mode] = jax.device_get(
      grad_step(
        state.params, data, items, (data_key, dropout_key), np.int32(0), np.int32(1), np.int32(1)
      )
    )
  want = grads['replicated']
  _assert_close(_unpadded(grads['sharded'], want), want, rtol=2e-5, atol=1e-8)
  pad = np.asarray(grads['sharded']['gmf']['gmf_item']['embedding'])[90:]
  assert pad.shape[0] == 6 and not pad.any()


@pytest.mark.slow  # three in-process runs: ~100 s on 2 busy cores
def test_pipeline_hashes_of_sharded_batches_do_not_depend_on_the_device_count(runs):
  # The replay of the train step's digests, in the sharded mode's batch path
  # (split data, data_shards.device_batch), on 1 and 2 devices, against the replicated
  # 8-device run.
  config = config_checks.resolve_model_defaults(small_config(runs['data_dir'], sharding='sharded'))
  dataset = data_lib.load(config.dataset)
  want = h.metrics(runs['repl_dir'])[0]['pipeline_hash_all']
  steps_per_epoch = pipeline.steps_per_epoch(dataset.num_train, config.num_neg, config.batch_size)
  for ndev in (1, 2):
    mesh = steps.make_mesh(ndev)
    data_key = steps.make_keys(0, mesh)[1]
    layout = parallel.make_layout(config, mesh)
    data = layout.device_data(dataset)
    items = steps.make_epoch_items(config, layout, data)(data, data_key, np.int32(0))
    replay = steps.make_hash_replay(config, layout)
    chain, first = hashing.init(), hashing.init()
    for step in range(steps_per_epoch):
      chain, first = replay(chain, first, data, items, data_key, np.int32(0), np.int32(step))
    assert hashing.hexdigest(chain) == want, ndev


@pytest.mark.slow  # ~20 s of compiles; the slow runs above check whole epochs too
def test_sharded_batches_hash_like_the_replicated_ones_on_1_and_2_devices(data_dir):
  # The train step's digest update alone, over an epoch's first batches: the sharded
  # mode's batches (split data and epoch) against the replicated epoch items'.
  config = config_checks.resolve_model_defaults(small_config(data_dir))
  dataset = data_lib.load(config.dataset)
  digests = {}
  for mode, ndev in (('replicated', 2), ('sharded', 1), ('sharded', 2)):
    config.sharding = mode
    mesh = steps.make_mesh(ndev)
    data_key = steps.make_keys(0, mesh)[1]
    layout = parallel.make_layout(config, mesh)
    data = layout.device_data(dataset)
    items = steps.make_epoch_items(config, layout, data)(data, data_key, np.int32(0))
    replay = steps.make_hash_replay(config, layout)
    chain, first = hashing.init(), hashing.init()
    for step in range(4):
      chain, first = replay(chain, first, data, items, data_key, np.int32(0), np.int32(step))
    digests[mode, ndev] = hashing.hexdigest(chain), hashing.hexdigest(first)
  assert len(set(digests.values())) == 1, digests


@pytest.mark.parametrize(
  'fields, message',
  [
    (dict(sharding='rows'), "config.sharding='rows' is invalid: use one of replicated, sharded."),
    (
      dict(sharding='sharded', model__first_layer='projected'),
      "config.model.first_layer='projected' is invalid: sharding='sharded' looks up the "
      "embedding tables row by row and supports 'concat' or 'auto' (which then never "
      'projects).',
    ),
  ],
)
def test_unsupported_sharding_configs_are_refused_with_one_message(fields, message):
  config = small_config('unused')
  config = h.set_fields(config, {k.replace('__', '.'): v for k, v in fields.items()})
  with pytest.raises(UserError) as e:
    config_checks.validate_config(config, 8)
  assert str(e.value) == message


def test_the_config_chooses_the_layout_once_and_the_sharded_one_builds_concat():
  import ml_collections

  mesh = steps.make_mesh(2)
  config = ml_collections.ConfigDict({'sharding': 'replicated', 'model': {'first_layer': 'auto'}})
  replicated = parallel.make_layout(config, mesh)
  assert isinstance(replicated, parallel.Replicated)
  assert replicated.model_config(config.model).first_layer == 'auto'
  # The memory check's way out of a replicated run: the sharded layout and its figure.
  sharded = replicated.alternative()
  assert isinstance(sharded, parallel.Sharded) and sharded.alternative() is None
  assert 'about 1.50 GB per device' in sharded.suggestion(1_500_000_000)
  assert sharded.model_config(config.model).first_layer == 'concat'
  assert config.model.first_layer == 'auto'  # a copy is changed, not the config
  config.sharding = 'sharded'
  assert isinstance(parallel.make_layout(config, mesh), parallel.Sharded)
  assert parallel.as_layout(config, sharded) is sharded
