"""The epoch builder: every slot's item of an epoch, built on the devices before its steps."""

from collections.abc import Callable
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from ncf_jax import dispatch, parallel, pipeline, sampling
from ncf_jax.parallel import AXIS


@dataclasses.dataclass(frozen=True)
class EpochBuilder:
  """`make_epoch_items`' builder: called as (data, data_key, epoch, in_flight=None)."""

  build: Callable[..., jax.Array]
  programs: tuple  # its jitted functions (compile-count tests)
  # What it returns, unbuilt (`memory.bytes_per_device` of an epoch before it runs).
  abstract: Callable[[Any], jax.ShapeDtypeStruct]

  def __call__(self, data, data_key, epoch, in_flight: dispatch.InFlight | None = None):
    return self.build(data, data_key, epoch, in_flight)


def make_epoch_items(config, layout: parallel.Layout | Mesh, data) -> EpochBuilder:
  """The epoch builder: (data, data_key, epoch, in_flight=None) -> every slot's item.

  `data` is the layout's device data (`Layout.device_data`, or its shapes: only its sizes
  are read). Each device builds its slots (`Layout.epoch_slots`; replicated: its 1/ndev of
  the slots in slot order, `pipeline.epoch_items`), in calls of `pipeline.EPOCH_CHUNK`
  slots that write into a donated buffer. Replicated, one reshard then gives every device
  the whole epoch, which its batches read; sharded, each device keeps the slots it owns
  (`data_shards`): no reshard, nothing replicated.

  Every launch is reported to `in_flight` (a `dispatch.InFlight`), so an epoch of many
  calls stays within the CPU client's queue limit. `build.programs` are its jitted
  functions; `build.abstract(data)` is the shape, dtype and sharding of what it returns.
  """
  layout = parallel.as_layout(config, layout)
  mesh = layout.mesh
  num_neg = int(config.num_neg)
  chunk, calls = _epoch_calls(layout, data, num_neg)
  per = calls * chunk
  split = NamedSharding(mesh, P(AXIS))

  def fill(buf, data, data_key, epoch, call):
    part = layout.epoch_part(
      data, data_key, epoch, num_neg=num_neg, call=call, chunk=chunk, calls=calls
    )
    # part[:1] is a small output that is not donated: what `in_flight` waits on.
    if per <= sampling.INT32_MAX:
      return jax.lax.dynamic_update_slice(buf, part, (call * chunk,)), part[:1]
    # A shard past int32 offsets: update row `call` of its [calls, chunk] view.
    rows = jax.lax.dynamic_update_slice(buf.reshape(calls, chunk), part[None], (call, 0))
    return rows.reshape(-1), part[:1]

  fill = jax.jit(
    jax.shard_map(
      fill,
      mesh=mesh,
      in_specs=(P(AXIS), layout.data_spec, P(), P(), P()),
      out_specs=(P(AXIS), P(AXIS)),
    ),
    donate_argnums=0,
  )
  # The built buffer is split over `data`; a layout whose epoch is whole on every device
  # reshards it once.
  reshard = None
  if layout.epoch_spec != P(AXIS):
    reshard = jax.jit(lambda buf: buf, out_shardings=NamedSharding(mesh, layout.epoch_spec))
  zeros = jax.jit(
    lambda dtype: jnp.zeros((mesh.size * per,), dtype), static_argnums=0, out_shardings=split
  )

  def build(data, data_key, epoch, in_flight: dispatch.InFlight | None = None):
    in_flight = in_flight or dispatch.InFlight(dispatch.in_flight_limit(list(mesh.devices.flat)))
    buf = zeros(np.dtype(layout.local_data(data).train_items.dtype))
    for call in range(calls):
      buf, token = fill(buf, data, data_key, epoch, np.int32(call))
      in_flight.add(token)
    items = buf if reshard is None else reshard(buf)
    in_flight.add(items)
    return items

  return EpochBuilder(
    build=build,
    programs=(zeros, fill) if reshard is None else (zeros, fill, reshard),
    abstract=lambda data: epoch_items_shape(config, layout, data),
  )


def _epoch_calls(layout: parallel.Layout, data, num_neg: int) -> tuple[int, int]:
  """(slots per builder call, calls per epoch) of the slots each device builds."""
  owned = layout.epoch_slots(data, num_neg)
  chunk = min(pipeline.EPOCH_CHUNK, owned)
  return chunk, -(-owned // chunk)


def epoch_items_shape(config, layout: parallel.Layout | Mesh, data) -> jax.ShapeDtypeStruct:
  """What `make_epoch_items(config, layout, data)` builds, as a shape with its sharding."""
  layout = parallel.as_layout(config, layout)
  chunk, calls = _epoch_calls(layout, data, int(config.num_neg))
  return jax.ShapeDtypeStruct(
    (layout.ndev * calls * chunk,),
    np.dtype(layout.local_data(data).train_items.dtype),
    sharding=NamedSharding(layout.mesh, layout.epoch_spec),
  )
