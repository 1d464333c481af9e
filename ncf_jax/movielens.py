"""Raw MovieLens ratings: GroupLens files (folder or zip), their download, and TFDS.

Everything here returns raw ids and timestamps (`Ratings`); the MLPerf preprocessing is in
ncf_jax.data. Parsing is vectorized: pyarrow's multi-threaded CSV reader, with `::`
files first rewritten in memory to a one-byte separator. Only the error path scans the
bytes again (numpy, block by block) to name the bad line.
"""

import contextlib
import dataclasses
import hashlib
import http.client
import importlib.util
import os
import sys
import urllib.error
import urllib.request
import zipfile
import zlib

from absl import logging
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from ncf_jax import cache
from ncf_jax.errors import UserError

# Official GroupLens location; NCF_JAX_MOVIELENS_URL (or download(base_url=...)) overrides
# it, e.g. for a mirror or the tests' local server.
BASE_URL = 'https://files.grouplens.org/datasets/movielens'
URL_ENV = 'NCF_JAX_MOVIELENS_URL'

# MD5 of the official zips (MLPerf reference verify_dataset.sh). Other zips get a zip test.
MD5 = {
  'ml-20m': 'cd245b17a1ae2cc31bb14903e1204af3',
  'ml-1m': 'c4d9eecfca2ab87c1945afe126590906',
}

# (ratings, users, items) of the official files (MLPERF.md 1.1); checked after parsing.
KNOWN_SIZES = {
  'ml-20m': (20_000_263, 138_493, 26_744),
  'ml-1m': (1_000_209, 6_040, 3_706),
}


@dataclasses.dataclass(frozen=True)
class RawFormat:
  """Where a GroupLens ratings file lives and how it is written."""

  folder: str  # folder inside the zip, also the extracted folder in data_dir
  filename: str  # ratings file inside that folder
  sep: str  # field separator
  header: str | None  # expected first line, or None when there is no header


FORMATS: dict[str, RawFormat] = {
  'ml-100k': RawFormat('ml-100k', 'u.data', '\t', None),
  'ml-1m': RawFormat('ml-1m', 'ratings.dat', '::', None),
  'ml-10m': RawFormat('ml-10M100K', 'ratings.dat', '::', None),
  'ml-20m': RawFormat('ml-20m', 'ratings.csv', ',', 'userId,movieId,rating,timestamp'),
  'ml-25m': RawFormat('ml-25m', 'ratings.csv', ',', 'userId,movieId,rating,timestamp'),
  'ml-latest-small': RawFormat(
    'ml-latest-small', 'ratings.csv', ',', 'userId,movieId,rating,timestamp'
  ),
}
NAMES = tuple(FORMATS)

# TFDS has no ml-10m.
TFDS_NAMES = {
  'ml-100k': 'movielens/100k-ratings',
  'ml-1m': 'movielens/1m-ratings',
  'ml-20m': 'movielens/20m-ratings',
  'ml-25m': 'movielens/25m-ratings',
  'ml-latest-small': 'movielens/latest-small-ratings',
}

_SEP_NAMES = {'\t': 'tabs', '::': "'::'", ',': "','", ';': "';'", '|': "'|'", ' ': 'spaces'}
_FIELDS = ('user id', 'movie id', 'rating', 'timestamp')
_COLUMNS = ['user', 'item', 'rating', 'timestamp']
_DIAGNOSE_BLOCK = 1 << 23


@dataclasses.dataclass(frozen=True)
class Source:
  """A located GroupLens ratings file: a plain file, or a member of the original zip."""

  name: str
  path: str  # the ratings file, or the zip
  member: str | None  # member inside the zip, None for a plain file
  fmt: RawFormat

  @property
  def where(self) -> str:
    return f'{self.path}:{self.member}' if self.member else self.path


@dataclasses.dataclass(frozen=True)
class Ratings:
  """Raw ratings in file order (order decides timestamp ties: last in file wins)."""

  users: np.ndarray  # int32 [n] raw user ids
  items: np.ndarray  # int32 [n] raw movie ids
  timestamps: np.ndarray  # int64 [n] seconds
  where: str  # file (or TFDS name) for messages

  def __len__(self) -> int:
    return int(self.users.shape[0])


