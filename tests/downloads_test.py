"""Tests of bounded GroupLens downloads: deadline, minimum rate, stalls, partial files, bombs.

Every server here listens on 127.0.0.1 only and stops by itself: a trickling handler sends
a bounded number of bytes and ends when the client hangs up or the test's server closes.
"""

import contextlib
import fcntl
import http.server
import io
import os
import threading
import time
import zipfile

from conftest import serve_http
import ml_collections
import pytest

from configs import default as default_config
from ncf_jax.data import sources
from ncf_jax.data.sources import grouplens
from ncf_jax.errors import UserError

GOOD = '1\t31\t4\t1260759144\n2\t10\t4\t835355493\n'


def ml100k_zip(text: str) -> bytes:
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, 'w', zipfile.ZIP_DEFLATED) as z:
    z.writestr('ml-100k/u.data', text)
  return buf.getvalue()


@contextlib.contextmanager
def trickle_server(size: int, interval: float, first_delay: float = 0.0):
  """Serves /ml-100k.zip (`size` declared bytes) one byte every `interval` s, after
  `first_delay` s of silence; yields the base URL. Handlers end when the test ends."""
  stop = threading.Event()

  class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # pylint: disable=invalid-name
      self.send_response(200)
      self.send_header('Content-Length', str(size))
      self.end_headers()
      self.wfile.flush()
      if stop.wait(first_delay):
        return
      try:
        for _ in range(size):
          self.wfile.write(b'x')
          self.wfile.flush()
          if stop.wait(interval):
            return
      except OSError:  # the client gave up
        return

    def log_message(self, *args):
      pass

  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
  server.daemon_threads = True
  server.block_on_close = False
  thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
  thread.start()
  try:
    yield f'http://127.0.0.1:{server.server_address[1]}'
  finally:
    stop.set()
    server.shutdown()
    server.server_close()


def test_slow_mirror_is_abandoned_and_its_partial_file_removed(tmp_path):
  limits = grouplens.DownloadLimits(timeout_s=60, min_rate=1000, min_rate_window_s=1)
  start = time.monotonic()
  with trickle_server(size=1000, interval=0.05) as base:
    with pytest.raises(UserError) as e:
      grouplens.download_zip('ml-100k', str(tmp_path), base_url=base, limits=limits)
  assert time.monotonic() - start < 10
  msg = str(e.value)
  assert f'download of {base}/ml-100k.zip is too slow' in msg
  assert 'config.dataset.download_min_rate=1000' in msg and 'NCF_JAX_MOVIELENS_URL' in msg
  assert os.listdir(tmp_path) == []


def test_deadline_abandons_a_download_that_keeps_a_good_rate(tmp_path):
  limits = grouplens.DownloadLimits(timeout_s=1, min_rate=0, min_rate_window_s=60)
  start = time.monotonic()
  with trickle_server(size=1000, interval=0.02) as base:
    with pytest.raises(
      UserError, match=r'did not finish within config.dataset.download_timeout_s=1 s'
    ):
      grouplens.download_zip('ml-100k', str(tmp_path), base_url=base, limits=limits)
  assert time.monotonic() - start < 10
  assert os.listdir(tmp_path) == []


def test_stalled_server_is_abandoned_after_the_bounded_socket_read(tmp_path):
  limits = grouplens.DownloadLimits(timeout_s=60, min_rate=1000, min_rate_window_s=1)
  start = time.monotonic()
  with trickle_server(size=1000, interval=0.01, first_delay=30) as base:
    with pytest.raises(UserError, match='download of .*ml-100k.zip stalled: no data for 1 s'):
      grouplens.download_zip('ml-100k', str(tmp_path), base_url=base, limits=limits)
  assert time.monotonic() - start < 10
  assert os.listdir(tmp_path) == []


def test_stale_part_file_of_a_killed_download_is_removed_by_the_next_attempt(tmp_path):
  (tmp_path / '.ml-100k.zip.k1ll3d.part').write_bytes(b'half a zip')
  with serve_http({'/ml-100k.zip': (ml100k_zip(GOOD), None)}) as base:
    grouplens.download_zip('ml-100k', str(tmp_path), base_url=base)
  assert os.listdir(tmp_path) == ['ml-100k.zip']


