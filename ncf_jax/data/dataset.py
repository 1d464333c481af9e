"""The processed dataset every other module consumes, and the raw interactions it is made from."""

import dataclasses

import numpy as np

from ncf_jax.data.synthetic import SyntheticOracle


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Leave-one-out implicit-feedback dataset in CSR form.

  Users and items are dense 0-based ids. Training positives are de-duplicated and sorted
  by (user, item); `user_offsets[u]:user_offsets[u + 1]` is user u's slice, so a sampler
  can index a user's positives. `test_items[u]` is user u's held-out (latest) item and is
  never among u's training positives. With a validation split (`validation=
  'leave_one_out'`), `valid_items[u]` is u's latest interaction before the test one; it
  differs from the test item and is never among u's training positives. Otherwise it is
  None. `test_negatives[u]`, when the data fixes them (the NCF paper's .test.negative),
  are the K negatives u's test item is ranked against instead of sampled ones.
  """

  name: str
  num_users: int
  num_items: int
  train_users: np.ndarray  # int32 [num_train]
  train_items: np.ndarray  # int32 [num_train]
  user_offsets: np.ndarray  # int32 [num_users + 1]
  test_items: np.ndarray  # int32 [num_users]
  valid_items: np.ndarray | None = None  # int32 [num_users], or None: no validation
  oracle: SyntheticOracle | None = None
  test_negatives: np.ndarray | None = None  # int32 [num_users, K], or None: sampled

  @property
  def num_train(self) -> int:
    return int(self.train_items.shape[0])

  @property
  def num_test(self) -> int:
    return int(self.test_items.shape[0])

  def user_degrees(self) -> np.ndarray:
    """Training positives per user, int32 [num_users]."""
    return np.diff(self.user_offsets).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class Interactions:
  """Raw positives as a source reads them, in input order (the input decides timestamp ties).

  This is what `preprocess` takes: a source that reads interactions (GroupLens, TFDS,
  synthetic, fractal) returns these, and the MLPerf preprocessing turns them into a
  `Dataset`. A source whose data is already split (ml-20mx16x32) returns a `Dataset`.
  """

  users: np.ndarray  # int32 [n] raw user ids (non-negative)
  items: np.ndarray  # int32 [n] raw item ids, or dense ids in [0, num_items) with num_items
  timestamps: np.ndarray  # int64 [n] seconds
  where: str  # the source (file, TFDS name, ...) for messages
  num_items: int | None = None  # items are already dense with this catalogue size
  oracle: SyntheticOracle | None = None  # planted model over the raw (dense) users
  # Fixed test negatives per raw user id, int32 [max raw user + 1, K] (NCF paper splits).
  test_negatives: np.ndarray | None = None

  def __len__(self) -> int:
    return int(self.users.shape[0])
