"""Shared fixtures: tiny hand-made datasets (no files, no jax import here)."""

import os

# Tests that need several devices set this before jax is imported (see multidevice tests).
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

import atexit
import shutil
import tempfile

# One persistent XLA compilation cache for the whole session, in this process and in the
# runs it starts (_train_helpers.env): the same program built by another test (or the same
# tiny config trained again) is loaded, not compiled. Compiling is most of a tiny run's
# time on 2 cores; loaded executables are the same binaries, so exact comparisons hold.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='ncf_jax_test_xla_cache_')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

import contextlib
import dataclasses
import http.server
import io
import threading
import zipfile

import numpy as np
import pytest

from ncf_jax import data as data_lib


def make_dataset(positives, test_items, num_items, name='handmade'):
  """Builds a Dataset from {user: iterable of train items} and a test item per user."""
  num_users = len(test_items)
  users, items = [], []
  for u in range(num_users):
    its = sorted(set(positives.get(u, ())))
    users += [u] * len(its)
    items += its
  degrees = np.bincount(np.asarray(users, np.int64), minlength=num_users)
  offsets = np.concatenate([[0], np.cumsum(degrees)]).astype(np.int32)
  return data_lib.Dataset(
    name=name,
    num_users=num_users,
    num_items=num_items,
    train_users=np.asarray(users, np.int32),
    train_items=np.asarray(items, np.int32),
    user_offsets=offsets,
    test_items=np.asarray(test_items, np.int32),
  )


def random_dataset(num_users=40, num_items=60, seed=0, max_degree=30):
  """A reproducible random dataset with varied degrees (1..max_degree)."""
  rng = np.random.default_rng(seed)
  positives, tests = {}, []
  for u in range(num_users):
    n = int(rng.integers(1, max_degree + 1))
    chosen = rng.choice(num_items, size=n + 1, replace=False)
    positives[u] = chosen[:-1].tolist()
    tests.append(int(chosen[-1]))
  return make_dataset(positives, tests, num_items, name='random')


def with_validation(dataset, seed=0, test_items=None):
  """`dataset` with a validation item per user (random, neither a positive nor the test
  item), and optionally other test items."""
  rng = np.random.default_rng(seed)
  test = dataset.test_items if test_items is None else np.asarray(test_items, np.int32)
  valid = []
  for u in range(dataset.num_users):
    taken = set(dataset.train_items[dataset.user_offsets[u] : dataset.user_offsets[u + 1]])
    free = sorted(set(range(dataset.num_items)) - taken - {int(test[u])})
    valid.append(free[int(rng.integers(len(free)))])
  return dataclasses.replace(dataset, test_items=test, valid_items=np.asarray(valid, np.int32))


@pytest.fixture
def tiny_dataset():
  """5 users, 12 items, hand-made."""
  positives = {0: [0, 1, 2], 1: [3, 4, 5, 6, 7, 8, 9, 10], 2: [0, 11], 3: [5], 4: [1, 3, 5, 7, 9]}
  return make_dataset(positives, [4, 11, 5, 6, 0], num_items=12, name='tiny')


@contextlib.contextmanager
def serve_http(files, prefix=''):
  """Serves {path: (body, declared Content-Length or None)} on 127.0.0.1 only.

  Yields the base URL (`http://127.0.0.1:<port>` + prefix). Download tests never touch
  any address beyond loopback.
  """

  class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # pylint: disable=invalid-name
      if self.path not in files:
        self.send_error(404)
        return
      body, length = files[self.path]
      self.send_response(200)
      self.send_header('Content-Length', str(length if length is not None else len(body)))
      self.end_headers()
      self.wfile.write(body)
      self.wfile.flush()
      self.close_connection = True

    def log_message(self, *args):
      pass

  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
  thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
  thread.start()
  try:
    yield f'http://127.0.0.1:{server.server_address[1]}{prefix}'
  finally:
    server.shutdown()
    server.server_close()


def ml100k_zip(rows):
  """A tiny zip laid out like GroupLens ml-100k, as TFDS's movielens builder parses it.

  rows: (user, movie, timestamp) triples for u.data; u.item and u.user list every id used.
  """
  users = sorted({u for u, _, _ in rows})
  movies = sorted({i for _, i, _ in rows})
  genres = '|'.join(['0'] * 18 + ['1'])  # 19 genre flags, as in the real u.item
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, 'w', zipfile.ZIP_DEFLATED) as z:
    z.writestr('ml-100k/u.data', ''.join(f'{u}\t{i}\t4\t{t}\n' for u, i, t in rows))
    z.writestr(
      'ml-100k/u.item',
      ''.join(f'{i}|Movie {i} (1995)|01-Jan-1995||http://example.com|{genres}\n' for i in movies),
    )
    z.writestr('ml-100k/u.user', ''.join(f'{u}|24|M|technician|85711\n' for u in users))
  return buf.getvalue()


def write_tfds_metadata(tfds_dir, file_format, name='ml-20m'):
  """Writes the metadata of a built TFDS dataset (no records, no TensorFlow needed)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.structured import movielens  # noqa: F401 (registers the builder)

  from ncf_jax.data.sources import tfds as ncf_tfds  # pylint: disable=g-import-not-at-top

  builder = tfds.builder(ncf_tfds.TFDS_NAMES[name], data_dir=str(tfds_dir))
  builder.info.set_file_format(file_format, override=True)
  builder.data_path.mkdir(parents=True)
  builder.info.write_to_directory(builder.data_path)
  return str(builder.data_path)
