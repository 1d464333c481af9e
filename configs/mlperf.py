"""NeuMF on MovieLens-20M under the MLPerf v0.5 NCF rules (docs/mlperf.md).

Default: the large-batch setting of NVIDIA's MLPerf v0.5 submission (batch 1,048,576,
lr 0.0045, Adam beta1 0.25, beta2 0.5, eps 1e-8). Variant `reference`: the 2018 PyTorch
reference (batch 2048, lr 0.0005, Adam defaults).

  python -m ncf_jax.train --config=configs/mlperf.py --config.dataset.download=True
  python -m ncf_jax.train --config=configs/mlperf.py:reference
  python -m ncf_jax.train --config=configs/mlperf.py:runlocal      # tiny synthetic smoke run
"""

from configs import default


def get_config(arg=None):
  """MLPerf NCF config; `arg` is None, 'reference' or 'runlocal'."""
  config = default.get_config()
  config.dataset.name = 'ml-20m'
  config.model.name = 'neumf'
  config.model.mf_dim = 64
  config.model.mlp_layers = (256, 256, 128, 64)
  config.num_neg = 4
  config.eval_num_neg = 999
  config.top_k = 10
  config.hr_threshold = 0.635
  config.num_epochs = 20
  config.match_mlperf = True
  config.batch_size = 1048576
  config.eval_batch_size = 16384
  config.learning_rate = 0.0045
  config.beta1 = 0.25
  config.beta2 = 0.5
  config.eps = 1e-8
  if arg == 'reference':
    config.batch_size = 2048
    config.learning_rate = 0.0005
    config.beta1 = 0.9
    config.beta2 = 0.999
  elif arg == 'runlocal':
    config.dataset.name = 'synthetic'
    config.num_epochs = 1
    config.batch_size = 8192
    config.eval_batch_size = 512
    config.eval_num_neg = 100
    config.hr_threshold = None
  elif arg is not None:
    raise ValueError(f'unknown variant {arg!r} of configs/mlperf.py: use reference or runlocal')
  return config
