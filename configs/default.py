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
  # 'synthetic', 'ml-100k', 'ml-1m', 'ml-10m', 'ml-20m', 'ml-25m', 'ml-latest-small',
  # 'ml-20mx16x32' (GroupLens's published fractal expansion of ml-20m), 'fractal', or
  # 'file' (your own interactions file: the dataset.path ... fields below, docs/data.md).
  d.name = 'synthetic'
  # Where a MovieLens dataset comes from: 'grouplens' (files or zip in data_dir) or 'tfds'.
  # Ignored for 'synthetic'.
  d.source = 'grouplens'
  # Folder holding the raw files (extracted folder or original zip) and the processed cache.
  d.data_dir = '~/.cache/ncf_jax'
  # Download the GroupLens zip into data_dir when it is missing (MD5/zip checked).
  d.download = False
  # Download: overall deadline in seconds (0: none); past it the partial file is removed.
  d.download_timeout_s = 3600.0
  # Download: abandoned when a window averages under this many bytes/s (0: no minimum).
  d.download_min_rate = 1024.0
  # Download: seconds per min-rate window; also bounds one stalled socket read.
  d.download_min_rate_window_s = 60.0
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
  # Synthetic generator: share of draws uniform over all items (label noise; it overfits).
  d.synthetic_noise = 0.0
  # File (name='file'): the interactions file (CSV/TSV/any delimiter, or Parquet); for
  # format='ncf_paper' the shared prefix of the NCF paper's .train.rating/.test.rating/...
  d.path = ''
  # File: 'auto' (Parquet by magic bytes, else text with a sniffed delimiter), 'csv',
  # 'tsv', 'parquet', or 'ncf_paper' (He et al. 2017's released splits and negatives).
  d.format = 'auto'
  # File: the user id column, a header name or a 0-based position as digits ('' = recognised).
  d.user_col = ''
  # File: the item id column (as user_col; '' = item, item_id, itemId, movieId, iid).
  d.item_col = ''
  # File: the timestamp column (as user_col; '' = timestamp, time or ts when present).
  d.time_col = ''
  # File: the rating column (as user_col; '' = rating, weight or score when present).
  d.rating_col = ''
  # File: keep only rows with rating >= this (None: keep every row as a positive).
  d.implicit_threshold = config_dict.placeholder(float)
  # File without timestamps: the test item is a seeded pseudo-random choice per user
  # ('seeded'), or the user's last row in the file ('last_row').
  d.holdout = 'seeded'
  # Fractal expansion (name='fractal'): the dataset expanded, built from this block's fields.
  d.fractal_base = 'synthetic'
  # Fractal expansion: integer multiplier of the base's users (ml-20mx16x32: 16).
  d.fractal_rows = 16
  # Fractal expansion: integer multiplier of the base's items (ml-20mx16x32: 32).
  d.fractal_cols = 32
  # Fractal expansion: seed of the randomised Kronecker product's sampling.
  d.fractal_seed = 0
  return d


