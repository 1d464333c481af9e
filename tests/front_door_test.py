"""The front door: every command's --help and -h, the config field listing, provenance,
and the one-line messages of a new user's first mistakes."""

import os
import subprocess
import sys

import _train_helpers as h
import pytest

from ncf_jax import config_help

COMMANDS = {
  'ncf_jax.train': ['--workdir', '--config'],
  'ncf_jax.evaluate': ['--workdir', '--best'],
  'ncf_jax.prepare': ['--download', '--config'],
  'ncf_jax.benchmark': ['--sections', 'modes', '--scale'],
  'ncf_jax.selfcheck': ['PASS'],
  'ncf_jax.config_help': ['--config'],
  'experiments.sweep': ['--sweep', '--parallel'],
  'experiments.seeds': ['--num_seeds'],
}


# CI time: these stand for the rest (one parser, errors.parse_flags, serves every command).
FAST = ('ncf_jax.train', 'ncf_jax.benchmark', 'ncf_jax.selfcheck')


@pytest.mark.parametrize('which', ['fast', pytest.param('rest', marks=pytest.mark.slow)])
def test_every_command_has_help_that_lists_its_flags_and_the_config_fields(which):
  procs = {
    (module, flag): subprocess.Popen(
      [sys.executable, '-m', module, flag],
      cwd=h.REPO,
      env=h.env(1),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for module in COMMANDS
    if (module in FAST) == (which == 'fast')
    for flag in (['-h', '--help'] if module == 'ncf_jax.train' else ['-h'])
  }
  if which == 'fast':  # and the listing, with a config file and an override
    out, err = subprocess.Popen(
      [sys.executable, '-m', 'ncf_jax.config_help', '--config=configs/mlperf.py']
      + ['--config.num_epochs=3'],
      cwd=h.REPO,
      env=h.env(1),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    ).communicate(timeout=120)
    assert 'num_epochs = 3  (configs/default.py: 8)' in out, err
  for (module, flag), proc in procs.items():
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, (module, flag, err[-2000:])
    for word in COMMANDS[module]:
      assert word in out, (module, flag, out)
    assert 'python -m ncf_jax.config_help' in out, (module, out)


def test_config_help_gives_every_field_its_value_and_comment():
  from configs import default, mlperf

  comments = config_help.field_comments()
  text = config_help.describe(default.get_config())
  assert 'dataset.min_ratings = 20\n    Users with fewer ratings are dropped' in text
  assert "model.name = 'neumf'" in text
  paths = [line.split(' = ')[0] for line in text.splitlines() if not line.startswith(' ')]
  assert all(comments[p] for p in paths), [p for p in paths if not comments[p]]
  mlperf_text = config_help.describe(mlperf.get_config())
  assert '(configs/default.py: ' in mlperf_text


def test_provenance_names_the_config_and_reads_git_or_none(monkeypatch):
  from ncf_jax.train import provenance

  assert provenance.Provenance().name == 'default'
  origin = provenance.Provenance(
    ('x/ncf_jax/train/__main__.py', '--a=b c'), 'configs/mlperf.py:runlocal'
  )
  assert origin.name == 'mlperf-runlocal'
  assert origin.command_line() == "python -m ncf_jax.train '--a=b c'"
  monkeypatch.setenv('PATH', '')  # no git: null, not an error
  record = origin.record(ended=True)
  assert record['git_commit'] is None and record['git_dirty'] is None and 'ended' in record


def test_an_automatic_workdir_is_named_after_the_config_and_a_file_is_refused(
  tmp_path, monkeypatch
):
  from ncf_jax.errors import UserError
  from ncf_jax.train import workdir as workdir_lib

  monkeypatch.chdir(tmp_path)
  made: list = []
  path = workdir_lib.make_workdir(None, made, 'mlperf-runlocal')
  assert os.path.basename(path).startswith('mlperf-runlocal-20') and os.path.isdir(path)
  assert workdir_lib.make_workdir(None, [], 'mlperf-runlocal') != path  # never the same
  (tmp_path / 'afile').write_text('x')
  with pytest.raises(UserError, match="'afile' is a file, not a folder"):
    workdir_lib.make_workdir('afile')


def test_the_progress_lines_show_the_running_loss_and_samples_per_sec(caplog):
  import logging

  import jax.numpy as jnp

  from ncf_jax import writers

  caplog.set_level(logging.INFO)
  bar = writers.progress(4, 0, 'epoch 1/8', True, every_s=0, samples_per_step=1024)
  for loss in (0.69, 0.6, 0.5, 0.4):
    bar.add(jnp.float32(loss))
  bar.close()
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith('epoch 1/8: ')]
  assert lines[-1].startswith('epoch 1/8: 4/4 steps (100%)'), lines
  assert 'loss 0.4000, ' in lines[-1] and ' samples/s' in lines[-1], lines


# ----------------------------------------------------------------------------------------
# Small misses: each a one-line message, nothing left behind.


def test_a_gzip_file_under_the_ratings_name_is_named_as_gzip(tmp_path):
  import gzip

  from ncf_jax.data.sources import grouplens
  from ncf_jax.errors import UserError

  fmt = grouplens.FORMATS['ml-100k']
  path = tmp_path / fmt.folder / fmt.filename
  path.parent.mkdir(parents=True)
  path.write_bytes(gzip.compress(b'1\t2\t3\t4\n'))
  with pytest.raises(UserError, match='is gzip-compressed'):
    grouplens.read_ratings(grouplens.locate('ml-100k', str(tmp_path)))


def test_min_ratings_is_not_suggested_when_it_is_already_enough():
  import numpy as np

  from ncf_jax.data.preprocess import preprocess
  from ncf_jax.errors import UserError

  users, items = np.asarray([0, 0, 0, 1, 1, 1]), np.asarray([5, 5, 5, 1, 2, 3])
  with pytest.raises(UserError, match='repeat one item') as e:
    preprocess(
      users, items, np.arange(6), name='x', min_ratings=3, where='w', validation='leave_one_out'
    )
  assert 'min_ratings=3 or more' not in str(e.value)


def test_a_failed_download_removes_the_data_dir_it_created(tmp_path, monkeypatch):
  from conftest import serve_http

  from configs import default
  from ncf_jax import prepare
  from ncf_jax.errors import UserError

  config = default.get_config()
  config.dataset.name = 'ml-1m'
  config.dataset.data_dir = str(tmp_path / 'data' / 'movielens')
  with serve_http({}) as base:
    monkeypatch.setenv('NCF_JAX_MOVIELENS_URL', base)
    with pytest.raises(UserError, match='download of '):
      prepare.run(config, download=True)
  assert os.listdir(tmp_path) == []
