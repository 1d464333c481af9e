"""PNG plots for sweeps and seed studies (matplotlib's Agg canvas, no pyplot state).

Figures are built with `matplotlib.figure.Figure` and saved through the Agg canvas, so
nothing here touches the pyplot backend of the calling process (a notebook keeps its
inline backend; a headless sweep needs no display).
"""

from collections.abc import Sequence

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

# (label, epochs trained [1, 2, ...], HR per epoch, train loss per epoch)
Curve = tuple[str, Sequence[int], Sequence[float], Sequence[float]]


def hr_curves(
  curves: Sequence[Curve],
  path: str,
  *,
  top_k: int = 10,
  hr_threshold: float | None = None,
  title: str = '',
  styles: Sequence[tuple[int, int]] | None = None,
) -> None:
  """HR@K (left) and train loss (right) by epoch, one line per run; saves a PNG.

  `styles[i]` = (colour group, line-style group) of curve i, e.g. colour by learning rate
  and line style by seed; by default every curve gets its own colour.
  """
  styles = list(styles) if styles else [(i, 0) for i in range(len(curves))]
  num_colors = max([c for c, _ in styles], default=0) + 1
  palette = matplotlib.colormaps['tab10' if num_colors <= 10 else 'tab20'].colors  # type: ignore[attr-defined]  # a ListedColormap
  dashes = ['-', '--', ':', '-.']
  fig = Figure(figsize=(13, 4.5))
  FigureCanvasAgg(fig)
  ax_hr, ax_loss = fig.subplots(1, 2)
  for (label, epochs, hrs, losses), (color, dash) in zip(curves, styles):
    kw = dict(
      marker='o',
      markersize=3,
      color=palette[color % len(palette)],
      linestyle=dashes[dash % len(dashes)],
    )
    points = [(e, h) for e, h in zip(epochs, hrs) if h is not None]
    if points:
      ax_hr.plot(*zip(*points), label=label, **kw)
    loss_points = [(e, v) for e, v in zip(epochs, losses) if v is not None]
    if loss_points:
      ax_loss.plot(*zip(*loss_points), **kw)
  if hr_threshold is not None:
    ax_hr.axhline(
      hr_threshold, color='gray', linestyle='--', linewidth=1, label=f'target {hr_threshold:g}'
    )
  ax_hr.set(xlabel='epochs trained', ylabel=f'HR@{top_k}', title=f'eval HR@{top_k}')
  ax_loss.set(xlabel='epochs trained', ylabel='train loss (BCE)', title='train loss')
  for ax in (ax_hr, ax_loss):
    ax.grid(True, alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  handles, labels = ax_hr.get_legend_handles_labels()
  if handles:
    fig.legend(handles, labels, loc='center right', fontsize=7)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout(rect=(0, 0, 0.85 if handles else 1, 1))
  fig.savefig(path, dpi=80)


def seed_boxplot(
  groups: Sequence[tuple[str, Sequence[float]]], path: str, *, title: str = ''
) -> None:
  """One box (with the individual runs as dots) per group, side by side; saves a PNG.

  `groups` is [(axis label, values)], e.g. [('epochs to target', [...]),
  ('seconds to target', [...])]; a group without values is drawn empty and says so.
  """
  fig = Figure(figsize=(4 * max(1, len(groups)), 4))
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, max(1, len(groups)), squeeze=False)[0]
  for ax, (label, values) in zip(axes, groups):
    values = [v for v in values if v is not None]
    if values:
      ax.boxplot([values], widths=0.5, showfliers=False)  # every run is a dot
      ax.scatter([1] * len(values), values, s=14, alpha=0.6, zorder=3)
    else:
      ax.text(
        0.5, 0.5, 'no run reached the target', ha='center', va='center', transform=ax.transAxes
      )
    ax.set(ylabel=label, xticks=[1], xticklabels=[f'{len(values)} runs'])
    ax.grid(True, axis='y', alpha=0.3)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=80)


def compare_bars(
  models: Sequence[tuple[str, dict[str, dict]]], path: str, *, top_k: int = 10, title: str = ''
) -> None:
  """One panel per metric, one bar per model: the mean over seeds with its 95 % interval.

  `models` is [(name, {metric: {'mean': m, 'ci95': [lo, hi] or None}})], metrics 'hr',
  'ndcg', 'mrr'; a model without a mean is left out of that panel.
  """
  metrics = ['hr', 'ndcg', 'mrr']
  fig = Figure(figsize=(4.2 * len(metrics), 4))
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, len(metrics), squeeze=False)[0]
  palette = matplotlib.colormaps['tab10'].colors  # type: ignore[attr-defined]  # a ListedColormap
  for ax, metric in zip(axes, metrics):
    names, means, low, high, colors = [], [], [], [], []
    for i, (name, stats) in enumerate(models):
      s = stats.get(metric) or {}
      if s.get('mean') is None:
        continue
      lo, hi = s['ci95'] if s.get('ci95') else (s['mean'], s['mean'])
      names.append(name)
      means.append(s['mean'])
      low.append(s['mean'] - lo)
      high.append(hi - s['mean'])
      colors.append(palette[i % len(palette)])
    positions = list(range(len(names)))
    ax.bar(positions, means, yerr=[low, high], capsize=4, color=colors)
    ax.set_xticks(positions)
    ax.set_xticklabels(names, rotation=30, ha='right', fontsize=8)
    ax.set(ylabel=f'test {metric.upper()}@{top_k}', title=f'{metric.upper()}@{top_k}')
    ax.grid(True, axis='y', alpha=0.3)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
