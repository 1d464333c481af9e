"""Source `grouplens`: MovieLens ratings from the GroupLens files (folder or zip), downloaded.

`GroupLensSource` serves config.dataset.source='grouplens' for the MovieLens names (NAMES).
Reading returns raw ids and timestamps (`Interactions`); the MLPerf preprocessing is in
ncf_jax.data.preprocess. Parsing is vectorized: pyarrow's multi-threaded CSV reader, with `::`
files first rewritten in memory to a one-byte separator. Only the error path scans the
bytes again (numpy, block by block) to name the bad line.
"""

import contextlib
import dataclasses
import fcntl
import glob
import hashlib
import http.client
import io
import os
import time
from typing import Any
import urllib.error
import urllib.request
import zipfile
import zlib

from absl import logging
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from ncf_jax.data import cache
from ncf_jax.data.dataset import Dataset, Interactions
from ncf_jax.data.sources import base
from ncf_jax.data.sources.base import DownloadLimits, download_limits  # noqa: F401 (API)
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


# Ratings rows of each release with a fixed, published size (GroupLens READMEs; ml-25m:
# 25,000,095). They bound what a member may inflate to: see `ratings_cap`.
RATING_ROWS = {
  'ml-100k': 100_000,
  'ml-1m': 1_000_209,
  'ml-10m': 10_000_054,
  'ml-20m': 20_000_263,
  'ml-25m': 25_000_095,
}
# Bytes per row allowed for the cap. A real row is 20-33 bytes (two ids, a rating, a 9-10
# digit timestamp, separators, newline): 64 is about twice the published file sizes.
MAX_BYTES_PER_ROW = 64
# Cap of a release without a fixed size (ml-latest-small changes over time; about 2.5 MB).
UNKNOWN_RATINGS_CAP = 1 << 28
# The whole archive (splits, tags, genome scores, ...) may inflate to this many times the
# ratings cap: ml-100k's other files are ~7x its u.data, ml-25m's ~0.7x its ratings.csv.
ARCHIVE_CAP_FACTOR = 4
# Compression methods zipfile can read (others raise NotImplementedError when opened).
_READABLE_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)


def ratings_cap(name: str) -> int:
  """Most bytes the ratings file of release `name` may hold uncompressed (zip bomb bound)."""
  rows = RATING_ROWS.get(name)
  return UNKNOWN_RATINGS_CAP if rows is None else rows * MAX_BYTES_PER_ROW


def _cap_basis(name: str) -> str:
  rows = RATING_ROWS.get(name)
  if rows is None:
    return f'the cap for a release without a published size, {UNKNOWN_RATINGS_CAP:,} bytes'
  return f'{rows:,} ratings x {MAX_BYTES_PER_ROW} bytes = {rows * MAX_BYTES_PER_ROW:,} bytes'


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

_SEP_NAMES = {'\t': 'tabs', '::': "'::'", ',': "','", ';': "';'", '|': "'|'", ' ': 'spaces'}
_FIELDS = ('user id', 'movie id', 'rating', 'timestamp')
_COLUMNS = ['user', 'item', 'rating', 'timestamp']
_DIAGNOSE_BLOCK = 1 << 23


@dataclasses.dataclass(frozen=True)
class RatingsFile:
  """A located GroupLens ratings file: a plain file, or a member of the original zip."""

  name: str
  path: str  # the ratings file, or the zip
  member: str | None  # member inside the zip, None for a plain file
  fmt: RawFormat

  @property
  def where(self) -> str:
    return f'{self.path}:{self.member}' if self.member else self.path


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
  limits: DownloadLimits | None = None,
) -> RatingsFile:
  """Finds the ratings of `name` in data_dir (extracted folder first, then the zip).

  Args:
    name: one of NAMES.
    data_dir: folder holding the extracted folder or the original zip.
    download: fetch the zip from GroupLens when neither is there.
    base_url: download location (default: $NCF_JAX_MOVIELENS_URL or BASE_URL).
    md5: expected MD5 per name (default MD5).
    limits: when a download is abandoned (default DownloadLimits()).

  Raises:
    UserError: not found (and not downloaded), the zip lacks the ratings member, or the
      member is encrypted, compressed by an unreadable method or bigger than its cap.
  """
  fmt = FORMATS[name]
  plain, zpath = expected_paths(name, data_dir)
  if os.path.isfile(plain):
    return RatingsFile(name, plain, None, fmt)
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
    zpath = download_zip(name, data_dir, base_url=base_url, md5=md5, limits=limits)
  member = f'{fmt.folder}/{fmt.filename}'
  try:
    with zipfile.ZipFile(zpath) as z:
      info = z.getinfo(member)
  except KeyError:
    raise UserError(
      f'{zpath} has no member {member}: it is not the GroupLens {name} zip; '
      'delete it and re-download (--download).'
    ) from None
  except PermissionError as e:
    raise UserError(_unreadable(zpath, e)) from None
  except (zipfile.BadZipFile, OSError) as e:
    raise UserError(
      f'{zpath} is not a readable zip ({e}); delete it and re-download (--download).'
    ) from None
  problem = _member_problem(info, name, ratings_cap(name))
  if problem:
    raise UserError(
      f'{zpath}: {problem}; it is not the GroupLens {name} zip. Delete it and re-download '
      f'(--download), or put the official {url(name, base_url)} in {data_dir} by hand.'
    )
  return RatingsFile(name, zpath, member, fmt)


