"""Training, as a library: `train_and_evaluate(config, workdir)`.

The command `python -m ncf_jax.train --config=configs/<name>.py` is `__main__.py`, which
only parses flags and calls this library, so tests, sweeps and the Colab notebook import
it with no flag side effects. Modules, in the order a run uses them:

  workdir.py     the run's folder: created or checked writable, locked for the run (one
                 run per workdir), removed if left empty
  run.py         `setup(config, workdir) -> Run`: everything built once (mesh, data,
                 model, keys, state, compiled programs, checkpoints, writer)
  pretrained.py  NeuMF initialised from trained GMF and MLP runs
  loop.py        `train_and_evaluate`: resume, then per epoch train / evaluate / select
                 and save, then test the selected epoch and write the summary
  progress.py    `Progress`: where the loop stands (epoch, batch, history, stop flags)
  preemption.py  SIGTERM and Ctrl-C as "save and stop at the next step", agreed across
                 processes
  results.py     epoch selection rules, summary.json and the run's last line
"""

from ncf_jax.train.loop import oom_hint, train_and_evaluate
from ncf_jax.train.progress import Progress
from ncf_jax.train.results import done_line
from ncf_jax.train.run import Run, setup

__all__ = ['Progress', 'Run', 'done_line', 'oom_hint', 'setup', 'train_and_evaluate']
