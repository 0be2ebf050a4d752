"""The studies `mtjax experiment <name>` runs and `mtjax report DIR` rebuilds, by name.

Dependencies go one way: this registry -> the study modules -> their shared helpers (arms, runs,
report); nothing below imports this module.
"""

from __future__ import annotations

from etils import epath

from mtjax.errors import BadInputError
from mtjax.experiments import arms, decomposition, efficiency, entropy, instructions, transfer

STUDIES: dict[str, arms.Study] = {m.STUDY.name: m.STUDY for m in (
    efficiency, transfer, entropy, decomposition, instructions)}


def rebuild(workdir: str) -> epath.Path:
  """Recomputes a study's summary.json, report.md and plots from its runs' stored metrics (no
  training; study.json says which study and with which settings). Returns report.md's path."""
  root = epath.Path(workdir)
  name, config = arms.read_study_json(root)
  if name not in STUDIES:
    raise BadInputError(str(root / "study.json"),
                        f"unknown study {name!r} (known: {', '.join(STUDIES)})")
  return STUDIES[name].rebuild(root, config)
