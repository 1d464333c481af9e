"""The processed dataset: what every other module consumes.

Raw MovieLens files / TFDS / the synthetic generator -> preprocessing (MLPerf rules,
../shared/MLPERF.md) -> a cached, checksummed binary -> `Dataset`.
"""
import dataclasses
from typing import Optional

import numpy as np


@dataclasses.dataclass(frozen=True)
class SyntheticOracle:
  """The planted preference model of a synthetic dataset.

  P(item | user) = theta[user, topic[item]] * within_topic[item]; the oracle score of a
  (user, item) pair is its log, so ranking by it is the best any model can do.
  """
  theta: np.ndarray         # float32 [num_users, num_topics], rows sum to 1
  item_topic: np.ndarray    # int32 [num_items]
  within_topic: np.ndarray  # float32 [num_items], sums to 1 within each topic

  def score(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Log-probability of each (user, item) pair under the planted model."""
    p = self.theta[users, self.item_topic[items]] * self.within_topic[items]
    return np.log(np.maximum(p, 1e-30)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Leave-one-out implicit-feedback dataset in CSR form.

  Users and items are dense 0-based ids. Training positives are de-duplicated and sorted
  by (user, item); `user_offsets[u]:user_offsets[u + 1]` is user u's slice, so a sampler
  can bisect a user's positives. `test_items[u]` is user u's held-out (latest) item and is
  never among u's training positives.
  """
  name: str
  num_users: int
  num_items: int
  train_users: np.ndarray    # int32 [num_train]
  train_items: np.ndarray    # int32 [num_train]
  user_offsets: np.ndarray   # int32 [num_users + 1]
  test_items: np.ndarray     # int32 [num_users]
  oracle: Optional[SyntheticOracle] = None

  @property
  def num_train(self) -> int:
    return int(self.train_items.shape[0])

  @property
  def num_test(self) -> int:
    return int(self.test_items.shape[0])

  def user_degrees(self) -> np.ndarray:
    """Training positives per user, int32 [num_users]."""
    return np.diff(self.user_offsets).astype(np.int32)
