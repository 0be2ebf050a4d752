"""The studies `mtjax experiment <name>` runs and `mtjax report DIR` rebuilds, by name.

Dependencies go one way: this registry -> the study modules -> their shared helpers (arms, runs,
report); nothing below imports this module.
"""

from __future__ import annotations

import json

from etils import epath

from mtjax.errors import BadInputError
from mtjax.experiments import (arms, decomposition, efficiency, entropy, expert_composition,
                               fast_slow, instructions, rl_diversity, task_experts, transfer,
                               weighting)

STUDIES: dict[str, arms.Study] = {m.STUDY.name: m.STUDY for m in (
    efficiency, transfer, entropy, decomposition, instructions, weighting, rl_diversity,
    task_experts, expert_composition, fast_slow)}


def rebuild(workdir: str) -> epath.Path:
  """Recomputes a study's summary.json, report.md and plots from its runs' stored metrics (no
  training; study.json says which study and with which settings). Returns report.md's path."""
  root = epath.Path(workdir)
  _check_study_json(root)
  try:
    name, config = arms.read_study_json(root)
  except BadInputError as e:
    if e.field == str(root):  # not a study directory
      raise
    raise BadInputError(str(root / "study.json"), f"its config is not valid here ({e})") from None
  except (KeyError, TypeError, ValueError) as e:  # settings that name no config field
    raise BadInputError(str(root / "study.json"),
                        f"its settings are not valid here ({type(e).__name__}: {e})") from None
  if name not in STUDIES:
    raise BadInputError(str(root / "study.json"),
                        f"unknown study {name!r} (known: {', '.join(STUDIES)})")
  return STUDIES[name].rebuild(root, config)


def _check_study_json(root: epath.Path) -> None:
  """study.json is a JSON object with a study name and a config (as `mtjax experiment` writes it)."""
  path = root / "study.json"
  if root.exists() and not root.is_dir():
    raise BadInputError(str(root), "is a file, expected a study directory")
  if not path.exists():
    return  # arms.read_study_json says it is not a study directory
  if path.is_dir():
    raise BadInputError(str(path), "is a directory, expected a JSON file")
  try:
    stored = json.loads(path.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise BadInputError(str(path), f"is not valid JSON ({e})") from None
  if not isinstance(stored, dict):
    raise BadInputError(str(path), f"expected a JSON object, got {type(stored).__name__}")
  missing = [k for k in ("study", "config") if k not in stored]
  if missing:
    raise BadInputError(str(path), f"has no {' or '.join(repr(k) for k in missing)} (expected "
                        "{\"study\": name, \"config\": {...}} as `mtjax experiment` writes it)")
  if not isinstance(stored["study"], str):
    raise BadInputError(str(path), f"'study' is {stored['study']!r}, expected a study name")
  if not isinstance(stored["config"], dict):
    raise BadInputError(str(path), "'config' is not a JSON object of settings")
