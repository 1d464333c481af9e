"""Loss and ranking metrics as plain functions (sums and counts; divide once on host)."""
import jax
import jax.numpy as jnp


def bce_sum(logits: jax.Array, labels: jax.Array, valid: jax.Array) -> jax.Array:
  """Sum over valid samples of sigmoid cross-entropy on logits (numerically stable)."""
  logits = logits.astype(jnp.float32)
  loss = jnp.maximum(logits, 0) - logits * labels + jnp.log1p(jnp.exp(-jnp.abs(logits)))
  return jnp.sum(jnp.where(valid, loss, 0.0))


def positive_rank(scores: jax.Array, mask: jax.Array) -> jax.Array:
  """Rank (0-based) of column 0 among the masked-in candidates of each row.

  Ties count against the positive: a negative scoring equal to it ranks above it, so
  equal scores (a constant model, bf16 rounding) can never inflate the metric.
  """
  pos = scores[:, :1]
  beats = (scores[:, 1:] >= pos) & mask[:, 1:]
  return jnp.sum(beats, axis=1, dtype=jnp.int32)


def ranking_sums(rank: jax.Array, weight: jax.Array, top_k: int) -> dict:
  """Sums of HR@K and NDCG@K over rows with weight 1, and the row count."""
  hit = rank < top_k
  ndcg = jnp.where(hit, 1.0 / jnp.log2(rank.astype(jnp.float32) + 2.0), 0.0)
  w = weight.astype(jnp.float32)
  return {'hr_sum': jnp.sum(hit * w), 'ndcg_sum': jnp.sum(ndcg * w), 'count': jnp.sum(w)}
