"""The processed dataset: what every other module consumes.

A source (ncf_jax.data.sources: GroupLens files, TFDS, the ml-20mx16x32 shards, your own
interactions file, the synthetic generator, the fractal expansion) -> preprocessing (MLPerf rules, docs/mlperf.md)
-> a cached, checksummed binary -> `Dataset`.

  dataset = data.load(config.dataset)   # cache hit: about a second at ml-20m scale

  dataset.py     Dataset (the leave-one-out CSR dataset) and Interactions (raw positives)
  preprocess.py  the MLPerf preprocessing: filter, dense ids, leave-one-out, validation
  prepare.py     prepare / load: pick the source, cache key, read, preprocess, check, cache
  cache.py       the checksummed, atomically written cache file
  synthetic.py   the seeded generator; fractal.py: the fractal expansion algorithm
  sources/       one module per source, all with one interface, and their registry

No jax here: numpy and pyarrow only, so the data layer and its tests stay fast.
"""

from ncf_jax.data.cache import cache_dir
from ncf_jax.data.dataset import Dataset, Interactions
from ncf_jax.data.prepare import Prepared, build, cache_params, check_config, load, prepare
from ncf_jax.data.preprocess import PREPROCESS_VERSION, VALIDATIONS, preprocess
from ncf_jax.data.sources import NAMES, SOURCES, Source, select
from ncf_jax.data.synthetic import SyntheticOracle

__all__ = [
  'NAMES',
  'PREPROCESS_VERSION',
  'SOURCES',
  'VALIDATIONS',
  'Dataset',
  'Interactions',
  'Prepared',
  'Source',
  'SyntheticOracle',
  'build',
  'cache_dir',
  'cache_params',
  'check_config',
  'load',
  'prepare',
  'preprocess',
  'select',
]
