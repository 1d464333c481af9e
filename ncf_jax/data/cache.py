"""Versioned, checksummed binary file of named numpy arrays (the processed-dataset cache).

Layout (little-endian):

  0   8 bytes   MAGIC
  8   u32       FORMAT_VERSION
  12  u32       header length H in bytes
  16  u32       zlib.crc32 of the header bytes
  20  H bytes   header: UTF-8 JSON {"meta": {...}, "arrays": [{"name", "dtype", "shape",
                "offset", "nbytes"}, ...], "payload_bytes": N, "payload_crc32": C}
  ..  padding to a multiple of ALIGN
  P   N bytes   payload: the raw C-order arrays, each starting at P + offset, offsets
                multiples of ALIGN

`read` checks the magic, the version, both checksums and the exact file size, so a
truncated, corrupted or other-version file raises `CacheError` and is never misread.
`write` is atomic: a temp file in the same folder, fsync, then `os.replace`, so a reader
(or a second writer) only ever sees a complete old file or a complete new one.

Also here: where the caches live (`cache_dir`), and `content_hash`, a source-file content
hash memoised by (path, size, mtime_ns) in a small JSON (`source_hash`: the one under
data_dir), so a valid cache loads without re-hashing a 500 MB ratings file.
"""

from collections.abc import Mapping
import contextlib
import hashlib
import json
import os
import struct
import tempfile
from typing import Any
import zlib

import numpy as np

MAGIC = b'NCFJAXC\x00'
FORMAT_VERSION = 1
ALIGN = 64
_PREAMBLE = struct.Struct('<8sIII')


class CacheError(Exception):
  """The file is not a valid cache of this format version (caller rebuilds it)."""


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def public_temp_file(folder: str, prefix: str, suffix: str):
  """mkstemp in `folder`, but with the usual umask permissions instead of 0600.

  Files renamed into place from it (caches, downloads) stay readable by whoever may read
  data_dir, as a plain open() would have made them.
  """
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=suffix)
  os.fchmod(fd, 0o666 & ~_umask())
  return fd, tmp


def _align(n: int) -> int:
  return (n + ALIGN - 1) // ALIGN * ALIGN


