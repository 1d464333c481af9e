"""Jitted hash-of-batches: proves that a seed makes the data pipeline deterministic.

Each element is hashed with threefry2x32 together with its global position, and the
element hashes are summed modulo 2**32 (two independent words, so a 64-bit digest). The
sum does not depend on how a batch is split across devices: each device hashes its share
and a `psum` over the data axis completes the digest. Digests are chained in step order
(`chain`), so the chain covers every batch of an epoch in order. Nothing leaves the device
until a digest is logged.
"""

import jax
import jax.numpy as jnp
import numpy as np

from ncf_jax import sampling

# NumPy, not jnp: importing this module must not start the XLA backend (multi-host
# jax.distributed.initialize has to run first).
_KEY = np.array([0x6E63665F, 0x6A617821], np.uint32)  # fixed: hashes are comparable
_KEY2 = np.array([0x243F6A88, 0x85A308D3], np.uint32)


def init() -> jax.Array:
  """Empty chain state."""
  return jnp.zeros((2,), jnp.uint32)


def _element_hash(position, a, b) -> jax.Array:
  """uint32[2, n] hashes of (position, a, b) triples: two threefry calls, fixed keys.

  b enters the second call's counter (not its key): per-lane keys made threefry ~4x
  slower on CPU.
  """
  h0, h1 = sampling.random_words(jnp.asarray(_KEY), position, a)
  return jnp.stack(sampling.random_words(jnp.asarray(_KEY2), h0 ^ b, h1))


def batch_digest(batch, position: jax.Array, axis_name: str | None = None) -> jax.Array:
  """uint32[2] digest of a training batch (user, item, label, valid) or its shard.

  Args:
    batch: dict with `user`, `item`, `label`, `valid` (flat arrays of one length).
    position: uint32 global positions of the elements within the batch.
    axis_name: when called per device inside shard_map, the axis to psum over.
  """
  flags = (batch['label'] > 0).astype(jnp.uint32) | (batch['valid'].astype(jnp.uint32) << 1)
  b = batch['item'].astype(jnp.uint32) * jnp.uint32(4) + flags
  h = _element_hash(position.astype(jnp.uint32), batch['user'].astype(jnp.uint32), b)
  digest = jnp.sum(h, axis=1, dtype=jnp.uint32)
  if axis_name is not None:
    digest = jax.lax.psum(digest, axis_name)
  return digest


def array_digest(
  values: jax.Array, position: jax.Array, mask=None, axis_name: str | None = None
) -> jax.Array:
  """uint32[2] digest of an int array (e.g. eval candidates) at global positions.

  Elements where `mask` is False (padding) are left out, so the digest does not depend on
  how the array was batched or padded.
  """
  values = values.astype(jnp.uint32)
  position = jnp.broadcast_to(position.astype(jnp.uint32), values.shape)
  h = _element_hash(position.ravel(), values.ravel(), jnp.zeros(values.size, jnp.uint32))
  if mask is not None:
    h = jnp.where(jnp.broadcast_to(mask, values.shape).ravel()[None, :], h, 0)
  digest = jnp.sum(h, axis=1, dtype=jnp.uint32)
  if axis_name is not None:
    digest = jax.lax.psum(digest, axis_name)
  return digest


def chain(state: jax.Array, digest: jax.Array) -> jax.Array:
  """Folds a digest into the running chain state (order-sensitive)."""
  h0, h1 = sampling.random_words(state, digest[0], digest[1])
  return jnp.stack([h0, h1])


def hexdigest(state) -> str:
  """16 hex digits of a chain state or digest."""
  s = np.asarray(jax.device_get(state)).astype(np.uint32)
  return f'{int(s[0]):08x}{int(s[1]):08x}'


def _words(x: jax.Array) -> jax.Array:
  """The bits of an array as uint32 words (one per element; two for 64-bit types)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  bits = x.dtype.itemsize * 8
  if bits == 64:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)  # [..., 2]
  if bits == 32:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  unsigned = {8: jnp.uint8, 16: jnp.uint16}[bits]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


@jax.jit
def _tree_digests(tree):
  def leaf(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    words = _words(jnp.asarray(x)).ravel()
    return array_digest(words, jnp.arange(words.size, dtype=jnp.uint32))

  return jax.tree.map(leaf, tree)


def tree_digests(tree) -> dict[str, str]:
  """{leaf path: 16 hex digits} of every array's bits in `tree`, computed where it lives.

  Each element's bits are hashed with its flat position and summed (`array_digest`), so a
  digest does not depend on how the array is sharded; any changed bit changes it. For the
  checkpoints' integrity check. Collective with several processes: every one calls it.
  """
  digests = jax.device_get(_tree_digests(tree))
  flat = jax.tree_util.tree_flatten_with_path(digests)[0]
  return {jax.tree_util.keystr(path): hexdigest(d) for path, d in flat}
