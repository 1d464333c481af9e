"""Per-device byte accounting: replicated arrays count whole, split ones 1/n per device."""
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ncf_jax import memory
from ncf_jax import steps


def test_replicated_arrays_count_their_full_size_on_every_device():
  mesh = steps.make_mesh(8)
  tree = {'a': np.zeros((10, 3), np.float32), 'b': [np.zeros((7,), np.int16)]}
  tree = jax.device_put(tree, NamedSharding(mesh, P()))
  per = memory.device_bytes(tree)
  assert sorted(per, key=lambda d: d.id) == sorted(mesh.devices.flat, key=lambda d: d.id)
  assert set(per.values()) == {10 * 3 * 4 + 7 * 2}
  assert memory.bytes_per_device(x=tree) == {'x': 134}


def test_an_array_split_over_the_data_axis_counts_one_nth_per_device():
  for n in (2, 8):
    mesh = steps.make_mesh(n)
    split = jax.device_put(np.zeros((16, 4), np.float32), NamedSharding(mesh, P('data')))
    whole = jax.device_put(np.zeros((5,), np.float32), NamedSharding(mesh, P()))
    assert set(memory.device_bytes(split).values()) == {16 * 4 * 4 // n}
    # A tree's figure is the sum over its arrays of each device's part.
    assert memory.bytes_per_device(t=(split, whole)) == {'t': 16 * 4 * 4 // n + 20}


def test_abstract_arrays_count_the_shards_they_would_have():
  mesh = steps.make_mesh(8)
  split = jax.ShapeDtypeStruct((64,), np.uint16, sharding=NamedSharding(mesh, P('data')))
  whole = jax.ShapeDtypeStruct((64,), np.uint16, sharding=NamedSharding(mesh, P()))
  got = memory.bytes_per_device(split=split, whole=whole, empty={}, scalars=(1, None))
  assert got == {'split': 16, 'whole': 128, 'empty': 0, 'scalars': 0}
  # The same figure as the built array's.
  built = jax.device_put(np.zeros((64,), np.uint16), split.sharding)
  assert memory.bytes_per_device(x=built) == {'x': 16}