def url(name: str, base_url: str | None = None) -> str:
  base = base_url or os.environ.get(URL_ENV) or BASE_URL
  return f'{base.rstrip("/")}/{name}.zip'


def expected_paths(name: str, data_dir: str):
  """(extracted ratings file, zip) paths searched in data_dir, in that order."""
  fmt = FORMATS[name]
  return (os.path.join(data_dir, fmt.folder, fmt.filename), os.path.join(data_dir, f'{name}.zip'))


def locate(
  name: str,
  data_dir: str,
  *,
  download: bool = False,
  base_url: str | None = None,
  md5: dict[str, str] | None = None,
) -> Source:
  """Finds the ratings of `name` in data_dir (extracted folder first, then the zip).

  Args:
    name: one of NAMES.
    data_dir: folder holding the extracted folder or the original zip.
    download: fetch the zip from GroupLens when neither is there.
    base_url: download location (default: $NCF_JAX_MOVIELENS_URL or BASE_URL).
    md5: expected MD5 per name (default MD5).

  Raises:
    UserError: not found (and not downloaded), or the zip lacks the ratings member.
  """
  fmt = FORMATS[name]
  plain, zpath = expected_paths(name, data_dir)
  if os.path.isfile(plain):
    return Source(name, plain, None, fmt)
  if not os.path.isfile(zpath):
    if not download:
      where = (
        f'data_dir {data_dir} does not exist'
        if not os.path.isdir(data_dir)
        else f'neither {plain} nor {zpath} exists'
      )
      raise UserError(
        f'MovieLens {name} not found: {where}. Get it with `python -m ncf_jax.prepare '
        f'--config=... --download` (or --config.dataset.download=True), use '
        f'--config.dataset.source=tfds, or download {url(name, base_url)} and put the zip '
        f'(or its extracted {fmt.folder}/ folder) in {data_dir}.'
      )
    zpath = download_zip(name, data_dir, base_url=base_url, md5=md5)
  member = f'{fmt.folder}/{fmt.filename}'
  try:
    with zipfile.ZipFile(zpath) as z:
      z.getinfo(member)
  except KeyError:
    raise UserError(
      f'{zpath} has no member {member}: it is not the GroupLens {name} zip; '
      'delete it and re-download (--download).'
    ) from None
  except (zipfile.BadZipFile, OSError) as e:
    raise UserError(
      f'{zpath} is not a readable zip ({e}); delete it and re-download (--download).'
    ) from None
  return Source(name, zpath, member, fmt)


def download_zip(
  name: str,
  data_dir: str,
  *,
  base_url: str | None = None,
  md5: dict[str, str] | None = None,
  timeout: float = 60.0,
) -> str:
  """Downloads `<name>.zip` into data_dir atomically and returns its path.

  The bytes go to a hidden `.<name>.zip.*.part` file in data_dir; only after the length,
  the MD5 (names in `md5`) or a full zip CRC test (others) pass is it renamed to
  `<name>.zip`. Any failure removes the part file, so nothing that looks complete is left.
  """
  md5 = MD5 if md5 is None else md5
  src = url(name, base_url)
  dest = os.path.join(data_dir, f'{name}.zip')
  try:
    os.makedirs(data_dir, exist_ok=True)
  except OSError as e:
    raise UserError(f'cannot create data_dir {data_dir} for the download: {e}') from None
  fd, tmp = cache.public_temp_file(data_dir, f'.{name}.zip.', '.part')
  logging.info('Downloading %s to %s', src, dest)
  try:
    digest, total = hashlib.md5(), 0
    with os.fdopen(fd, 'wb') as f, urllib.request.urlopen(src, timeout=timeout) as r:
      length = r.headers.get('Content-Length')
      for block in iter(lambda: r.read(1 << 20), b''):
        f.write(block)
        digest.update(block)
        total += len(block)
    if length is not None and total != int(length):
      raise UserError(f'download of {src} is truncated ({total} of {length} bytes); run it again.')
    if name in md5:
      if digest.hexdigest() != md5[name]:
        raise UserError(
          f'download of {src} has MD5 {digest.hexdigest()}, expected '
          f'{md5[name]} (corrupt or not the official file); run it again.'
        )
    else:
      with zipfile.ZipFile(tmp) as z:
        bad = z.testzip()
      if bad is not None:
        raise UserError(f'download of {src} is corrupt (bad CRC in {bad}); run it again.')
    os.replace(tmp, dest)
  except (
    urllib.error.URLError,
    http.client.HTTPException,
    zipfile.BadZipFile,
    zlib.error,
    OSError,
    EOFError,
  ) as e:
    raise UserError(
      f'download of {src} failed: {e}. Check the network (or '
      f'${URL_ENV}), or download it by hand into {dest}.'
    ) from None
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return dest


