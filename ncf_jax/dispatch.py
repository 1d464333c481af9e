"""Host-side dispatch of device programs: a bound on work in flight, and a stall watchdog.

Why a bound. XLA's CPU client lets each device queue at most 32 unfinished programs
(`max_inflight_computations_per_device`); the 33rd launch waits for a slot *on one of
the client's worker threads*. A multi-device program's per-device parts rendezvous in
every all-reduce, each part holding a worker thread while it waits, and the client's
pool has about max(cores, devices) workers. With asynchronous dispatch running 32 programs ahead,
the launches blocked on full queues hold the workers that the running program's last
participant needs: it never starts, the others wait for it, and XLA aborts after 40 s
("Expected 4 threads to join the rendezvous, but only 3 of them arrived"). It needs more
devices than spare cores, so it showed on this 2-core machine with 2-8 fake devices and
not on a workstation. Ten lines reproduce it (`tests/dispatch_test.py`).

`InFlight` keeps the loop's unfinished programs below that limit by waiting, before each
new launch, for the one `limit` launches back: the queue never drains, so the device is
never idle for it. Accelerators and one CPU device have no such limit; there `InFlight`
does nothing.

Why a watchdog. A collective can also stall for reasons outside the process (a host that
died or froze, a wedged interconnect): on GPUs NCCL then waits forever without a word.
`Watchdog` ends such a run with one line saying what happened and what to do.
"""

import collections
from collections.abc import Callable, Sequence
import os
import sys
import threading
import time

import jax

# Unfinished launches the train loop allows on a multi-device CPU client: well below
# XLA's 32 per device, deep enough that dispatch still runs ahead of the devices.
CPU_MAX_IN_FLIGHT = 8

# Exit status of a run that the watchdog ended (2 is a user error).
EXIT_STALLED = 3


def in_flight_limit(devices: Sequence[jax.Device]) -> int | None:
  """The bound for programs over `devices`: CPU_MAX_IN_FLIGHT on a multi-device CPU client.

  Only this process's devices count: each process has its own CPU client and queues.
  """
  local = [d for d in devices if d.process_index == jax.process_index()]
  if len(local) > 1 and all(d.platform == 'cpu' for d in local):
    return CPU_MAX_IN_FLIGHT
  return None


class InFlight:
  """Bounds the device programs launched but not finished (see the module docstring).

  Call `add` with one small output of every launch (an output that is not donated to
  the next launch: a metric, a digest). With `limit=None` it only counts.
  """

  def __init__(self, limit: int | None, on_wait: Callable[[], None] | None = None):
    self.limit = limit
    self._pending: collections.deque = collections.deque()
    self._on_wait = on_wait

  def add(self, token) -> None:
    if self.limit is None:
      return
    self._pending.append(token)
    while len(self._pending) > self.limit:
      jax.block_until_ready(self._pending.popleft())
      if self._on_wait is not None:
        self._on_wait()

  def __len__(self) -> int:
    return len(self._pending)


class Watchdog:
  """Ends the process with one clear line when the loop stops making progress.

  The loop calls `beat()` whenever a launch returns or a wait for the device ends. After
  the first beat (the first call's compilation does not count), `timeout_s` seconds
  without one print `error: <describe()>` to stderr and exit with EXIT_STALLED. A thread
  blocked in a collective cannot be interrupted, and the rest of the run would never
  finish, so exiting is the only way out; checkpoints are written atomically, so the
  last one is intact. `timeout_s=0` disables it.
  """

  def __init__(self, timeout_s: float, describe: Callable[[float], str]):
    self.timeout_s = float(timeout_s)
    self._describe = describe
    self._last: float | None = None
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def beat(self) -> None:
    self._last = time.monotonic()

  def __enter__(self):
    if self.timeout_s > 0:
      self._thread = threading.Thread(target=self._watch, name='ncf_jax-watchdog', daemon=True)
      self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    if self._thread is not None:
      self._thread.join()

  def _watch(self) -> None:
    poll = min(5.0, max(0.05, self.timeout_s / 10))
    while not self._stop.wait(poll):
      last = self._last
      if last is None:
        continue
      idle = time.monotonic() - last
      if idle > self.timeout_s:
        try:
          message = self._describe(idle)
        except Exception as e:  # pylint: disable=broad-except
          message = f'the run made no progress for {idle:.0f} s ({e!r} while describing it)'
        print(f'error: {message}', file=sys.stderr, flush=True)
        os._exit(EXIT_STALLED)  # pylint: disable=protected-access