def _unreadable(path: str, e: OSError) -> str:
  return (
    f'{path} cannot be read ({e.strerror or e}); give this user read access to it '
    '(and its folder), or delete it and re-download (--download).'
  )


def _member_problem(info: zipfile.ZipInfo, name: str, cap: int | None) -> str | None:
  """What makes a zip member unreadable or too big, from its directory entry (no inflating)."""
  if info.flag_bits & 0x1:
    return f'member {info.filename} is encrypted (a GroupLens zip has no password)'
  if info.compress_type not in _READABLE_METHODS:
    return (
      f'member {info.filename} uses compression method {info.compress_type}, which '
      'cannot be read (stored, deflate, bzip2 and lzma can)'
    )
  if cap is not None and info.file_size > cap:
    return _too_big(info.filename, name, cap)
  return None


def _too_big(member: str, name: str, cap: int) -> str:
  if member.endswith('/' + FORMATS[name].filename):
    why = f'the most a GroupLens {name} ratings file can hold ({_cap_basis(name)})'
  else:
    why = (
      f'the most a whole GroupLens {name} archive can hold ({ARCHIVE_CAP_FACTOR} x the ratings cap)'
    )
  return f'member {member} inflates to more than {cap:,} bytes, {why}'


class MemberTooBig(UserError):
  """A zip member inflated past its cap while it was streamed."""


class _CappedReader(io.RawIOBase):
  """A zip member as a raw stream that stops with MemberTooBig past `cap` inflated bytes."""

  def __init__(self, member, cap: int, message: str):
    super().__init__()
    self._member, self._cap, self._message, self._count = member, cap, message, 0

  def readable(self) -> bool:
    return True

  def readinto(self, b) -> int:
    want = min(len(b), self._cap - self._count + 1)
    data = self._member.read(want)
    self._count += len(data)
    if self._count > self._cap:
      raise MemberTooBig(self._message)
    b[: len(data)] = data
    return len(data)

  def close(self) -> None:
    self._member.close()
    super().close()


