"""The benchmark command: flags, the section registry and `main`."""

import importlib
import json
import os
import shutil
import sys
import tempfile

from absl import flags

from ncf_jax import errors
from ncf_jax.benchmark import common
from ncf_jax.errors import UserError, exit_on_user_error

# Section name -> its module under ncf_jax.benchmark, which has `run(args) -> figures`.
# Imported only when chosen, so the data section and its measurement processes never
# load JAX (its import would count in their peak RSS).
SECTIONS = {
  'data': 'data_section',
  'sampler': 'sampler_section',
  'train': 'train_section',
  'modes': 'modes_section',
}


def define_flags() -> None:
  """Defines the benchmark command's flags (only when run as a command)."""
  errors.define_config_file(
    'configs/mlperf.py', 'Config whose model, dtype and optimizer the train section times.'
  )
  flags.DEFINE_list(
    'batch_sizes',
    ['65536', '1048576'],
    'Global batch sizes the train section times (the smallest also gets the '
    'breakdown and the hash cost).',
  )
  flags.DEFINE_list(
    'torch_variants',
    ['eager', 'fused_adam', 'compiled', 'sparse_adam'],
    'PyTorch peer variants the train section interleaves with ours (when '
    'torch is installed; empty: none).',
  )
  flags.DEFINE_list('sections', None, f'Sections to run, of {", ".join(SECTIONS)} (default: all).')
  flags.DEFINE_float('scale', 1.0, 'Problem size relative to ml-20m (e.g. 0.05).')
  flags.DEFINE_bool('json', False, 'Print one JSON object instead of a table.')
  flags.DEFINE_string(
    'workdir', None, 'Scratch folder (default: a new temp folder, deleted after).'
  )


@exit_on_user_error
def main(argv):
  """Runs the chosen sections and prints their figures (a table, or one JSON object)."""
  if len(argv) > 1:
    raise UserError(f'unexpected arguments {" ".join(argv[1:])!r}.')
  FLAGS = flags.FLAGS
  names = FLAGS.sections or list(SECTIONS)
  unknown = [n for n in names if n not in SECTIONS]
  if unknown:
    raise UserError(f'unknown --sections {", ".join(unknown)}; valid: {", ".join(SECTIONS)}.')
  bad = [v for v in FLAGS.torch_variants or () if v not in common.TORCH_VARIANTS]
  if bad:
    raise UserError(
      f'unknown --torch_variants {", ".join(bad)}; valid: {", ".join(common.TORCH_VARIANTS)}.'
    )
  if not FLAGS.scale > 0:
    raise UserError(f'--scale is {FLAGS.scale}; it must be > 0.')
  workdir = FLAGS.workdir or tempfile.mkdtemp(prefix='ncf_jax_benchmark_')
  os.makedirs(workdir, exist_ok=True)
  figures = {}
  try:
    for n in names:
      print(f'[benchmark] section {n}...', file=sys.stderr, flush=True)
      section = importlib.import_module(f'ncf_jax.benchmark.{SECTIONS[n]}')
      found = section.run(
        common.Args(
          scale=FLAGS.scale,
          workdir=workdir,
          config=FLAGS.config,
          batch_sizes=tuple(int(b) for b in FLAGS.batch_sizes),
          torch_variants=tuple(FLAGS.torch_variants or ()),
        )
      )
      for k, v in found.items():  # as it goes; stdout gets the table (or JSON) at the end
        print(f'[benchmark] {n}: {k} = {v}', file=sys.stderr, flush=True)
      figures.update(found)
  finally:
    if FLAGS.workdir is None:
      shutil.rmtree(workdir, ignore_errors=True)
  if FLAGS.json:
    print(json.dumps(figures))
  else:
    width = max(map(len, figures))
    for k, v in figures.items():
      print(f'{k:<{width}}  {v:.3f}' if isinstance(v, float) else f'{k:<{width}}  {v}')
