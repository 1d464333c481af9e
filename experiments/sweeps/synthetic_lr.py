r"""Synthetic data: which Adam learning rate reaches HR@10 >= 0.65 in the fewest epochs?

Small enough to run on a laptop CPU (default config: NeuMF mf_dim 16, MLP 64-32-16,
4,000 users x 2,000 items, batch 8,192, 8 epochs at most), with two seeds per rate so that
a difference can be told from seed noise.

  python -m experiments.sweep --config=configs/default.py \
      --sweep=experiments/sweeps/synthetic_lr.py --config.hr_threshold=0.65 \
      --workdir=runs/synthetic_lr

Result: not run yet.
"""
from experiments import hyper


def get_sweep():
  return hyper.product([
      hyper.sweep('config.learning_rate', [0.0005, 0.001, 0.002, 0.004, 0.008]),
      hyper.sweep('config.seed', [0, 1]),
  ])
