"""Tests of the prepare command (python -m ncf_jax.prepare), run as a user would."""

import io
import json
import os
import subprocess
import sys
import zipfile

from conftest import ml100k_zip, serve_http
import numpy as np
import pytest

from ncf_jax.data import cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable


def prepare(*flags, env=None, wait=True):
  cmd = [PYTHON, '-m', 'ncf_jax.prepare', '--config=configs/default.py', *flags]
  full_env = {**os.environ, **(env or {})}
  proc = subprocess.Popen(
    cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  if not wait:
    return proc
  out, err = proc.communicate(timeout=120)
  return proc.returncode, out, err


def test_prints_one_json_summary_line_and_reuses_the_cache(tmp_path):
  flags = (f'--config.dataset.data_dir={tmp_path}', '--config.dataset.synthetic_num_users=300')
  rc, out, err = prepare(*flags)
  assert rc == 0, err
  lines = out.splitlines()
  assert len(lines) == 1
  summary = json.loads(lines[0])
  assert list(summary) == ['dataset', 'num_users', 'num_items', 'num_train', 'num_test', 'cache']
  assert summary['dataset'] == 'synthetic' and summary['num_users'] == 300
  assert summary['num_items'] == 2000 and summary['num_test'] == 300
  assert summary['cache'].startswith(str(tmp_path / 'processed'))
  mtime = os.stat(summary['cache']).st_mtime_ns
  rc, out2, err2 = prepare(*flags)
  assert rc == 0 and json.loads(out2) == summary
  assert os.stat(summary['cache']).st_mtime_ns == mtime
  assert 'Loaded synthetic' in err2


def test_unknown_name_is_one_error_line_without_traceback(tmp_path):
  rc, out, err = prepare(f'--config.dataset.data_dir={tmp_path}', '--config.dataset.name=ml-30m')
  assert rc == 2 and out == ''
  assert err.strip().splitlines() == [
    "error: unknown dataset name 'ml-30m' (config.dataset.name); valid names: synthetic, "
    'ml-100k, ml-1m, ml-10m, ml-20m, ml-25m, ml-latest-small, ml-20mx16x32, fractal, file.'
  ]


def test_missing_movielens_files_say_where_and_how_to_get_them(tmp_path):
  rc, out, err = prepare(f'--config.dataset.data_dir={tmp_path}', '--config.dataset.name=ml-20m')
  assert rc == 2 and out == '' and 'Traceback' not in err
  assert f'{tmp_path}/ml-20m/ratings.csv' in err and '--download' in err
  assert os.listdir(tmp_path) == []


def test_two_concurrent_prepares_leave_one_valid_cache(tmp_path):
  flags = (f'--config.dataset.data_dir={tmp_path}', '--config.dataset.synthetic_num_users=3000')
  procs = [prepare(*flags, wait=False) for _ in range(2)]
  outs = [p.communicate(timeout=120) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs
  paths = {json.loads(out)['cache'] for out, _ in outs}
  assert len(paths) == 1
  arrays, meta = cache.read(paths.pop())  # complete and checksummed
  assert meta['num_users'] == 3000 and arrays['test_items'].shape == (3000,)
  assert [f for f in os.listdir(tmp_path / 'processed') if f.endswith('.tmp')] == []


def test_download_flag_fetches_from_the_configured_url_then_prepares(tmp_path):
  rng = np.random.default_rng(0)
  rows = '\n'.join(
    f'{u}\t{i}\t3\t{t}'
    for u, i, t in zip(
      np.repeat(np.arange(1, 31), 25), rng.integers(1, 200, 750), rng.integers(1, 10**9, 750)
    )
  )
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, 'w') as z:
    z.writestr('ml-100k/u.data', rows + '\n')
  with serve_http({'/ml-100k.zip': (buf.getvalue(), None)}) as base:
    rc, out, err = prepare(
      f'--config.dataset.data_dir={tmp_path}',
      '--config.dataset.name=ml-100k',
      '--download',
      env={'NCF_JAX_MOVIELENS_URL': base},
    )
  assert rc == 0, err
  summary = json.loads(out)
  assert summary['dataset'] == 'ml-100k' and summary['num_users'] == 30
  assert (tmp_path / 'ml-100k.zip').read_bytes() == buf.getvalue()


def test_failed_download_exits_with_one_message_and_no_file(tmp_path):
  with serve_http({}) as base:
    rc, out, err = prepare(
      f'--config.dataset.data_dir={tmp_path}',
      '--config.dataset.name=ml-1m',
      '--download',
      env={'NCF_JAX_MOVIELENS_URL': base},
    )
  assert rc == 2 and out == '' and 'Traceback' not in err
  assert 'error: download of ' in err and '404' in err
  assert os.listdir(tmp_path) == []


def test_benchmark_data_section_runs_tiny_and_prints_one_json_object():
  proc = subprocess.run(
    [PYTHON, '-m', 'ncf_jax.benchmark', '--sections=data', '--scale=0.002', '--json'],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr
  figures = json.loads(proc.stdout)
  for key in (
    'data_preprocess_sec',
    'data_bare_parse_sec',
    'data_preprocess_parse_ratio',
    'data_cache_load_sec',
    'data_peak_rss_gb',
    'synthetic_generate_sec',
  ):
    assert isinstance(figures[key], float) and figures[key] > 0, key
  assert figures['data_num_users'] == figures['synthetic_num_users'] == 277
  assert figures['synthetic_rows'] == figures['data_num_train'] + figures['data_num_users']


def test_benchmark_unknown_section_is_a_user_error():
  proc = subprocess.run(
    [PYTHON, '-m', 'ncf_jax.benchmark', '--sections=nope'],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert proc.returncode == 2 and 'unknown --sections nope; valid: ' in proc.stderr


# (raw user, raw movie, timestamp): at min_ratings=3 users 1, 2, 3 stay (user 4 is dropped).
TFDS_ROWS = [
  (1, 10, 5),
  (1, 20, 6),
  (1, 30, 7),
  (2, 10, 1),
  (2, 40, 2),
  (2, 50, 3),
  (2, 20, 4),
  (3, 60, 9),
  (3, 10, 8),
  (3, 30, 7),
  (4, 70, 1),
  (4, 10, 2),
]


def tfds_config(data_dir):
  from configs import default  # pylint: disable=g-import-not-at-top

  config = default.get_config()
  config.dataset.update(name='ml-100k', source='tfds', data_dir=str(data_dir), min_ratings=3)
  return config


@pytest.mark.slow  # imports TensorFlow (10-20 s on 2 shared cores)
def test_tfds_download_builds_array_record_prints_one_json_line_then_uses_the_cache(
  tmp_path, monkeypatch, capfd
):
  """The real TFDS movielens builder, fed over HTTP from 127.0.0.1."""
  pytest.importorskip('tensorflow')  # requirements-tfds.txt: TFDS builds need it
  from tensorflow_datasets.structured import movielens as tfds_movielens  # pylint: disable=g-import-not-at-top

  body = ml100k_zip(TFDS_ROWS)
  from ncf_jax import prepare as prepare_lib  # pylint: disable=g-import-not-at-top

  builder_config = next(
    c for c in tfds_movielens.Movielens.BUILDER_CONFIGS if c.name == '100k-ratings'
  )
  with serve_http({'/ml-100k.zip': (body, None)}) as url:
    monkeypatch.setenv('NCF_JAX_MOVIELENS_URL', url)  # our download of data_dir/ml-100k.zip
    # The fake zip cannot match TFDS's registered checksum of the official URL, so the
    # builder fetches it from an unregistered local URL instead.
    monkeypatch.setattr(builder_config, '_download_url', f'{url}/ml-100k.zip')
    prepare_lib.run(tfds_config(tmp_path), download=True)  # the command's body
    out, err = capfd.readouterr()
  assert len(out.splitlines()) == 1, out
  summary = json.loads(out)
  assert summary == {
    'dataset': 'ml-100k',
    'num_users': 3,
    'num_items': 6,
    'num_train': 7,
    'num_test': 3,
    'cache': summary['cache'],
  }
  assert 'Downloading and preparing dataset' in err  # TFDS's progress, moved off stdout
  built = tmp_path / 'tfds' / 'movielens' / '100k-ratings' / '0.1.1'
  shards = [f for f in os.listdir(built) if '.array_record-' in f]
  assert len(shards) == 1 and not [f for f in os.listdir(built) if 'tfrecord' in f]
  with open(built / 'dataset_info.json') as f:
    assert json.load(f)['fileFormat'] == 'array_record'
  mtimes = {p: os.stat(p).st_mtime_ns for p in (built / shards[0], summary['cache'])}

  prepare_lib.run(tfds_config(tmp_path))  # no --download, no server: the build and cache are reused
  out2, err2 = capfd.readouterr()
  assert json.loads(out2) == summary and len(out2.splitlines()) == 1
  assert {p: os.stat(p).st_mtime_ns for p in mtimes} == mtimes
  assert 'Downloading and preparing' not in err2


def one_error_line(rc, out, err):
  lines = err.strip().splitlines()
  assert rc == 2 and out == '' and 'Traceback' not in err, err
  assert lines[-1].startswith('error: ')
  return lines[-1]


def test_slow_mirror_is_one_error_line_and_leaves_no_part_file(tmp_path):
  import downloads_test  # pylint: disable=g-import-not-at-top

  with downloads_test.trickle_server(size=2000, interval=0.05) as base:
    line = one_error_line(
      *prepare(
        f'--config.dataset.data_dir={tmp_path}',
        '--config.dataset.name=ml-100k',
        '--config.dataset.download_min_rate_window_s=1',
        '--download',
        env={'NCF_JAX_MOVIELENS_URL': base},
      )
    )
  assert f'download of {base}/ml-100k.zip is too slow' in line
  assert os.listdir(tmp_path) == []


def test_zip_bomb_in_data_dir_is_one_error_line_naming_the_cap(tmp_path):
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, 'w', zipfile.ZIP_DEFLATED) as z:
    z.writestr('ml-100k/u.data', '1\t2\t3\t4\n' * (4 << 20))
  (tmp_path / 'ml-100k.zip').write_bytes(buf.getvalue())
  line = one_error_line(
    *prepare(f'--config.dataset.data_dir={tmp_path}', '--config.dataset.name=ml-100k')
  )
  assert 'ml-100k/u.data inflates to more than 6,400,000 bytes' in line


def test_encrypted_member_is_one_error_line(tmp_path):
  import movielens_test  # pylint: disable=g-import-not-at-top

  (tmp_path / 'ml-100k.zip').write_bytes(movielens_test.patched_zip(flag_bits=0x1))
  line = one_error_line(
    *prepare(f'--config.dataset.data_dir={tmp_path}', '--config.dataset.name=ml-100k')
  )
  assert 'ml-100k/u.data is encrypted' in line


@pytest.mark.skipif(
  os.geteuid() == 0, reason='root reads a chmod 000 file (movielens_test fakes it)'
)
def test_chmod_000_ratings_file_is_one_error_line(tmp_path):
  path = tmp_path / 'ml-100k' / 'u.data'
  path.parent.mkdir()
  path.write_text('1\t2\t3\t4\n')
  path.chmod(0)
  line = one_error_line(
    *prepare(f'--config.dataset.data_dir={tmp_path}', '--config.dataset.name=ml-100k')
  )
  assert f'{path} cannot be read (Permission denied)' in line
