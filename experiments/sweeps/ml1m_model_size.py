r"""NCF paper protocol (ml-1m, 100 sampled negatives): how do HR@10 and NDCG@10 grow with
model size, i.e. the predictive factors (mf_dim and the last MLP layer), each MLP layer
twice as wide as the next, as in He et al. 2017 §4.1?

  python -m experiments.sweep --config=configs/ncf_paper.py \
      --sweep=experiments/sweeps/ml1m_model_size.py --config.dataset.download=True \
      --workdir=runs/ml1m_model_size

Factors 8, 16, 32, 64 (mf_dim f, MLP layers 8f-4f-2f-f), two seeds each: 8 runs at batch
256, each stopped early on its validation split (the config's protocol). Read each point's
selected epoch, validation HR and test HR in results.md, and the validation curves for
overfitting of the larger models.

Result: not run here (no ml-1m on the machine this was written on).
"""

from experiments import hyper

FACTORS = (8, 16, 32, 64)


def get_sweep():
  size = hyper.zipit(
    [
      hyper.sweep('config.model.mf_dim', FACTORS),
      hyper.sweep('config.model.mlp_layers', [(8 * f, 4 * f, 2 * f, f) for f in FACTORS]),
    ]
  )
  return hyper.product([size, hyper.sweep('config.seed', [0, 1])])
