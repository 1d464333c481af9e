"""SIGTERM and Ctrl-C as a request to save and stop at the next step boundary.

The first SIGTERM or SIGINT (Ctrl-C) sets a flag that the loop checks before every train
call; the loop then saves a checkpoint at the current step and ends the run cleanly. A
second SIGINT aborts at once (KeyboardInterrupt), saving nothing more.
"""

import contextlib
import os
import signal
from typing import Any

from absl import logging
import jax

SIGNAL_NAMES = {signal.SIGTERM: 'SIGTERM', signal.SIGINT: 'Ctrl-C'}


class Interrupted(KeyboardInterrupt):
  """Raised after a Ctrl-C has been honoured: the run saved its state and wrote its summary.

  A KeyboardInterrupt, so a Python caller (a notebook) stops as after any interrupt;
  `python -m ncf_jax.train` exits with code 130 and no traceback.
  """


class Preemption:
  """Turns SIGTERM and a first Ctrl-C into a flag that the loop checks (`check`).

  With several processes every one must stop at the same step (saving is collective), so
  JAX's preemption service handles SIGTERM instead: a notice on any host makes
  `reached_preemption_sync_point` true on all of them at one agreed step; a Ctrl-C on
  one host is passed on to it as SIGTERM.
  """

  def __init__(self) -> None:
    self.requested = False
    self.reason: str | None = None  # 'SIGTERM' or 'Ctrl-C', once requested
    self._previous: dict[int, Any] = {}
    self._multi = (
      jax.process_count() > 1
      and jax.distributed.is_initialized()
      and bool(jax.config.jax_enable_preemption_service)  # type: ignore[attr-defined]
    )

  def check(self, call: int) -> bool:
    """Call before every train call, `call` rising by one each time, as on every process.

    A counter of calls, not the global step: with `steps_per_call` > 1 the step jumps,
    and the preemption service's agreed stop point (the hosts' max + 1) must be reached.
    """
    if self._multi and not self.requested:
      from jax.experimental import multihost_utils

      self.requested = multihost_utils.reached_preemption_sync_point(call)
      if self.requested and self.reason is None:
        self.reason = 'SIGTERM'
    return self.requested

  def __enter__(self):
    # Several processes: keep the preemption service's own SIGTERM handler.
    wanted = (signal.SIGINT,) if self._multi else (signal.SIGTERM, signal.SIGINT)
    for sig in wanted:
      with contextlib.suppress(ValueError):  # not the main thread (a notebook worker)
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.reason == 'Ctrl-C':
      raise KeyboardInterrupt  # the second Ctrl-C: abort now
    if self.reason is None:
      self.reason = SIGNAL_NAMES.get(signum, 'SIGTERM')
    if signum == signal.SIGINT:
      logging.warning(
        'Ctrl-C: saving a checkpoint at the next step; press Ctrl-C again to abort without saving.'
      )
      if self._multi:  # every process must agree on the step: the service decides
        os.kill(os.getpid(), signal.SIGTERM)
        return
    self.requested = True

  def __exit__(self, *exc):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous.clear()
