"""Epoch structure, padding, ordering and eval candidates of the on-device pipeline."""

import collections
import dataclasses

from conftest import random_dataset, with_validation
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ncf_jax import pipeline, sampling

KEY = jax.random.key(0, impl='threefry2x32')


@pytest.fixture(scope='module')
def ds():
  return random_dataset(num_users=30, num_items=40, seed=3, max_degree=25)


def _epoch(ds, key, epoch, batch_size=64, num_neg=4):
  return list(pipeline.iterate_train(ds, key, epoch, batch_size=batch_size, num_neg=num_neg))


def test_epoch_has_every_positive_once_and_num_neg_negatives_per_positive(ds):
  batches = _epoch(ds, KEY, 0)
  cat = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  valid = cat['valid']
  assert valid.sum() == ds.num_train * 5
  pos = valid & (cat['label'] == 1)
  pairs = collections.Counter(zip(cat['user'][pos].tolist(), cat['item'][pos].tolist()))
  assert sorted(pairs) == sorted(zip(ds.train_users.tolist(), ds.train_items.tolist()))
  assert set(pairs.values()) == {1}
  neg = valid & (cat['label'] == 0)
  per_user = np.bincount(cat['user'][neg], minlength=ds.num_users)
  np.testing.assert_array_equal(per_user, 4 * ds.user_degrees())
  for u, i in zip(cat['user'][neg], cat['item'][neg]):
    lo, hi = ds.user_offsets[u], ds.user_offsets[u + 1]
    assert i not in ds.train_items[lo:hi]


