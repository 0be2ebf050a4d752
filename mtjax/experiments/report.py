"""What every study report shares: markdown tables, mean ± std cells, PNG figures.

Each study writes its own report.md and plots (its `write_report`); `mtjax report DIR` rebuilds
them through the registry (experiments.registry.rebuild) from the metrics the study's runs stored.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from etils import epath


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
  return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
      "| " + " | ".join(r) + " |" for r in rows]


def write_markdown(root: epath.Path, lines: Sequence[str]) -> epath.Path:
  """Writes a study's report.md from its lines; returns its path."""
  path = root / "report.md"
  path.write_text("\n".join(lines))
  return path


def floor_of(summary: dict, task: str, digits: int = 3) -> str:
  """A task's floor from summary["floors"] (what trivial baselines score on the scored examples,
  mtjax.experiments.floors), or "-" where none is defined or stored."""
  value = (summary.get("floors") or {}).get(task, {}).get("floor")
  return "-" if value is None else f"{value:.{digits}f}"


def mean_std(values: Sequence[float], digits: int = 3) -> str:
  v = np.asarray(values, np.float64)
  return f"{v.mean():.{digits}f} ± {v.std():.{digits}f}"


class _Figures:
  """pyplot's `subplots` on bare Figures: the global backend stays as it was (a notebook keeps its
  inline plots), no display is needed, and nothing has to be closed."""

  @staticmethod
  def subplots(nrows: int = 1, ncols: int = 1, *, figsize=None, dpi=None, squeeze: bool = True,
               **kwargs):
    from matplotlib.figure import Figure
    fig = Figure(figsize=figsize, dpi=dpi)
    return fig, fig.subplots(nrows, ncols, squeeze=squeeze, **kwargs)


def pyplot() -> type[_Figures]:
  return _Figures


def save_figure(fig, path: epath.Path) -> epath.Path:
  """Writes `fig` as a PNG (local path or gs://)."""
  fig.tight_layout()
  with path.open("wb") as f:
    fig.savefig(f, format="png")
  return path