def write(path: str, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
  """Atomically writes `arrays` and the JSON-able `meta` to `path`.

  Args:
    path: destination file; its folder is created if needed.
    arrays: name -> numpy array (any fixed-size dtype; written C-contiguous).
    meta: JSON-serialisable metadata returned by `read` unchanged.
  """
  entries: list[dict[str, Any]] = []
  offset, crc = 0, 0
  contiguous = {}
  for name, a in arrays.items():
    a = np.ascontiguousarray(a)
    contiguous[name] = a
    entries.append(
      {
        'name': name,
        'dtype': a.dtype.str,
        'shape': list(a.shape),
        'offset': offset,
        'nbytes': int(a.nbytes),
      }
    )
    offset = _align(offset + a.nbytes)
  payload_bytes = offset
  # The checksum covers the payload exactly as written, padding included.
  pos = 0
  for e in entries:
    crc = zlib.crc32(bytes(e['offset'] - pos), crc)
    crc = zlib.crc32(memoryview(contiguous[e['name']]).cast('B'), crc)  # type: ignore[arg-type]
    pos = e['offset'] + e['nbytes']
  crc = zlib.crc32(bytes(payload_bytes - pos), crc)
  header = json.dumps(
    {'meta': dict(meta), 'arrays': entries, 'payload_bytes': payload_bytes, 'payload_crc32': crc},
    sort_keys=True,
  ).encode()
  start = _align(_PREAMBLE.size + len(header))

  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = public_temp_file(folder, '.' + os.path.basename(path) + '.', '.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(_PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(header), zlib.crc32(header)))
      f.write(header)
      f.write(bytes(start - _PREAMBLE.size - len(header)))
      pos = 0
      for e in entries:
        f.write(bytes(e['offset'] - pos))
        f.write(memoryview(contiguous[e['name']]).cast('B'))  # type: ignore[arg-type]
        pos = e['offset'] + e['nbytes']
      f.write(bytes(payload_bytes - pos))
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


def read(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Reads a cache written by `write`.

  Returns:
    (arrays, meta): writable arrays that share one buffer read from the file, and `meta`.

  Raises:
    FileNotFoundError: no file at `path`.
    CacheError: the file is truncated, corrupted, or of another format version.
  """
  with open(path, 'rb') as f:
    size = os.fstat(f.fileno()).st_size
    pre = f.read(_PREAMBLE.size)
    if len(pre) < _PREAMBLE.size:
      raise CacheError(f'truncated ({size} bytes)')
    magic, version, header_len, header_crc = _PREAMBLE.unpack(pre)
    if magic != MAGIC:
      raise CacheError('not an ncf_jax cache file (bad magic bytes)')
    if version != FORMAT_VERSION:
      raise CacheError(
        f'written by cache format version {version}, this code reads version {FORMAT_VERSION}'
      )
    header = f.read(header_len)
    if len(header) != header_len or zlib.crc32(header) != header_crc:
      raise CacheError('header checksum mismatch (truncated or corrupted)')
    try:
      h = json.loads(header)
      payload_bytes = int(h['payload_bytes'])
      start = _align(_PREAMBLE.size + header_len)
    except (ValueError, KeyError, TypeError) as e:
      raise CacheError(f'unreadable header ({e})') from e
    if size != start + payload_bytes:
      raise CacheError(
        f'size is {size} bytes, expected {start + payload_bytes} (truncated or appended to)'
      )
    f.seek(start)
    buf = bytearray(payload_bytes)
    if f.readinto(buf) != payload_bytes:
      raise CacheError('truncated payload')
  if zlib.crc32(buf) != h['payload_crc32']:
    raise CacheError('payload checksum mismatch (corrupted)')
  arrays = {}
  try:
    for entry in h['arrays']:
      dtype = np.dtype(entry['dtype'])
      count = int(np.prod(entry['shape'], dtype=np.int64))
      arrays[entry['name']] = np.frombuffer(buf, dtype, count, entry['offset']).reshape(
        entry['shape']
      )
  except (ValueError, KeyError, TypeError) as e:
    raise CacheError(f'inconsistent array table ({e})') from e
  return arrays, h['meta']


def content_hash(path: str, memo_path: str) -> str:
  """SHA-256 of a file's bytes, memoised by (absolute path, size, mtime_ns) in `memo_path`.

  A file rewritten in place with the same size within the same mtime tick would reuse a
  stale hash; for downloaded or hand-placed dataset files that does not happen in practice.
  The memo is best effort: an unreadable memo is ignored, a lost concurrent update only
  costs a re-hash.
  """
  st = os.stat(path)
  key = f'{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}'
  try:
    with open(memo_path) as f:
      memo = json.load(f)
    if not isinstance(memo, dict):
      memo = {}
  except (OSError, ValueError):
    memo = {}
  if key in memo:
    return memo[key]
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 23), b''):
      h.update(block)
  digest = 'sha256:' + h.hexdigest()
  # Keep only the current entry per path, so the memo never grows with edits.
  prefix = os.path.abspath(path) + '|'
  memo = {k: v for k, v in memo.items() if not k.startswith(prefix)}
  memo[key] = digest
  try:
    folder = os.path.dirname(os.path.abspath(memo_path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = public_temp_file(folder, '.source_hashes.', '.tmp')
    try:
      with os.fdopen(fd, 'w') as f:
        json.dump(memo, f, indent=1, sort_keys=True)
      os.replace(tmp, memo_path)
    finally:
      if os.path.exists(tmp):
        os.unlink(tmp)
  except OSError:
    pass
  return digest


def cache_dir(data_dir: str) -> str:
  """Folder of the processed caches (and the source-hash memo) under data_dir."""
  return os.path.join(os.path.abspath(os.path.expanduser(data_dir)), 'processed')


def source_hash(path: str, data_dir: str) -> str:
  """`content_hash` of a source file, memoised in `<data_dir>/processed/source_hashes.json`."""
  return content_hash(path, os.path.join(cache_dir(data_dir), 'source_hashes.json'))