def test_only_the_last_batch_is_padded_and_padding_is_masked(ds):
  batches = _epoch(ds, KEY, 0)
  n = ds.num_train * 5
  assert len(batches) == -(-n // 64) == pipeline.steps_per_epoch(ds.num_train, 4, 64)
  assert all(b['valid'].all() for b in batches[:-1])
  assert batches[-1]['valid'].sum() == n - 64 * (len(batches) - 1)
  assert all(len(b['user']) == 64 for b in batches)


def test_order_differs_between_epochs_and_seeds_and_repeats_for_the_same(ds):
  first = lambda key, e: _epoch(ds, key, e)[0]['item']
  a = first(KEY, 0)
  np.testing.assert_array_equal(a, first(KEY, 0))
  assert (a != first(KEY, 1)).mean() > 0.5
  assert (a != first(jax.random.key(1, impl='threefry2x32'), 0)).mean() > 0.5


def test_a_device_slice_equals_the_slice_of_the_global_batch(ds):
  data = sampling.to_device(ds)
  whole = pipeline.train_batch(data, KEY, 2, 3, batch_size=64, num_neg=4)
  for start in (0, 16, 48):
    part = pipeline.train_batch(data, KEY, 2, 3, batch_size=64, num_neg=4, start=start, size=16)
    for k in whole:
      np.testing.assert_array_equal(whole[k][start : start + 16], part[k])


def test_batches_read_from_the_slot_order_epoch_equal_train_batch(ds):
  # The train loop's path: the epoch's items built in slot order (here in 3 uneven
  # device parts, the last padded), then each batch reads them.
  data = sampling.to_device(ds)
  n = pipeline.epoch_size(ds.num_train, 4)
  per = -(-n // 3)
  items = jnp.concatenate(
    [pipeline.epoch_items(data, KEY, 5, num_neg=4, start=d * per, size=per) for d in range(3)]
  )
  assert items.dtype == data.train_items.dtype
  # Compiled once each, the step traced (as in the train step), not dispatched op by op.
  want_fn = jax.jit(lambda s: pipeline.train_batch(data, KEY, 5, s, batch_size=64, num_neg=4))
  got_fn = jax.jit(
    lambda s: pipeline.batch_from_items(data, items, KEY, 5, s, batch_size=64, num_neg=4)
  )
  for step in range(pipeline.steps_per_epoch(ds.num_train, 4, 64)):
    want, got = want_fn(jnp.int32(step)), got_fn(jnp.int32(step))
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=f'{k} of batch {step}')
  other = pipeline.epoch_items(data, KEY, 6, num_neg=4)
  assert (np.asarray(other[:n]) != np.asarray(items[:n])).mean() > 0.3  # fresh negatives


def test_train_batch_is_jittable_with_traced_epoch_and_step(ds):
  data = sampling.to_device(ds)
  fn = jax.jit(lambda e, s: pipeline.train_batch(data, KEY, e, s, batch_size=64, num_neg=4))
  out = fn(jnp.int32(1), jnp.int32(0))
  assert out['user'].dtype == jnp.int32 and out['label'].dtype == jnp.float32
  assert out['valid'].dtype == jnp.bool_ and out['item'].shape == (64,)


def test_eval_candidates_are_distinct_and_exclude_positives_and_test_item(ds):
  users, items = pipeline.eval_candidates(ds, KEY, num_neg=10, batch_users=8)
  assert items.shape == (ds.num_users, 11)
  np.testing.assert_array_equal(items[:, 0], ds.test_items)
  for u in users:
    row = items[u, 1:].tolist()
    lo, hi = ds.user_offsets[u], ds.user_offsets[u + 1]
    assert len(set(row)) == 10
    assert not set(row) & set(ds.train_items[lo:hi].tolist())
    assert ds.test_items[u] not in row


def test_eval_candidates_are_fixed_for_a_key_whatever_the_batching(ds):
  _, a = pipeline.eval_candidates(ds, KEY, num_neg=10, batch_users=8)
  _, b = pipeline.eval_candidates(ds, KEY, num_neg=10, batch_users=32)
  np.testing.assert_array_equal(a, b)
  _, c = pipeline.eval_candidates(ds, jax.random.key(5, impl='threefry2x32'), num_neg=10)
  assert (a[:, 1:] != c[:, 1:]).mean() > 0.5


def test_match_mlperf_draws_with_replacement_and_masks_repeats_and_test_copies(ds):
  _, items = pipeline.eval_candidates(ds, KEY, num_neg=60, match_mlperf=True)
  mask = np.asarray(pipeline.first_occurrence(jnp.asarray(items)))
  saw_test_copy = saw_repeat = False
  for u in range(ds.num_users):
    row = items[u]
    lo, hi = ds.user_offsets[u], ds.user_offsets[u + 1]
    assert not set(row[1:].tolist()) & set(ds.train_items[lo:hi].tolist())
    seen = set()
    for j, it in enumerate(row):
      assert mask[u, j] == (it not in seen)
      seen.add(it)
    saw_test_copy |= bool((row[1:] == row[0]).any())
    saw_repeat |= len(set(row[1:].tolist())) < 60
  # 60 draws from at most 40 items: repeats are certain, copies of the test item likely.
  assert saw_repeat and saw_test_copy


def test_validation_candidates_exclude_positives_and_the_validation_item_only(ds):
  vds = with_validation(ds, seed=1)
  _, valid = pipeline.eval_candidates(vds, KEY, num_neg=10, split='valid')
  _, test = pipeline.eval_candidates(vds, KEY, num_neg=10, split='test')
  np.testing.assert_array_equal(valid[:, 0], vds.valid_items)
  np.testing.assert_array_equal(test[:, 0], vds.test_items)
  saw_test_item = False
  for u in range(vds.num_users):
    positives = set(vds.train_items[vds.user_offsets[u] : vds.user_offsets[u + 1]].tolist())
    v, t = valid[u, 1:].tolist(), test[u, 1:].tolist()
    assert len(set(v)) == 10 and len(set(t)) == 10
    assert not set(v) & positives and not set(t) & positives
    assert vds.valid_items[u] not in v
    # Test candidates exclude everything the user interacted with.
    assert vds.valid_items[u] not in t and vds.test_items[u] not in t
    saw_test_item |= vds.test_items[u] in v
  # The test item is an ordinary validation candidate (10 of <= 38 items, 30 users).
  assert saw_test_item
  # Another key stream than the test candidates.
  assert (valid[:, 1:] != test[:, 1:]).mean() > 0.5


def test_validation_candidates_do_not_depend_on_the_test_items(ds):
  a = with_validation(ds, seed=1)
  moved = np.array(
    [
      next(
        i
        for i in range(ds.num_items)
        if i
        not in set(a.train_items[a.user_offsets[u] : a.user_offsets[u + 1]].tolist())
        | {int(a.valid_items[u]), int(a.test_items[u])}
      )
      for u in range(ds.num_users)
    ]
  )
  b = dataclasses.replace(a, test_items=moved.astype(np.int32))
  np.testing.assert_array_equal(
    pipeline.eval_candidates(a, KEY, num_neg=10, split='valid')[1],
    pipeline.eval_candidates(b, KEY, num_neg=10, split='valid')[1],
  )
  assert (
    pipeline.eval_candidates(a, KEY, num_neg=10)[1]
    != pipeline.eval_candidates(b, KEY, num_neg=10)[1]
  ).any()


def test_a_split_that_does_not_exist_or_mlperf_draws_with_validation_are_refused(ds):
  data = sampling.to_device(ds)
  users = jnp.arange(4)
  with pytest.raises(ValueError, match='no validation split'):
    pipeline.eval_batch(data, KEY, users, num_neg=5, split='valid')
  with pytest.raises(ValueError, match='unknown split'):
    pipeline.eval_batch(data, KEY, users, num_neg=5, split='train')
  vdata = sampling.to_device(with_validation(ds))
  with pytest.raises(ValueError, match='no validation split'):
    pipeline.eval_batch(vdata, KEY, users, num_neg=5, match_mlperf=True)
