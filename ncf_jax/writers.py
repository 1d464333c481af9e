"""Run outputs: config.json, metrics.jsonl, summary.json, TensorBoard events, progress.

Only process 0 writes (`enabled=False` elsewhere). Files are replaced atomically.
"""

import collections
from collections.abc import Callable
import contextlib
import importlib.util
import json
import logging as std_logging
import math
import os
import sys
import threading
import time
import traceback

from absl import logging
import jax
import tqdm


class _QuietLibraries:
  """Drops library records that say nothing to the user of a run.

  orbax's INFO lines on every save and its warning when evaluate opens a workdir
  read-only (on purpose); JAX's "Unable to initialize backend 'tpu'" when no libtpu is
  installed (JAX probes for it on every start; with libtpu installed a failure to start
  it still shows).
  """

  def __init__(self):
    self._no_libtpu = importlib.util.find_spec('libtpu') is None

  def filter(self, record) -> bool:
    message = str(record.msg)
    if message.startswith('Given directory is read only'):
      return False
    if self._no_libtpu and message.startswith("Unable to initialize backend 'tpu'"):
      return False
    return record.levelno > 20 or (
      '/orbax/' not in record.pathname and '/etils/' not in record.pathname
    )


_QUIET = _QuietLibraries()
# The loggers it filters: absl's (orbax logs through it) and the one JAX reports on
# backends with (logger-level filters see only the logger's own records).
_QUIET_LOGGERS = ('absl', 'jax._src.xla_bridge')


class _DivertToFile:
  """Sends the checkpoint libraries' records (orbax, etils, asyncio) to a file instead."""

  def __init__(self, path: str):
    self.path = path
    self._format = std_logging.Formatter(
      '%(asctime)s %(levelname)s %(threadName)s %(pathname)s:%(lineno)d] %(message)s'
    )

  def filter(self, record) -> bool:
    if not (
      '/orbax/' in record.pathname or '/etils/' in record.pathname or record.name == 'asyncio'
    ):
      return True
    # A full disk drops them: the run's error line still shows.
    with contextlib.suppress(OSError), open(self.path, 'a') as f:
      f.write(self._format.format(record) + '\n')
    return False


def _closed_loop_noise(value) -> bool:
  return isinstance(value, RuntimeError) and str(value) == 'Event loop is closed'


def swallow_closed_loop_errors(path: str) -> None:
  """After a failed save, tensorstore's late callbacks find orbax's event loop closed and
  print a traceback each, from their own threads, and asyncio reports the save's futures
  ("exception was never retrieved") when they are collected, at any later time: from now
  on those (and only those) go to `path` (idempotent; other errors print as before)."""
  if getattr(sys.excepthook, '_ncf_jax_path', None) is not None:
    return
  std_logging.getLogger('asyncio').addFilter(_DivertToFile(path))
  previous, previous_unraisable = sys.excepthook, sys.unraisablehook

  def to_file(exc_type, value, tb) -> None:
    with contextlib.suppress(OSError), open(path, 'a') as f:
      traceback.print_exception(exc_type, value, tb, file=f)

  def hook(exc_type, value, tb):
    if not _closed_loop_noise(value):
      return previous(exc_type, value, tb)
    return to_file(exc_type, value, tb)

  def unraisable(u):
    if not _closed_loop_noise(u.exc_value):
      return previous_unraisable(u)
    return to_file(u.exc_type, u.exc_value, u.exc_traceback)

  hook._ncf_jax_path = path  # type: ignore[attr-defined]
  sys.excepthook, sys.unraisablehook = hook, unraisable


@contextlib.contextmanager
def library_logs_to(path: str):
  """While active, orbax's (and asyncio's) records go to `path`, not to the terminal.

  A failed save makes orbax log its tracebacks from several threads (100+ lines); the
  run's own one-line error says what happened, and the details stay in `path`.
  """
  divert = _DivertToFile(path)
  loggers = [logging.get_absl_logger(), std_logging.getLogger('asyncio')]
  for logger in loggers:
    logger.addFilter(divert)
  hooks = sys.excepthook, sys.unraisablehook, threading.excepthook

  def to_file(*exc_info):  # tensorstore's callbacks print their errors through these
    with contextlib.suppress(OSError), open(path, 'a') as f:
      traceback.print_exception(*exc_info[-3:], file=f)

  sys.excepthook = to_file
  sys.unraisablehook = lambda u: to_file(u.exc_type, u.exc_value, u.exc_traceback)
  threading.excepthook = lambda a: to_file(a.exc_type, a.exc_value, a.exc_traceback)
  try:
    yield
  finally:
    for logger in loggers:
      logger.removeFilter(divert)
    sys.excepthook, sys.unraisablehook, threading.excepthook = hooks


