"""Run outputs: config.json, metrics.jsonl, summary.json, TensorBoard events, progress.

Only process 0 writes (`enabled=False` elsewhere). Files are replaced atomically.
"""
import json
import math
import os
import sys
import time

from absl import logging
import jax
import tqdm


class _QuietLibraries:
  """Drops INFO records that orbax logs through absl on every save (warnings still show)."""

  def filter(self, record) -> bool:
    return record.levelno > 20 or ('/orbax/' not in record.pathname
                                   and '/etils/' not in record.pathname)


_QUIET = _QuietLibraries()


def quiet_library_logs() -> None:
  """Keeps the run's own log lines readable (idempotent)."""
  logger = logging.get_absl_logger()
  if _QUIET not in logger.filters:
    logger.addFilter(_QUIET)


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
      _atomic_write(os.path.join(self.workdir, 'config.json'),
                    json.dumps(config, indent=2, sort_keys=True) + '\n')
      if self._tb is not None:
        self._tb.add_text('config', '```\n' + json.dumps(config, indent=2) + '\n```', 0)

  def rewrite_history(self, history: list) -> None:
    """metrics.jsonl holds exactly the epochs of the restored run (none after a kill)."""
    if self.enabled:
      _atomic_write(self.metrics_path,
                    ''.join(json.dumps({k: _clean(v) for k, v in r.items()}) + '\n'
                            for r in history))

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
    logging.info('epoch %d step %d/%d: train_loss %.5f', epoch, step, steps,
                 loss_sum / max(count, 1.0))

  def write_summary(self, summary: dict) -> None:
    if self.enabled:
      _atomic_write(os.path.join(self.workdir, 'summary.json'),
                    json.dumps(summary, indent=2, sort_keys=True) + '\n')

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


class _PlainProgress:
  """Progress for non-terminals: a log line every ~30 s."""

  def __init__(self, total, initial, desc):
    self.total, self.n, self.desc = total, initial, desc
    self.last = time.time()

  def update(self, k):
    self.n += k
    if time.time() - self.last > 30:
      self.last = time.time()
      logging.info('%s: %d/%d steps', self.desc, self.n, self.total)

  def close(self):
    pass


def progress(total: int, initial: int, desc: str, enabled: bool):
  """A tqdm bar on a terminal, periodic log lines otherwise."""
  if enabled and sys.stderr.isatty():
    return tqdm.tqdm(total=total, initial=initial, desc=desc, leave=False)
  return _PlainProgress(total, initial, desc)
