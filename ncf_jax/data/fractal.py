"""Fractal expansion of an interaction matrix (Belletti et al. 2019, arXiv 1901.08910).

A base user x item matrix B (n x m, binary) becomes a (rows * n) x (cols * m) one:

1. **Reduction** (the paper's Algorithm 2; mlcommons/training
   data_generation/fractal_graph_expansions/graph_reduction.py): the top k = min(rows, cols)
   singular triplets of B, U [n, k], s [k], V^T [k, m]. U is resized to rows x k and V^T to
   k x cols (block means along users / items), each replaced by its closest matrix with
   orthonormal columns (rows), and R = U_r diag(s) V_r^T: a rows x cols matrix whose
   singular values are exactly B's k largest.
2. **Sampling probabilities**: P = |R| / max |R|, clipped to [MIN_KEEP, MAX_KEEP] (the
   mlcommons defaults: dropout rates between 0.05 and 0.99).
3. **Randomised Kronecker product**: every nonzero (u, i) of B becomes a rows x cols block
   of candidates (a * n + u, b * m + i); candidate (a, b) is kept with probability
   P[a, b], independently. In expectation the result is kron(P, B), whose singular values
   are the products of P's and B's and whose item (user) totals are scaled copies of B's,
   the properties the paper preserves. mlcommons also shuffles B's rows and columns
   independently in every block; we do not (see docs/data.md, "The fractal dataset").

Pure numpy, seeded: the same input and seed give the same bytes.
"""

import dataclasses

import numpy as np

# Bump when the output changes for the same input and seed: old caches are rebuilt.
VERSION = 1
# Keep probabilities are clipped to [MIN_KEEP, MAX_KEEP]: mlcommons' min_dropout_rate 0.05
# and max_dropout_rate 0.99 (random_matrix_ops.py).
MIN_KEEP = 0.01
MAX_KEEP = 0.95
# B is decomposed densely up to this many entries (n * m); above, by randomised subspace
# iteration on its sparse form (Halko, Martinsson and Tropp 2011).
DENSE_SVD_ENTRIES = 1 << 23
_OVERSAMPLE = 10
_POWER_ITERATIONS = 7
_CHUNK = 1 << 22  # candidates drawn per numpy call (memory, not results)


@dataclasses.dataclass(frozen=True)
class Expansion:
  """Expanded interactions in generation order, and how they were drawn."""

  users: np.ndarray  # int32 [nnz] a * num_base_users + u
  items: np.ndarray  # int32 [nnz] b * num_base_items + i
  timestamps: np.ndarray  # int64 [nnz] the base interaction's timestamp
  num_users: int  # rows * num_base_users
  num_items: int  # cols * num_base_items
  reduced: np.ndarray  # float64 [rows, cols] R, singular values = B's largest
  probabilities: np.ndarray  # float64 [rows, cols] P, keep probability of each block


