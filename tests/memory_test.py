"""Per-device byte accounting: replicated arrays count whole, split ones 1/n per device."""

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from ncf_jax import memory, parallel, steps


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


def _tiny(data_dir, **fields):
  import _train_helpers as h

  from ncf_jax import config_checks

  return config_checks.resolve_model_defaults(h.tiny_config(data_dir, **fields))


def test_host_shapes_are_those_of_the_host_arrays_narrow_and_wide():
  from ncf_jax import data as data_lib
  from ncf_jax import sampling

  rng = np.random.default_rng(0)
  for num_items in (300, sampling.NARROW_ITEMS + 5):
    degrees = rng.integers(2, 6, size=40)
    offsets = np.r_[0, np.cumsum(degrees)].astype(np.int32)
    items = np.concatenate(
      [np.sort(rng.choice(num_items, d, replace=False)) for d in degrees]
    ).astype(np.int32)
    ds = data_lib.Dataset(
      't',
      40,
      num_items,
      np.repeat(np.arange(40), degrees).astype(np.int32),
      items,
      offsets,
      np.zeros(40, np.int32),
      np.zeros(40, np.int32),
    )
    arrays = sampling.host_arrays(ds)
    shapes = sampling.host_shapes(40, num_items, ds.num_train, True)
    assert {k: (v.shape[0], v.dtype) for k, v in arrays.items()} == shapes


def test_the_estimate_before_building_is_what_the_built_run_holds(tmp_path):
  from ncf_jax import data as data_lib
  from ncf_jax import models

  for mode, ndev in (('replicated', 2), ('sharded', 8)):
    config = _tiny(str(tmp_path / 'data'), sharding=mode)
    dataset = data_lib.load(config.dataset)
    mesh = steps.make_mesh(ndev)
    model = models.create_model(config.model, dataset.num_users, dataset.num_items, 'float32')
    key = steps.make_keys(0, mesh)[0]
    layout = parallel.make_layout(config, mesh)
    state = steps.create_train_state(config, model, key, layout)
    data = layout.device_data(dataset)
    items = steps.make_epoch_items(config, layout, data)(data, key, np.int32(0))
    built = memory.bytes_per_device(
      params=state.params, opt_state=state.opt_state, data=data, epoch=items
    )
    assert steps.memory_need(config, model, dataset, layout, key) == built, mode


def test_a_run_that_cannot_fit_is_refused_before_it_allocates(tmp_path, monkeypatch):
  import pytest

  from ncf_jax import train
  from ncf_jax.errors import UserError

  # 8 CPU devices sharing 1 MB: the tiny run's replicated state alone is larger.
  monkeypatch.setattr(memory, 'available', lambda devices: (1_000_000, 8))
  workdir = tmp_path / 'run'
  with pytest.raises(
    UserError,
    match=r'out of memory before the first step: this run needs '
    r'at least \d+\.\d\d GB per device \(data .*\), and 8 devices share this '
    r"host's 0\.0 GB of available memory\. --config\.sharding=sharded splits",
  ):
    train.train_and_evaluate(_tiny(str(tmp_path / 'data')), str(workdir))
  assert not workdir.exists()  # nothing written