def _open(source: Source):
  if source.member is None:
    return open(source.path, 'rb')
  # The member stays readable after the archive is closed (zipfile reference-counts it).
  with zipfile.ZipFile(source.path) as z:
    return z.open(source.member)


def _read_bytes(source: Source) -> bytes:
  with _open(source) as f:
    return f.read()


def _seps_in(line: str):
  return [s for s in ('::', '\t', ',', ';', '|') if s in line]


def _check_first_line(first: bytes, source: Source) -> None:
  """Empty file, header and separator checks on the first line (cheap, before parsing)."""
  fmt, where = source.fmt, source.where
  if not first:
    raise UserError(
      f'{where} is empty: expected MovieLens {source.name} ratings. Delete it '
      'and re-download (--download) or restore the original file.'
    )
  if not first.strip():
    raise UserError(
      f'{where} line 1 is blank: a GroupLens {source.name} file starts with '
      f'{"its header" if fmt.header else "a rating"}. Restore the original file.'
    )
  line = first.decode('utf-8', 'replace').lstrip('\ufeff').rstrip('\r\n')
  if fmt.header is not None:
    if line != fmt.header:
      found = _seps_in(line)
      hint = (
        f' (it looks separated by {_SEP_NAMES[found[0]]}, not commas)'
        if found and found[0] != fmt.sep
        else ''
      )
      raise UserError(
        f'{where} line 1: expected the header {fmt.header!r}, found '
        f'{line[:80]!r}{hint}. Is this the GroupLens {source.name} ratings.csv?'
      )
  elif fmt.sep not in line:
    found = _seps_in(line)
    hint = f'; it uses {_SEP_NAMES[found[0]]}' if found else ''
    raise UserError(
      f'{where} line 1: expected fields separated by {_SEP_NAMES[fmt.sep]} '
      f'({"::".join(_FIELDS) if fmt.sep == "::" else fmt.sep.join(_FIELDS)}), '
      f'found {line[:80]!r}{hint}. Is this the GroupLens {source.name} file?'
    )


def read_ratings(source: Source) -> Ratings:
  """Parses a located GroupLens ratings file into raw ids and timestamps.

  Raises:
    UserError: empty file, wrong header or separator, malformed line (file and 1-based
      line number), non-integer id or timestamp, corrupt zip.
  """
  try:
    return _read_ratings(source)
  except (zipfile.BadZipFile, zlib.error, EOFError) as e:
    raise UserError(
      f'{source.where} cannot be read from the zip ({e}); the zip is corrupt: '
      'delete it and re-download (--download).'
    ) from None


def _read_ratings(source: Source) -> Ratings:
  fmt, where = source.fmt, source.where
  with _open(source) as f:
    first = f.readline(1 << 16)
  _check_first_line(first, source)
  sep = fmt.sep
  if sep == '::':
    # pyarrow needs a one-byte delimiter: rewrite '::' to a tab in memory (C speed).
    data = _read_bytes(source)
    tab = data.find(b'\t')
    if tab >= 0:
      line = data.count(b'\n', 0, tab) + 1
      raise UserError(
        f'{where} line {line} contains a tab; a '
        f"GroupLens {source.name} ratings.dat separates fields with '::' only."
      )
    data = data.replace(b'::', b'\t')
    sep = '\t'
    stream = pa.BufferReader(data)
  else:
    data = None
    stream = source.path if source.member is None else _open(source)
  read_options = pacsv.ReadOptions(
    column_names=_COLUMNS, skip_rows=1 if fmt.header else 0, block_size=1 << 24
  )
  parse_options = pacsv.ParseOptions(
    delimiter=sep, quote_char=False, double_quote=False, escape_char=False, newlines_in_values=False
  )
  convert_options = pacsv.ConvertOptions(
    column_types={'user': pa.int32(), 'item': pa.int32(), 'timestamp': pa.int64()},
    include_columns=['user', 'item', 'timestamp'],
    null_values=[],
    strings_can_be_null=False,
    quoted_strings_can_be_null=False,
  )
  try:
    table = pacsv.read_csv(
      stream,
      read_options=read_options,
      parse_options=parse_options,
      convert_options=convert_options,
    )
  except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
    if data is None:
      data = _read_bytes(source)
    message = _diagnose(data, sep, 2 if fmt.header else 1, where, fmt.sep)
    raise UserError(message or f'{where}: cannot parse ({e}).') from None
  finally:
    if not isinstance(stream, str):
      stream.close()
  if table.num_rows == 0:
    raise UserError(
      f'{where} has no ratings (only a header). Delete it and re-download '
      '(--download) or restore the original file.'
    )
  users = table.column('user').to_numpy()
  items = table.column('item').to_numpy()
  timestamps = table.column('timestamp').to_numpy()
  del table
  if (users < 0).any() or (items < 0).any() or (timestamps < 0).any():
    # pyarrow accepts a sign; the diagnosis names the line.
    message = _diagnose(
      data if data is not None else _read_bytes(source), sep, 2 if fmt.header else 1, where, fmt.sep
    )
    raise UserError(message or f'{where}: negative id or timestamp.')
  return Ratings(users, items, timestamps, where)


