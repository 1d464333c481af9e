"""Tests of the binary cache format (ncf_jax.data.cache)."""

import json
import os
import struct
import threading

import numpy as np
import pytest

from ncf_jax.data import cache


def _arrays():
  return {
    'a': np.arange(10, dtype=np.int32),
    'b': np.linspace(0, 1, 7, dtype=np.float32),
    'empty': np.zeros((0,), np.int64),
    'm': np.arange(6, dtype=np.int16).reshape(2, 3),
  }


def test_round_trip_keeps_arrays_dtypes_shapes_and_meta(tmp_path):
  path = str(tmp_path / 'x.ncfcache')
  cache.write(path, _arrays(), {'k': [1, 'two']})
  arrays, meta = cache.read(path)
  assert meta == {'k': [1, 'two']}
  for name, a in _arrays().items():
    np.testing.assert_array_equal(arrays[name], a)
    assert arrays[name].dtype == a.dtype and arrays[name].shape == a.shape


def test_written_file_gets_umask_permissions_not_mkstemp_0600(tmp_path):
  path = str(tmp_path / 'x.ncfcache')
  old = os.umask(0o022)
  try:
    cache.write(path, _arrays(), {})
  finally:
    os.umask(old)
  assert os.stat(path).st_mode & 0o777 == 0o644


def test_arrays_start_64_byte_aligned_in_the_file(tmp_path):
  path = str(tmp_path / 'x.ncfcache')
  cache.write(path, _arrays(), {})
  with open(path, 'rb') as f:
    _, _, header_len, _ = struct.unpack('<8sIII', f.read(20))
    header = json.loads(f.read(header_len))
  start = (20 + header_len + 63) // 64 * 64
  assert all((start + e['offset']) % 64 == 0 for e in header['arrays'])


def test_missing_file_raises_file_not_found(tmp_path):
  with pytest.raises(FileNotFoundError):
    cache.read(str(tmp_path / 'none'))


@pytest.mark.parametrize('cut', [0, 10, 30, -1])
def test_truncated_file_is_detected(tmp_path, cut):
  path = str(tmp_path / 'x.ncfcache')
  cache.write(path, _arrays(), {})
  with open(path, 'rb') as f:
    data = f.read()
  with open(path, 'wb') as f:
    f.write(data[:cut] if cut >= 0 else data[:cut])
  with pytest.raises(cache.CacheError):
    cache.read(path)


def test_flipped_payload_byte_fails_the_checksum(tmp_path):
  path = str(tmp_path / 'x.ncfcache')
  cache.write(path, _arrays(), {})
  with open(path, 'r+b') as f:
    f.seek(-70, os.SEEK_END)
    b = f.read(1)
    f.seek(-70, os.SEEK_END)
    f.write(bytes([b[0] ^ 0xFF]))
  with pytest.raises(cache.CacheError, match='checksum'):
    cache.read(path)


def test_flipped_header_byte_fails_the_header_checksum(tmp_path):
  path = str(tmp_path / 'x.ncfcache')
  cache.write(path, _arrays(), {'k': 1})
  with open(path, 'r+b') as f:
    f.seek(25)
    b = f.read(1)
    f.seek(25)
    f.write(bytes([b[0] ^ 0x01]))
  with pytest.raises(cache.CacheError, match='header'):
    cache.read(path)


def test_other_format_version_is_refused_not_misread(tmp_path):
  path = str(tmp_path / 'x.ncfcache')
  cache.write(path, _arrays(), {})
  with open(path, 'r+b') as f:
    f.seek(8)
    f.write(struct.pack('<I', cache.FORMAT_VERSION + 1))
  with pytest.raises(cache.CacheError, match='version'):
    cache.read(path)


def test_not_a_cache_file_is_refused(tmp_path):
  path = tmp_path / 'x.ncfcache'
  path.write_bytes(b'userId,movieId,rating,timestamp\n' * 10)
  with pytest.raises(cache.CacheError, match='magic'):
    cache.read(str(path))


def test_failed_write_leaves_old_file_and_no_temp_file(tmp_path, monkeypatch):
  path = str(tmp_path / 'x.ncfcache')
  cache.write(path, _arrays(), {'v': 1})
  before = open(path, 'rb').read()

  def fail(fd):
    raise OSError('disk full')

  monkeypatch.setattr(cache.os, 'fsync', fail)  # fails after the temp file is written
  with pytest.raises(OSError, match='disk full'):
    cache.write(path, {'a': np.arange(3)}, {'v': 2})
  assert open(path, 'rb').read() == before
  assert os.listdir(tmp_path) == ['x.ncfcache']


def test_concurrent_writers_leave_one_complete_file(tmp_path):
  path = str(tmp_path / 'x.ncfcache')
  big = {'a': np.arange(1 << 20, dtype=np.int32)}
  errors = []

  def writer(i):
    try:
      for _ in range(5):
        cache.write(path, big, {'writer': i})
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=writer, args=(i,)) for i in range(3)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors
  arrays, meta = cache.read(path)
  np.testing.assert_array_equal(arrays['a'], big['a'])
  assert meta['writer'] in (0, 1, 2)
  assert os.listdir(tmp_path) == ['x.ncfcache']


def test_content_hash_is_memoised_by_path_size_and_mtime(tmp_path):
  src = tmp_path / 'ratings.csv'
  src.write_bytes(b'1,2,3,4\n')
  memo = str(tmp_path / 'memo.json')
  h1 = cache.content_hash(str(src), memo)
  assert h1.startswith('sha256:')
  # Same (path, size, mtime): the memo answers, even though the bytes changed.
  st = os.stat(src)
  src.write_bytes(b'9,9,9,9\n')
  os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
  assert cache.content_hash(str(src), memo) == h1
  # A new mtime re-hashes.
  os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  h2 = cache.content_hash(str(src), memo)
  assert h2 != h1
  assert len(json.load(open(memo))) == 1


def test_content_hash_ignores_an_unreadable_memo(tmp_path):
  src = tmp_path / 'r'
  src.write_bytes(b'abc')
  memo = tmp_path / 'memo.json'
  memo.write_text('{not json')
  assert cache.content_hash(str(src), str(memo)).startswith('sha256:')
