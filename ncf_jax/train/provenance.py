"""Where a run came from: package version, git commit, command line, config file, host, times.

The command passes a `Provenance` to `train_and_evaluate`; called from Python, the run
records what it can see itself (no command line of its own, config file `None`).
config.json and summary.json get `record()` under the key `provenance`, and the workdir
gets command.txt with the command line that reproduces the run.
"""

import dataclasses
import os
import shlex
import socket
import subprocess
import sys
import time

import ncf_jax


@dataclasses.dataclass(frozen=True)
class Provenance:
  """What the caller knows about a run: its command line and its `--config` value."""

  argv: tuple[str, ...] | None = None  # sys.argv of the command (None: called from Python)
  config_file: str | None = None  # the --config value, `file.py[:variant]`
  started: str = dataclasses.field(default_factory=lambda: _now())

  @property
  def name(self) -> str:
    """The config's short name for a workdir: `mlperf-runlocal`, or `default` from Python."""
    if not self.config_file:
      return 'default'
    path, _, variant = self.config_file.partition(':')
    stem = os.path.splitext(os.path.basename(path))[0] or 'default'
    safe = ''.join(c if c.isalnum() or c in '-_.' else '_' for c in variant)
    return f'{stem}-{safe}' if safe else stem

  def command_line(self) -> str | None:
    """The command line, quoted for a shell (`python -m ncf_jax.train ...`)."""
    if self.argv is None:
      return None
    head = ['python', '-m', 'ncf_jax.train'] if self.argv[0].endswith('__main__.py') else []
    return shlex.join(head + list(self.argv[1:] if head else self.argv))

  def record(self, ended: bool = False) -> dict:
    """The JSON record (with the end time when `ended`)."""
    commit, dirty = git_state()
    out = {
      'version': ncf_jax.__version__,
      'git_commit': commit,
      'git_dirty': dirty,
      'argv': None if self.argv is None else list(self.argv),
      'command': self.command_line(),
      'config_file': self.config_file,
      'host': socket.gethostname(),
      'process_count': _process_count(),
      'cwd': os.getcwd(),
      'started': self.started,
    }
    if ended:
      out['ended'] = _now()
    return out


def _now() -> str:
  return time.strftime('%Y-%m-%dT%H:%M:%S%z')


def _process_count() -> int:
  import jax

  return jax.process_count()


def git_state() -> tuple[str | None, bool | None]:
  """(commit, dirty) of the checkout this package runs from; (None, None) without git."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(ncf_jax.__file__)))
  try:
    commit = subprocess.run(
      ['git', 'rev-parse', 'HEAD'], cwd=root, capture_output=True, text=True, timeout=10
    )
    if commit.returncode != 0:
      return None, None
    status = subprocess.run(
      ['git', 'status', '--porcelain', '--untracked-files=no'],
      cwd=root, capture_output=True, text=True, timeout=10,
    )  # fmt: skip
  except (OSError, subprocess.SubprocessError):
    return None, None
  dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
  return commit.stdout.strip(), dirty


def from_command_line(config_file: str | None) -> Provenance:
  return Provenance(argv=tuple(sys.argv), config_file=config_file)