def _diagnose(
  data: bytes, sep: str, first_data_line: int, where: str, shown_sep: str
) -> str | None:
  """Finds the first bad data line in `data` (error path; numpy, block by block).

  Args:
    data: the file bytes (for '::' files already rewritten to `sep`).
    sep: the one-byte separator in `data`.
    first_data_line: 1-based line number of the first data line (2 after a header).
    where: file name for the message.
    shown_sep: the separator as the user's file has it.

  Returns:
    A message naming the file, the 1-based line number and what is wrong, or None.
  """
  sep_byte = ord(sep)
  pos, line_base, n = 0, 0, len(data)
  view = memoryview(data)
  while pos < n:
    end = min(pos + _DIAGNOSE_BLOCK, n)
    if end < n:  # cut blocks after a newline
      cut = data.rfind(b'\n', pos, end)
      if cut < 0:  # a line longer than a block
        cut = data.find(b'\n', end)
      end = n if cut < 0 else cut + 1
    buf = np.frombuffer(view[pos:end], np.uint8)
    message = _diagnose_block(buf, sep_byte, first_data_line, line_base, where, shown_sep)
    if message:
      return message
    line_base += int(np.count_nonzero(buf == 10))
    pos = end
  return None


def _diagnose_block(buf, sep_byte, first_data_line, line_base, where, shown_sep):
  nl = np.flatnonzero(buf == 10)
  starts = np.concatenate([[0], nl + 1])
  ends = np.concatenate([nl, [buf.size]])
  if starts[-1] == buf.size:  # block ends with a newline: no partial last line
    starts, ends = starts[:-1], ends[:-1]
  ends = ends - ((ends > starts) & (buf[np.maximum(ends - 1, 0)] == 13))
  lineno = line_base + 1 + np.arange(starts.size)
  data_line = (lineno >= first_data_line) & (ends > starts)  # pyarrow skips empty lines

  seps = np.flatnonzero(buf == sep_byte)
  line_of = np.searchsorted(starts, seps, 'right') - 1
  nsep = np.bincount(line_of, minlength=starts.size)

  def text(k):
    s = bytes(buf[starts[k] : ends[k]]).decode('utf-8', 'replace')
    return (s.replace(chr(sep_byte), shown_sep) if shown_sep != chr(sep_byte) else s)[:80]

  problems = []  # (line index, message)
  bad = np.flatnonzero(data_line & (nsep != 3))
  if bad.size:
    k = bad[0]
    problems.append(
      (
        k,
        f'expected 4 fields ({", ".join(_FIELDS)}) separated by '
        f'{_SEP_NAMES[shown_sep]}, found {nsep[k] + 1}: {text(k)!r}',
      )
    )
  good = np.flatnonzero(data_line & (nsep == 3))
  if good.size:
    s = seps[data_line[line_of] & (nsep[line_of] == 3)].reshape(-1, 3)
    field_start = [starts[good], s[:, 0] + 1, s[:, 1] + 1, s[:, 2] + 1]
    field_end = [s[:, 0], s[:, 1], s[:, 2], ends[good]]
    nondigit = np.concatenate([[0], np.cumsum((buf < 48) | (buf > 57), dtype=np.int64)])
    for j, limit in ((0, 10), (1, 10), (3, 18)):
      fs, fe = field_start[j], field_end[j]
      length = fe - fs
      wrong = (length <= 0) | (nondigit[fe] - nondigit[fs] > 0) | (length > limit)
      if j < 2:  # int32 ids: a 10-digit id must not exceed 2147483647
        ten = np.flatnonzero(~wrong & (length == 10))
        if ten.size:
          digits = buf[fs[ten, None] + np.arange(10)].astype(np.int64) - 48
          value = digits @ (10 ** np.arange(9, -1, -1, dtype=np.int64))
          wrong[ten[value > 2**31 - 1]] = True
      w = np.flatnonzero(wrong)
      if w.size:
        k = good[w[0]]
        value = bytes(buf[fs[w[0]] : fe[w[0]]]).decode('utf-8', 'replace')
        problems.append(
          (
            k,
            f'{_FIELDS[j]} {value!r} is not a non-negative integer'
            f'{" below 2**31" if j < 2 else ""}: {text(k)!r}',
          )
        )
  if not problems:
    return None
  k, what = min(problems, key=lambda p: p[0])
  return (
    f'{where} line {int(lineno[k])}: {what}. Fix or restore the file (the GroupLens '
    'original has no such line).'
  )