# Fields a resumed run may set differently from the run that saved the checkpoint (how
# long and how often it evaluates, logs and saves; where the data is read from; the device
# count and table layout): ncf_jax.checkpoint.check_compatible refuses a difference in any
# other field. Listed in this order in that refusal.
RESUMABLE_FIELDS = (
  'num_epochs',
  'hr_threshold',
  'eval_every_epochs',
  'log_every_steps',
  'checkpoint_every_epochs',
  'keep_checkpoints',
  'eval_batch_size',
  'hash_pipeline',
  'eval_full_ranking',
  'full_ranking_chunk',
  'early_stop_patience',
  'num_devices',
  'dataset.data_dir',
  'dataset.download',
  'dataset.source',
  'dataset.download_timeout_s',
  'dataset.download_min_rate',
  'dataset.download_min_rate_window_s',
  'stall_timeout_s',
  'divergence_factor',
  'test_at_end',
  'steps_per_call',
  'sharding',
  'model.first_layer',
)


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
  # L2 per sample on the embedding rows it reads, averaged like the loss (docs/validation.md).
  config.model.l2 = 0.0
  # The alternative: l2_params * the sum of squares of every parameter, added once per step.
  config.model.l2_params = 0.0
  # Standard deviation of the normal initialisation of the embedding tables (MLPerf 0.01);
  # None: the model's default (ncf_jax.models.DEFAULTS), recorded in config.json.
  config.model.embed_init_std = config_dict.placeholder(float)
  # How the MLP tower's first layer reads the embeddings: 'concat' (one product per pair
  # on concat(p_u, q_i), as the reference), 'projected' (each table times its half of the
  # kernel once per call, then gathered) or 'auto' (project a table when it has fewer rows
  # than the pairs one call scores per device). Same parameters; values equal up to float
  # rounding (docs/benchmarks.md#first-layer-projection).
  config.model.first_layer = 'auto'
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
  # 'adam' or 'sgd' (plain SGD, no momentum: beta1, beta2 and eps are unused).
  config.optimizer = 'adam'
  # Learning rate of the optimizer; None: the model's default (ncf_jax.models.DEFAULTS;
  # NeuMF 0.002), recorded in config.json.
  config.learning_rate = config_dict.placeholder(float)
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
  # Cut-off K of HR@K, NDCG@K, MRR@K (and Recall@K with eval_full_ranking).
  config.top_k = 10
  # Stop once the test HR@K reaches this value (MLPerf's rule, validation='none' only).
  config.hr_threshold = config_dict.placeholder(float)
  # 'none' (MLPerf: test every epoch) or 'leave_one_out' (select on validation, test once).
  config.validation = 'none'
  # Validation metric that selects the best epoch and drives early stopping: 'hr' or 'ndcg'.
  config.select_metric = 'hr'
  # With a validation split: test the selected epoch once at the end. False for the points
  # of a hyperparameter search, which must not read the test split (experiments.compare).
  config.test_at_end = True
  # Stop when select_metric has not improved for this many epochs; 0 = run num_epochs.
  config.early_stop_patience = 0
  # Reproduce the MLPerf reference's eval sampling (with replacement, duplicates count once).
  config.match_mlperf = False
  # Hash every training batch and the eval candidates on device and log the digests.
  config.hash_pipeline = False
  # Also rank each held-out item against all its candidate items (full_* metrics).
  config.eval_full_ranking = False
  # Full ranking scores this many items per user at a time (memory, not results).
  config.full_ranking_chunk = 256
  # Compute dtype of the model ('float32' or 'bfloat16'); parameters stay float32.
  config.dtype = 'float32'
  # Evaluate (test, or validation with a split) every this many epochs and after the last.
  config.eval_every_epochs = 1
  # Log a train line every this many steps (0 = only per epoch).
  config.log_every_steps = 0
  # Train steps per compiled call (a lax.fori_loop on device): fewer launches from Python,
  # the same results bit for bit; an epoch's last (steps_per_epoch % this) run one a call.
  config.steps_per_call = 1
  # Save a checkpoint every this many epochs (0 = only at the end and on SIGTERM).
  config.checkpoint_every_epochs = 1
  # Checkpoints kept in WORKDIR/checkpoints.
  config.keep_checkpoints = 3
  # Devices of the data mesh: 0 = every device of every process; n > 0 = the first n
  # (single-process only; for device-count studies and sweeps sharing a host).
  config.num_devices = 0
  # 'replicated': every device holds the embedding tables, their Adam state, the sampler's
  # data and the epoch; 'sharded': tables by rows, data and epoch by training positives,
  # split over the devices (docs/scale.md). Same batches and hashes either way.
  config.sharding = 'replicated'
  # End the run with one clear line (exit 3) when no training step finishes for this many
  # seconds, e.g. a collective stalled by a dead host; 0 = never. Checkpoints stay intact.
  config.stall_timeout_s = 600
  # End the run with one clear line when an epoch's running train loss exceeds this many
  # times ln 2, the loss of a freshly initialised model (its logits are near 0): the run
  # has diverged (a learning rate far too high). 0 = never; a NaN or inf loss always stops.
  config.divergence_factor = 10.0
  return config


def metrics():
  """Headline scalars of a run."""
  return ['eval_hr', 'eval_ndcg', 'train_loss', 'train_samples_per_sec']
