"""Tests of raw MovieLens reading, download and TFDS conversion (the grouplens and tfds sources)."""

import builtins
import hashlib
import io
import os
import resource
import time
import zipfile

from conftest import serve_http, write_tfds_metadata
import numpy as np
import pytest

from configs import default as default_config
from ncf_jax.data import sources
from ncf_jax.data.sources import grouplens
from ncf_jax.data.sources import tfds as tfds_source
from ncf_jax.errors import UserError

ROWS = [
  (1, 31, 2.5, 1260759144),
  (1, 1029, 3.0, 1260759179),
  (7, 31, 4.5, 851866703),
  (2, 10, 4.0, 835355493),
  (2, 17, 5.0, 835355681),
]


def ratings_text(name, rows=ROWS):
  fmt = grouplens.FORMATS[name]
  lines = [fmt.header] if fmt.header else []
  lines += [fmt.sep.join(str(v) for v in r) for r in rows]
  return '\n'.join(lines) + '\n'


def write_folder(data_dir, name, text):
  fmt = grouplens.FORMATS[name]
  path = os.path.join(data_dir, fmt.folder, fmt.filename)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    f.write(text)
  return path


def zip_bytes(name, text, extra=()):
  fmt = grouplens.FORMATS[name]
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, 'w', zipfile.ZIP_DEFLATED) as z:
    z.writestr(f'{fmt.folder}/', '')
    z.writestr(f'{fmt.folder}/{fmt.filename}', text)
    for member, content in extra:
      z.writestr(member, content)
  return buf.getvalue()


def read(data_dir, name):
  return grouplens.read_ratings(grouplens.locate(name, str(data_dir)))


def assert_rows(ratings, rows=ROWS):
  np.testing.assert_array_equal(ratings.users, [r[0] for r in rows])
  np.testing.assert_array_equal(ratings.items, [r[1] for r in rows])
  np.testing.assert_array_equal(ratings.timestamps, [r[3] for r in rows])
  assert ratings.users.dtype == np.int32 and ratings.timestamps.dtype == np.int64


@pytest.mark.parametrize('name', grouplens.NAMES)
def test_each_format_parses_from_the_extracted_folder(tmp_path, name):
  rows = [(u, i, int(r) if name in ('ml-100k', 'ml-1m') else r, t) for u, i, r, t in ROWS]
  write_folder(tmp_path, name, ratings_text(name, rows))
  ratings = read(tmp_path, name)
  assert_rows(ratings)
  assert ratings.where.endswith(grouplens.FORMATS[name].filename)


@pytest.mark.parametrize('name', ['ml-100k', 'ml-10m', 'ml-20m'])
def test_zip_gives_the_same_ratings_as_the_folder(tmp_path, name):
  (tmp_path / f'{name}.zip').write_bytes(zip_bytes(name, ratings_text(name)))
  source = grouplens.locate(name, str(tmp_path))
  assert source.member == (f'{grouplens.FORMATS[name].folder}/{grouplens.FORMATS[name].filename}')
  assert_rows(grouplens.read_ratings(source))


def test_ml10m_zip_member_lives_in_ml_10M100K(tmp_path):
  (tmp_path / 'ml-10m.zip').write_bytes(zip_bytes('ml-10m', ratings_text('ml-10m')))
  assert grouplens.locate('ml-10m', str(tmp_path)).member == 'ml-10M100K/ratings.dat'


def test_extracted_folder_is_preferred_over_the_zip(tmp_path):
  write_folder(tmp_path, 'ml-1m', ratings_text('ml-1m'))
  (tmp_path / 'ml-1m.zip').write_bytes(b'not read')
  assert grouplens.locate('ml-1m', str(tmp_path)).member is None


def test_crlf_line_endings_parse(tmp_path):
  write_folder(tmp_path, 'ml-20m', ratings_text('ml-20m').replace('\n', '\r\n'))
  assert_rows(read(tmp_path, 'ml-20m'))


def test_missing_files_name_both_paths_and_how_to_get_them(tmp_path):
  with pytest.raises(UserError) as e:
    grouplens.locate('ml-20m', str(tmp_path))
  msg = str(e.value)
  assert str(tmp_path / 'ml-20m' / 'ratings.csv') in msg
  assert str(tmp_path / 'ml-20m.zip') in msg
  assert '--download' in msg and 'source=tfds' in msg and 'ml-20m.zip' in msg
  assert os.listdir(tmp_path) == []


