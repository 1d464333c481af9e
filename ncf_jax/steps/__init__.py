"""The compiled programs of a run: state, epoch builder, train/grad/eval steps, on a mesh.

Data parallel over every device of every process: a 1-D `data` mesh, each device
computing its share of the global batch (negatives included) inside the compiled step
(`jax.shard_map`). Where the parameters, the sampler's data and the epoch live, and so
how a batch, a table row and a gradient are read or reduced, is the run's layout
(`ncf_jax.parallel`, from `config.sharding`), which every builder here takes. Everything
is a pure function of its arguments; the loop that calls them is `ncf_jax.train`.

- `state`: TrainState, the optimizer, `create_train_state`, `make_keys`, `make_mesh`.
- `epoch`: the epoch builder (`make_epoch_items`).
- `train_step`: the train step, its gradients alone, the digest replay of a resume.
- `evaluation`: the eval step, full ranking, the host eval loop, `params_hash`.
- `memory_check`: the memory a run needs, checked before it builds anything.
"""

from ncf_jax.steps.epoch import epoch_items_shape, make_epoch_items
from ncf_jax.steps.evaluation import evaluate, full_rank, make_eval_step, params_hash
from ncf_jax.steps.memory_check import check_memory, memory_need
from ncf_jax.steps.state import (
  OPTIMIZERS,
  TrainState,
  create_train_state,
  make_keys,
  make_mesh,
  make_optimizer,
)
from ncf_jax.steps.train_step import make_grad_step, make_hash_replay, make_train_step

__all__ = [
  'OPTIMIZERS',
  'TrainState',
  'check_memory',
  'create_train_state',
  'epoch_items_shape',
  'evaluate',
  'full_rank',
  'make_epoch_items',
  'make_eval_step',
  'make_grad_step',
  'make_hash_replay',
  'make_keys',
  'make_mesh',
  'make_optimizer',
  'make_train_step',
  'memory_need',
  'params_hash',
]
