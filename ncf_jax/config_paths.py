"""Dotted field paths ('model.mlp_layers') in configs: the one place that walks them.

A config is an ml_collections ConfigDict whose groups (`config.model`, `config.dataset`)
are ConfigDicts; the same paths name fields in its JSON form (config.json, a checkpoint's
meta), which is a plain nested dict. Reading and flattening accept either; setting goes
through ml_collections' own `update_from_flattened_dict`, so type checks, locking and
FieldReferences behave as for `config.a.b = v`.

  get(config, 'model.mf_dim')             # 16; KeyError (or `default`) when absent
  set_value(config, 'model.mf_dim', 8)    # in place
  override(config, {'model.mf_dim': 8, 'num_epochs': 1})
  flatten(config)                         # {'dataset.name': 'synthetic', ...}
  first_unknown(config, 'model.mf_dimm')  # 1: the index of the part that names no field
  from_keywords({'model__mf_dim': 8})     # {'model.mf_dim': 8}, for **kwargs spellings
"""

from collections.abc import Iterator, Mapping, Sequence
import json
from typing import Any, TypeGuard

import ml_collections

# Separator of a path's parts, and its spelling in Python keyword arguments.
SEP, KEYWORD_SEP = '.', '__'

# A `default` of `get` that no config holds (None is a value: placeholder fields hold it).
MISSING = object()
_RAISE = object()


def parts(path: str | Sequence[str]) -> list[str]:
  """A path's parts: 'a.b' -> ['a', 'b']; '' (the config itself) -> []."""
  if isinstance(path, str):
    return path.split(SEP) if path else []
  return list(path)


def is_group(node: Any) -> TypeGuard[ml_collections.ConfigDict | Mapping[str, Any]]:
  """Whether `node` holds fields (a ConfigDict or, in a config's JSON form, a dict)."""
  return isinstance(node, (ml_collections.ConfigDict, Mapping))


def get(config: Any, path: str | Sequence[str], default: Any = _RAISE) -> Any:
  """The value at `path` ('' or []: `config` itself).

  A path that names no field (a missing part, or one below a leaf) returns `default`, or
  raises KeyError naming the path when no default is given.
  """
  node = config
  for part in parts(path):
    if not is_group(node) or part not in node:
      if default is _RAISE:
        raise KeyError(SEP.join(parts(path)))
      return default
    node = node[part]
  return node


def set_value(config: ml_collections.ConfigDict, path: str, value: Any) -> None:
  """Sets the field at `path` in place, as `config.a.b = value` would.

  The groups on the way must exist (KeyError otherwise); the leaf follows ConfigDict's
  rules (a locked config refuses a new field, a typed field a value of another type).
  """
  config.update_from_flattened_dict({path: value})


def override(
  config: ml_collections.ConfigDict, values: Mapping[str, Any]
) -> ml_collections.ConfigDict:
  """Sets every {path: value} of `values` in place, in order; returns `config`."""
  for path, value in values.items():
    set_value(config, path, value)
  return config


def items(config: Any, prefix: str = '') -> Iterator[tuple[str, Any]]:
  """(dotted path, value) of every leaf, depth first in the config's own order.

  Groups are walked, not returned; an empty group yields nothing.
  """
  for key, value in config.items():
    if is_group(value):
      yield from items(value, f'{prefix}{key}{SEP}')
    else:
      yield f'{prefix}{key}', value


def flatten(config: Any) -> dict[str, Any]:
  """{dotted path: value} of every leaf of a ConfigDict or of its JSON form."""
  return dict(items(config))


def leaf_paths(config: Any) -> list[str]:
  """The dotted path of every leaf, in the config's own order."""
  return [path for path, _ in items(config)]


def first_unknown(config: Any, path: str | Sequence[str]) -> int | None:
  """Index of the first part of `path` that a group of `config` lacks, or None.

  None too when the walk reaches a leaf before the path ends ('num_epochs.x'): that part
  names no field, but not a missing one of a group either.
  """
  node = config
  for i, part in enumerate(parts(path)):
    if not is_group(node):
      return None
    if part not in node:
      return i
    node = node[part]
  return None


def to_json_dict(config: ml_collections.ConfigDict) -> dict:
  """The JSON form of a config (tuples become lists): what config.json and checkpoints hold."""
  return json.loads(config.to_json_best_effort())


def from_keywords(values: Mapping[str, Any]) -> dict[str, Any]:
  """{'model__mf_dim': v} (keyword-argument spelling) -> {'model.mf_dim': v}."""
  return {key.replace(KEYWORD_SEP, SEP): value for key, value in values.items()}
