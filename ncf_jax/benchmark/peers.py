"""The implementations ours are compared against: a NumPy sampler and a PyTorch NeuMF."""

from collections.abc import Callable
import os
import time
from typing import Any

import numpy as np

from ncf_jax.benchmark import common


def numpy_bisection_negatives(dataset, seed=0):
  """The sampler peer: a per-user bisection, vectorised in NumPy.

  This is the approach of TensorFlow's 2019 NCF pipeline: per element, bisect the user's
  sorted positives (here their shifted values p_k - k) with NumPy array steps and return
  the r-th non-positive, r + j. Same distribution as ours (exact uniform over the
  non-positives), another bijection from r to items. Returns `draw(users) -> items`.
  """
  offsets = dataset.user_offsets.astype(np.int64)
  degrees = np.diff(offsets)
  local = np.arange(dataset.num_train) - np.repeat(offsets[:-1], degrees)
  shifted = (dataset.train_items - local).astype(np.int32)
  steps = int(np.ceil(np.log2(degrees.max() + 1)))
  last = dataset.num_train - 1
  rng = np.random.default_rng(seed)

  def draw(u):
    off, deg = offsets[u], degrees[u]
    r = rng.integers(0, dataset.num_items - deg)
    lo, hi = np.zeros_like(deg), deg.copy()
    for _ in range(steps):
      mid = (lo + hi) >> 1
      le = shifted[np.minimum(off + mid, last)] <= r
      active = lo < hi
      lo = np.where(active & le, mid + 1, lo)
      hi = np.where(active & ~le, mid, hi)
    return r + lo

  return draw


# The PyTorch peer's variants: common.TORCH_VARIANTS. 'sparse_adam' is a second peer with
# other optimizer semantics (lazy: only the rows a batch touches move).


def torch_neumf(
  num_users: int, num_items: int, batch: int, variants=common.TORCH_VARIANTS
) -> tuple[dict[str, Callable[[int], float]], dict[str, Any]]:
  """NVIDIA's MLPerf NeuMF module (PyTorch, CPU) as the train-step peer.

  Returns ({variant: run(n) -> seconds for n Adam steps at `batch`}, info). Variants:
  'eager' (torch.optim.Adam, foreach), 'fused_adam' (Adam(fused=True)), 'compiled'
  (`torch.compile` of forward, backward and the fused Adam step), 'sparse_adam' (sparse
  embedding gradients with SparseAdam, dense layers with fused Adam). Each run(n) is
  warmed up (and compiled) on its first call by the caller's warm-up round. A variant
  that this torch build cannot run is left out and named in info['torch_skipped'];
  without torch the dict is empty and info says why.
  """
  try:
    import torch  # pylint: disable=g-import-not-at-top  (optional: the peer only)
  except ImportError:
    return {}, {'torch_note': 'torch not installed: peer skipped'}
  from torch import nn  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count() or 1)

  class NeuMF(nn.Module):
    def __init__(self, sparse: bool):
      super().__init__()
      emb = lambda n, d: nn.Embedding(n, d, sparse=sparse)
      self.mf_user, self.mf_item = emb(num_users, 64), emb(num_items, 64)
      self.mlp_user, self.mlp_item = emb(num_users, 128), emb(num_items, 128)
      self.mlp = nn.Sequential(
        nn.Linear(256, 256),
        nn.ReLU(),
        nn.Linear(256, 128),
        nn.ReLU(),
        nn.Linear(128, 64),
        nn.ReLU(),
      )
      self.final = nn.Linear(128, 1)

    def forward(self, u, i):
      gmf = self.mf_user(u) * self.mf_item(i)
      mlp = self.mlp(torch.cat([self.mlp_user(u), self.mlp_item(i)], dim=1))
      return self.final(torch.cat([gmf, mlp], dim=1)).squeeze(1)

  u = torch.randint(0, num_users, (batch,))
  i = torch.randint(0, num_items, (batch,))
  y = torch.randint(0, 2, (batch,)).float()
  loss_fn = nn.BCEWithLogitsLoss()

  def make(variant):
    model = NeuMF(sparse=variant == 'sparse_adam')
    if variant == 'sparse_adam':
      tables = [
        p
        for n, p in model.named_parameters()
        if n.endswith('.weight')
        and isinstance(model.get_submodule(n[: -len('.weight')]), nn.Embedding)
      ]
      dense = [p for p in model.parameters() if all(p is not t for t in tables)]
      opts = [torch.optim.SparseAdam(tables, lr=1e-3), torch.optim.Adam(dense, lr=1e-3, fused=True)]
    else:
      opts = [torch.optim.Adam(model.parameters(), lr=1e-3, fused=variant == 'fused_adam')]

    forward = torch.compile(model) if variant == 'compiled' else model
    update = [torch.compile(o.step) if variant == 'compiled' else o.step for o in opts]

    def step():
      for opt in opts:
        opt.zero_grad(set_to_none=True)
      loss_fn(forward(u, i), y).backward()
      for u_ in update:
        u_()

    def run(n: int) -> float:
      t = time.perf_counter()
      for _ in range(n):
        step()
      return time.perf_counter() - t

    run(1)  # builds the optimizer state (and compiles): fails here if unsupported
    return run

  runners, skipped = {}, []
  for variant in variants:
    try:
      runners[variant] = make(variant)
    except Exception as e:  # pylint: disable=broad-except  (a build without the feature)
      skipped.append(f'{variant}: {type(e).__name__}: {str(e).splitlines()[0][:120]}')
  info = {'torch_version': torch.__version__, 'torch_threads': torch.get_num_threads()}
  if skipped:
    info['torch_skipped'] = '; '.join(skipped)
  return runners, info
