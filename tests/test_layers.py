"""The package layers of DESIGN.md hold, for every import in mtjax/ (module level AND inside
functions, read from the AST): a package imports only packages of its own layer or below, and the
package graph has no cycle (so same-layer imports go one way)."""

import ast
import graphlib
import pathlib

from conftest import REPO

# DESIGN.md's layer table, with the top-level modules it leaves unnamed placed by what they are.
LAYERS = {
    "errors": 0, "config": 0, "tree": 0, "monitoring": 0, "wheels": 0,
    "parallel": 1, "tasks": 1,
    "model": 2, "data": 2,
    "train": 3, "resolve": 3, "perf": 3,
    "eval": 4, "rl": 4,
    "recipes": 5, "check": 5,
    "experiments": 6,
    "cli": 7, "loading": 7, "bench": 7, "jobset": 7, "colab": 7, "torch_reference": 7,
    "__init__": 7, "__main__": 7,
}
PACKAGE = REPO / "mtjax"


def unit(module: str) -> str:
  """The layer unit of a dotted module name under mtjax: its package or top-level module."""
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else "__init__"


def unit_of(path: pathlib.Path, package: pathlib.Path) -> str:
  rel = path.relative_to(package)
  return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imports(path: pathlib.Path) -> list[tuple[int, str]]:
  """(line, imported mtjax module) of every import statement in a file, wherever it stands."""
  out = []
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      out += [(node.lineno, a.name) for a in node.names if a.name.startswith("mtjax.")]
    elif isinstance(node, ast.ImportFrom):
      assert node.level == 0, f"{path}:{node.lineno}: a relative import (use mtjax.<...>)"
      if node.module == "mtjax":  # `from mtjax import tasks`: each name is a unit
        out += [(node.lineno, f"mtjax.{a.name}") for a in node.names]
      elif node.module and node.module.startswith("mtjax."):
        out.append((node.lineno, node.module))
  return out


def edges(package: pathlib.Path = PACKAGE) -> dict[tuple[str, str], list[str]]:
  """(importing unit, imported unit) -> where, over every .py file of the package."""
  found: dict[tuple[str, str], list[str]] = {}
  for path in sorted(package.rglob("*.py")):
    here = unit_of(path, package)
    for line, target in imports(path):
      there = unit(target)
      if there != here:
        found.setdefault((here, there), []).append(f"{path.relative_to(package.parent)}:{line}")
  return found


def test_every_unit_has_a_layer():
  units = {p.stem if p.parent == PACKAGE and p.suffix == ".py" else p.name
           for p in PACKAGE.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
  assert units - set(LAYERS) == set(), "a new package or module: give it a layer in LAYERS"


def test_no_import_points_up_a_layer():
  up = {f"{a} (layer {LAYERS[a]}) -> {b} (layer {LAYERS[b]}): {', '.join(where)}"
        for (a, b), where in edges().items() if LAYERS[b] > LAYERS[a]}
  assert not up, "imports that point up a layer:\n" + "\n".join(sorted(up))


def test_the_package_graph_has_no_cycle():
  graph: dict[str, set[str]] = {}
  for a, b in edges():
    graph.setdefault(a, set()).add(b)
  graphlib.TopologicalSorter(graph).prepare()  # raises CycleError naming the cycle


def test_a_lazy_upward_import_is_caught(tmp_path):
  """The check reads imports inside functions too: a copy of the package where a train module
  imports eval inside a function is reported."""
  import shutil
  copy = tmp_path / "mtjax"
  shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
  loop = copy / "train" / "loop.py"
  loop.write_text(loop.read_text() + "\n\ndef _sneaky():\n  from mtjax.eval import evaluate\n")
  assert ("train", "eval") not in edges()
  assert edges(copy)[("train", "eval")] == [f"mtjax/train/loop.py:{len(loop.read_text().splitlines())}"]
