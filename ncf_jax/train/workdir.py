"""The run's folder: created (or checked writable) first, locked for the run, removed again
if a run fails before writing anything."""

import fcntl
import json
import os
import socket
import tempfile
import time

import jax

from ncf_jax.errors import UserError


def _missing_dirs(path: str) -> list[str]:
  """`path` and those of its parents that do not exist yet, deepest first."""
  missing = []
  path = os.path.abspath(path)
  while not os.path.exists(path):
    missing.append(path)
    path = os.path.dirname(path)
  return missing


def remove_if_empty(dirs: list[str]) -> None:
  """Removes each of `dirs` (deepest first) whose tree holds no file at all.

  For the folders a run created before it failed: it leaves no empty workdir behind.
  Only empty folders are removed (`os.rmdir`), so no file is ever lost; the run's own
  lock file does not count.
  """
  for top in dirs:
    if not os.path.isdir(top):
      continue
    lock = os.path.join(top, LOCK_FILE)
    if [os.path.join(r, f) for r, _, files in os.walk(top) for f in files] == [lock]:
      os.remove(lock)
    try:
      for root, _, _ in sorted(os.walk(top), key=lambda w: -len(w[0])):
        os.rmdir(root)  # fails (and stops) at the first folder that is not empty
    except OSError:
      return


def _new_run_dir(name: str) -> str:
  """A new folder `runs/<name>-<date>-<time>` (`-2`, `-3`... if taken), created."""
  base = os.path.join('runs', f'{name}-{time.strftime("%Y%m%d-%H%M%S")}')
  for i in range(1, 1000):
    path = base if i == 1 else f'{base}-{i}'
    try:
      os.mkdir(path)
      return path
    except FileExistsError:
      continue
  return tempfile.mkdtemp(prefix=os.path.basename(base) + '-', dir='runs')


def make_workdir(workdir: str | None, made: list[str] | None = None, name: str = 'default') -> str:
  """Creates (or checks) the run's folder; appends the folders it created to `made`.

  Without `workdir`, a new `runs/<name>-<date>-<time>` (`name`: the config's, e.g.
  `mlperf-runlocal`).
  """
  made = [] if made is None else made
  if not workdir and jax.process_count() > 1:
    raise UserError('a multi-process run needs --workdir (the same shared folder on every host).')
  if not workdir:
    made[:0] = _missing_dirs('runs')
    os.makedirs('runs', exist_ok=True)
    workdir = _new_run_dir(name)
    made.insert(0, os.path.abspath(workdir))
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(
      f'workdir {workdir!r} is a file, not a folder; pass a --workdir that is a folder (or '
      'does not exist yet).'
    )
  try:
    made[:0] = _missing_dirs(workdir)
    os.makedirs(workdir, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix='.write_test', dir=workdir)  # unique per process
    with os.fdopen(fd, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise UserError(
      f'workdir {workdir!r} is not writable ({e.strerror}); pass a --workdir you can write to.'
    ) from None
  return workdir


LOCK_FILE = '.ncf_jax.lock'


class WorkdirLock:
  """One run per workdir: an exclusive `flock` on WORKDIR/.ncf_jax.lock, held for the run.

  The operating system drops the lock when the process ends, however it ends (a SIGKILL
  leaves no stale lock). The file keeps its last holder's host, pid and start time, which
  a refused run names. Only process 0 of a multi-process run takes it: the processes of
  one run share the workdir.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self._fd: int | None = None

  def acquire(self) -> str | None:
    """Takes the lock; returns None, or who holds it when another run does."""
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # never truncates the holder's
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.read(fd, 4096).decode(errors='replace')
      os.close(fd)
      return _describe_holder(holder)
    os.ftruncate(fd, 0)
    stamp = time.strftime('%Y-%m-%d %H:%M:%S %Z')
    os.write(
      fd, json.dumps({'host': socket.gethostname(), 'pid': os.getpid(), 'since': stamp}).encode()
    )
    self._fd = fd
    return None

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)  # closing the file drops the flock
      self._fd = None


def _describe_holder(text: str) -> str:
  try:
    who = json.loads(text)
    return f'host {who["host"]}, pid {who["pid"]}, since {who["since"]}'
  except (ValueError, KeyError, TypeError):
    return 'a run that is just starting'


def lock_workdir(workdir: str) -> WorkdirLock:
  """The workdir's lock, taken (on process 0; every process agrees on the outcome).

  Raises:
    UserError: another run holds the workdir; nothing in it was changed.
  """
  lock = WorkdirLock(workdir)
  holder = lock.acquire() if jax.process_index() == 0 else None
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    import numpy as np

    busy = int(multihost_utils.broadcast_one_to_all(np.int32(holder is not None)))
    if busy and holder is None:
      holder = 'another run (process 0 names it)'
  if holder is not None:
    raise UserError(
      f'workdir {workdir!r} is in use by another run ({holder}); two runs in one workdir '
      'would overwrite each other\'s checkpoints and metrics. Wait for it to end, stop it, '
      'or pass another --workdir.'
    )
  return lock


def check_writable(path: str) -> None:
  """Raises UserError unless an existing folder `path` can take new files (checked early,
  before anything compiles, instead of when the first checkpoint is saved)."""
  if not os.path.isdir(path):
    return
  try:
    fd, probe = tempfile.mkstemp(prefix='.write_test', dir=path)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise UserError(
      f'{path!r} is not writable ({e.strerror}); checkpoints are saved there. Fix its '
      'permissions or pass another --workdir.'
    ) from None
