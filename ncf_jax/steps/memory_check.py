"""The memory a run needs before it builds anything, and the refusal of one that cannot fit."""

from ncf_jax import memory, parallel
from ncf_jax.steps.epoch import epoch_items_shape
from ncf_jax.steps.state import create_train_state


def memory_need(config, model, dataset, layout: parallel.Layout, key) -> dict[str, int]:
  """Bytes per device (the most any holds) of the state, data and epoch, before building.

  Collective with several processes: every process calls it.
  """
  state = create_train_state(config, model, key, layout, abstract=True)
  data = layout.abstract_device_data(dataset)
  epoch = epoch_items_shape(config, layout, data)
  return memory.bytes_per_device(
    params=state.params, opt_state=state.opt_state, data=data, epoch=epoch
  )


def check_memory(config, model, dataset, layout: parallel.Layout, key) -> None:
  """Refuses, before allocating, a run whose state, data and epoch cannot fit in memory.

  The refusal names the other layout (`Layout.alternative`) with its per-device figure
  when there is one that splits more. Collective with several processes.
  """
  need = memory_need(config, model, dataset, layout, key)
  hint = ''
  other = layout.alternative()
  if other is not None:
    hint = other.suggestion(sum(memory_need(config, model, dataset, other, key).values()))
  memory.check_fits(need, layout.local_devices, hint)