def test_missing_data_dir_is_named(tmp_path):
  with pytest.raises(UserError, match=f'data_dir {tmp_path / "nope"} does not exist'):
    grouplens.locate('ml-1m', str(tmp_path / 'nope'))
  assert not (tmp_path / 'nope').exists()


def test_zip_without_the_ratings_member_is_reported(tmp_path):
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, 'w') as z:
    z.writestr('other/file.txt', 'x')
  (tmp_path / 'ml-1m.zip').write_bytes(buf.getvalue())
  with pytest.raises(UserError, match='has no member ml-1m/ratings.dat'):
    grouplens.locate('ml-1m', str(tmp_path))


def test_corrupt_zip_is_reported(tmp_path):
  (tmp_path / 'ml-1m.zip').write_bytes(b'PK garbage')
  with pytest.raises(UserError, match='not a readable zip'):
    grouplens.locate('ml-1m', str(tmp_path))


# --- bad input: each message names the file and the 1-based line -----------------------


@pytest.mark.parametrize(
  'name,text,line',
  [
    ('ml-20m', 'userId,movieId,rating,timestamp\n1,2,3.5,10\n1,3,4.0\n', 3),
    ('ml-20m', 'userId,movieId,rating,timestamp\n1,2,3.5,10\n\n1,3,4,5,6\n', 4),
    ('ml-1m', '1::2::3::10\n2::3::4::11\n3::4::5\n', 3),
    ('ml-1m', '1::2::3::10\n2::3::4::11::9\n', 2),
    ('ml-100k', '1\t2\t3\t10\n1\t2\t3\n', 2),
  ],
)
def test_malformed_line_names_file_and_line_number(tmp_path, name, text, line):
  path = write_folder(tmp_path, name, text)
  with pytest.raises(UserError, match=rf'{path} line {line}: expected 4 fields'):
    read(tmp_path, name)


def test_malformed_line_inside_a_zip_names_the_member(tmp_path):
  text = 'userId,movieId,rating,timestamp\n1,2,3.5,10\n1,2\n'
  (tmp_path / 'ml-20m.zip').write_bytes(zip_bytes('ml-20m', text))
  with pytest.raises(UserError, match=r'ml-20m.zip:ml-20m/ratings.csv line 3: expected 4'):
    read(tmp_path, 'ml-20m')


def test_malformed_line_far_into_a_big_file_gets_the_right_number(tmp_path, monkeypatch):
  monkeypatch.setattr(grouplens, '_DIAGNOSE_BLOCK', 1000)  # many diagnosis blocks
  rows = ''.join(f'{u}::{u % 97}::3::{1000 + u}\n' for u in range(1, 3001))
  path = write_folder(tmp_path, 'ml-1m', rows + '5::6::oops::7::8\n' + rows)
  with pytest.raises(
    UserError,
    match=rf'{path} line 3001: expected 4 fields .* found 5: '
    r"'5::6::oops::7::8'",
  ):
    read(tmp_path, 'ml-1m')


@pytest.mark.parametrize(
  'text,line,what',
  [
    ('userId,movieId,rating,timestamp\n1,2,3.5,10\nabc,3,4.0,11\n', 3, "user id 'abc'"),
    ('userId,movieId,rating,timestamp\n1,2,3.5,10\n1,3.0,4.0,11\n', 3, "movie id '3.0'"),
    ('userId,movieId,rating,timestamp\n1,2,3.5,10\n1,,4.0,11\n', 3, "movie id ''"),
    ('userId,movieId,rating,timestamp\n1,2,3.5,2020-01-01\n', 2, "timestamp '2020-01-01'"),
    ('userId,movieId,rating,timestamp\n1,2,3.5,1\n1,2,3.5,1\n-4,2,3.5,1\n', 4, "user id '-4'"),
    ('userId,movieId,rating,timestamp\n1,3000000000,3.5,1\n', 2, "movie id '3000000000'"),
  ],
)
def test_non_numeric_id_or_timestamp_names_line_and_value(tmp_path, text, line, what):
  path = write_folder(tmp_path, 'ml-20m', text)
  with pytest.raises(UserError, match=rf'{path} line {line}: {what} is not a non-negative'):
    read(tmp_path, 'ml-20m')


