"""Shared by resume_test, multihost_test and failures_test: tiny runs in and out of process."""

import atexit
from collections.abc import Sequence
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from ncf_jax import config_paths

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, 'tests', '_train_worker.py')

# Tiny synthetic run: 300 users, 200 items, ~8k positives -> 40 steps of 1024 per epoch.
TINY = {
  'dataset.synthetic_num_users': 300,
  'dataset.synthetic_num_items': 200,
  'dataset.synthetic_mean_interactions': 30,
  'batch_size': 1024,
  'eval_batch_size': 128,
  'eval_num_neg': 50,
  'num_epochs': 3,
  'hash_pipeline': True,
  'seed': 0,
}
STEPS_PER_EPOCH = 40
# What a resumed run must reproduce exactly, per epoch.
EXACT_KEYS = ('hr', 'ndcg', 'train_loss', 'pipeline_hash_first', 'pipeline_hash_all')
HASH_KEYS = ('pipeline_hash_first', 'pipeline_hash_all')

# One persistent XLA compilation cache for every subprocess of this test session (the
# one conftest.py opened for the pytest process, when there is one): a run after the first
# loads its executables (~5 s instead of ~16 s on 2 cores). Loaded executables are the
# same binaries, so exact comparisons are unaffected.
_XLA_CACHE = os.environ.get('JAX_COMPILATION_CACHE_DIR')
if not _XLA_CACHE:
  _XLA_CACHE = tempfile.mkdtemp(prefix='ncf_jax_test_xla_cache_')
  atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)


def _values(data_dir: str, overrides: dict) -> dict:
  """TINY, the data_dir and `overrides` (`a__b=v` spelling) as {'a.b': v}."""
  return {**TINY, 'dataset.data_dir': data_dir, **config_paths.from_keywords(overrides)}


def set_fields(config, values: dict):
  """Sets {'a.b': v} fields of a ConfigDict in place; returns it."""
  return config_paths.override(config, values)


def tiny_config(data_dir: str, base=None, **overrides):
  """The TINY config as a ConfigDict (in-process runs); `a__b=v` sets field a.b.

  `base`: the config to shrink (default: configs/default.py's).
  """
  from configs import default

  config = default.get_config() if base is None else base
  return set_fields(config, _values(data_dir, overrides))


def config_flags(data_dir: str, **overrides) -> list[str]:
  """The TINY config as train command-line flags."""
  return [f'--config={os.path.join(REPO, "configs", "default.py")}'] + [
    f'--config.{k}={v}' for k, v in _values(data_dir, overrides).items()
  ]


def env(devices: int, **extra) -> dict[str, str]:
  e = dict(os.environ)
  e['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  e['JAX_PLATFORMS'] = 'cpu'
  e['JAX_COMPILATION_CACHE_DIR'] = _XLA_CACHE
  e['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  e['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'
  e['PYTHONPATH'] = REPO + os.pathsep + e.get('PYTHONPATH', '')
  e.update({k: str(v) for k, v in extra.items()})
  return e


def train_cmd(
  workdir: str, data_dir: str, *, worker: bool = False, extra: Sequence[str] = (), **overrides
) -> list[str]:
  """`python -m ncf_jax.train` (or the slowed-down tests/_train_worker.py) on TINY."""
  head = [sys.executable, WORKER] if worker else [sys.executable, '-m', 'ncf_jax.train']
  return head + [f'--workdir={workdir}'] + config_flags(data_dir, **overrides) + list(extra)


def run(
  cmd: Sequence[str], devices: int = 2, timeout: float = 240, log: str | None = None, **env_extra
) -> subprocess.CompletedProcess:
  """Runs a command to completion; with `log`, output goes there (and to .stdout)."""
  if log is None:
    return subprocess.run(
      cmd, cwd=REPO, env=env(devices, **env_extra), timeout=timeout, capture_output=True, text=True
    )
  with open(log, 'w') as f:
    rc = subprocess.run(
      cmd,
      cwd=REPO,
      env=env(devices, **env_extra),
      timeout=timeout,
      stdout=f,
      stderr=subprocess.STDOUT,
    ).returncode
  return subprocess.CompletedProcess(cmd, rc, stdout=read(log), stderr='')


def start(cmd: Sequence[str], log: str, devices: int = 2, **env_extra) -> subprocess.Popen:
  """Starts a command in the background, output to `log`."""
  with open(log, 'w') as f:
    return subprocess.Popen(
      cmd, cwd=REPO, env=env(devices, **env_extra), stdout=f, stderr=subprocess.STDOUT
    )


def read(path: str) -> str:
  with open(path) as f:
    return f.read()


def wait_for_line(proc: subprocess.Popen, log: str, text: str, timeout: float = 180) -> None:
  """Polls `log` until it contains `text`; fails if the process ends first."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if text in read(log):
      return
    if proc.poll() is not None:
      raise AssertionError(
        f'process ended (rc {proc.returncode}) before {text!r}:\n' + read(log)[-3000:]
      )
    time.sleep(0.02)
  stop(proc)
  raise AssertionError(f'timed out waiting for {text!r}:\n' + read(log)[-3000:])


def stop(proc: subprocess.Popen) -> None:
  """SIGKILLs one of the test's own child processes if it is still running."""
  if proc.poll() is None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)


def metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  return [json.loads(line) for line in read(path).splitlines() if line.strip()]


def summary(workdir: str) -> dict:
  return json.loads(read(os.path.join(workdir, 'summary.json')))


def checkpoint_steps(workdir: str) -> list[int]:
  """Committed checkpoint steps (orbax renames a finished save to its bare step number)."""
  d = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(d):
    return []
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def tree_digest(path: str) -> dict[str, str]:
  """{relative path: sha256} of every file below `path` (to prove nothing changed).

  The workdir's lock file is left out: it records the last run that started there.
  """
  out = {}
  for root, _, files in os.walk(path):
    for name in files:
      if name == '.ncf_jax.lock':
        continue
      full = os.path.join(root, name)
      with open(full, 'rb') as f:
        out[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
  return out


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def assert_same_epochs(got: list[dict], want: list[dict], keys=EXACT_KEYS) -> None:
  assert [r['epoch'] for r in got] == [r['epoch'] for r in want]
  for g, w in zip(got, want):
    for k in keys:
      assert g.get(k) == w.get(k), (k, g['epoch'], g.get(k), w.get(k))
