"""Process setup before the backends start: XLA flags and multi-host `jax.distributed`."""

import os

from absl import logging
import jax

from ncf_jax import config_checks


def maybe_initialize_distributed(
  coordinator_address=None, num_processes=None, process_id=None
) -> None:
  """jax.distributed from flags, or from the environment where JAX can detect it."""
  explicit = any(v is not None for v in (coordinator_address, num_processes, process_id))
  env = os.environ
  detectable = (
    env.get('JAX_COORDINATOR_ADDRESS')
    or int(env.get('SLURM_NTASKS', '1')) > 1
    or ',' in env.get('TPU_WORKER_HOSTNAMES', '')
  )
  if not (explicit or detectable):
    # A Cloud TPU VM (pod slice workers included) announces itself only through the GCE
    # metadata server, which jax.distributed.initialize() queries: try it there.
    if os.path.exists('/dev/accel0') or os.path.exists('/dev/vfio/0'):
      try:
        jax.distributed.initialize()
      except (ValueError, RuntimeError) as e:  # not a detectable cluster: one process
        logging.info('No multi-host cluster detected on this TPU VM (%s).', e)
    return
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(
    coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
  )


def _add_xla_flag(name: str, value) -> None:
  current = os.environ.get('XLA_FLAGS', '')
  if f'--{name}=' not in current:
    os.environ['XLA_FLAGS'] = f'{current} --{name}={value}'.strip()


def xla_flags(config) -> None:
  """XLA flags that must be set before the backends start.

  With a fixed seed, deterministic GPU kernels. With the stall watchdog on, XLA's CPU
  collectives wait longer than it before aborting (their default is 40 s), so that a stall
  ends with the watchdog's one line rather than XLA's abort and C++ stack.
  """
  if config_checks.fixed_seed(config) is not None:
    _add_xla_flag('xla_gpu_deterministic_ops', 'true')
  if float(config.stall_timeout_s) > 0:
    _add_xla_flag(
      'xla_cpu_collective_call_terminate_timeout_seconds', int(float(config.stall_timeout_s)) + 60
    )


def define_run_flags() -> None:
  """The flags of a training command: --config, --workdir and the multi-host ones.

  `python -m ncf_jax.train`, `experiments.sweep` and `experiments.seeds` define the same
  flags, so `--config.x=y` means the same to each.
  """
  from absl import flags

  from ncf_jax import errors

  errors.define_config_file('configs/default.py', 'Training config file.')
  flags.DEFINE_string('workdir', None, 'Run directory (made if absent; resumed).')
  flags.DEFINE_string(
    'coordinator_address', None, 'Multi-host: host:port of process 0 (jax.distributed).'
  )
  flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes.')
  flags.DEFINE_integer('process_id', None, 'Multi-host: this process index.')
