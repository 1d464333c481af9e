"""Validated hyperparameter search: which setting wins, chosen on the validation split only.

Two pieces, both pure (no JAX, no files):

* `select(rows, select_metric)`: the winner of finished runs by their validation metrics.
  The rule, in order: the higher validation `select_metric` (config.select_metric, HR@K or
  NDCG@K of the run's selected epoch); then the higher validation value of the other one;
  then the earlier row. Callers list the incumbent (the setting a change would replace)
  first, so a change must beat it, not tie it. Rows carry no test metric: a search point
  runs with config.test_at_end=False and never evaluates the test split.

* `coordinate_search(...)`: one pass over a list of `Axis`, each a line search on an
  ordered grid of values around the config's own value. Start with the value and its two
  neighbours; while the winner is the lowest (highest) value tried and the grid goes on,
  try the next lower (higher) one. The winner is kept and the next axis starts from it.
  Its points are named by their settings (`sweep.point_name`), so a setting reached twice
  is trained once and a rerun resumes where it stopped.

`default_space(model)` is the search a model gets with `--search=default`
(docs/experiments.md#default-search-spaces says where each range comes from).
"""

from collections.abc import Callable, Sequence
import dataclasses
import math
from typing import Any

import ml_collections

from ncf_jax import config_paths

PREFIX = 'config.'
METRICS = ('hr', 'ndcg')
Setting = dict[str, Any]  # {'config.<field>': value}


# ----------------------------------------------------------------------------------------
# Selection.


def _score(row: dict, select_metric: str) -> tuple[float, float] | None:
  other = next(m for m in METRICS if m != select_metric)
  first, second = row.get(f'valid_{select_metric}'), row.get(f'valid_{other}')
  if row.get('status', 'done') != 'done' or first is None or not math.isfinite(first):
    return None
  return (first, second if second is not None and math.isfinite(second) else -math.inf)


def select(rows: Sequence[dict], select_metric: str) -> int | None:
  """Index of the winning row (rule in the module docstring); None if none finished.

  Reads only `valid_<metric>` and `status`: whatever else a row holds cannot change it.
  """
  if select_metric not in METRICS:
    raise ValueError(f'select_metric must be one of {METRICS}, got {select_metric!r}')
  best, best_score = None, None
  for i, row in enumerate(rows):
    score = _score(row, select_metric)
    if score is not None and (best_score is None or score > best_score):
      best, best_score = i, score
  return best


# ----------------------------------------------------------------------------------------
# Axes.


def _round(value: float) -> float:
  return float(f'{value:.6g}')  # 0.002 * 0.5 is 0.001, not 0.0010000000000000002


@dataclasses.dataclass(frozen=True)
class Axis:
  """One hyperparameter: `grid(config)` -> (settings in ascending order, index of the
  config's own value). `where` says where its range comes from."""

  name: str
  grid: Callable[[ml_collections.ConfigDict], tuple[list[Setting], int]]
  where: str = ''


def scaled(field: str, powers: Sequence[int], *, integer: bool = False, where: str = '') -> Axis:
  """The config's value times 2**k for k in `powers` (which must hold 0)."""

  def grid(config):
    value = config_paths.get(config, field)
    if value is None:
      raise ValueError(f'config.{field} is None; the search scales its value')
    out = []
    for k in sorted(set(powers)):
      v = value * 2.0**k
      v = max(1, int(round(v))) if integer else _round(v)
      if not out or list(out[-1].values())[0] != v:
        out.append({PREFIX + field: v})
    return out, next(i for i, s in enumerate(out) if s[PREFIX + field] == value)

  return Axis(field, grid, where)


def values(field: str, grid_values: Sequence[float], *, where: str = '') -> Axis:
  """These values of `field` in ascending order, with the config's own value added."""

  def grid(config):
    value = config_paths.get(config, field)
    ordered = sorted(set(grid_values) | {value})
    return [{PREFIX + field: v} for v in ordered], ordered.index(value)

  return Axis(field, grid, where)


def _tower(layers: Sequence[int], factor: float) -> tuple[int, ...]:
  out = [max(1, int(round(w * factor))) for w in layers]
  out[0] += out[0] % 2  # the first width is two embeddings side by side: even
  return tuple(out)


