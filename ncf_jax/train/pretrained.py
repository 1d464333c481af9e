"""NeuMF initialised from trained GMF and MLP runs (the NCF paper's pre-training)."""

import os

import jax
from jax.sharding import Mesh

from ncf_jax import checkpoint as ckpt_lib
from ncf_jax import models, parallel, steps
from ncf_jax.errors import UserError


def _trained_checkpoints(path: str) -> ckpt_lib.Checkpoints:
  """The selected epoch's checkpoint of a run with a validation split (the NCF recipe:
  GMF and MLP each selected on validation), else the run's latest checkpoints."""
  best = os.path.join(path, ckpt_lib.BEST_DIR)
  if os.path.isdir(best) and any(name.isdigit() for name in os.listdir(best)):
    return ckpt_lib.Checkpoints(path, 1, read_only=True, best_metric='selected')
  return ckpt_lib.Checkpoints(path, 1, read_only=True)


def _final_params(path: str, name: str):
  """The parameters of a trained `name` ('gmf'/'mlp') workdir: its selected epoch's with a
  validation split, else its latest checkpoint's."""
  ck = _trained_checkpoints(path)
  step = ck.latest_step()
  if step is None:
    raise UserError(
      f'config.model.pretrained_{name}={path!r} has no checkpoint; train '
      f'a {name} model with --workdir={path} first.'
    )
  meta = ck.restore_meta(step)
  saved = meta['config']['model']
  if saved['name'] != name:
    raise UserError(
      f'config.model.pretrained_{name}={path!r} holds a {saved["name"]} model, not {name}.'
    )
  restored = ck.manager.restore(
    step, args=ckpt_lib.ocp.args.Composite(state=ckpt_lib.ocp.args.StandardRestore())
  )['state']
  ck.close()
  return restored['params']


def load_pretrained(config, state: steps.TrainState, layout: parallel.Layout | Mesh):
  """NeuMF params from the final checkpoints of trained GMF / MLP workdirs, placed as
  `state.params` are, in `layout` (a Mesh: `parallel.make_layout(config, mesh)`'s)."""
  layout = parallel.as_layout(config, layout)
  gmf = _final_params(config.model.pretrained_gmf, 'gmf') if config.model.pretrained_gmf else None
  mlp = _final_params(config.model.pretrained_mlp, 'mlp') if config.model.pretrained_mlp else None
  current = jax.device_get(layout.gather(state.params))  # whole, on every host
  params = models.neumf_from_pretrained(current, gmf, mlp)
  try:
    # The pretrained runs' tables as saved (either layout): this run's rows.
    return layout.place_params(params, like=current)
  except (ValueError, TypeError) as e:
    raise UserError(f'pretrained GMF/MLP shapes do not match this NeuMF config: {e}') from None
