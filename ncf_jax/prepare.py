r"""Builds the processed dataset of a config once and caches it under its data_dir.

  python -m ncf_jax.prepare --config=configs/default.py
  python -m ncf_jax.prepare --config=configs/default.py --config.dataset.name=ml-20m \
      --config.dataset.data_dir=~/data/movielens --download

Prints one JSON line: {"dataset", "num_users", "num_items", "num_train", "num_test",
"cache"}. Training (`ncf_jax.data.load`) then loads the cache in about a second.
"""

import json
import os

from absl import app, flags

from ncf_jax import data, errors
from ncf_jax.errors import UserError, exit_on_user_error, parse_flags


def define_flags() -> None:
  """Defines the prepare command's flags (only when run as a command)."""
  errors.define_config_file(
    'configs/default.py', 'Config file (only config.dataset and config.validation are used).'
  )
  flags.DEFINE_bool(
    'download',
    False,
    'Download the GroupLens zip into data_dir when it is '
    'missing, and with --config.dataset.source=tfds build the TFDS dataset '
    'from it (same as --config.dataset.download=True).',
  )
  flags.DEFINE_bool('force', False, 'Rebuild even if a valid cache exists.')


def run(config, *, download: bool = False, force: bool = False) -> dict:
  """Prepares `config.dataset` and prints the one JSON summary line (the command's body).

  Nothing else goes to stdout: data sources that print (TFDS) are sent to stderr.
  """
  dataset_config = config.dataset
  if download:
    dataset_config.download = True
  created = _missing_dirs(os.path.expanduser(str(dataset_config.data_dir)))
  try:
    prepared = data.prepare(dataset_config, force=force, validation=config.validation)
  except BaseException:
    _remove_empty(created)  # a failed download leaves no empty data_dir behind
    raise
  if prepared.cache_path is None:
    raise UserError(
      f'could not write the processed cache under {dataset_config.data_dir} '
      '(see the warning above); make it writable or pick another '
      '--config.dataset.data_dir.'
    )
  ds = prepared.dataset
  summary = {
    'dataset': ds.name,
    'num_users': ds.num_users,
    'num_items': ds.num_items,
    'num_train': ds.num_train,
    'num_test': ds.num_test,
    'cache': prepared.cache_path,
  }
  print(json.dumps(summary), flush=True)
  return summary


def _missing_dirs(path: str) -> list[str]:
  """`path` and those of its parents that do not exist yet, deepest first."""
  missing, path = [], os.path.abspath(path)
  while not os.path.exists(path):
    missing.append(path)
    path = os.path.dirname(path)
  return missing


def _remove_empty(dirs: list[str]) -> None:
  """Removes the folders of `dirs` (deepest first) whose tree holds no file."""
  for top in dirs:
    try:
      for root, _, _ in sorted(os.walk(top), key=lambda w: -len(w[0])):
        os.rmdir(root)  # fails (and stops) at the first folder that is not empty
    except OSError:
      return


@exit_on_user_error
def main(argv):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments {" ".join(argv[1:])!r}; use --config.dataset.* flags.')
  run(flags.FLAGS.config, download=flags.FLAGS.download, force=flags.FLAGS.force)


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=parse_flags)
