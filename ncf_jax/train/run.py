"""A training run's long-lived objects, built once by `setup(config, workdir)`.

`Run` holds what every stage of the loop reads: the mesh and its layout (replicated or
sharded, chosen once by `parallel.make_layout`), the dataset and its device form, the
model, the keys, the compiled programs, the checkpoints, the writer and the workdir lock.
"""

from collections.abc import Callable
import dataclasses
import os
from typing import Any

from absl import logging
import flax.linen as nn
import jax
from jax.sharding import Mesh
import ml_collections
import numpy as np

from ncf_jax import checkpoint as ckpt_lib
from ncf_jax import config_checks, memory, models, parallel, pipeline, steps, writers
from ncf_jax import data as data_lib
import ncf_jax.train.pretrained as pretrained
from ncf_jax.train.provenance import Provenance
import ncf_jax.train.workdir as workdir_lib


@dataclasses.dataclass(frozen=True)
class Programs:
  """The jitted programs a run calls (each compiles at its first call)."""

  train_step: Callable[..., Any]  # one step a call
  multi_step: Callable[..., Any] | None  # config.steps_per_call steps a call, when > 1
  build_epoch: Any  # an epoch's negatives and order, on device
  eval_step: Callable[..., Any]  # the per-epoch evaluation (validation split if any, else test)


@dataclasses.dataclass
class Run:
  """Everything a run builds once; the loop's stages read it and never rebuild it."""

  config: ml_collections.ConfigDict
  workdir: str
  mesh: Mesh
  layout: parallel.Layout  # how state, data and epoch lie on the mesh (config.sharding)
  seed: int
  dataset: data_lib.Dataset
  model: nn.Module
  data: Any  # the sampler's arrays on the devices
  data_key: jax.Array
  dropout_key: jax.Array
  abstract: Any  # the TrainState's shapes and shardings
  programs: Programs
  ckpts: ckpt_lib.Checkpoints
  best_ckpts: ckpt_lib.Checkpoints | None  # the selected epoch's, with a validation split
  writer: writers.MetricWriter
  resumed: dict | None  # the restored checkpoint's meta (None for a fresh start)
  device_bytes: dict[str, int]
  state: steps.TrainState | None  # the state to start from; `take_state` hands it over
  lock: workdir_lib.WorkdirLock  # held until `close`: one run per workdir
  provenance: Provenance  # where the run came from (config.json, summary.json)

  @property
  def steps_per_epoch(self) -> int:
    return pipeline.steps_per_epoch(
      self.dataset.num_train, self.config.num_neg, self.config.batch_size
    )

  @property
  def select_key(self) -> str | None:
    """The validation metric that selects the best epoch; None without a validation split."""
    if self.config.validation == 'none':
      return None
    return f'valid_{self.config.select_metric}'

  @property
  def is_main(self) -> bool:
    return jax.process_index() == 0

  def take_state(self) -> steps.TrainState:
    """The starting state, handed over once: the loop donates its buffers."""
    state, self.state = self.state, None
    assert state is not None, 'take_state() was already called'
    return state

  def close(self) -> None:
    """Closes the writer and checkpoints and releases the workdir (idempotent)."""
    self.writer.close()
    self.ckpts.close()
    if self.best_ckpts is not None:
      self.best_ckpts.close()
    self.lock.release()


def resolve_seed(config: ml_collections.ConfigDict) -> int:
  """config.seed, or (None or negative) one drawn by process 0 and sent to every process.

  Every process must use the same seed: the keys and the initial parameters are
  "replicated", and nothing would notice if each process drew its own.
  """
  fixed = config_checks.fixed_seed(config)
  if fixed is not None:
    return fixed
  seed = int.from_bytes(os.urandom(4), 'little') & 0x7FFFFFFF
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    seed = int(multihost_utils.broadcast_one_to_all(np.int32(seed)))
  logging.info(
    'config.seed=%s: drew seed %d (rerun with --config.seed=%d).', config.seed, seed, seed
  )
  return seed


def setup(
  config: ml_collections.ConfigDict,
  workdir: str | None,
  made: list | None = None,
  provenance: Provenance | None = None,
) -> Run:
  """Checks the config, makes the workdir, loads the data, builds (or restores) the state.

  `made` receives the folders created here, so that a failed run can remove them.
  """
  writers.quiet_library_logs()
  provenance = provenance or Provenance()
  mesh = steps.make_mesh(int(config.num_devices))
  config_checks.validate_config(config, mesh.size)
  workdir = workdir_lib.make_workdir(workdir, made, provenance.name)
  lock = workdir_lib.lock_workdir(workdir)
  try:
    return _build(config, workdir, mesh, lock, provenance)
  except BaseException:
    lock.release()
    raise


