"""The sampler's data split over devices (`config.sharding='sharded'`, ncf_jax.data_shards).

Each device holds a contiguous user range and owns a contiguous range of positives; the
batches it assembles from the owners of their slots, and its evaluation of its own users,
must be exactly those of the whole dataset on one device.
"""

import _train_helpers as h
import jax
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from ncf_jax import config_checks, data_shards, models, parallel, pipeline, sampling, steps
from ncf_jax import data as data_lib

NUM_NEG = 4


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  config = h.tiny_config(
    str(tmp_path_factory.mktemp('data')),
    dataset__synthetic_num_users=150,
    dataset__synthetic_num_items=200,
  )
  return data_lib.load(config.dataset)


@pytest.mark.parametrize('degrees', [[3, 0, 5, 1, 0, 0, 7, 2], [0, 0, 4], [9], [1, 1, 1]])
@pytest.mark.parametrize('ndev', [1, 2, 3, 8])
def test_positives_and_eval_users_are_each_owned_once_and_held_with_their_users(degrees, ndev):
  offsets = np.r_[0, np.cumsum(degrees)]
  num_train, num_users = int(offsets[-1]), len(degrees)
  parts = data_shards.partition(offsets, num_train, ndev)
  owned = np.concatenate([np.arange(a, b) for a, b in zip(parts['pos_lo'], parts['pos_hi'])])
  assert np.array_equal(owned, np.arange(num_train))
  evaluated = np.concatenate([np.arange(a, b) for a, b in zip(parts['eval_lo'], parts['eval_hi'])])
  assert np.array_equal(evaluated, np.arange(num_users))
  user_of = np.repeat(np.arange(num_users), degrees)
  for d in range(ndev):
    lo, hi = parts['lo'][d], parts['hi'][d]
    # Its positives' users and the users it evaluates are in the range it holds.
    assert all(lo <= user_of[k] < hi for k in range(parts['pos_lo'][d], parts['pos_hi'][d]))
    assert lo <= parts['eval_lo'][d] and parts['eval_hi'][d] <= hi


@pytest.mark.parametrize('ndev', [8, 3])
def test_split_batches_are_the_whole_datasets_on_any_device_count(dataset, ndev):
  mesh = steps.make_mesh(ndev)
  key = steps.make_keys(0, mesh)[1]
  config = h.tiny_config('', sharding='sharded', num_neg=NUM_NEG)
  layout = parallel.make_layout(config, mesh)
  split = layout.device_data(dataset)
  assert isinstance(split, data_shards.Split)
  items = steps.make_epoch_items(config, layout, split)(split, key, np.int32(1))
  local = 170
  batch = ndev * local

  def per_device(d, it, s):
    return data_shards.device_batch(
      d,
      it,
      key,
      1,
      s,
      batch_size=batch,
      num_neg=NUM_NEG,
      start=jax.lax.axis_index('data') * local,
      size=local,
    )

  fn = jax.jit(
    jax.shard_map(per_device, mesh=mesh, in_specs=(P('data'), P('data'), P()), out_specs=P('data'))
  )
  whole = sampling.to_device(dataset)
  ref = jax.jit(lambda s: pipeline.train_batch(whole, key, 1, s, batch_size=batch, num_neg=NUM_NEG))
  for step in range(pipeline.steps_per_epoch(dataset.num_train, NUM_NEG, batch)):
    got, want = jax.device_get((fn(split, items, np.int32(step)), ref(np.int32(step))))
    valid = want['valid']
    assert np.array_equal(got['valid'], valid)
    for k in ('user', 'item', 'label'):
      assert np.array_equal(got[k][valid], want[k][valid]), (step, k)


def test_each_device_holds_about_one_nth_of_the_data(dataset):
  mesh = steps.make_mesh(8)
  split = data_shards.to_devices(dataset, mesh)
  whole = sampling.host_arrays(dataset)
  for k, v in whole.items():
    part = getattr(split.local, k)
    per = part.addressable_shards[0].data.shape[0]
    # A part: 1/8 of the whole, plus the users on a boundary and padding to the longest.
    assert part.shape[0] == 8 * per and per <= v.shape[0] / 8 * 1.2 + 64, k


def test_split_evaluation_gives_the_replicated_metrics_and_candidates(dataset):
  # 8 devices: users split unevenly (ranges balance positives, not users).
  digests, results = {}, {}
  for mode, ndev in (('replicated', 2), ('sharded', 8)):
    config = config_checks.resolve_model_defaults(
      h.tiny_config('', sharding=mode, eval_batch_size=ndev * 16, eval_num_neg=30)
    )
    config.model.first_layer = 'concat'
    mesh = steps.make_mesh(ndev)
    model = models.create_model(config.model, dataset.num_users, dataset.num_items, 'float32')
    init_key, data_key, _ = steps.make_keys(0, mesh)
    layout = parallel.make_layout(config, mesh)
    state = steps.create_train_state(config, model, init_key, layout)
    data = layout.device_data(dataset)
    eval_step = steps.make_eval_step(config, layout, model, dataset.num_users, dataset.num_items)
    results[mode, ndev], digests[mode, ndev] = steps.evaluate(
      eval_step, state.params, data, data_key, dataset.num_users, int(config.eval_batch_size)
    )
  assert len(set(digests.values())) == 1, digests
  want = results['replicated', 2]
  for got in results.values():
    assert got == pytest.approx(want, abs=1e-6)
