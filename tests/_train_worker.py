"""`python -m ncf_jax.train` with every train step slowed down, for signal and stall tests.

  NCF_TEST_STEP_DELAY=0.05 python tests/_train_worker.py --workdir=... --config.x=...
  NCF_TEST_STALL_AT_CALL=50 python tests/_train_worker.py ...

Runs train.py's own `main` (same flags, same error handling); only `make_train_step` is
wrapped so that each step also sleeps NCF_TEST_STEP_DELAY seconds on the host. A tiny
epoch then lasts long enough that a test can reliably kill or SIGTERM the run mid-epoch.
The sleep changes no value: batches depend only on (seed, epoch, step). With
NCF_TEST_STALL_AT_CALL=k the k-th step call of the process (0-based) never returns, as
if a collective had stalled.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402

from ncf_jax import errors, launch, steps  # noqa: E402
from ncf_jax.train import __main__ as train_main  # noqa: E402

_DELAY = float(os.environ.get('NCF_TEST_STEP_DELAY', '0'))
_STALL_AT = int(os.environ.get('NCF_TEST_STALL_AT_CALL', '-1'))
_make_train_step = steps.make_train_step


def _slow_make_train_step(config, mesh, **kwargs):
  # With steps_per_call > 1 each program counts (and delays) its own calls.
  step_fn = _make_train_step(config, mesh, **kwargs)
  calls = [0]

  def slow(*args):
    if calls[0] == _STALL_AT:
      time.sleep(3600)
    calls[0] += 1
    time.sleep(_DELAY)
    return step_fn(*args)

  return slow


steps.make_train_step = _slow_make_train_step

if __name__ == '__main__':
  launch.define_run_flags()
  app.run(train_main.main, flags_parser=errors.parse_flags)
