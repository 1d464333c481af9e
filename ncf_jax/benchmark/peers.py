"""The implementations ours are compared against: a NumPy sampler and a PyTorch NeuMF."""
import os
import time
from typing import Any, Dict

import numpy as np


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


def torch_neumf(num_users: int, num_items: int, batch: int) -> Dict[str, Any]:
  """The train-step peer: NVIDIA's MLPerf NeuMF module (PyTorch, CPU), samples/s of one
  Adam step, eager and with fused Adam; a note instead when torch is not installed."""
  try:
    import torch  # pylint: disable=g-import-not-at-top  (optional: the peer only)
  except ImportError:
    return {'torch_note': 'torch not installed: peer skipped'}
  from torch import nn  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count() or 1)

  class NeuMF(nn.Module):
    def __init__(self):
      super().__init__()
      self.mf_user, self.mf_item = nn.Embedding(num_users, 64), nn.Embedding(num_items, 64)
      self.mlp_user = nn.Embedding(num_users, 128)
      self.mlp_item = nn.Embedding(num_items, 128)
      self.mlp = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(),
                               nn.Linear(128, 64), nn.ReLU())
      self.final = nn.Linear(128, 1)

    def forward(self, u, i):
      gmf = self.mf_user(u) * self.mf_item(i)
      mlp = self.mlp(torch.cat([self.mlp_user(u), self.mlp_item(i)], dim=1))
      return self.final(torch.cat([gmf, mlp], dim=1)).squeeze(1)

  out = {}
  u = torch.randint(0, num_users, (batch,))
  i = torch.randint(0, num_items, (batch,))
  y = torch.randint(0, 2, (batch,)).float()
  loss_fn = nn.BCEWithLogitsLoss()
  for name, fused in (('eager', False), ('fused_adam', True)):
    model = NeuMF()
    try:
      opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)
    except (RuntimeError, TypeError):
      continue
    def step():
      opt.zero_grad(set_to_none=True)
      loss_fn(model(u, i), y).backward()
      opt.step()
    step()
    t = time.perf_counter()
    for _ in range(3):
      step()
    out[f'torch_{name}_samples_per_sec'] = 3 * batch / (time.perf_counter() - t)
  out['torch_version'] = torch.__version__
  return out
