"""Loss and ranking metrics against hand-computed values."""

import jax.numpy as jnp
import numpy as np

from ncf_jax import metrics


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
