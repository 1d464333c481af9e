r"""Synthetic data: which Adam learning rate reaches HR@10 >= 0.65 in the fewest epochs?

Small enough to run on a laptop CPU (default config: NeuMF mf_dim 16, MLP 64-32-16,
4,000 users x 2,000 items, batch 8,192, 8 epochs at most), with two seeds per rate so that
a difference can be told from seed noise.

  python -m experiments.sweep --config=configs/default.py \
      --sweep=experiments/sweeps/synthetic_lr.py --config.hr_threshold=0.65 \
      --workdir=runs/synthetic_lr

Result (measured here at commit 1aa0fd6 on a 2-core CPU, 1 device, shared with other
jobs; table and curves in experiments/results/synthetic_lr/): epochs to HR@10 >= 0.65,
seed 0 / seed 1:

  lr 0.0005: not reached in 8 epochs (best HR 0.5650 / 0.5685)
  lr 0.001:  7 / 8
  lr 0.002:  4 / 4   (the default config's rate)
  lr 0.004:  3 / 2
  lr 0.008, 0.016, 0.032: 2 / 2

From 0.004 up every run reaches the target by epoch 2. HR@10 after those 2 epochs is
highest at 0.016 (0.6717 / 0.6737) and lower at 0.032 (0.6617 / 0.6685), the first sign of
a rate that is too high. Read the epochs, not the seconds: the first epoch (compiling)
took 6.6-10.9 s against 1.1-2.7 s for later ones, on a machine shared with other jobs.
The 14 runs took 311 s in all.
"""
from experiments import hyper


def get_sweep():
  return hyper.product([
      hyper.sweep('config.learning_rate',
                  [0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032]),
      hyper.sweep('config.seed', [0, 1]),
  ])