def test_non_numeric_id_in_a_double_colon_file_shows_the_original_line(tmp_path):
  path = write_folder(tmp_path, 'ml-1m', '1::2::3::10\nx::2::3::10\n')
  with pytest.raises(UserError, match=rf"{path} line 2: user id 'x' .*'x::2::3::10'"):
    read(tmp_path, 'ml-1m')


def test_empty_file_is_reported(tmp_path):
  path = write_folder(tmp_path, 'ml-1m', '')
  with pytest.raises(UserError, match=rf'{path} is empty'):
    read(tmp_path, 'ml-1m')


def test_header_only_file_has_no_ratings(tmp_path):
  path = write_folder(tmp_path, 'ml-20m', 'userId,movieId,rating,timestamp\n')
  with pytest.raises(UserError, match=rf'{path} has no ratings'):
    read(tmp_path, 'ml-20m')


@pytest.mark.parametrize(
  'name,text,match',
  [
    (
      'ml-20m',
      'userId;movieId;rating;timestamp\n1;2;3;4\n',
      r"line 1: expected the header "
      r"'userId,movieId,rating,timestamp'.*separated by ';'",
    ),
    ('ml-20m', '1,2,3.5,4\n', r"line 1: expected the header"),
    ('ml-1m', '1,2,3,4\n', r"line 1: expected fields separated by '::'.*it uses ','"),
    ('ml-100k', '1,2,3,4\n', r"line 1: expected fields separated by tabs.*it uses ','"),
    ('ml-1m', '1::2::3::4\n1\t2\t3\t4\n', r'line 2 contains a tab'),
    ('ml-1m', '\n1::2::3::4\n', r'line 1 is blank'),
  ],
)
def test_wrong_separator_or_header_is_reported(tmp_path, name, text, match):
  path = write_folder(tmp_path, name, text)
  with pytest.raises(UserError, match=match) as e:
    read(tmp_path, name)
  assert path in str(e.value)


def test_known_sizes_mismatch_says_not_the_official_file():
  with pytest.raises(
    UserError,
    match=r"has 5 ratings; the official GroupLens ml-20m has "
    r"20,000,263.*not the official file",
  ):
    grouplens.check_known_sizes('ml-20m', 'f.csv', num_ratings=5)
  grouplens.check_known_sizes('ml-20m', 'f.csv', 20_000_263, 138_493, 26_744)
  grouplens.check_known_sizes('ml-100k', 'f', num_ratings=5)  # no published sizes: no check


# --- download from a local server ------------------------------------------------------


def serve(files):
  """serve_http with the GroupLens folder layout: yields the base URL of /movielens."""
  return serve_http(files, prefix='/movielens')


