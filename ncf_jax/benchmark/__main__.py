r"""Benchmarks: timing lives here, never in tests.

  python -m ncf_jax.benchmark                        # every section, full scale
  python -m ncf_jax.benchmark --sections=data --scale=0.05 --json
  python -m ncf_jax.benchmark --sections=sampler,train --scale=0.002 --batch_sizes=512,1024

Sections (--sections, default: all four): `data` (on the host: generate, parse,
preprocess and cache an ml-20m-sized ratings.csv), `sampler` (training negatives, epoch
batches and eval candidates against raw random draws and a NumPy peer), `train` (the
MLPerf NeuMF train step, its breakdown, evaluation and a PyTorch peer) and `modes` (both
`config.sharding` modes on 1, 2, 4 and 8 devices: samples/s and bytes per device).
Each measurement is printed to stderr as it is taken. `--json` prints one JSON object with the chosen sections'
figures (stable keys, in order). docs/benchmarks.md says how each figure is taken.
"""

from absl import app, flags

from ncf_jax.benchmark import cli
from ncf_jax.errors import parse_flags

cli.define_flags()
flags.adopt_module_key_flags(cli)  # so --help lists them
app.run(cli.main, flags_parser=parse_flags)
