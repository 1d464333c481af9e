"""Source `tfds`: the MovieLens ratings of TensorFlow Datasets, read through tfds.data_source.

`TfdsSource` serves config.dataset.source='tfds' for the MovieLens names TFDS has
(TFDS_NAMES; not ml-10m). Reading an existing build needs no TensorFlow; building one does
(`open_tfds` with download). Known sizes are GroupLens's (the same files).
"""

import contextlib
import importlib.util
import os
import sys
from typing import Any

from absl import logging
import numpy as np

from ncf_jax.data.dataset import Dataset, Interactions
from ncf_jax.data.sources import base, grouplens
from ncf_jax.errors import UserError

# TFDS has no ml-10m.
TFDS_NAMES = {
  'ml-100k': 'movielens/100k-ratings',
  'ml-1m': 'movielens/1m-ratings',
  'ml-20m': 'movielens/20m-ratings',
  'ml-25m': 'movielens/25m-ratings',
  'ml-latest-small': 'movielens/latest-small-ratings',
}
# Formats `tfds.data_source` can read (random access); TFDS's default, tfrecord, is not one.
TFDS_FILE_FORMAT = 'array_record'
_TFDS_READABLE = ('array_record', 'parquet')


def tfds_build_command(name: str) -> str:
  """The command that builds TFDS `name` the way `open_tfds` reads it."""
  return (
    f'python -m ncf_jax.prepare --config=configs/default.py --config.dataset.name={name} '
    '--config.dataset.source=tfds --download'
  )


def open_tfds(
  name: str,
  data_dir: str,
  download: bool,
  zip_dir: str | None = None,
  limits: grouplens.DownloadLimits | None = None,
):
  """Returns the `tfds.data_source` of the ratings of `name`, building it first if asked.

  Reading an existing build needs no TensorFlow; building does (TFDS's movielens builder
  extracts and parses with tf.io.gfile). The build writes array_record, a format
  `tfds.data_source` reads, and takes the GroupLens zip from `zip_dir/<name>.zip` (TFDS's
  manual_dir), which `grouplens.download_zip` fetches first when it is missing: our downloader fails
  in seconds with a clear message, TFDS's own retries for minutes when offline.

  Args:
    name: a key of TFDS_NAMES.
    data_dir: the TFDS data_dir (`config.dataset.data_dir`/tfds).
    download: build the dataset when it is not in data_dir.
    zip_dir: where the GroupLens zips live (`config.dataset.data_dir`; default: the
      folder above data_dir).
    limits: when the zip's download is abandoned (default grouplens.DownloadLimits()).

  Raises:
    UserError: not built (and download is off), built in a format data_source cannot
      read, TensorFlow missing for a build, download or build failed.
  """
  if name not in TFDS_NAMES:
    raise UserError(
      f'{name} is not in TensorFlow Datasets (TFDS has '
      f'{", ".join(sorted(TFDS_NAMES))}); use --config.dataset.source=grouplens.'
    )
  tfds_name = TFDS_NAMES[name]
  zip_dir = os.path.dirname(os.path.abspath(data_dir)) if zip_dir is None else zip_dir
  # TFDS prints progress ("Downloading and preparing dataset...") to stdout, which belongs
  # to the commands' own output (prepare's one JSON line).
  with contextlib.redirect_stdout(sys.stderr):
    try:
      import tensorflow_datasets as tfds
      from tensorflow_datasets.structured import movielens  # noqa: F401 (registers the builder)

      builder = tfds.builder(tfds_name, data_dir=data_dir)
      prepared = builder.is_prepared()
    except ModuleNotFoundError as e:
      raise UserError(
        f'TensorFlow Datasets needs the Python module {e.name!r}, which is not '
        'installed: pip install -r requirements.txt.'
      ) from None
    where = str(builder.data_path)
    if not prepared:
      if not download:
        raise UserError(
          f'TFDS {tfds_name} is not built in {data_dir}. Build it there (as array_record) '
          f'with `{tfds_build_command(name)}` (or --config.dataset.download=True), or use '
          '--config.dataset.source=grouplens.'
        )
      _build_tfds(tfds, builder, name, data_dir, zip_dir, limits)
    else:
      formats = sorted(f.value for f in builder.info.available_file_formats())
      if not set(formats) & set(_TFDS_READABLE):
        raise UserError(
          f'TFDS {tfds_name} in {where} is stored as {", ".join(formats) or "no known format"}'
          f', which tfds.data_source cannot read (it needs {TFDS_FILE_FORMAT}). Delete '
          f'{where} and rebuild it with `{tfds_build_command(name)}`, or use '
          '--config.dataset.source=grouplens.'
        )
    try:
      return builder.as_data_source(split='train')
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(
        f'cannot read TFDS {tfds_name} in {where} ({_first_line(e)}); delete '
        f'{where} and rebuild it with `{tfds_build_command(name)}`.'
      ) from None


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return f'{type(e).__name__}: {text.splitlines()[0]}' if text else type(e).__name__


def has_tensorflow() -> bool:
  """Whether TensorFlow is installed (TFDS builds need it; reading does not)."""
  return importlib.util.find_spec('tensorflow') is not None


