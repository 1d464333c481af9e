"""What a run reports: epoch selection rules, summary.json, and its last line."""

from __future__ import annotations

import importlib.metadata
import os
from typing import TYPE_CHECKING, Any

import jax

if TYPE_CHECKING:
  from ncf_jax.train.progress import Progress
  from ncf_jax.train.run import Run


def best_record(history: list[dict], key: str | None) -> dict | None:
  """The epoch record with the highest `key` (the earliest among equals), or None."""
  best = None
  for record in history:
    value = record.get(key) if key is not None else None
    if value is not None and (best is None or value > best[key]):
      best = record
  return best


def early_stopped(history: list[dict], key: str | None, patience: int) -> bool:
  """Whether the last evaluated epoch is `patience` or more epochs after the best one."""
  best = best_record(history, key)
  if not patience or best is None:
    return False
  last = max(r['epoch'] for r in history if r.get(key) is not None)
  return last - best['epoch'] >= patience


def max_over_epochs(history: list[dict], key: str) -> float | None:
  values = [r[key] for r in history if r.get(key) is not None]
  return max(values) if values else None


def library_versions() -> dict[str, str | None]:
  """Versions that `params_hash` depends on: it reproduces only when they match."""
  out: dict[str, str | None] = {}
  for name in ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'numpy'):
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  return out


def _final_test(run: Run, progress: Progress, test: dict | None) -> dict | None:
  """The test metrics of the run's result: the selected parameters' with a validation
  split, else the last evaluated epoch's (the final parameters', unless preempted)."""
  if run.select_key is not None:
    return test
  last: dict = next((r for r in reversed(progress.history) if 'hr' in r), {})
  return {k: v for k, v in last.items() if k in ('hr', 'ndcg', 'mrr') or k.startswith('full_')}


def summary(
  run: Run, progress: Progress, params_hash: str, test: dict | None, test_hash: str | None
) -> dict[str, Any]:
  """summary.json: the run's result, how it was selected, and where it ran."""
  history, validated = progress.history, run.select_key is not None
  best = best_record(history, run.select_key) if validated else None
  final_test = _final_test(run, progress, test)
  reached = progress.reached
  out = {
    'seed': run.seed,
    'params_hash': params_hash,
    'epochs_done': len(history),
    'validation': run.config.validation,
    'select_metric': run.select_key,
    'test_at_end': bool(run.config.test_at_end),
    'best_epoch': None if best is None else best['epoch'],
    **{
      f'valid_{k}': None if best is None else best.get(f'valid_{k}') for k in ('hr', 'ndcg', 'mrr')
    },
    **{
      f'test_{k}': None if final_test is None else final_test.get(k) for k in ('hr', 'ndcg', 'mrr')
    },
    'test_hr_max_over_epochs': max_over_epochs(history, 'hr'),
    'test_ndcg_max_over_epochs': max_over_epochs(history, 'ndcg'),
    'final': history[-1] if history else None,
    'eval_candidates_hash': test_hash if validated else progress.eval_hash,
    'valid_candidates_hash': progress.eval_hash if validated else None,
    'early_stopped': bool(progress.stop_early),
    'hr_threshold': run.config.hr_threshold,
    'epochs_to_target': None if reached is None else reached + 1,
    'seconds_to_target': None
    if reached is None
    else history[[h['epoch'] for h in history].index(reached)]['total_wall_s'],
    'preempted': progress.preempted,
    'stop_reason': progress.stop_reason,
    'num_devices': run.mesh.size,
    'bytes_per_device': run.device_bytes,
    'num_processes': jax.process_count(),
    'platform': jax.devices()[0].platform,
    'versions': library_versions(),
    'workdir': os.path.abspath(run.workdir),
    'provenance': run.provenance.record(ended=True),
  }
  if final_test:
    out.update({f'test_{k}': v for k, v in final_test.items() if k.startswith('full_')})
  if best is not None:
    out.update({k: v for k, v in best.items() if k.startswith('valid_full_')})
  return out


def done_line(workdir: str, summary: dict, history: list, top_k: int, wall_s: float) -> str:
  """The run's last line: where its outputs are and its headline result.

  `Done: runs/demo - HR@10 0.6877, NDCG@10 0.4655 (epoch 8), 8.1 s; summary.json`: the
  run's result as in summary.json, i.e. the selected epoch's test metrics with a
  validation split (the best validation epoch so far if it was stopped before the
  test), else the last evaluated epoch's. Epochs count from 1 here (summary.json's
  `best_epoch` and metrics.jsonl's `epoch` from 0).
  """

  def metrics(prefix, label):
    return (
      f'{label}HR@{top_k} {summary[prefix + "hr"]:.4f}, NDCG@{top_k} {summary[prefix + "ndcg"]:.4f}'
    )

  if summary['validation'] == 'none' and summary['test_hr'] is not None:
    last = next(r['epoch'] for r in reversed(history) if r.get('hr') is not None)
    what = f'{metrics("test_", "")} (epoch {last + 1})'
  elif summary['validation'] != 'none' and summary['test_hr'] is not None:
    what = f'{metrics("test_", "test ")} (selected epoch {summary["best_epoch"] + 1})'
  elif summary['validation'] != 'none' and summary['valid_hr'] is not None:
    epoch = summary['best_epoch'] + 1
    what = f'{metrics("valid_", "valid ")} ' + (
      f'(selected epoch {epoch}; test not evaluated: config.test_at_end=False)'
      if summary.get('test_at_end') is False and not summary['preempted']
      else f'(best epoch so far: {epoch})'
    )
  else:
    what = 'no epoch evaluated yet'
  if summary['preempted']:
    return (
      f'Stopped ({summary.get("stop_reason") or "SIGTERM"}): {workdir} - {what}, '
      f'{wall_s:.1f} s; summary.json; rerun '
      'the same command to resume.'
    )
  return f'Done: {workdir} - {what}, {wall_s:.1f} s; summary.json'