def _build(
  config, workdir: str, mesh: Mesh, lock: workdir_lib.WorkdirLock, provenance: Provenance
) -> Run:
  """`setup` once the workdir is this run's: checkpoints, data, model, state, programs."""
  for name in (ckpt_lib.LATEST_DIR, ckpt_lib.BEST_DIR):
    workdir_lib.check_writable(os.path.join(workdir, name))
  ckpts, best_ckpts, seed = _open_checkpoints(config, workdir)
  dataset = _load_dataset(config, mesh)
  init_key, data_key, dropout_key = steps.make_keys(seed, mesh)
  layout = parallel.make_layout(config, mesh)
  model = models.create_model(
    layout.model_config(config.model), dataset.num_users, dataset.num_items, config.dtype
  )
  steps.check_memory(config, model, dataset, layout, init_key)
  data = layout.device_data(dataset)
  state = steps.create_train_state(config, model, init_key, layout)
  logging.info('Model %s: %d parameters.', config.model.name, models.num_params(state.params))
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
  )
  state, resumed = _initial_state(config, ckpts, state, abstract, layout)
  writer = writers.MetricWriter(workdir, enabled=jax.process_index() == 0)
  writer.write_config(
    ckpt_lib.config_to_dict(config) | {'resolved_seed': seed, 'provenance': provenance.record()}
  )
  command = provenance.command_line()
  if command is not None and jax.process_index() == 0:  # as a sweep point's
    with open(os.path.join(workdir, 'command.txt'), 'w') as f:
      f.write(command + '\n')
  writer.rewrite_history(resumed['history'] if resumed else [])
  programs, device_bytes = _build_programs(config, layout, model, dataset, data, state, abstract)
  return Run(
    config=config, workdir=workdir, mesh=mesh, layout=layout, seed=seed, dataset=dataset,
    model=model, data=data, data_key=data_key, dropout_key=dropout_key, abstract=abstract,
    programs=programs, ckpts=ckpts, best_ckpts=best_ckpts, writer=writer, resumed=resumed,
    device_bytes=device_bytes, state=state, lock=lock, provenance=provenance,
  )  # fmt: skip


def _open_checkpoints(config, workdir: str):
  """The workdir's checkpoints, and the run's seed (the saved one when resuming).

  A resume must be compatible with the saved run's config (checked before any work).
  """
  ckpts = ckpt_lib.Checkpoints(workdir, int(config.keep_checkpoints))
  newest = ckpts.newest_readable_meta()  # a step whose meta is damaged is set aside
  latest = None if newest is None else newest[0]
  if newest is not None:
    saved_meta = newest[1]
    ckpt_lib.check_compatible(saved_meta, config, saved_meta['seed'])
    seed = int(saved_meta['seed'])
  else:
    seed = resolve_seed(config)
  best_ckpts = None
  if config.validation != 'none':
    best_ckpts = ckpt_lib.Checkpoints(workdir, 1, best_metric=f'valid_{config.select_metric}')
    best_ckpts.delete_after(latest)
  return ckpts, best_ckpts, seed


def _load_dataset(config, mesh: Mesh) -> data_lib.Dataset:
  dataset = data_lib.load(config.dataset, config.validation)
  config_checks.validate_against_data(config, dataset)
  logging.info(
    'Devices: %d (%d processes), platform %s. Dataset %s: %d users, %d items, '
    '%d train positives; %d samples/epoch, %d steps/epoch of %d.',
    mesh.size, jax.process_count(), jax.devices()[0].platform, dataset.name,
    dataset.num_users, dataset.num_items, dataset.num_train,
    pipeline.epoch_size(dataset.num_train, config.num_neg),
    pipeline.steps_per_epoch(dataset.num_train, config.num_neg, config.batch_size),
    config.batch_size,
  )  # fmt: skip
  return dataset


def _initial_state(config, ckpts: ckpt_lib.Checkpoints, state, abstract, layout: parallel.Layout):
  """(state, meta): the newest intact checkpoint's, else the initial state (pre-trained if
  asked). Damaged steps are set aside on the way, each with one warning line."""
  intact = ckpts.restore_newest_intact(abstract)
  if intact is not None:
    step, state, meta = intact
    _log_resumed(step, meta, int(config.num_epochs))
    return state, meta
  if config.model.pretrained_gmf or config.model.pretrained_mlp:
    state = state.replace(params=pretrained.load_pretrained(config, state, layout))
  return state, None


def _log_resumed(step: int, meta: dict, num_epochs: int) -> None:
  """Where a resumed run stands, epochs counted from 1 (meta['epoch']: epochs begun)."""
  done = len(meta['history'])
  if done >= num_epochs:
    logging.info('Resuming from checkpoint at step %d: all %d epochs done.', step, done)
  else:
    logging.info(
      'Resuming from checkpoint at step %d: %d of %d epochs done; continuing with epoch %d.',
      step, done, num_epochs, done + 1,
    )  # fmt: skip


def _build_programs(config, layout: parallel.Layout, model, dataset, data, state, abstract):
  """The run's jitted programs, and the bytes per device its arrays take."""
  train_step = steps.make_train_step(config, layout, like=abstract)
  # k steps per call; an epoch's last (steps left < k) run one per call through train_step.
  per_call = int(config.steps_per_call)
  multi_step = (
    steps.make_train_step(config, layout, num_steps=per_call, like=abstract)
    if per_call > 1
    else None
  )
  build_epoch = steps.make_epoch_items(config, layout, data)
  # The most any device holds of each (collective with several processes: all call it).
  device_bytes = memory.bytes_per_device(
    params=state.params, opt_state=state.opt_state, data=data, epoch=build_epoch.abstract(data)
  )
  logging.info('Bytes per device (max over devices): %s', device_bytes)
  # Every epoch's evaluation reads the validation split when there is one, else the test.
  eval_step = steps.make_eval_step(
    config, layout, model, dataset.num_users, dataset.num_items,
    split='valid' if config.validation != 'none' else 'test',
  )  # fmt: skip
  return Programs(train_step, multi_step, build_epoch, eval_step), device_bytes