def check_known_sizes(
  name: str,
  where: str,
  num_ratings: int | None = None,
  num_users: int | None = None,
  num_items: int | None = None,
  known: dict[str, tuple] | None = None,
) -> None:
  """Raises UserError when an official dataset's counts differ from the published ones."""
  known = KNOWN_SIZES if known is None else known
  if name not in known:
    return
  exp_ratings, exp_users, exp_items = known[name]
  for what, got, exp in (
    ('ratings', num_ratings, exp_ratings),
    ('users', num_users, exp_users),
    ('items', num_items, exp_items),
  ):
    if got is not None and got != exp:
      raise UserError(
        f'{where} has {got:,} {what}; the official GroupLens {name} has {exp:,}. It is not '
        'the official file (partial or modified?): delete it and re-download (--download), '
        'or rename the dataset if it is your own data.'
      )


# --------------------------------------------------------------------------------------
# TensorFlow Datasets.

# Formats `tfds.data_source` can read (random access); TFDS's default, tfrecord, is not one.
TFDS_FILE_FORMAT = 'array_record'
_TFDS_READABLE = ('array_record', 'parquet')


def tfds_build_command(name: str) -> str:
  """The command that builds TFDS `name` the way `open_tfds` reads it."""
  return (
    f'python -m ncf_jax.prepare --config=configs/default.py --config.dataset.name={name} '
    '--config.dataset.source=tfds --download'
  )


def open_tfds(name: str, data_dir: str, download: bool, zip_dir: str | None = None):
  """Returns the `tfds.data_source` of the ratings of `name`, building it first if asked.

  Reading an existing build needs no TensorFlow; building does (TFDS's movielens builder
  extracts and parses with tf.io.gfile). The build writes array_record, a format
  `tfds.data_source` reads, and takes the GroupLens zip from `zip_dir/<name>.zip` (TFDS's
  manual_dir), which `download_zip` fetches first when it is missing: our downloader fails
  in seconds with a clear message, TFDS's own retries for minutes when offline.

  Args:
    name: a key of TFDS_NAMES.
    data_dir: the TFDS data_dir (`config.dataset.data_dir`/tfds).
    download: build the dataset when it is not in data_dir.
    zip_dir: where the GroupLens zips live (`config.dataset.data_dir`; default: the
      folder above data_dir).

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
      _build_tfds(tfds, builder, name, data_dir, zip_dir)
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


def _build_tfds(tfds, builder, name: str, data_dir: str, zip_dir: str) -> None:
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
    download_zip(name, zip_dir)
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


def read_tfds(ds, name: str) -> Ratings:
  """Converts a TFDS movielens ratings data source to raw `Ratings` (data-source order).

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
  return Ratings(users, items, timestamps, where)


