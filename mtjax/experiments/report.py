"""The one report renderer of the studies: a study declares its report as blocks (headings,
paragraphs, tables, bullet lists, figures, its verdict), and this module writes report.md and draws
the figures; the README's findings blocks are cut from the same blocks (`brief`). No study writes
markdown syntax or saves a figure itself.

    doc = Report("Efficiency study: multi-task vs task-specific")
    doc.text("Tasks: ...")
    doc.table(["task", "metric", ...], rows)       # rows of cell strings
    doc.verdict(f"**Verdict: {decided}** ({why}).")
    doc.figure("efficiency_curves.png", lambda: _figure(summary), alt="eval curves")
    write(root, doc)                               # report.md and efficiency_curves.png

`mtjax report DIR` rebuilds them through the registry (experiments.registry.rebuild) from the
metrics the study's runs stored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath


@dataclasses.dataclass(frozen=True)
class Block:
  kind: str  # heading | text | table | bullets | figure | verdict
  lines: tuple[str, ...]  # its markdown
  name: str = ""  # figure: the file
  draw: Callable[[], Any] | None = None  # figure: -> a matplotlib Figure


@dataclasses.dataclass
class Report:
  """A study's report: a title and its blocks, in order."""

  title: str
  blocks: list[Block] = dataclasses.field(default_factory=list)

  def heading(self, text: str, level: int = 2) -> None:
    self.blocks.append(Block("heading", ("#" * level + " " + text,)))

  def text(self, text: str) -> None:
    """A paragraph."""
    self.blocks.append(Block("text", (text,)))

  def table(self, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    self.blocks.append(Block("table", tuple(md_table(header, rows))))

  def bullets(self, items: Sequence[str]) -> None:
    self.blocks.append(Block("bullets", tuple(f"- {item}" for item in items)))

  def verdict(self, text: str) -> None:
    """The study's verdict line (the README's brief keeps it)."""
    self.blocks.append(Block("verdict", (text,)))

  def figure(self, name: str, draw: Callable[[], Any], alt: str = "") -> None:
    """A figure drawn by `draw()` (a matplotlib Figure from `figure()`), saved as `name`."""
    self.blocks.append(Block("figure", (f"![{alt or name.rsplit('.', 1)[0]}]({name})",), name, draw))

  def markdown(self, *, title: bool = True) -> str:
    lines = [f"# {self.title}", ""] if title else []
    for block in self.blocks:
      lines += [*block.lines, ""]
    return "\n".join(lines)


def write(root: epath.Path, report: Report) -> epath.Path:
  """Draws the report's figures into `root` and writes root/report.md; returns its path."""
  for block in report.blocks:
    if block.kind == "figure":
      assert block.draw is not None
      save_figure(block.draw(), root / block.name)
  path = root / "report.md"
  path.write_text(report.markdown())
  return path


def brief(report: Report) -> str:
  """A report's first and last tables and its verdict line (the README's short form)."""
  tables = [b for b in report.blocks if b.kind == "table"]
  verdicts = [b for b in report.blocks if b.kind == "verdict"]
  lines: list[str] = []
  for table in tables[:1] + tables[1:][-1:]:
    lines += [*table.lines, ""]
  return "\n".join(lines + [line for b in verdicts[:1] for line in b.lines])


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
  return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
      "| " + " | ".join(r) + " |" for r in rows]


def floor_of(summary: dict, task: str, digits: int = 3) -> str:
  """A task's floor from summary["floors"] (what trivial baselines score on the scored examples,
  mtjax.experiments.floors), or "-" where none is defined or stored."""
  value = (summary.get("floors") or {}).get(task, {}).get("floor")
  return "-" if value is None else f"{value:.{digits}f}"


def true_entropies(summary: Mapping[str, Any]) -> dict[str, float]:
  """Each task's true entropy (nats per scored token) as the run recorded it in summary["floors"]
  (mtjax.experiments.floors.entropy_truth; older records: none)."""
  return {t: float(e["true_entropy"]) for t, e in (summary.get("floors") or {}).items()
          if isinstance(e, Mapping) and e.get("true_entropy") is not None}


def baselines_section(report: Report, summary: dict) -> None:
  """Every trivial baseline's score per task (the floor is their maximum), when the summary
  stores them (studies run before the baseline family was recorded show the floor only)."""
  table = {t: r for t, r in (summary.get("floors") or {}).items() if r.get("baselines")}
  if not table:
    return
  family = {r.get("floor_family", "all") for r in table.values()}
  report.heading("Floors: every trivial baseline")
  report.text("Each task's floor is the best of these baselines on the scored held-out examples "
              f"(mtjax.experiments.floors; family: {', '.join(sorted(family))}). A target must lie "
              "above it: a score a trivial rule reaches shows no skill.")
  for task, r in table.items():
    rows = sorted(r["baselines"].items(), key=lambda kv: -kv[1])
    report.table([f"{task}: baseline", r["metric"]],
                 [[name, f"{score:.3f}" + (" (floor)" if score == r["floor"] else "")]
                  for name, score in rows])


def mean_std(values: Sequence[float], digits: int = 3) -> str:
  v = np.asarray(values, np.float64)
  return f"{v.mean():.{digits}f} ± {v.std():.{digits}f}"


def figure(nrows: int = 1, ncols: int = 1, *, figsize=None, dpi=None, squeeze: bool = True,
           **kwargs) -> tuple[Any, Any]:
  """(a bare matplotlib Figure, its axes), as pyplot.subplots: the global backend stays as it was
  (a notebook keeps its inline plots), no display is needed, and nothing has to be closed."""
  from matplotlib.figure import Figure
  fig = Figure(figsize=figsize, dpi=dpi)
  return fig, fig.subplots(nrows, ncols, squeeze=squeeze, **kwargs)


def save_figure(fig: Any, path: epath.Path) -> epath.Path:
  """Writes `fig` as a PNG (local path or gs://)."""
  fig.tight_layout()
  with path.open("wb") as f:
    fig.savefig(f, format="png")
  return path