def download_zip(
  name: str,
  data_dir: str,
  *,
  base_url: str | None = None,
  md5: dict[str, str] | None = None,
  timeout: float = 60.0,
  limits: DownloadLimits | None = None,
) -> str:
  """Downloads `<name>.zip` into data_dir atomically and returns its path.

  The bytes go to a hidden `.<name>.zip.*.part` file in data_dir, flock-ed while it is
  written; only after the length, the MD5 (names in `md5`) and the archive check (every
  member readable and within its inflated-size cap, streamed: `_archive_problem`) pass is
  it renamed to `<name>.zip`. Any failure, Ctrl-C included, removes the part file, and a
  part file left by a killed process (no longer locked) is removed by the next download.
  The transfer is abandoned past `limits.timeout_s`, or when a window of
  `limits.min_rate_window_s` averages under `limits.min_rate` bytes/s; one socket read
  waits at most min(`timeout`, those bounds) seconds.
  """
  md5 = MD5 if md5 is None else md5
  limits = DownloadLimits() if limits is None else limits
  src = url(name, base_url)
  dest = os.path.join(data_dir, f'{name}.zip')
  try:
    os.makedirs(data_dir, exist_ok=True)
  except OSError as e:
    raise UserError(f'cannot create data_dir {data_dir} for the download: {e}') from None
  _remove_stale_parts(data_dir, name)
  fd, tmp = cache.public_temp_file(data_dir, f'.{name}.zip.', '.part')
  # Locked until it is renamed or removed (the dup outlives the writer's close), so the
  # next download's stale-part cleanup skips it; the OS releases it if this process dies.
  fcntl.flock(fd, fcntl.LOCK_EX)
  lock_fd = os.dup(fd)
  sock_timeout = limits.socket_timeout(timeout)
  by_hand = (
    f'the partial file was removed. Download it by hand into {dest}, or set ${URL_ENV} '
    'to another mirror'
  )
  logging.info('Downloading %s to %s', src, dest)
  try:
    with os.fdopen(fd, 'wb') as f, urllib.request.urlopen(src, timeout=sock_timeout) as r:
      length = r.headers.get('Content-Length')
      digest, total = _transfer(r, f, src, limits, by_hand)
    if length is not None and total != int(length):
      raise UserError(f'download of {src} is truncated ({total} of {length} bytes); run it again.')
    if name in md5 and digest.hexdigest() != md5[name]:
      raise UserError(
        f'download of {src} has MD5 {digest.hexdigest()}, expected '
        f'{md5[name]} (corrupt or not the official file); run it again.'
      )
    try:
      problem = _archive_problem(tmp, name, stream=name not in md5)
    except _BadCrc as bad:
      raise UserError(f'download of {src} is corrupt (bad CRC in {bad}); run it again.') from None
    if problem:
      raise UserError(f'download of {src} is refused: {problem}; {by_hand}.')
    os.replace(tmp, dest)
  except TimeoutError:
    raise UserError(
      f'download of {src} stalled: no data for {sock_timeout:g} s; {by_hand} (or raise '
      'config.dataset.download_min_rate_window_s).'
    ) from None
  except (
    urllib.error.URLError,
    http.client.HTTPException,
    zipfile.BadZipFile,
    zlib.error,
    OSError,
    EOFError,
  ) as e:
    if isinstance(getattr(e, 'reason', None), TimeoutError):  # urlopen wraps a connect timeout
      raise UserError(
        f'download of {src} stalled: no answer for {sock_timeout:g} s; {by_hand}.'
      ) from None
    raise UserError(
      f'download of {src} failed: {e}. Check the network (or '
      f'${URL_ENV}), or download it by hand into {dest}.'
    ) from None
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
    os.close(lock_fd)
  return dest


def _transfer(r, f, src: str, limits: DownloadLimits, by_hand: str):
  """Copies response `r` to file `f` under the deadline and minimum rate; (MD5, bytes)."""
  digest, total = hashlib.md5(), 0
  start = window_start = time.monotonic()
  window_bytes = 0
  while True:
    block = r.read1(1 << 16)  # returns what one socket read brought (a trickle too)
    if not block:
      return digest, total
    f.write(block)
    digest.update(block)
    total += len(block)
    window_bytes += len(block)
    now = time.monotonic()
    if limits.timeout_s > 0 and now - start > limits.timeout_s:
      raise UserError(
        f'download of {src} did not finish within config.dataset.download_timeout_s='
        f'{limits.timeout_s:g} s ({total:,} bytes received); {by_hand} (or raise '
        'config.dataset.download_timeout_s).'
      )
    if limits.min_rate > 0 and now - window_start >= limits.min_rate_window_s:
      rate = window_bytes / (now - window_start)
      if rate < limits.min_rate:
        raise UserError(
          f'download of {src} is too slow: {rate:,.0f} bytes/s over the last '
          f'{now - window_start:.0f} s, under config.dataset.download_min_rate='
          f'{limits.min_rate:g} (averaged over config.dataset.download_min_rate_window_s='
          f'{limits.min_rate_window_s:g}); {by_hand} (or lower config.dataset.download_min_rate).'
        )
      window_start, window_bytes = now, 0


def _remove_stale_parts(data_dir: str, name: str) -> None:
  """Removes `.<name>.zip.*.part` files no process holds (left by a killed download)."""
  for path in glob.glob(os.path.join(glob.escape(data_dir), f'.{name}.zip.*.part')):
    try:
      fd = os.open(path, os.O_RDONLY)
    except OSError:
      continue
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      continue  # another download is writing it
    else:
      logging.info('Removing %s, left by an interrupted download', path)
      with contextlib.suppress(OSError):
        os.unlink(path)
    finally:
      os.close(fd)


class _BadCrc(Exception):
  """A member's CRC does not match (its name is the argument)."""