class _Csr:
  """Binary sparse matrix from (row, col) pairs, duplicates counted once; products only."""

  def __init__(self, rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]):
    key = np.unique(rows.astype(np.int64) * shape[1] + cols)
    self.shape = shape
    self.row_of = key // shape[1]
    self.col = key - self.row_of * shape[1]
    self.starts = np.searchsorted(self.row_of, np.arange(shape[0] + 1))

  def dot(self, x: np.ndarray) -> np.ndarray:
    """self @ x for x [shape[1], l], in chunks of rows (memory: _CHUNK / l rows)."""
    out = np.zeros((self.shape[0], x.shape[1]))
    step = max(1, _CHUNK // max(1, x.shape[1]))
    nz = int(self.col.shape[0])
    for lo in range(0, nz, step):
      hi = min(nz, lo + step)
      rows = self.row_of[lo:hi]
      # rows are sorted: sum contiguous runs with reduceat.
      first = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
      out[rows[first]] += np.add.reduceat(x[self.col[lo:hi]], first, axis=0)
    return out

  def transpose(self) -> '_Csr':
    return _Csr(self.col, self.row_of, (self.shape[1], self.shape[0]))


def top_singular_triplets(
  users: np.ndarray,
  items: np.ndarray,
  num_users: int,
  num_items: int,
  k: int,
  dense_entries: int = DENSE_SVD_ENTRIES,
):
  """The k largest singular values of the binary interaction matrix, and their vectors.

  Returns (u [n, k], s [k] descending, vt [k, m]). Dense LAPACK up to `dense_entries`
  matrix entries; above, randomised subspace iteration with a fixed seed, so the result
  depends on the base only.
  """
  if num_users * num_items <= dense_entries:
    b = np.zeros((num_users, num_items))
    b[users, items] = 1.0
    u, s, vt = np.linalg.svd(b, full_matrices=False)
    return u[:, :k], s[:k], vt[:k]
  a = _Csr(users, items, (num_users, num_items))
  at = a.transpose()
  rng = np.random.Generator(np.random.PCG64(0))
  width = min(k + _OVERSAMPLE, num_users, num_items)
  q, _ = np.linalg.qr(a.dot(rng.standard_normal((num_items, width))))
  for _ in range(_POWER_ITERATIONS):
    z, _ = np.linalg.qr(at.dot(q))
    q, _ = np.linalg.qr(a.dot(z))
  small = at.dot(q).T  # q^T a, [width, m]
  w, s, vt = np.linalg.svd(small, full_matrices=False)
  return (q @ w)[:, :k], s[:k], vt[:k]


def resize_rows(x: np.ndarray, size: int) -> np.ndarray:
  """x [n, k] resampled to [size, k]: means of `size` contiguous row blocks (n >= size),
  else linear interpolation between row centres (skimage.transform.resize's role)."""
  n = x.shape[0]
  if size <= n:
    starts = np.linspace(0, n, size + 1).astype(np.int64)[:-1]
    counts = np.diff(np.r_[starts, n])
    return np.add.reduceat(x, starts, axis=0) / counts[:, None]
  centres = (np.arange(size) + 0.5) * n / size - 0.5
  return np.stack([np.interp(centres, np.arange(n), x[:, j]) for j in range(x.shape[1])], axis=1)


def closest_orthonormal(x: np.ndarray) -> np.ndarray:
  """The matrix with orthonormal columns nearest to x [r, k] (r >= k): its polar factor.

  Equals x (x^T x)^{-1/2} (mlcommons' _closest_column_orthogonal_matrix) when x has full
  column rank, and stays defined when it does not.
  """
  p, _, qt = np.linalg.svd(x, full_matrices=False)
  return p @ qt


def reduced_matrix(
  u: np.ndarray, s: np.ndarray, vt: np.ndarray, rows: int, cols: int
) -> np.ndarray:
  """The paper's Algorithm 2: a rows x cols matrix with singular values s[:k]."""
  k = min(rows, cols, s.shape[0])
  u_r = closest_orthonormal(resize_rows(u[:, :k], rows))
  v_r = closest_orthonormal(resize_rows(vt[:k].T, cols))
  return u_r @ np.diag(s[:k]) @ v_r.T


def keep_probabilities(reduced: np.ndarray) -> np.ndarray:
  """|R| / max |R| clipped to [MIN_KEEP, MAX_KEEP] (mlcommons normalize_matrix + clip)."""
  a = np.abs(reduced)
  return np.clip(a / a.max(), MIN_KEEP, MAX_KEEP)


def check_multipliers(rows, cols) -> None:
  """Raises ValueError naming a multiplier that is not an integer >= 1."""
  for field, value in (('rows', rows), ('cols', cols)):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
      raise ValueError(f'the {field} multiplier is {value!r}; it must be an integer >= 1')


def expand(
  users: np.ndarray,
  items: np.ndarray,
  timestamps: np.ndarray,
  num_users: int,
  num_items: int,
  rows: int,
  cols: int,
  seed: int,
  probabilities: np.ndarray | None = None,
  dense_entries: int = DENSE_SVD_ENTRIES,
) -> Expansion:
  """Expands base interactions (dense ids) by rows x cols; see the module docstring.

  Args:
    users, items: dense base ids in [0, num_users) / [0, num_items), one per interaction.
    timestamps: int64 per interaction; every expanded copy inherits its base row's.
    num_users, num_items: the base matrix's shape.
    rows, cols: integer multipliers (>= 1) of users and items.
    seed: seed of the sampling (numpy PCG64).
    probabilities: [rows, cols] keep probabilities to use instead of the reduction (tests).
    dense_entries: see top_singular_triplets.

  Returns:
    Expansion, rows ordered by row block a, then base row, then item block b. Base
    rows repeating a (user, item) pair are expanded independently.
  """
  check_multipliers(rows, cols)
  n = int(users.shape[0])
  if n == 0:
    raise ValueError('the base has no interactions to expand')
  if probabilities is None:
    k = min(rows, cols, num_users, num_items)
    u, s, vt = top_singular_triplets(users, items, num_users, num_items, k, dense_entries)
    reduced = reduced_matrix(u, s, vt, rows, cols)
    probabilities = keep_probabilities(reduced)
  else:
    reduced = np.asarray(probabilities, np.float64)
  probabilities = np.asarray(probabilities, np.float64)
  if probabilities.shape != (rows, cols):
    raise ValueError(f'probabilities have shape {probabilities.shape}, expected {(rows, cols)}')
  if (rows * num_users >= 2**31) or (cols * num_items >= 2**31):
    raise ValueError(f'{rows} x {num_users} users or {cols} x {num_items} items exceed int32 ids')
  rng = np.random.Generator(np.random.PCG64(seed))
  thresholds = probabilities.astype(np.float32)
  step = max(1, _CHUNK // cols)
  out_u, out_i, out_t = [], [], []
  base_u = users.astype(np.int64)
  base_i = items.astype(np.int64)
  col_offset = np.arange(cols, dtype=np.int64) * num_items
  for a in range(rows):
    for lo in range(0, n, step):
      hi = min(n, lo + step)
      keep = rng.random((hi - lo, cols), dtype=np.float32) < thresholds[a]
      row, block = np.nonzero(keep)  # row-major: base row, then item block
      src = lo + row
      out_u.append((a * num_users + base_u[src]).astype(np.int32))
      out_i.append((col_offset[block] + base_i[src]).astype(np.int32))
      out_t.append(timestamps[src].astype(np.int64, copy=False))
  return Expansion(
    users=np.concatenate(out_u),
    items=np.concatenate(out_i),
    timestamps=np.concatenate(out_t),
    num_users=rows * num_users,
    num_items=cols * num_items,
    reduced=reduced,
    probabilities=probabilities,
  )