def corrupt_zip(body: bytes) -> bytes:
  """The zip with one byte flipped in the middle of the compressed ml-100k/u.data."""
  body = bytearray(body)
  info = zipfile.ZipFile(io.BytesIO(bytes(body))).getinfo('ml-100k/u.data')
  body[info.header_offset + 30 + len(info.filename) + info.compress_size // 2] ^= 0xFF
  return bytes(body)


def test_download_places_a_checked_zip_that_then_parses(tmp_path):
  body = zip_bytes('ml-latest-small', ratings_text('ml-latest-small'))
  with serve({'/movielens/ml-latest-small.zip': (body, None)}) as base:
    source = grouplens.locate('ml-latest-small', str(tmp_path / 'd'), download=True, base_url=base)
  assert os.listdir(tmp_path / 'd') == ['ml-latest-small.zip']
  assert (tmp_path / 'd' / 'ml-latest-small.zip').read_bytes() == body
  assert_rows(grouplens.read_ratings(source))


def test_download_checks_md5_of_names_that_have_one(tmp_path):
  body = zip_bytes('ml-1m', ratings_text('ml-1m', [(1, 2, 3, 4)]))
  with serve({'/movielens/ml-1m.zip': (body, None)}) as base:
    path = grouplens.download_zip(
      'ml-1m', str(tmp_path), base_url=base, md5={'ml-1m': hashlib.md5(body).hexdigest()}
    )
  assert path == str(tmp_path / 'ml-1m.zip')


def test_download_with_wrong_md5_leaves_no_file(tmp_path):
  body = zip_bytes('ml-1m', ratings_text('ml-1m', [(1, 2, 3, 4)]))
  with serve({'/movielens/ml-1m.zip': (body, None)}) as base:
    with pytest.raises(UserError, match='has MD5 .* expected c4d9eecfca2ab87c1945afe126590906'):
      grouplens.download_zip('ml-1m', str(tmp_path), base_url=base)  # the real MD5 table
  assert os.listdir(tmp_path) == []


def test_truncated_download_leaves_no_file(tmp_path):
  body = zip_bytes('ml-100k', ratings_text('ml-100k'))
  with serve({'/movielens/ml-100k.zip': (body[: len(body) // 2], len(body))}) as base:
    with pytest.raises(UserError, match='download of .*ml-100k.zip (is truncated|failed)'):
      grouplens.download_zip('ml-100k', str(tmp_path), base_url=base)
  assert os.listdir(tmp_path) == []


def test_corrupt_zip_download_without_md5_fails_the_zip_test_and_leaves_no_file(tmp_path):
  body = corrupt_zip(zip_bytes('ml-100k', ratings_text('ml-100k') * 50))
  with serve({'/movielens/ml-100k.zip': (body, None)}) as base:
    with pytest.raises(UserError, match='ml-100k.zip'):
      grouplens.download_zip('ml-100k', str(tmp_path), base_url=base)
  assert os.listdir(tmp_path) == []


def test_corrupt_zip_placed_by_hand_is_reported_when_read(tmp_path):
  body = corrupt_zip(zip_bytes('ml-100k', ratings_text('ml-100k') * 50))
  (tmp_path / 'ml-100k.zip').write_bytes(body)
  with pytest.raises(UserError, match='the zip is corrupt'):
    read(tmp_path, 'ml-100k')


def test_cut_zip_served_whole_fails_and_leaves_no_file(tmp_path):
  body = zip_bytes('ml-100k', ratings_text('ml-100k'))
  with serve({'/movielens/ml-100k.zip': (body[:-30], None)}) as base:
    with pytest.raises(UserError, match='download of .*ml-100k.zip failed'):
      grouplens.download_zip('ml-100k', str(tmp_path), base_url=base)
  assert os.listdir(tmp_path) == []


def test_http_error_is_a_user_error_and_leaves_no_file(tmp_path):
  with serve({}) as base, pytest.raises(UserError, match='404'):
    grouplens.locate('ml-25m', str(tmp_path), download=True, base_url=base)
  assert os.listdir(tmp_path) == []


def test_base_url_comes_from_the_environment(tmp_path, monkeypatch):
  body = zip_bytes('ml-100k', ratings_text('ml-100k'))
  with serve({'/movielens/ml-100k.zip': (body, None)}) as base:
    monkeypatch.setenv(grouplens.URL_ENV, base)
    assert grouplens.url('ml-100k') == base + '/ml-100k.zip'
    grouplens.download_zip('ml-100k', str(tmp_path))
  assert os.listdir(tmp_path) == ['ml-100k.zip']


def test_default_url_is_the_official_grouplens_one(monkeypatch):
  monkeypatch.delenv(grouplens.URL_ENV, raising=False)
  assert grouplens.url('ml-20m') == 'https://files.grouplens.org/datasets/movielens/ml-20m.zip'


# --- TFDS --------------------------------------------------------------------------------


def test_tfds_random_mock_records_have_non_numeric_ids_and_say_so(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  # What tfds.testing.mock_data's random records look like: ids are random strings.
  records = [
    {'user_id': b'kq3Zx', 'movie_id': b'7', 'user_rating': np.float32(4), 'timestamp': np.int64(k)}
    for k in range(5)
  ]
  write_tfds_metadata(tmp_path, 'array_record', name='ml-100k')  # built: records are mocked
  with tfds.testing.mock_data(data_dir=str(tmp_path), as_data_source_fn=lambda *a, **k: records):
    ds = tfds_source.open_tfds('ml-100k', str(tmp_path), download=False)
    assert len(ds) == 5
    assert set(ds[0]) >= {'user_id', 'movie_id', 'timestamp', 'user_rating'}
    with pytest.raises(
      UserError,
      match=r'TFDS movielens/100k-ratings record 0: user_id .* is '
      'not a numeric id',
    ):
      tfds_source.read_tfds(ds, 'ml-100k')


def tfds_records(rows=ROWS, as_bytes=True):
  enc = (lambda v: str(v).encode()) if as_bytes else str
  return [
    {
      'user_id': enc(u),
      'movie_id': enc(i),
      'user_rating': np.float32(r),
      'timestamp': np.int64(t),
      'movie_title': b'x',
      'movie_genres': np.array([1]),
    }
    for u, i, r, t in rows
  ]


@pytest.mark.parametrize('as_bytes', [True, False])
def test_tfds_records_convert_to_raw_ratings_in_order(tmp_path, as_bytes):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  records = tfds_records(as_bytes=as_bytes)
  write_tfds_metadata(tmp_path, 'array_record')  # built: records are mocked
  with tfds.testing.mock_data(data_dir=str(tmp_path), as_data_source_fn=lambda *a, **k: records):
    ds = tfds_source.open_tfds('ml-20m', str(tmp_path), download=False)
    ratings = tfds_source.read_tfds(ds, 'ml-20m')
  assert_rows(ratings)
  assert ratings.where == 'TFDS movielens/20m-ratings'


def test_tfds_has_no_ml10m():
  with pytest.raises(UserError, match='ml-10m is not in TensorFlow Datasets'):
    tfds_source.open_tfds('ml-10m', '/nonexistent', download=False)


# --- bounded inflation, unreadable members and files ----------------------------------


def bomb_zip(name='ml-100k', rows=8 << 20):
  """A zip whose ratings member holds `rows` valid rows (64 MiB by default), correct CRC."""
  fmt = grouplens.FORMATS[name]
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, 'w', zipfile.ZIP_DEFLATED) as z:
    z.writestr(f'{fmt.folder}/{fmt.filename}', '1\t2\t3\t4\n' * rows)
  return buf.getvalue()


def peak_rss_mib():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_zip_bomb_placed_by_hand_is_refused_quickly_naming_the_cap(tmp_path):
  (tmp_path / 'ml-100k.zip').write_bytes(bomb_zip())
  cap = grouplens.ratings_cap('ml-100k')
  assert cap == 100_000 * 64
  start, rss = time.monotonic(), peak_rss_mib()
  with pytest.raises(UserError) as e:
    read(tmp_path, 'ml-100k')
  assert time.monotonic() - start < 30 and peak_rss_mib() - rss < 200
  msg = str(e.value)
  assert str(tmp_path / 'ml-100k.zip') in msg and 'ml-100k/u.data' in msg
  assert f'more than {cap:,} bytes' in msg and '--download' in msg


@pytest.mark.parametrize('name', ['ml-100k', 'ml-1m'])
def test_bomb_is_stopped_while_streaming_whatever_the_directory_says(tmp_path, name, monkeypatch):
  # Past `locate` (whose directory check refuses it at once): the capped stream stops it.
  fmt = grouplens.FORMATS[name]
  (tmp_path / f'{name}.zip').write_bytes(bomb_zip(name, rows=1 << 20))
  source = grouplens.RatingsFile(
    name, str(tmp_path / f'{name}.zip'), f'{fmt.folder}/{fmt.filename}', fmt
  )
  monkeypatch.setitem(grouplens.RATING_ROWS, name, 1000)
  start, rss = time.monotonic(), peak_rss_mib()
  with pytest.raises(UserError, match=f'inflates to more than {1000 * 64:,} bytes'):
    grouplens.read_ratings(source)
  assert time.monotonic() - start < 30 and peak_rss_mib() - rss < 100


def patched_zip(flag_bits=None, method=None):
  """The ml-100k test zip with its member's flag bits or compression method overwritten
  in both the local header and the central directory (as another zip tool would write)."""
  body = bytearray(zip_bytes('ml-100k', ratings_text('ml-100k'), extra=()))
  z = zipfile.ZipFile(io.BytesIO(bytes(body)))
  info = z.getinfo('ml-100k/u.data')
  local = info.header_offset
  central = [
    i
    for i in range(len(body))
    if body[i : i + 4] == b'PK\x01\x02'
    and body[i + 46 : i + 46 + len(info.filename)] == info.filename.encode()
  ][0]
  if flag_bits is not None:
    body[local + 6 : local + 8] = flag_bits.to_bytes(2, 'little')
    body[central + 8 : central + 10] = flag_bits.to_bytes(2, 'little')
  if method is not None:
    body[local + 8 : local + 10] = method.to_bytes(2, 'little')
    body[central + 10 : central + 12] = method.to_bytes(2, 'little')
  return bytes(body)


def test_encrypted_member_is_one_message(tmp_path):
  (tmp_path / 'ml-100k.zip').write_bytes(patched_zip(flag_bits=0x1))
  with pytest.raises(UserError, match='member ml-100k/u.data is encrypted') as e:
    read(tmp_path, 'ml-100k')
  assert str(tmp_path / 'ml-100k.zip') in str(e.value) and '--download' in str(e.value)


def test_unsupported_compression_method_is_one_message(tmp_path):
  (tmp_path / 'ml-100k.zip').write_bytes(patched_zip(method=99))
  with pytest.raises(UserError, match='uses compression method 99, which cannot be read'):
    read(tmp_path, 'ml-100k')


@pytest.mark.parametrize('flag_bits, method', [(0x1, None), (None, 99)])
def test_unreadable_member_read_directly_is_a_user_error(tmp_path, flag_bits, method):
  (tmp_path / 'ml-100k.zip').write_bytes(patched_zip(flag_bits, method))
  source = grouplens.RatingsFile(
    'ml-100k', str(tmp_path / 'ml-100k.zip'), 'ml-100k/u.data', grouplens.FORMATS['ml-100k']
  )
  with pytest.raises(UserError, match='cannot be read from the zip'):
    grouplens.read_ratings(source)


def deny_reads(monkeypatch, path):
  """chmod 000 `path`; as root (whom chmod does not stop) make opening it raise instead."""
  os.chmod(path, 0)
  if os.geteuid() != 0:
    return
  real_open, real_os_open = builtins.open, os.open

  def check(p):
    if os.fspath(p) == str(path):
      raise PermissionError(13, 'Permission denied', str(path))

  def fake_open(p, *args, **kwargs):
    if not isinstance(p, int):
      check(p)
    return real_open(p, *args, **kwargs)

  def fake_os_open(p, *args, **kwargs):
    check(p)
    return real_os_open(p, *args, **kwargs)

  monkeypatch.setattr(builtins, 'open', fake_open)
  monkeypatch.setattr(io, 'open', fake_open)  # zipfile opens through io.open
  monkeypatch.setattr(os, 'open', fake_os_open)


def test_unreadable_ratings_file_is_one_message(tmp_path, monkeypatch):
  path = write_folder(tmp_path, 'ml-1m', ratings_text('ml-1m'))
  deny_reads(monkeypatch, path)
  with pytest.raises(UserError, match='cannot be read .*Permission denied.*read access') as e:
    read(tmp_path, 'ml-1m')
  assert path in str(e.value)


def test_unreadable_ratings_file_is_one_message_when_hashed(tmp_path, monkeypatch):
  path = write_folder(tmp_path, 'ml-1m', ratings_text('ml-1m'))
  cfg = default_config.get_dataset_config()
  cfg.name, cfg.data_dir = 'ml-1m', str(tmp_path)
  deny_reads(monkeypatch, path)
  with pytest.raises(UserError, match=f'{path} cannot be read .*Permission denied'):
    sources.select(cfg).identity()


def test_unreadable_zip_is_one_message(tmp_path, monkeypatch):
  path = tmp_path / 'ml-100k.zip'
  path.write_bytes(zip_bytes('ml-100k', ratings_text('ml-100k')))
  deny_reads(monkeypatch, path)
  with pytest.raises(UserError, match=f'{path} cannot be read .*Permission denied.*read access'):
    read(tmp_path, 'ml-100k')