def embedding_size(model: str, powers: Sequence[int], *, where: str = '') -> Axis:
  """The embedding size: model.mf_dim (GMF, MF), the MLP tower's widths (MLP), or both
  together (NeuMF: the NCF paper's "predictive factors"), times 2**k."""
  fields = {'mf': ['mf_dim'], 'gmf': ['mf_dim'], 'mlp': ['mlp_layers']}.get(
    model, ['mf_dim', 'mlp_layers']
  )

  def grid(config):
    out = []
    for k in sorted(set(powers)):
      setting: Setting = {}
      for f in fields:
        value = config.model[f]
        if f == 'mf_dim':
          setting[PREFIX + 'model.mf_dim'] = max(1, int(round(value * 2.0**k)))
        else:
          setting[PREFIX + 'model.mlp_layers'] = _tower(value, 2.0**k)
      if setting not in out:
        out.append(setting)
      if k == 0:
        current = out.index(setting)
    return out, current

  return Axis('embedding size', grid, where)


# Where the default ranges come from (docs/experiments.md#default-search-spaces).
_LR = 'NCF paper sec. 4.1 tuned Adam lr over 0.0001-0.005 (50x); here 1/8x-8x the config'
_L2 = 'Rendle et al. 2020 tune L2 on a hold-out (their MF: 0.005); 0 is the NCF paper'
_SIZE = 'NCF paper sec. 4.1: predictive factors 8, 16, 32, 64; here 1/4x-4x the config'
_NEG = 'NCF paper fig. 6: 1-10 negatives per positive, best 3-6; here 1/4x-4x the config'


def default_space(model: str) -> list[Axis]:
  """The `--search=default` axes of `model`, searched in this order.

  neumf_pretrained searches only the learning rate of the optimizer the paper switches to
  (plain SGD): its sizes are fixed by the pre-trained GMF and MLP.
  """
  lr = scaled('learning_rate', range(-3, 4), where=_LR)
  if model == 'neumf_pretrained':
    return [lr]
  return [
    lr,
    values('model.l2', (0.0, 1e-4, 1e-3, 1e-2), where=_L2),
    embedding_size(model, range(-2, 3), where=_SIZE),
    scaled('num_neg', range(-2, 3), integer=True, where=_NEG),
  ]


# ----------------------------------------------------------------------------------------
# The search.


def normalise(setting: Setting, base: ml_collections.ConfigDict) -> Setting:
  """`setting` without the fields that already hold that value in `base`, so that one
  configuration always gets one name (and one run), whichever axis reached it."""
  out = {}
  for key, value in setting.items():
    current = config_paths.get(base, key[len(PREFIX) :])
    same = (
      tuple(current) == tuple(value)
      if isinstance(value, (tuple, list)) and isinstance(current, (tuple, list))
      else current == value
    )
    if not same:
      out[key] = value
  return out


def _key(setting: Setting) -> str:
  return repr(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in setting.items()))


@dataclasses.dataclass
class Trial:
  """One point the search trained: its setting and what its run reports."""

  axis: str
  setting: Setting  # normalised against the base config
  row: dict  # valid_hr, valid_ndcg, best_epoch, status, ... (never a test metric)


def coordinate_search(
  base: ml_collections.ConfigDict,
  axes: Sequence[Axis],
  evaluate: Callable[[list[Setting]], list[dict]],
  apply: Callable[[ml_collections.ConfigDict, Setting], ml_collections.ConfigDict],
  select_metric: str,
) -> tuple[Setting, list[Trial]]:
  """(the selected setting, every trial in the order tried); `evaluate(settings)` trains
  the settings (skipping finished ones) and returns one row each, in order."""
  chosen: Setting = {}
  trials: list[Trial] = []
  seen: dict[str, dict] = {}  # a setting reached again (an axis's incumbent) is not rerun
  for axis in axes:
    grid, current = axis.grid(apply(base, chosen))
    settings = [normalise({**chosen, **s}, base) for s in grid]
    tried = sorted({i for i in (current - 1, current, current + 1) if 0 <= i < len(grid)})
    rows: dict[int, dict] = {}
    while True:
      for i in tried:
        if i not in rows and _key(settings[i]) in seen:
          rows[i] = seen[_key(settings[i])]
      todo = [i for i in tried if i not in rows]
      for i, row in zip(todo, evaluate([settings[i] for i in todo])):
        rows[i] = seen[_key(settings[i])] = row
        trials.append(Trial(axis.name, settings[i], row))
      order = [current] + [i for i in tried if i != current]  # the incumbent first
      won = select([rows[i] for i in order], select_metric)
      if won is None:
        raise RuntimeError(f'no run of the {axis.name} axis finished; see their train.log')
      best = order[won]
      if best == tried[0] and best > 0:
        tried.insert(0, best - 1)
      elif best == tried[-1] and best < len(grid) - 1:
        tried.append(best + 1)
      else:
        break
    chosen = settings[best]
  return chosen, trials