def quiet_library_logs() -> None:
  """Keeps the run's own log lines readable (idempotent).

  Call it before JAX starts its backends (the first `jax.devices()`) so that the
  backend probe's line is filtered too.
  """
  for name in _QUIET_LOGGERS:
    logger = std_logging.getLogger(name)
    if _QUIET not in logger.filters:
      logger.addFilter(_QUIET)


def _caller_set_up_logging() -> bool:
  """Whether absl's INFO lines already reach a handler, or the caller chose otherwise.

  True under `absl.app.run` (its handler is on the root logger), when the absl logger
  has its own level or handlers, when the root logger passes INFO, or when the root
  logger has any handler but a plain stderr stream (a file, pytest's capture). absl
  itself puts a plain stderr handler on a bare root logger at its first log call
  (`logging.basicConfig()`), so that one does not count.
  """
  absl_logger, root = logging.get_absl_logger(), std_logging.getLogger()
  if logging.get_absl_handler() in root.handlers:
    return True
  if absl_logger.handlers or absl_logger.level != std_logging.NOTSET:
    return True
  if root.level <= std_logging.INFO:
    return True
  return any(
    type(h) is not std_logging.StreamHandler or h.stream is not sys.stderr for h in root.handlers
  )


@contextlib.contextmanager
def visible_logs():
  """Shows the run's INFO lines on stderr when it is called from plain Python.

  Without `absl.app.run`, absl drops INFO records (the root logger is at WARNING), so
  `train_and_evaluate` from a script or a notebook printed no `Iteration` line and no
  hash. Unless the caller set up logging (`_caller_set_up_logging`), the absl logger
  gets its own stderr handler at INFO, in the command's format, for the duration of the
  run; it does not propagate meanwhile, so no line shows twice.
  """
  if _caller_set_up_logging():
    yield
    return
  absl_logger = logging.get_absl_logger()
  handler = std_logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.PythonFormatter())
  absl_logger.addHandler(handler)
  absl_logger.setLevel(std_logging.INFO)
  absl_logger.propagate = False
  try:
    yield
  finally:
    absl_logger.removeHandler(handler)
    absl_logger.setLevel(std_logging.NOTSET)
    absl_logger.propagate = True


def _atomic_write(path: str, text: str) -> None:
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)


def _clean(value):
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


