"""The run's folder: created (or checked writable) first, removed again if a run fails empty."""

import os
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
  Only empty folders are removed (`os.rmdir`), so no file is ever lost.
  """
  for top in dirs:
    if not os.path.isdir(top):
      continue
    try:
      for root, _, _ in sorted(os.walk(top), key=lambda w: -len(w[0])):
        os.rmdir(root)  # fails (and stops) at the first folder that is not empty
    except OSError:
      return


def make_workdir(workdir: str | None, made: list[str] | None = None) -> str:
  """Creates (or checks) the run's folder; appends the folders it created to `made`."""
  made = [] if made is None else made
  if not workdir and jax.process_count() > 1:
    raise UserError('a multi-process run needs --workdir (the same shared folder on every host).')
  if not workdir:
    made[:0] = _missing_dirs('runs')
    os.makedirs('runs', exist_ok=True)
    workdir = tempfile.mkdtemp(prefix=time.strftime('%Y%m%d-%H%M%S-'), dir='runs')
    made.insert(0, os.path.abspath(workdir))
    print(f'workdir: {workdir}', flush=True)
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