def _archive_problem(zpath: str, name: str, stream: bool) -> str | None:
  """Why a zip is refused: an unreadable or too big member (directory entries; if `stream`,
  every member inflated, CRC-checked and counted against its cap, never held whole).

  Raises:
    _BadCrc: a member's CRC does not match (streaming only).
  """
  ratings = f'{FORMATS[name].folder}/{FORMATS[name].filename}'
  cap = ratings_cap(name)
  archive_cap = ARCHIVE_CAP_FACTOR * cap
  with zipfile.ZipFile(zpath) as z:
    infos = z.infolist()
    for info in infos:
      problem = _member_problem(info, name, cap if info.filename == ratings else None)
      if problem:
        return problem
    if sum(info.file_size for info in infos) > archive_cap:
      return _too_big('(all members together)', name, archive_cap)
    if not stream:
      return None
    inflated = 0
    for info in infos:
      member_cap = cap if info.filename == ratings else archive_cap - inflated
      count = 0
      try:
        with z.open(info) as m:
          while block := m.read(1 << 20):
            count += len(block)
            if count > member_cap:
              return _too_big(info.filename, name, member_cap)
      except zipfile.BadZipFile:
        raise _BadCrc(info.filename) from None
      inflated += count
  return None


def _open(source: RatingsFile):
  if source.member is None:
    return open(source.path, 'rb')
  # The member stays readable after the archive is closed (zipfile reference-counts it).
  with zipfile.ZipFile(source.path) as z:
    member = z.open(source.member)
  # Inflation is capped while it streams: a bomb stops at the cap, whatever its header says.
  cap = ratings_cap(source.name)
  message = (
    f'{source.path}: {_too_big(source.member, source.name, cap)}; it is not the GroupLens '
    f'{source.name} zip (a zip bomb?): delete it and re-download (--download), or put the official '
    f'{url(source.name)} in {os.path.dirname(source.path)} by hand.'
  )
  return io.BufferedReader(_CappedReader(member, cap, message), 1 << 20)


def _read_bytes(source: RatingsFile) -> bytes:
  with _open(source) as f:
    return f.read()


def _seps_in(line: str):
  return [s for s in ('::', '\t', ',', ';', '|') if s in line]


def _check_first_line(first: bytes, source: RatingsFile) -> None:
  """Empty file, header and separator checks on the first line (cheap, before parsing)."""
  fmt, where = source.fmt, source.where
  if first.startswith(b'\x1f\x8b'):
    raise UserError(
      f'{where} is gzip-compressed, not the GroupLens {source.name} text: decompress it '
      '(gunzip) or restore the original file.'
    )
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


def read_ratings(source: RatingsFile) -> Interactions:
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
  except (RuntimeError, NotImplementedError) as e:  # encrypted, unknown compression
    raise UserError(
      f'{source.where} cannot be read from the zip ({e}); it is not the GroupLens '
      f'{source.name} zip: delete it and re-download (--download).'
    ) from None
  except OSError as e:  # PermissionError, I/O error (pyarrow's ArrowIOError is one too)
    raise UserError(_unreadable(source.path, e)) from None


def _read_ratings(source: RatingsFile) -> Interactions:
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
  return Interactions(users, items, timestamps, where)


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


def check_dataset_sizes(name: str, min_ratings: int, dataset: Dataset, where: str) -> None:
  """`check_known_sizes` on a preprocessed official dataset's users and items."""
  if min_ratings <= 20:  # the published counts are after the (no-op) MLPerf filter
    check_known_sizes(name, where, num_users=dataset.num_users, num_items=dataset.num_items)


class GroupLensSource(base.Source):
  """A MovieLens ratings file in data_dir: the extracted folder, or the zip (downloaded).

  Identity: the SHA-256 of the file or zip (memoised, `cache.source_hash`).
  """

  names = NAMES
  kinds = ('grouplens',)

  def __init__(self, settings: base.Settings):
    super().__init__(settings)
    self._file: RatingsFile | None = None

  def ratings_file(self) -> RatingsFile:
    """The located ratings file (found, or downloaded, once)."""
    if self._file is None:
      self._file = locate(
        self.name,
        self.data_dir,
        download=self.settings.download,
        limits=self.settings.download_limits,
      )
    return self._file

  def cache_params(self) -> dict[str, Any]:
    return {'source': 'grouplens'}

  def identity(self) -> str:
    path = self.ratings_file().path
    try:
      return cache.source_hash(path, self.data_dir)
    except OSError as e:
      raise UserError(_unreadable(path, e)) from None

  def read(self, validation: str) -> Interactions:
    del validation  # the preprocessing splits
    ratings = read_ratings(self.ratings_file())
    check_known_sizes(self.name, ratings.where, num_ratings=len(ratings))
    return ratings

  def check(self, dataset: Dataset, where: str) -> None:
    check_dataset_sizes(self.name, self.min_ratings, dataset, where)
