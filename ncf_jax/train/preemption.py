"""SIGTERM as a request to save and stop at the next step boundary, agreed by every process."""

import signal

import jax


class Preemption:
  """Turns SIGTERM into a flag that the loop checks at step boundaries (`check`).

  With several processes every one must stop at the same step (saving is collective), so
  JAX's preemption service handles SIGTERM instead: a notice on any host makes
  `reached_preemption_sync_point` true on all of them at one agreed step.
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    self._multi = (
      jax.process_count() > 1
      and jax.distributed.is_initialized()
      and jax.config.jax_enable_preemption_service
    )

  def check(self, call: int) -> bool:
    """Call before every train call, `call` rising by one each time, as on every process.

    A counter of calls, not the global step: with `steps_per_call` > 1 the step jumps,
    and the preemption service's agreed stop point (the hosts' max + 1) must be reached.
    """
    if self._multi and not self.requested:
      from jax.experimental import multihost_utils

      self.requested = multihost_utils.reached_preemption_sync_point(call)
    return self.requested

  def __enter__(self):
    if self._multi:  # keep the preemption service's own SIGTERM handler
      return self
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. a notebook worker): no handler
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