# --------------------------------------------------------------------------------------
# ml-20mx16x32: GroupLens's published fractal expansion of ml-20m (MLPerf's planned
# successor dataset), as numpy .npz shards; layout in docs/data.md ("ml-20mx16x32").

EXPANDED_NAME = 'ml-20mx16x32'
# One train and one test shard per user row block (the expansion's 16 user multiplier).
EXPANDED_SHARDS = 16
EXPANDED_URL = f'{BASE_URL}/ml-20mx16x32.tar'
# (train rows, items) of the published files, as both the mlcommons README and PyG's
# MovieLens1B state them. Their user counts disagree (2,197,225 and 2,210,078), so the
# user count is not checked.
EXPANDED_KNOWN_SIZES = {EXPANDED_NAME: (1_223_962_043, 855_776)}
_NPZ_ARRAY = 'arr_0'  # np.savez's name for its one positional array


@dataclasses.dataclass(frozen=True)
class ShardSource:
  """The located shards of ml-20mx16x32: trainx16x32_<i>.npz and testx16x32_<i>.npz."""

  folder: str
  train: tuple  # paths, shard 0 first
  test: tuple  # paths, shard 0 first

  @property
  def paths(self) -> tuple:
    return self.train + self.test


@dataclasses.dataclass(frozen=True)
class ExpandedRatings:
  """ml-20mx16x32 as published: (user, item) train rows and one test row per user."""

  train_users: np.ndarray  # int32 [n] raw user ids, shard order
  train_items: np.ndarray  # int32 [n] item ids (already dense, 0-based)
  test_users: np.ndarray  # int32 [num_test] raw user ids
  test_items: np.ndarray  # int32 [num_test]
  where: str  # the folder, for messages


def expanded_shard_paths(data_dir: str):
  """(folder, train paths, test paths) that `locate_shards` looks for."""
  folder = os.path.join(data_dir, EXPANDED_NAME)
  return (
    folder,
    tuple(os.path.join(folder, f'trainx16x32_{i}.npz') for i in range(EXPANDED_SHARDS)),
    tuple(os.path.join(folder, f'testx16x32_{i}.npz') for i in range(EXPANDED_SHARDS)),
  )


def expanded_how_to_get(data_dir: str) -> str:
  return (
    f'Download {EXPANDED_URL} (3.1 GB) and extract it into {data_dir} (`tar -xf '
    f'ml-20mx16x32.tar -C {data_dir}`), or generate it from ml-20m with mlcommons/'
    'training data_generation/fractal_graph_expansions/data_gen.sh.'
  )


def locate_shards(data_dir: str, download: bool = False) -> ShardSource:
  """Finds the 16 train and 16 test shards of ml-20mx16x32 in data_dir/ml-20mx16x32/.

  Raises:
    UserError: a shard is missing (names how many and the first one, and how to get them).
  """
  folder, train, test = expanded_shard_paths(data_dir)
  missing = [p for p in train + test if not os.path.isfile(p)]
  if missing:
    where = (
      f'data_dir {data_dir} does not exist'
      if not os.path.isdir(data_dir)
      else f'{folder} does not exist'
      if not os.path.isdir(folder)
      else f'{len(missing)} of {2 * EXPANDED_SHARDS} shards are missing, the first is {missing[0]}'
    )
    note = (
      ' (--download does not fetch this tarball: it has no published checksum to '
      'verify it against.)'
      if download
      else ''
    )
    raise UserError(
      f'{EXPANDED_NAME} not found: {where}. It is {EXPANDED_SHARDS} train and '
      f'{EXPANDED_SHARDS} test shards, trainx16x32_<i>.npz and testx16x32_<i>.npz for i = '
      f'0..{EXPANDED_SHARDS - 1}, in {folder}. {expanded_how_to_get(data_dir)}{note}'
    )
  return ShardSource(folder, train, test)


def _layout_error(path: str, found: str) -> UserError:
  return UserError(
    f'{path}: {found}; a published {EXPANDED_NAME} shard holds one array {_NPZ_ARRAY!r} of '
    f'integer (user, item) rows, shape [n, 2]. Re-extract it from ml-20mx16x32.tar, or '
    f'regenerate it.'
  )


