"""The hash-of-batches diagnostic: same seed -> same digests on 1, 2 or 8 devices."""

from conftest import random_dataset
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from ncf_jax import hashing, pipeline, sampling

BATCH, NUM_NEG = 96, 4


def _epoch_hashes(ds, seed, num_devices):
  """(first, all) chained digests of one epoch computed per device under shard_map."""
  mesh = Mesh(np.asarray(jax.devices()[:num_devices]), ('data',))
  data = sampling.to_device(ds, NamedSharding(mesh, P()))
  key = jax.random.key(seed, impl='threefry2x32')
  local = BATCH // num_devices

  def per_device(data, key, chain, step):
    start = jax.lax.axis_index('data') * local
    batch = pipeline.train_batch(
      data, key, 0, step, batch_size=BATCH, num_neg=NUM_NEG, start=start, size=local
    )
    digest = hashing.batch_digest(batch, start + jnp.arange(local, dtype=jnp.uint32), 'data')
    return hashing.chain(chain, digest)

  fn = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(), P()), out_specs=P()))
  chain, first = hashing.init(), None
  for step in range(pipeline.steps_per_epoch(ds.num_train, NUM_NEG, BATCH)):
    chain = fn(data, key, chain, np.int32(step))
    first = first or hashing.hexdigest(chain)
  return first, hashing.hexdigest(chain)


@pytest.fixture(scope='module')
def ds():
  return random_dataset(num_users=25, num_items=50, seed=4, max_degree=20)


def test_hashes_are_identical_on_1_2_and_8_devices(ds):
  assert len(jax.devices()) >= 8, 'conftest forces 8 host devices'
  hashes = {n: _epoch_hashes(ds, 0, n) for n in (1, 2, 8)}
  assert len(set(hashes.values())) == 1, hashes


def test_hashes_change_with_the_seed(ds):
  a, b = _epoch_hashes(ds, 0, 2), _epoch_hashes(ds, 1, 2)
  assert a[0] != b[0] and a[1] != b[1]


def test_digest_sees_every_field_and_the_order():
  batch = {
    'user': jnp.arange(8),
    'item': jnp.arange(8) * 3,
    'label': (jnp.arange(8) % 2).astype(jnp.float32),
    'valid': jnp.ones(8, bool),
  }
  pos = jnp.arange(8, dtype=jnp.uint32)
  base = hashing.hexdigest(hashing.batch_digest(batch, pos))
  for field, value in [
    ('user', batch['user'].at[3].set(9)),
    ('item', batch['item'].at[3].set(1)),
    ('label', batch['label'].at[0].set(1.0)),
    ('valid', batch['valid'].at[7].set(False)),
    ('user', batch['user'][::-1]),
  ]:
    changed = dict(batch, **{field: value})
    assert hashing.hexdigest(hashing.batch_digest(changed, pos)) != base, field
  chain_ab = hashing.chain(
    hashing.chain(hashing.init(), jnp.array([1, 2], jnp.uint32)), jnp.array([3, 4], jnp.uint32)
  )
  chain_ba = hashing.chain(
    hashing.chain(hashing.init(), jnp.array([3, 4], jnp.uint32)), jnp.array([1, 2], jnp.uint32)
  )
  assert hashing.hexdigest(chain_ab) != hashing.hexdigest(chain_ba)


def test_array_digest_ignores_masked_padding():
  values = jnp.arange(12).reshape(3, 4)
  pos = jnp.arange(12, dtype=jnp.uint32).reshape(3, 4)
  full = hashing.array_digest(values[:2], pos[:2])
  padded = hashing.array_digest(values.at[2].set(0), pos, mask=jnp.array([1, 1, 0], bool)[:, None])
  np.testing.assert_array_equal(full, padded)
