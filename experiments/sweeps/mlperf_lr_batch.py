r"""MLPerf (ml-20m): how do the epochs and time to HR@10 >= 0.635 depend on the batch size,
and does each published batch size need its own learning rate and Adam betas?

The four published recipes of docs/mlperf.md §5, from the 2,048 reference batch to
NVIDIA's 1,048,576, each at its published learning rate and at half and twice that, with
two seeds (4 x 3 x 2 = 24 runs of at most 20 epochs; the mlperf config stops each at 0.635):

  python -m experiments.sweep --config=configs/mlperf.py \
      --sweep=experiments/sweeps/mlperf_lr_batch.py --config.dataset.download=True \
      --workdir=runs/mlperf_lr_batch
  # on a multi-chip host, e.g. 2 points at a time on half the chips each: --parallel=2

Read results.md for epochs and seconds to the target; an lr row that never reaches it
shows '—'. For a claim about one recipe, follow up with a seed study (experiments.seeds).

Result: not run here (no ml-20m and no accelerator on the machine this was written on).
"""

# (batch_size, learning_rate, beta1, beta2, eps, source in docs/mlperf.md §5)
RECIPES = [
  (2048, 0.0005, 0.9, 0.999, 1e-8, 'REF-0.5 reference'),
  (65536, 0.00281936, 0.0490852, 0.965095, 1.23757e-08, 'tensorflow/models#5572'),
  (99000, 0.00382059, 0.783529, 0.909003, 1.45439e-07, 'TF-2019 run.sh (keras)'),
  (1048576, 0.0045, 0.25, 0.5, 1e-8, 'NV-0.5'),
]
LR_SCALES = (0.5, 1.0, 2.0)
SEEDS = (0, 1)


def get_sweep():
  return [
    {
      'config.batch_size': batch,
      'config.learning_rate': round(lr * scale, 12),
      'config.beta1': beta1,
      'config.beta2': beta2,
      'config.eps': eps,
      'config.seed': seed,
    }
    for batch, lr, beta1, beta2, eps, _ in RECIPES
    for scale in LR_SCALES
    for seed in SEEDS
  ]
