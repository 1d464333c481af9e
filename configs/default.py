"""Default ncf_jax config: NeuMF on the embedded seeded synthetic dataset.

Every field of every config is defined and commented here, once; other configs import
this one and change only what differs.

  python -m ncf_jax.train --config=configs/default.py
  python -m ncf_jax.train --config=configs/default.py --config.num_epochs=3
"""
import ml_collections
from ml_collections import config_dict


def get_dataset_config() -> ml_collections.ConfigDict:
  """The `dataset` block shared by every config (see ncf_jax.data)."""
  d = ml_collections.ConfigDict()
  # 'synthetic', 'ml-100k', 'ml-1m', 'ml-10m', 'ml-20m', 'ml-25m' or 'ml-latest-small'.
  d.name = 'synthetic'
  # Where a MovieLens dataset comes from: 'grouplens' (files or zip in data_dir) or 'tfds'.
  # Ignored for 'synthetic'.
  d.source = 'grouplens'
  # Folder holding the raw files (extracted folder or original zip) and the processed cache.
  d.data_dir = '~/.cache/ncf_jax'
  # Download the GroupLens zip into data_dir when it is missing (MD5/zip checked).
  d.download = False
  # Users with fewer ratings are dropped (MLPerf: 20; a no-op on ml-1m and ml-20m).
  d.min_ratings = 20
  # Synthetic generator: number of users.
  d.synthetic_num_users = 4000
  # Synthetic generator: number of items.
  d.synthetic_num_items = 2000
  # Synthetic generator: mean interactions per user (heavy-tailed, every user >= 20).
  d.synthetic_mean_interactions = 60.0
  # Synthetic generator: rank of the planted user/item preference structure (topics).
  d.synthetic_num_topics = 16
  # Synthetic generator: seed of the data itself (independent of the training seed).
  d.synthetic_seed = 0
  return d


def get_config() -> ml_collections.ConfigDict:
  """Returns the default config: small NeuMF on synthetic data, a few minutes on 2 CPUs."""
  config = ml_collections.ConfigDict()
  config.dataset = get_dataset_config()

  config.model = ml_collections.ConfigDict()
  # 'neumf' (GMF + MLP), 'gmf', 'mlp' (the NCF paper's three) or 'mf' (dot product + biases).
  config.model.name = 'neumf'
  # GMF / MF embedding width.
  config.model.mf_dim = 16
  # MLP widths; the first is the concatenated user+item embedding width (must be even).
  config.model.mlp_layers = (64, 32, 16)
  # Dropout rate on the MLP hidden layers (0 = off, as in MLPerf).
  config.model.dropout = 0.0
  # L2 penalty on the embeddings touched by a batch, added to the loss (0 = off, as in MLPerf).
  config.model.l2 = 0.0
  # Initialise NeuMF from a trained GMF workdir / checkpoint (NCF paper pre-training).
  config.model.pretrained_gmf = config_dict.placeholder(str)
  # Initialise NeuMF from a trained MLP workdir / checkpoint (NCF paper pre-training).
  config.model.pretrained_mlp = config_dict.placeholder(str)

  # Seed of everything random (init, sampling, order, eval candidates); -1 (None in Python)
  # draws one, logs it and records it in config.json and summary.json.
  config.seed = config_dict.FieldReference(0, field_type=int)
  # Epochs to train (an upper bound when hr_threshold is set).
  config.num_epochs = 8
  # Global training batch (samples, positives and negatives together) over all devices.
  config.batch_size = 8192
  # Users per global evaluation batch (each with 1 + eval_num_neg candidates).
  config.eval_batch_size = 1024
  # Adam learning rate.
  config.learning_rate = 0.002
  # Adam beta1.
  config.beta1 = 0.9
  # Adam beta2.
  config.beta2 = 0.999
  # Adam epsilon.
  config.eps = 1e-8
  # Training negatives per positive, redrawn every epoch.
  config.num_neg = 4
  # Sampled evaluation negatives per user (MLPerf 999, NCF paper 100).
  config.eval_num_neg = 100
  # Cut-off K of HR@K and NDCG@K.
  config.top_k = 10
  # Stop once eval HR@K reaches this value; None runs all epochs.
  config.hr_threshold = config_dict.placeholder(float)
  # Reproduce the MLPerf reference's eval sampling (with replacement, duplicates count once).
  config.match_mlperf = False
  # Hash every training batch and the eval candidates on device and log the digests.
  config.hash_pipeline = False
  # Also rank each test item against all items the user has not interacted with.
  config.eval_full_ranking = False
  # Compute dtype of the model ('float32' or 'bfloat16'); parameters stay float32.
  config.dtype = 'float32'
  # Evaluate every this many epochs (and always after the last).
  config.eval_every_epochs = 1
  # Log a train line every this many steps (0 = only per epoch).
  config.log_every_steps = 0
  # Save a checkpoint every this many epochs (0 = only at the end and on SIGTERM).
  config.checkpoint_every_epochs = 1
  # Checkpoints kept in WORKDIR/checkpoints.
  config.keep_checkpoints = 3
  # Devices of the data mesh: 0 = every device of every process; n > 0 = the first n
  # (single-process only; for device-count studies and sweeps sharing a host).
  config.num_devices = 0
  # End the run with one clear line (exit 3) when no training step finishes for this many
  # seconds, e.g. a collective stalled by a dead host; 0 = never. Checkpoints stay intact.
  config.stall_timeout_s = 600
  return config


def metrics():
  """Headline scalars of a run."""
  return ['eval_hr', 'eval_ndcg', 'train_loss', 'train_samples_per_sec']
