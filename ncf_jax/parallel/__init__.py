"""The run's layout over the devices, chosen once from `config.sharding` (`make_layout`).

`Layout` is the interface; `Replicated` and `Sharded` its two implementations
(`ncf_jax.parallel.layout`, `.replicated`, `.sharded`).
"""

from jax.sharding import Mesh

from ncf_jax.parallel.layout import AXIS, Layout
from ncf_jax.parallel.replicated import Replicated
from ncf_jax.parallel.sharded import Sharded

__all__ = ['AXIS', 'MODES', 'Layout', 'Replicated', 'Sharded', 'make_layout', 'validate_config']

_LAYOUTS: dict[str, type[Layout]] = {c.mode: c for c in (Replicated, Sharded)}
# Values of config.sharding.
MODES = tuple(_LAYOUTS)


def _mode(config) -> str:
  return getattr(config, 'sharding', 'replicated')  # configs without the field: replicated


def make_layout(config, mesh: Mesh) -> Layout:
  """The layout `config.sharding` names, on `mesh` (the one place that reads the mode)."""
  return _LAYOUTS[_mode(config)](mesh)


def as_layout(config, mesh_or_layout: Mesh | Layout) -> Layout:
  """`mesh_or_layout` if a Layout, else `make_layout(config, mesh)` (callers holding a mesh)."""
  if isinstance(mesh_or_layout, Layout):
    return mesh_or_layout
  return make_layout(config, mesh_or_layout)


def validate_config(config, bad) -> None:
  """`config.sharding`, and what its layout cannot run; `bad(field, value, why)` reports."""
  mode = _mode(config)
  if mode not in _LAYOUTS:
    bad('sharding', mode, f'use one of {", ".join(MODES)}')
    return
  _LAYOUTS[mode].check_config(config, bad)