def shard_rows(path: str) -> int:
  """Rows of a shard, from the .npy header inside the .npz (no data read).

  Raises:
    UserError: not a readable .npz, no arr_0, or not an integer [n, >= 2] array.
  """
  try:
    with zipfile.ZipFile(path) as z:
      names = z.namelist()
      if f'{_NPZ_ARRAY}.npy' not in names:
        raise _layout_error(
          path, f'it holds {", ".join(n[:-4] for n in names) or "nothing"}, no {_NPZ_ARRAY!r}'
        )
      with z.open(f'{_NPZ_ARRAY}.npy') as f:
        version = np.lib.format.read_magic(f)
        read_header = (
          np.lib.format.read_array_header_1_0
          if version == (1, 0)
          else np.lib.format.read_array_header_2_0
        )
        shape, _, dtype = read_header(f)
  except (zipfile.BadZipFile, OSError, ValueError, EOFError, zlib.error) as e:
    raise UserError(
      f'{path} is not a readable .npz file ({e}). Re-extract it from '
      f'ml-20mx16x32.tar, or regenerate it.'
    ) from None
  if len(shape) != 2 or shape[1] < 2 or dtype.kind not in 'iu':
    raise _layout_error(path, f'{_NPZ_ARRAY!r} is {dtype} with shape {tuple(shape)}')
  return int(shape[0])


def _read_shard(path: str, rows: int) -> np.ndarray:
  """The [rows, >= 2] integer array of a shard, checked (ids in [0, 2**31))."""
  try:
    with np.load(path, allow_pickle=False) as z:
      array = z[_NPZ_ARRAY]
  except (zipfile.BadZipFile, OSError, ValueError, EOFError, zlib.error) as e:
    raise UserError(
      f'{path} cannot be read ({e}). Re-extract it from ml-20mx16x32.tar, or regenerate it.'
    ) from None
  if array.shape[0] != rows:
    raise UserError(f'{path} changed while it was read; run again.')
  cols = array[:, :2]
  if cols.size and (int(cols.min()) < 0 or int(cols.max()) >= 2**31):
    k = int(np.argmax(((cols < 0) | (cols >= 2**31)).any(axis=1)))
    raise UserError(
      f'{path} row {k}: (user, item) = {tuple(int(v) for v in cols[k])}; ids '
      'must be in [0, 2**31). Is this a published ml-20mx16x32 shard?'
    )
  return array


def read_shards(source: ShardSource) -> ExpandedRatings:
  """Reads every shard in turn into preallocated int32 columns (one shard in memory).

  Peak memory: the int32 train columns (8 bytes a row, about 9.8 GB for the published
  1.2 billion rows) plus one shard as stored.

  Raises:
    UserError: unreadable shard, wrong layout, an id out of range, no train row.
  """
  train_rows = [shard_rows(p) for p in source.train]
  test_rows = [shard_rows(p) for p in source.test]
  total = sum(train_rows)
  if total == 0:
    raise UserError(
      f'{source.folder}: the train shards have no rows. '
      f'{expanded_how_to_get(os.path.dirname(source.folder))}'
    )
  columns = []
  for paths, counts in ((source.train, train_rows), (source.test, test_rows)):
    n = sum(counts)
    users, items = np.empty(n, np.int32), np.empty(n, np.int32)
    pos = 0
    for path, rows in zip(paths, counts):
      array = _read_shard(path, rows)
      users[pos : pos + rows] = array[:, 0]
      items[pos : pos + rows] = array[:, 1]
      del array
      pos += rows
      logging.info('Read %s (%d rows)', path, rows)
    columns += [users, items]
  return ExpandedRatings(*columns, where=source.folder)


def check_expanded_sizes(
  where: str,
  num_rows: int | None = None,
  num_items: int | None = None,
  known: dict[str, tuple] | None = None,
) -> None:
  """Raises UserError when ml-20mx16x32's train rows or items differ from the published."""
  known = EXPANDED_KNOWN_SIZES if known is None else known
  if EXPANDED_NAME not in known:
    return
  for what, got, exp in (
    ('train rows', num_rows, known[EXPANDED_NAME][0]),
    ('items', num_items, known[EXPANDED_NAME][1]),
  ):
    if got is not None and got != exp:
      raise UserError(
        f'{where} has {got:,} {what}; the published {EXPANDED_NAME} has {exp:,}. These are '
        f'not the published shards (partial or modified?). {expanded_how_to_get(os.path.dirname(where))}'
      )
