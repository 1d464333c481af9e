"""Dot-product matrix factorisation on MovieLens-1M, the baseline of Rendle et al. 2020
("Neural Collaborative Filtering vs. Matrix Factorization Revisited"), evaluated with the
NCF paper's protocol (100 sampled negatives, HR@10 / NDCG@10).

  python -m ncf_jax.train --config=configs/mf_baseline.py --config.dataset.download=True
"""
from configs import default


def get_config():
  config = default.get_config()
  config.dataset.name = 'ml-1m'
  config.model.name = 'mf'
  config.model.mf_dim = 64
  config.model.l2 = 0.0
  config.num_neg = 4
  config.eval_num_neg = 100
  config.top_k = 10
  config.num_epochs = 20
  config.batch_size = 1024
  config.eval_batch_size = 2048
  config.learning_rate = 0.002
  return config
