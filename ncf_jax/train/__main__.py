"""`python -m ncf_jax.train --config=configs/<name>.py [--config.<field>=<value>] [--workdir=DIR]`.

Parses the flags, sets up the process (XLA flags, multi-host `jax.distributed`) and calls
`ncf_jax.train.train_and_evaluate`; a user error becomes one `error:` line and exit 2.
Ctrl-C saves a checkpoint at the next step and exits with code 130 (a second Ctrl-C
aborts at once, also 130); rerunning the same command resumes.
"""

import sys

from absl import app, flags, logging
import jax
from ml_collections import config_flags

from ncf_jax import launch, train, writers
from ncf_jax.errors import UserError, exit_on_user_error, parse_flags
from ncf_jax.train import provenance
from ncf_jax.train.preemption import Interrupted


@exit_on_user_error
def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  FLAGS = flags.FLAGS
  config = FLAGS.config
  writers.quiet_library_logs()  # before JAX starts its backends
  launch.xla_flags(config)
  launch.maybe_initialize_distributed(
    FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id
  )
  logging.info(
    'JAX process %d of %d, %d local devices of %d.',
    jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
  )  # fmt: skip
  try:
    config_file = config_flags.get_config_filename(FLAGS['config'])
    origin = provenance.from_command_line(config_file)
    train.train_and_evaluate(config, FLAGS.workdir, origin)
  except Interrupted:
    sys.exit(130)  # saved; the log's last lines say where and how to resume
  except KeyboardInterrupt:
    print(
      'error: interrupted (Ctrl-C) before the run could save; checkpoints saved before '
      'it are intact. Rerun the same command to resume.',
      file=sys.stderr,
      flush=True,
    )
    sys.exit(130)


if __name__ == '__main__':
  launch.define_run_flags()
  app.run(main, flags_parser=parse_flags)
