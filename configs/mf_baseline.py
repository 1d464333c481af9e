"""Dot-product matrix factorisation on MovieLens-1M: the recipe of Rendle et al. 2020
("Neural Collaborative Filtering vs. Matrix Factorization Revisited"; google-research
dot_vs_learned_similarity/mf_simple.py), evaluated with the NCF paper's protocol (100
sampled negatives, HR@10 / NDCG@10) and selected on a validation split.

  python -m ncf_jax.train --config=configs/mf_baseline.py --config.dataset.download=True
  python -m ncf_jax.train --config=configs/mf_baseline.py --config.dataset.name=ml-100k

Their recipe: MF with user, item and global biases; logistic loss; plain SGD with step
0.002 per example; L2 0.005 on what an example touches; 8 negatives per positive drawn
uniformly every epoch; embeddings N(0, 0.1) and zero biases; dimension 16-192; 256 epochs;
everything tuned on a hold-out split of the training data. Here:

  model mf, mf_dim 64          the dot product's width (their embedding_dim also counts
                               the bias); in their range, and as good as 128 on the
                               tuning data
  optimizer sgd, lr 2.048      0.002 x batch_size: the loss is a batch mean, so a batch
                               moves each row by the sum of its examples' 0.002-steps, as
                               consecutive per-example steps would to first order (batch
                               256 and 1024 gave the same validation curve)
  model.l2 0.0025              their update subtracts reg x row per example, the gradient
                               of (reg / 2) x |row|^2: l2 = 0.005 / 2 on the user's and
                               item's embedding and bias rows, per sample
  num_neg 8, embed_init_std 0.1, num_epochs 256 (a cap)
  validation leave_one_out, early stop after 20 epochs without a better validation HR@10

Where it differs, because the code does it another way:
  * minibatches of 1024 instead of one example at a time (the first-order equivalence
    above);
  * training negatives are never the user's training positives (theirs are uniform over
    all items, positives included);
  * the global bias is not regularised (it is not an embedding row; theirs decays with the
    same reg per example);
  * the hold-out is the validation split of docs/validation.md (each user's latest
    training interaction), and the epoch is chosen by early stopping on it; the test
    split follows the MLPerf preprocessing (latest timestamp, ties last in file) with
    100 distinct negatives per user drawn from the run's seed, not the NCF paper's files.

Tuned only on the validation split of synthetic data shaped like ml-100k (943 users,
1,682 items, 106 ratings per user; docs/validation.md): valid HR@10 0.680 at epoch 109 of
130 (early stop), against 0.671 at epoch 7 for the previous Adam config, which then fell
to 0.587 by epoch 30.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset.name = 'ml-1m'
  config.model.name = 'mf'
  config.model.mf_dim = 64
  config.model.embed_init_std = 0.1
  config.model.l2 = 0.005 / 2
  config.optimizer = 'sgd'
  config.batch_size = 1024
  config.learning_rate = 0.002 * config.batch_size
  config.num_neg = 8
  config.eval_num_neg = 100
  config.top_k = 10
  config.eval_batch_size = 2048
  config.validation = 'leave_one_out'
  config.select_metric = 'hr'
  config.early_stop_patience = 20
  config.num_epochs = 256
  return config