def _build_tfds(tfds, builder, name: str, data_dir: str, zip_dir: str, limits=None) -> None:
  """Builds TFDS `name` as array_record from `zip_dir/<name>.zip`, downloading it first."""
  # pylint: disable-next=g-import-not-at-top
  from tensorflow_datasets.core.download.download_manager import NonMatchingChecksumError

  tfds_name = TFDS_NAMES[name]
  if not has_tensorflow():  # checked before any download: fail in a second, not after one
    raise UserError(
      f'building TFDS {tfds_name} needs TensorFlow (TFDS\'s movielens builder reads the zip '
      'with tf.io.gfile), which is not installed: pip install -r requirements-tfds.txt and '
      'run again, or use --config.dataset.source=grouplens (the same GroupLens files, no '
      'TensorFlow).'
    )
  zpath = os.path.join(zip_dir, f'{name}.zip')
  if not os.path.isfile(zpath):
    grouplens.download_zip(name, zip_dir, limits=limits)
  logging.info('Building TFDS %s in %s from %s', tfds_name, data_dir, zpath)
  config = tfds.download.DownloadConfig(manual_dir=zip_dir)
  try:
    builder.download_and_prepare(file_format=TFDS_FILE_FORMAT, download_config=config)
  except NonMatchingChecksumError:
    raise UserError(
      f'{zpath} is not the official GroupLens {name} zip that TFDS {tfds_name} expects (its '
      'SHA-256 differs). Delete it and run again with --download, or use '
      '--config.dataset.source=grouplens to read it as it is.'
    ) from None
  except tfds.download.DownloadError as e:
    raise UserError(
      f'TFDS could not download {tfds_name} ({_first_line(e)}). Check the '
      f'network, or put the official zip at {zpath} and run again.'
    ) from None
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(
      f'TFDS failed to build {tfds_name} in {data_dir} from {zpath} '
      f'({_first_line(e)}). Delete {zpath} and run again with --download, or '
      'use --config.dataset.source=grouplens.'
    ) from None


def tfds_identity(ds, name: str) -> str:
  """What identifies a TFDS data source's content for the cache key."""
  info = getattr(ds, 'dataset_info', None)
  version = getattr(info, 'version', None)
  return f'tfds:{TFDS_NAMES[name]}:{version}:{len(ds)}'


_TFDS_CHUNK = 1 << 16


def read_tfds(ds, name: str) -> Interactions:
  """Converts a TFDS movielens ratings data source to raw `Interactions` (data-source order).

  TFDS hands out one decoded record at a time, so this is the one place that touches
  records individually (in chunks, each chunk converted with numpy); it runs once, then
  the processed cache is used.
  """
  where = f'TFDS {TFDS_NAMES[name]}'
  n = len(ds)
  if n == 0:
    raise UserError(f'{where} has no ratings.')
  users = np.empty(n, np.int32)
  items = np.empty(n, np.int32)
  timestamps = np.empty(n, np.int64)
  for start in range(0, n, _TFDS_CHUNK):
    stop = min(start + _TFDS_CHUNK, n)
    records = [ds[k] for k in range(start, stop)]
    for out, key in ((users, 'user_id'), (items, 'movie_id')):
      raw = np.asarray([r[key] for r in records])
      ok = np.char.isdigit(raw) & (np.char.str_len(raw) <= 9)
      if not ok.all():
        k = int(np.argmax(~ok))
        raise UserError(
          f'{where} record {start + k}: {key} {raw[k]!r} is not a numeric id; '
          'is this the real TFDS movielens dataset?'
        )
      out[start:stop] = raw.astype(np.int64)
    timestamps[start:stop] = np.asarray([r['timestamp'] for r in records], np.int64)
  if (timestamps < 0).any():
    k = int(np.argmax(timestamps < 0))
    raise UserError(f'{where} record {k}: negative timestamp {timestamps[k]}.')
  return Interactions(users, items, timestamps, where)


class TfdsSource(base.Source):
  """A MovieLens TFDS build in `<data_dir>/tfds` (built from the GroupLens zip when asked).

  Identity: the TFDS name, version and record count (`tfds_identity`).
  """

  names = grouplens.NAMES  # TFDS lacks ml-10m: `open_tfds` says so when it is located
  kinds = ('tfds',)

  def __init__(self, settings: base.Settings):
    super().__init__(settings)
    self._ds: Any = None

  def data_source(self):
    """The opened `tfds.data_source` (built once, when download is on and it is missing)."""
    if self._ds is None:
      self._ds = open_tfds(
        self.name,
        os.path.join(self.data_dir, 'tfds'),
        self.settings.download,
        zip_dir=self.data_dir,
        limits=self.settings.download_limits,
      )
    return self._ds

  def cache_params(self) -> dict[str, Any]:
    return {'source': 'tfds'}

  def identity(self) -> str:
    return tfds_identity(self.data_source(), self.name)

  def read(self, validation: str) -> Interactions:
    del validation  # the preprocessing splits
    ratings = read_tfds(self.data_source(), self.name)
    grouplens.check_known_sizes(self.name, ratings.where, num_ratings=len(ratings))
    return ratings

  def check(self, dataset: Dataset, where: str) -> None:
    grouplens.check_dataset_sizes(self.name, self.min_ratings, dataset, where)
