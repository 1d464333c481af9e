"""A chain of small all-reduce programs dispatched back to back: XLA:CPU's deadlock, in brief.

  XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/_collective_chain.py LIMIT

LIMIT is the `dispatch.InFlight` bound ('none' for unbounded dispatch). Prints `done` and
exits 0 when all launches finish. Unbounded on fewer cores than devices, XLA aborts the
process after 40 s in the rendezvous of an all-reduce (see ncf_jax/dispatch.py).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P
import numpy as np  # noqa: E402

from ncf_jax import dispatch  # noqa: E402

LAUNCHES = 300


def main(limit):
  mesh = Mesh(np.asarray(jax.devices()), ('data',))

  def body(x, s):
    y = jax.lax.pmean(jnp.sin(x) + s, 'data')
    return y, y[0]

  step = jax.jit(
    jax.shard_map(body, mesh=mesh, in_specs=(P(), P()), out_specs=(P(), P())), donate_argnums=0
  )
  x = jax.device_put(jnp.zeros((200_000,)), NamedSharding(mesh, P()))
  in_flight = dispatch.InFlight(limit)
  for i in range(LAUNCHES):
    x, token = step(x, np.float32(i))
    in_flight.add(token)
  jax.block_until_ready(x)
  print('done', flush=True)


if __name__ == '__main__':
  main(None if sys.argv[1] == 'none' else int(sys.argv[1]))
