"""Loss and ranking metrics against hand-computed values."""

import jax.numpy as jnp
import numpy as np

from ncf_jax import metrics, pipeline


def test_bce_sum_matches_the_formula_and_ignores_invalid():
  logits = jnp.array([2.0, -1.0, 0.0, 50.0, -50.0])
  labels = jnp.array([1.0, 0.0, 1.0, 0.0, 1.0])
  valid = jnp.array([True, True, True, True, False])
  p = 1 / (1 + np.exp(-np.asarray(logits, np.float64)))
  want = -(np.log(p[0]) + np.log(1 - p[1]) + np.log(p[2])) + 50.0  # -log(1-sigmoid(50)) ~ 50
  np.testing.assert_allclose(float(metrics.bce_sum(logits, labels, valid)), want, rtol=1e-5)


def test_rank_counts_ties_against_the_positive_and_skips_masked():
  scores = jnp.array(
    [
      [0.5, 0.9, 0.5, 0.1, 0.2],  # one above, one tie -> rank 2
      [0.9, 0.1, 0.2, 0.3, 0.4],  # best -> rank 0
      [0.1, 0.9, 0.9, 0.9, 0.9],  # below all; two masked -> rank 2
      [0.3, 0.3, 0.3, 0.3, 0.3],
    ]
  )  # constant model -> rank 4 (last)
  mask = jnp.array([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 0, 1, 0, 1], [1, 1, 1, 1, 1]], bool)
  np.testing.assert_array_equal(metrics.positive_rank(scores, mask), [2, 0, 2, 4])


def test_hr_and_ndcg_sums_by_hand():
  rank = jnp.array([0, 1, 2, 9, 10, 3])
  weight = jnp.array([1, 1, 1, 1, 1, 0])
  out = metrics.ranking_sums(rank, weight, top_k=10)
  assert float(out['count']) == 5
  assert float(out['hr_sum']) == 4  # ranks 0, 1, 2, 9 hit; 10 misses; last row unweighted
  want = 1 / np.log2(2) + 1 / np.log2(3) + 1 / np.log2(4) + 1 / np.log2(11)
  np.testing.assert_allclose(float(out['ndcg_sum']), want, rtol=1e-6)
  out3 = metrics.ranking_sums(rank, weight, top_k=3)
  assert float(out3['hr_sum']) == 3


def _reference_rank(scores, items):
  """The MLPerf reference's rank, literally: negatives then the positive go into a dict
  keyed by item (a repeat keeps its first place), and heapq.nlargest (stable: the earlier
  of equal scores first) orders it."""
  import heapq

  by_item = {}
  for item, score in zip([*items[1:], items[0]], [*scores[1:], scores[0]]):
    by_item[int(item)] = float(score)
  ranked = heapq.nlargest(len(by_item), by_item, key=by_item.get)
  return ranked.index(int(items[0]))


def test_match_mlperf_rank_is_the_reference_rule_with_ties():
  rng = np.random.default_rng(0)
  items = rng.integers(0, 12, (400, 16)).astype(np.int32)  # many repeats and test copies
  item_score = np.round(rng.random((400, 12)) * 3) / 3  # 4 levels: many ties
  scores = np.take_along_axis(item_score, items, axis=1).astype(np.float32)
  mask = pipeline.first_occurrence(jnp.asarray(items))
  got = np.asarray(metrics.positive_rank(jnp.asarray(scores), mask, jnp.asarray(items)))
  want = [_reference_rank(s, i) for s, i in zip(scores, items)]
  np.testing.assert_array_equal(got, want)
  plain = np.asarray(metrics.positive_rank(jnp.asarray(scores), mask))
  assert (plain >= got).all() and (plain > got).any()  # the rule only moves ties
