"""Every Colab notebook runs top to bottom (nbclient) at smoke size on the CPU, and shows what its
text says it shows: the numbers it prints agree with what the run wrote to its workdir."""

import ast
import json
import math
import re

import nbformat
import pytest
from nbclient import NotebookClient

import run_contract
from conftest import REPO

NOTEBOOKS = sorted((REPO / "colab").glob("*.ipynb"))
VERDICTS = ("more efficient", "less efficient", "inconclusive")
# mtjax.train.metrics and mtjax.experiments.report call matplotlib.use("Agg") to write PNGs, which
# switches a notebook's inline backend off: a later plt.show() displays nothing.


def _cell(notebook, snippet):
  """The first code cell whose source contains snippet."""
  cells = [c for c in notebook.cells if c.cell_type == "code" and snippet in c.source]
  assert cells, f"no code cell contains {snippet!r}"
  return cells[0]


def _stdout(cell):
  return "".join(o.get("text", "") for o in cell.get("outputs", [])
                 if o.get("output_type") == "stream" and o.get("name") == "stdout")


def _data(cell, mime):
  """Every output of mime type (display_data or execute_result) of a cell."""
  return [o["data"][mime] for o in cell.get("outputs", [])
          if o.get("output_type") in ("display_data", "execute_result") and mime in o.get("data", {})]


def _floats(text):
  return [float(x) for x in re.findall(r"[-+]?(?:\d+\.\d*(?:e[-+]?\d+)?|nan|inf)", text)]


def _check_quickstart(notebook, work):
  out = _stdout(_cell(notebook, "train.run(cfg, workdir)"))
  compiles, final_step = map(int, re.search(r"compiles: (\d+) \| final step: (\d+)", out).groups())
  assert (compiles, final_step) == (1, 10)  # smoke: 10 steps, one compilation
  assert run_contract.check(work / "quickstart") == []
  rows = [json.loads(line) for line in (work / "quickstart" / "metrics.jsonl").read_text().splitlines()]
  last = [r for r in rows if "train/loss" in r][-1]
  assert last["step"] == 10
  plot = _cell(notebook, "plt.show()")
  printed = ast.literal_eval(_stdout(plot).strip().splitlines()[-1])  # the final per-task losses
  assert set(printed) == {"reverse", "addition", "grammar"}
  for task, loss in printed.items():
    assert math.isfinite(loss) and loss == round(last[f"train/{task}/loss"], 3), task
  assert _data(plot, "image/png")  # the per-task curves are shown inline


def _check_multitask_vs_single(notebook, work):
  summary = json.loads((work / "efficiency" / "summary.json").read_text())
  out = _stdout(_cell(notebook, "efficiency.run("))
  for seed in summary["seeds"]:
    assert f"study: seed{seed}/multi" in out
    for task in summary["tasks"]:
      assert f"study: seed{seed}/single_{task}" in out
  ratios, verdict = re.search(r"ratios per seed: (\[.*\]) \| verdict: (.+)", out).groups()
  assert verdict.strip() in VERDICTS and verdict.strip() == summary["verdict"]
  assert len(_floats(ratios)) == len(summary["seeds"])
  assert _floats(ratios) == pytest.approx(summary["ratios"], nan_ok=True)
  report = _cell(notebook, "report.md")
  (markdown,) = _data(report, "text/markdown")
  assert markdown.startswith("# Efficiency study")
  for task in summary["tasks"]:
    assert f"| {task} |" in markdown  # a table row per task
  assert len(_data(report, "image/png")) == 1


def _check_entropy_and_order(notebook, work):
  preview = _stdout(_cell(notebook, "preview(staged"))
  first, second = preview.split("steps 20-39")
  assert "steps 0-19" in first

  def shares(block):  # task -> (rate, examples)
    found = re.findall(r"^\s+(structured_copy|open_ended_grammar)\s+([\d.]+)\s+(\d+)", block, re.M)
    return {t: (float(rate), int(n)) for t, rate, n in found}

  assert shares(first) == {"structured_copy": (1.0, shares(first)["structured_copy"][1]),
                           "open_ended_grammar": (0.0, 0)}  # stage 1: structured tasks only
  assert shares(first)["structured_copy"][1] > 0
  assert {t: rate for t, (rate, _) in shares(second).items()} == {"structured_copy": 0.5,
                                                                  "open_ended_grammar": 0.5}
  assert all(n > 0 for _, n in shares(second).values())  # stage 2 from step 20: both tasks
  summary = json.loads((work / "entropy" / "summary.json").read_text())
  (shown,) = _data(_cell(notebook, "entropy.run("), "text/plain")
  joint = ast.literal_eval(shown)  # the cell's value: findings["joint"]
  assert joint == summary["findings"]["joint"]  # repr and JSON both round-trip floats exactly
  assert set(joint) == {"structured_copy", "open_ended_grammar"}
  for task, values in joint.items():
    assert set(values) == {"final_entropy", "retained", "final_distinct", "final_pass1"}, task
    assert 0 < values["final_entropy"] < math.inf
  report = _cell(notebook, "report.md")
  (markdown,) = _data(report, "text/markdown")
  assert markdown.startswith("# Entropy study")
  assert len(_data(report, "image/png")) == 1


CHECKS = {"quickstart": _check_quickstart, "multitask_vs_single": _check_multitask_vs_single,
          "entropy_and_order": _check_entropy_and_order}


def test_there_are_three_notebooks():
  assert {p.stem for p in NOTEBOOKS} == set(CHECKS)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, tmp_path, monkeypatch):
  monkeypatch.setenv("MTJAX_SMOKE", "1")
  monkeypatch.setenv("MTJAX_NOTEBOOK_DIR", str(tmp_path))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("XLA_FLAGS", "")  # one CPU device in the kernel, as on a Colab CPU runtime
  notebook = nbformat.read(path, as_version=4)
  NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
  errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors
  setup = _stdout(notebook.cells[1])
  assert re.fullmatch(r"1 cpu device\(s\); smoke=True\n", setup), setup  # the setup cell saw the flags
  CHECKS[path.stem](notebook, tmp_path)