class MetricWriter:
  """Per-epoch records to metrics.jsonl (one JSON object a line) and TensorBoard."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.workdir = workdir
    self.enabled = enabled
    self._tb = None
    if enabled:
      try:
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))
      except Exception as e:  # pylint: disable=broad-except
        # Optional (metrics.jsonl has everything); tensorboardX can fail inside its own
        # optional imports (e.g. a broken torch install), which must not stop training.
        logging.warning('No TensorBoard events: tensorboardX unavailable (%s).', e)

  @property
  def metrics_path(self) -> str:
    return os.path.join(self.workdir, 'metrics.jsonl')

  def write_config(self, config: dict) -> None:
    if self.enabled:
      _atomic_write(
        os.path.join(self.workdir, 'config.json'),
        json.dumps(config, indent=2, sort_keys=True) + '\n',
      )
      if self._tb is not None:
        self._tb.add_text('config', '```\n' + json.dumps(config, indent=2) + '\n```', 0)

  def rewrite_history(self, history: list) -> None:
    """metrics.jsonl holds exactly the epochs of the restored run (none after a kill)."""
    if self.enabled:
      _atomic_write(
        self.metrics_path,
        ''.join(json.dumps({k: _clean(v) for k, v in r.items()}) + '\n' for r in history),
      )

  def write_epoch(self, record: dict) -> None:
    if not self.enabled:
      return
    with open(self.metrics_path, 'a') as f:
      f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + '\n')
    if self._tb is not None:
      for k, v in record.items():
        if isinstance(v, (int, float)) and k != 'epoch' and v is not None:
          name = k if k.startswith('train_') or k.endswith('_s') else f'eval_{k}'
          self._tb.add_scalar(name, v, record['epoch'] + 1)
      self._tb.flush()

  def log_step(self, epoch: int, step: int, steps: int, state) -> None:
    loss_sum, count = jax.device_get((state.loss_sum, state.loss_count))
    logging.info(
      'epoch %d step %d/%d: train_loss %.5f', epoch + 1, step, steps, loss_sum / max(count, 1.0)
    )

  def write_summary(self, summary: dict) -> None:
    if self.enabled:
      _atomic_write(
        os.path.join(self.workdir, 'summary.json'),
        json.dumps(summary, indent=2, sort_keys=True) + '\n',
      )

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


class _PlainProgress:
  """Progress for non-terminals: a log line every `every_s` seconds."""

  def __init__(self, total: int, initial: int, desc: str, every_s: float = 30.0):
    self.total, self.n, self.desc, self.every_s = total, initial, desc, every_s
    self._start = self._last = time.time()
    self._initial = initial
    self.postfix = ''  # the running loss and samples/s (DeviceProgress sets it)

  def set_postfix_str(self, text: str, refresh: bool = True) -> None:
    self.postfix = text

  def update(self, k: int) -> None:
    self.n += k
    now = time.time()
    if now - self._last >= self.every_s:
      self._last = now
      rate = (self.n - self._initial) / max(now - self._start, 1e-9)
      logging.info(
        '%s: %d/%d steps (%.0f%%), %.1f steps/s%s',
        self.desc,
        self.n,
        self.total,
        100.0 * self.n / max(self.total, 1),
        rate,
        f', {self.postfix}' if self.postfix else '',
      )

  def close(self) -> None:
    pass


class DeviceProgress:
  """A progress bar that counts a step when the device has finished it.

  Steps are dispatched asynchronously, so counting dispatches filled the bar at once
  and left it full while the device worked. `add(token)` takes one small output of
  each step (its loss) and advances the bar past every finished one, polled with
  `is_ready()`: no wait, no host sync in the loop. `close()` waits for the rest in
  order, so the bar keeps moving with the device until the epoch's last step.
  """

  def __init__(
    self, bar, on_wait: Callable[[], None] | None = None, samples_per_step: int | None = None
  ):
    self.bar = bar
    self._pending: collections.deque = collections.deque()
    self._on_wait = on_wait
    self._samples_per_step = samples_per_step
    self._done, self._start, self._shown = 0, time.time(), 0.0

  def _finished(self, token, steps: int) -> None:
    """A finished call: the bar moves, and shows its loss and the samples/s so far."""
    self._done += steps
    now = time.time()
    if now - self._shown < 0.5 and self._done < getattr(self.bar, 'total', 0):
      return  # reads the loss (a device-to-host copy) twice a second at most
    self._shown = now
    if hasattr(self.bar, 'set_postfix_str') and hasattr(token, 'shape') and token.size == 1:
      text = f'loss {float(token):.4f}'
      if self._samples_per_step:
        rate = self._done * self._samples_per_step / max(time.time() - self._start, 1e-9)
        text += f', {rate:,.0f} samples/s'
      self.bar.set_postfix_str(text, refresh=False)

  def add(self, token, steps: int = 1) -> None:
    """Counts `steps` steps (one compiled call's) when `token` is ready."""
    self._pending.append((token, steps))
    done, last = 0, None
    while self._pending and self._pending[0][0].is_ready():
      last, k = self._pending.popleft()
      done += k
    if done:
      self._finished(last, done)
      self.bar.update(done)

  def close(self) -> None:
    while self._pending:
      token, steps = self._pending.popleft()
      token.block_until_ready()
      self._finished(token, steps)
      self.bar.update(steps)
      if self._on_wait is not None:
        self._on_wait()
    self.bar.close()


def _bar(total: int, initial: int, desc: str, enabled: bool, every_s: float):
  if enabled and sys.stderr.isatty():
    return tqdm.tqdm(total=total, initial=initial, desc=desc, leave=False)
  return _PlainProgress(total, initial, desc, every_s)


def progress(
  total: int,
  initial: int,
  desc: str,
  enabled: bool,
  on_wait: Callable[[], None] | None = None,
  every_s: float = 30.0,
  samples_per_step: int | None = None,
) -> DeviceProgress:
  """A tqdm bar on a terminal, a log line every `every_s` s otherwise; see DeviceProgress.

  `on_wait` is called after each wait for a step in `close` (the stall watchdog's beat).
  Both show the last finished call's loss and, given `samples_per_step`, samples/s.
  """
  return DeviceProgress(_bar(total, initial, desc, enabled, every_s), on_wait, samples_per_step)
