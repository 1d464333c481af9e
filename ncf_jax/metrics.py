"""Loss and ranking metrics as plain functions (sums and counts; divide once on host)."""

import jax
import jax.numpy as jnp


def bce_sum(logits: jax.Array, labels: jax.Array, valid: jax.Array) -> jax.Array:
  """Sum over valid samples of sigmoid cross-entropy on logits (numerically stable)."""
  logits = logits.astype(jnp.float32)
  loss = jnp.maximum(logits, 0) - logits * labels + jnp.log1p(jnp.exp(-jnp.abs(logits)))
  return jnp.sum(jnp.where(valid, loss, 0.0))


def positive_rank(scores: jax.Array, mask: jax.Array, items: jax.Array | None = None) -> jax.Array:
  """Rank (0-based) of column 0 among the masked-in candidates of each row.

  Ties count against the positive: a negative scoring equal to it ranks above it, so
  equal scores (a constant model, bf16 rounding) can never inflate the metric.

  With `items` (match_mlperf: the MLPerf reference's rule, docs/mlperf.md 3.3-3.4) a
  positive that was also drawn among the negatives takes its first draw's place: a tie
  counts against it only from a negative drawn before that place, never after it. A
  positive not drawn stays last, so every tie counts against it as without `items`.
  """
  pos = scores[:, :1]
  if items is None:
    beats = (scores[:, 1:] >= pos) & mask[:, 1:]
    return jnp.sum(beats, axis=1, dtype=jnp.int32)
  cols = items.shape[1]
  column = jnp.arange(1, cols, dtype=jnp.int32)[None, :]
  copy = items[:, 1:] == items[:, :1]
  place = jnp.min(jnp.where(copy, column, cols), axis=1, keepdims=True)  # cols: not drawn
  wins_tie = column < place
  beats = ((scores[:, 1:] > pos) | ((scores[:, 1:] == pos) & wins_tie)) & mask[:, 1:]
  return jnp.sum(beats, axis=1, dtype=jnp.int32)


def ranking_sums(rank: jax.Array, weight: jax.Array, top_k: int) -> dict:
  """Sums of HR@K, NDCG@K and MRR@K over rows with weight 1, and the row count.

  rank is the 0-based rank of each row's one held-out item: HR@K = [rank < K],
  NDCG@K = 1 / log2(rank + 2) and MRR@K = 1 / (rank + 1) when rank < K, else 0.
  """
  hit = rank < top_k
  r = rank.astype(jnp.float32)
  ndcg = jnp.where(hit, 1.0 / jnp.log2(r + 2.0), 0.0)
  mrr = jnp.where(hit, 1.0 / (r + 1.0), 0.0)
  w = weight.astype(jnp.float32)
  return {
    'hr_sum': jnp.sum(hit * w),
    'ndcg_sum': jnp.sum(ndcg * w),
    'mrr_sum': jnp.sum(mrr * w),
    'count': jnp.sum(w),
  }


def recall_sum(ranks: jax.Array, relevant: jax.Array, weight: jax.Array, top_k: int) -> jax.Array:
  """Sum over rows with weight 1 of Recall@K: the share of a row's relevant items in its top K.

  ranks: int [B, R], the 0-based rank of each of a row's R relevant items among all its
  candidates; relevant: bool [B, R], which of the R are real (rows may have fewer). With
  one held-out item per user (leave-one-out) Recall@K equals HR@K.
  """
  hits = jnp.sum((ranks < top_k) & relevant, axis=1, dtype=jnp.float32)
  count = jnp.maximum(jnp.sum(relevant, axis=1, dtype=jnp.float32), 1.0)
  return jnp.sum(hits / count * weight.astype(jnp.float32))
