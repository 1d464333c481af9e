"""Sweep points as data: small helpers that build lists of {'config.<field>': value}.

hyper.product([hyper.sweep('config.learning_rate', [5e-4, 1e-3]),
               hyper.sweep('config.seed', [0, 1])])   # 4 points
hyper.zipit([hyper.sweep('config.batch_size', [2048, 65536]),
             hyper.sweep('config.learning_rate', [5e-4, 3e-3])])   # 2 points
"""

from collections.abc import Iterable
import itertools
from typing import Any

Point = dict[str, Any]


def sweep(name: str, values: Iterable[Any]) -> list[Point]:
  """One axis: a point per value."""
  return [{name: v} for v in values]


def fixed(name: str, value: Any) -> list[Point]:
  """An axis of one value (every point of a product gets it)."""
  return [{name: value}]


def product(axes: Iterable[list[Point]]) -> list[Point]:
  """Every combination of the axes' points; the last axis varies fastest."""
  return [_merge(combo) for combo in itertools.product(*axes)]


def zipit(axes: Iterable[list[Point]]) -> list[Point]:
  """The i-th points of all axes merged; the axes must have the same length."""
  axes = list(axes)
  if len({len(a) for a in axes}) > 1:
    raise ValueError(f'zipit: axes of different lengths {[len(a) for a in axes]}')
  return [_merge(combo) for combo in zip(*axes)]


def _merge(points) -> Point:
  out: Point = {}
  for p in points:
    clash = set(out) & set(p)
    if clash:
      raise ValueError(f'the same field on two axes: {sorted(clash)}')
    out.update(p)
  return out
