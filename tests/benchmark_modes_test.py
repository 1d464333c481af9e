"""The `modes` benchmark section: both sharding modes, one worker process per device count."""

import json
import os
import subprocess
import sys

from ncf_jax.benchmark import cli, modes_section

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ('params', 'opt_state', 'data', 'epoch')


def test_modes_section_times_both_modes_and_the_sharded_one_holds_less(tmp_path):
  # One worker (2 devices) keeps CI short; the counts' loop is the same for 1, 4 and 8.
  # scale 0.0007: common.scaled_dataset's minimum sizes (100 users, 1000 items).
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  out = subprocess.run(
    [
      sys.executable,
      '-m',
      'ncf_jax.benchmark.modes_section',
      '--counts=2',
      '--batch=1024',
      '--steps=1',
      '--scale=0.0007',
      f'--workdir={tmp_path}',
      '--json',
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  figures = json.loads(out.stdout.strip().splitlines()[-1])
  assert not [k for k in figures if k.startswith('modes_error')], figures
  assert figures['modes_batch'] == 1024 and figures['modes_num_users'] == 100
  for n in (2,):
    for mode in modes_section.MODES:
      assert figures[f'modes_samples_per_sec_{mode}_d{n}'] > 0
      total = figures[f'modes_bytes_per_device_{mode}_d{n}']
      assert total == sum(figures[f'modes_bytes_per_device_{mode}_d{n}_{p}'] for p in PARTS)
      assert figures[f'modes_bytes_per_device_{mode}_d{n}_params'] > 0
    assert figures[f'modes_sharded_memory_ratio_d{n}'] > 0
    assert figures[f'modes_peak_host_rss_gb_d{n}'] > 0
  assert figures['modes_first_layer_sharded_d2'] == 'concat'
  # On two devices the sharded mode holds about half the rows of every table, of the
  # sampler's data and of the epoch.
  for part in PARTS:
    assert (
      figures[f'modes_bytes_per_device_sharded_d2_{part}']
      < figures[f'modes_bytes_per_device_replicated_d2_{part}']
    ), part


def test_a_failed_worker_is_one_error_figure_not_a_crash():
  assert modes_section.worker_figures(
    4, 1, '', 'Traceback ...\nRESOURCE_EXHAUSTED: Out of memory\n\n'
  ) == {'modes_error_d4': 'exit status 1: RESOURCE_EXHAUSTED: Out of memory'}
  assert modes_section.worker_figures(8, -9, '', '') == {
    'modes_error_d8': 'killed by signal 9: no output'
  }
  assert modes_section.worker_figures(2, 0, 'log line\n{"a": 1}\n', '') == {'a': 1}


def test_worker_env_sets_the_device_count_and_keeps_other_xla_flags():
  env = modes_section.worker_env(
    4, {'XLA_FLAGS': '--xla_force_host_platform_device_count=8 --xla_cpu_foo=1', 'PATH': '/bin'}
  )
  assert env['XLA_FLAGS'] == '--xla_cpu_foo=1 --xla_force_host_platform_device_count=4'
  assert env['JAX_PLATFORMS'] == 'cpu' and env['PATH'] == '/bin'


def test_the_section_is_registered_and_counts_default_to_1_2_4_8():
  assert cli.SECTIONS['modes'] == 'modes_section'
  assert modes_section.DEVICE_COUNTS == (1, 2, 4, 8)
