"""`python -m ncf_jax.train` with every train step slowed down, for signal tests.

  NCF_TEST_STEP_DELAY=0.05 python tests/_train_worker.py --workdir=... --config.x=...

Runs train.py's own `main` (same flags, same error handling); only `make_train_step` is
wrapped so that each step also sleeps NCF_TEST_STEP_DELAY seconds on the host. A tiny
epoch then lasts long enough that a test can reliably kill or SIGTERM the run mid-epoch.
The sleep changes no value: batches depend only on (seed, epoch, step).
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402

from ncf_jax import errors  # noqa: E402
from ncf_jax import train  # noqa: E402

_DELAY = float(os.environ.get('NCF_TEST_STEP_DELAY', '0'))
_make_train_step = train.make_train_step


def _slow_make_train_step(config, mesh):
  step_fn = _make_train_step(config, mesh)

  def slow(*args):
    time.sleep(_DELAY)
    return step_fn(*args)
  return slow


train.make_train_step = _slow_make_train_step

if __name__ == '__main__':
  train.define_flags()
  app.run(train.main, flags_parser=errors.parse_flags)
