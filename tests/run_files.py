"""Reading a run directory in tests: its metric rows and its checkpoints."""

import json


def rows(workdir):
  """metrics.jsonl's rows (none if it does not exist yet)."""
  path = workdir / "metrics.jsonl"
  return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []


def checkpoints(workdir):
  """(committed steps, names of anything else: unfinished saves) in workdir/checkpoints."""
  directory = workdir / "checkpoints"
  names = [p.name for p in directory.iterdir()] if directory.exists() else []
  return sorted(int(n) for n in names if n.isdigit()), sorted(n for n in names if not n.isdigit())
