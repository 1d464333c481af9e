"""Reference scorers on the same evaluation candidates as the model: popularity and oracle.

They bracket what a trained model should reach: the popularity baseline (score = number of
training positives of the item) is the floor any personalised model must beat, and on
synthetic data the planted oracle (`Dataset.oracle`) is the ceiling.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ncf_jax import data as data_lib
from ncf_jax import pipeline


def hr_ndcg(
  scores: np.ndarray, mask: np.ndarray, top_k: int, items: np.ndarray | None = None
) -> dict[str, float]:
  """HR@K, NDCG@K and MRR@K with column 0 the positive; ties count against the positive
  (with `items`, match_mlperf's rule: `metrics.positive_rank`)."""
  pos = scores[:, :1]
  if items is None:
    beats = scores[:, 1:] >= pos
  else:
    column = np.arange(1, items.shape[1])[None, :]
    place = np.where(items[:, 1:] == items[:, :1], column, items.shape[1]).min(1, keepdims=True)
    beats = (scores[:, 1:] > pos) | ((scores[:, 1:] == pos) & (column < place))
  rank = (beats & mask[:, 1:]).sum(axis=1)
  hit = rank < top_k
  ndcg = np.where(hit, 1.0 / np.log2(rank + 2.0), 0.0)
  mrr = np.where(hit, 1.0 / (rank + 1.0), 0.0)
  return {'hr': float(hit.mean()), 'ndcg': float(ndcg.mean()), 'mrr': float(mrr.mean())}


def evaluate_scorer(
  dataset: data_lib.Dataset,
  key: jax.Array,
  scorer: Callable[[np.ndarray, np.ndarray], np.ndarray],
  *,
  num_neg: int,
  top_k: int,
  match_mlperf: bool = False,
  split: str = 'test',
) -> dict[str, float]:
  """HR/NDCG/MRR of `scorer(users [U, C], items [U, C]) -> scores` on the run's candidates
  of `split` (a run's `data_key` gives exactly the candidates its own evaluation uses)."""
  users, items = pipeline.eval_candidates(
    dataset, key, num_neg=num_neg, match_mlperf=match_mlperf, split=split
  )
  if match_mlperf:
    mask = np.asarray(pipeline.first_occurrence(jnp.asarray(items)))
  else:
    mask = np.ones(items.shape, bool)
  grid = np.broadcast_to(users[:, None], items.shape)
  return hr_ndcg(scorer(grid, items), mask, top_k, items if match_mlperf else None)


def popularity_scorer(dataset: data_lib.Dataset):
  counts = np.bincount(dataset.train_items, minlength=dataset.num_items).astype(np.float32)
  return lambda users, items: counts[items]


def oracle_scorer(dataset: data_lib.Dataset) -> Callable | None:
  if dataset.oracle is None:
    return None
  return dataset.oracle.score