def test_part_file_of_a_running_download_is_kept(tmp_path):
  live = tmp_path / '.ml-100k.zip.running.part'
  live.write_bytes(b'in progress')
  with open(live, 'rb') as held:
    fcntl.flock(held, fcntl.LOCK_EX)  # as the downloader holds it
    with serve_http({'/ml-100k.zip': (ml100k_zip(GOOD), None)}) as base:
      grouplens.download_zip('ml-100k', str(tmp_path), base_url=base)
  assert sorted(os.listdir(tmp_path)) == ['.ml-100k.zip.running.part', 'ml-100k.zip']


def test_zip_bomb_from_a_mirror_is_refused_at_download_and_nothing_is_left(tmp_path):
  bomb = ml100k_zip('1\t2\t3\t4\n' * (2 << 20))  # 16 MiB of rows; the ml-100k cap is 6.4 MB
  assert len(bomb) < 100_000
  cap = grouplens.ratings_cap('ml-100k')
  start = time.monotonic()
  with serve_http({'/ml-100k.zip': (bomb, None)}) as base:
    with pytest.raises(UserError) as e:
      grouplens.download_zip('ml-100k', str(tmp_path), base_url=base)
  assert time.monotonic() - start < 30
  msg = str(e.value)
  assert f'download of {base}/ml-100k.zip is refused' in msg
  assert 'ml-100k/u.data' in msg and f'{cap:,} bytes' in msg
  assert os.listdir(tmp_path) == []


def test_ctrl_c_during_the_archive_check_removes_the_partial_file(tmp_path, monkeypatch):
  def interrupted(*args, **kwargs):
    raise KeyboardInterrupt

  with serve_http({'/ml-100k.zip': (ml100k_zip(GOOD), None)}) as base:
    monkeypatch.setattr(zipfile, 'ZipFile', interrupted)
    with pytest.raises(KeyboardInterrupt):
      grouplens.download_zip('ml-100k', str(tmp_path), base_url=base)
  assert os.listdir(tmp_path) == []


def test_download_fields_default_to_an_hour_and_1kb_per_s_over_a_minute():
  cfg = default_config.get_dataset_config()
  assert (cfg.download_timeout_s, cfg.download_min_rate, cfg.download_min_rate_window_s) == (
    3600.0,
    1024.0,
    60.0,
  )
  cfg.name = 'ml-100k'
  limits = sources.select(cfg).settings.download_limits
  assert limits == grouplens.DownloadLimits(3600.0, 1024.0, 60.0)
  assert limits.socket_timeout() == 60.0


@pytest.mark.parametrize(
  'field, value',
  [
    ('download_timeout_s', -1.0),
    ('download_min_rate', -5.0),
    ('download_min_rate_window_s', 0.0),
    ('download_timeout_s', float('nan')),
  ],
)
def test_invalid_download_fields_are_one_config_message(field, value):
  cfg = default_config.get_dataset_config()
  cfg.name = 'ml-100k'
  cfg[field] = value
  with pytest.raises(UserError, match=rf'config.dataset.{field}={value!r} is invalid: it must be'):
    sources.select(cfg)


def test_zero_disables_the_deadline_and_the_minimum_rate():
  cfg = default_config.get_dataset_config()
  cfg.name = 'ml-100k'
  cfg.download_timeout_s = 0.0
  cfg.download_min_rate = 0
  limits = sources.select(cfg).settings.download_limits
  assert limits.timeout_s == 0 and limits.min_rate == 0 and limits.socket_timeout() == 60.0


def test_a_block_without_the_download_fields_gets_the_defaults():
  cfg = ml_collections.ConfigDict(
    {'name': 'ml-100k', 'source': 'grouplens', 'data_dir': '/x', 'download': False}
  )
  cfg.min_ratings = 20
  assert sources.select(cfg).settings.download_limits == grouplens.DownloadLimits()
