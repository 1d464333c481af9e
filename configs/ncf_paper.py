"""NeuMF on MovieLens-1M with the NCF paper's protocol (He et al. 2017): 100 sampled
eval negatives, HR@10 / NDCG@10, predictive factors 8 (mf_dim 8, last MLP layer 8),
batch 256, lr 0.001, 4 negatives per positive.

  python -m ncf_jax.train --config=configs/ncf_paper.py --config.dataset.download=True
"""
from configs import default


def get_config():
  config = default.get_config()
  config.dataset.name = 'ml-1m'
  config.model.name = 'neumf'
  config.model.mf_dim = 8
  config.model.mlp_layers = (64, 32, 16, 8)
  config.num_neg = 4
  config.eval_num_neg = 100
  config.top_k = 10
  config.num_epochs = 20
  config.batch_size = 256
  config.eval_batch_size = 2048
  config.learning_rate = 0.001
  return config
