"""Tasks as data: build a task from a spec, describe a registered task as one, and rebuild a run's
tasks from the record it keeps (workdir/tasks.json).

A run whose tasks were defined in a config file (`data.jsonl_tasks`, or `tasks.register(...)` in
Python) must stay usable after that file moves: eval, report, resume and export rebuild its tasks
from tasks.json. A task whose source or scorer exists only as Python code (a generator, a
preprocess function, a scorer without a registered name) cannot be rebuilt from data: then
`mtjax eval --config FILE` imports the file that defines it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

from etils import epath

from mtjax import tasks as registry
from mtjax.config import JsonlTaskConfig
from mtjax.errors import BadInputError
from mtjax.tasks import scoring
from mtjax.tasks.sources import ArrayRecordSource, Fields, JsonlSource

RECORD = "tasks.json"


def _paths(value: str | tuple[str, ...]) -> tuple[str, ...]:
  return (value,) if isinstance(value, str) else tuple(value)


def absolute(path: str) -> str:
  """A local path made absolute (the run may be resumed from another directory); URLs as given."""
  return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def normalized(spec: JsonlTaskConfig) -> JsonlTaskConfig:
  """The spec with its file lists as tuples of absolute paths (what config.json records)."""
  return dataclasses.replace(spec, train=tuple(absolute(p) for p in _paths(spec.train)),
                             validation=tuple(absolute(p) for p in _paths(spec.validation)))


def jsonl_task(name: str, spec: JsonlTaskConfig) -> registry.Task:
  """The task `data.jsonl_tasks.<name>` describes (not registered)."""
  files = {split: _paths(getattr(spec, split)) for split in ("train", "validation")}
  files = {split: paths for split, paths in files.items() if paths}
  try:
    scorer = scoring.get_scorer(spec.scorer)
  except KeyError as e:
    raise BadInputError(f"data.jsonl_tasks.{name}.scorer", str(e.args[0])) from None
  fields = Fields(prompt=spec.prompt_field, target=spec.target_field,
                  instruction_field=spec.instruction_field, instruction=spec.instruction)
  return registry.Task(name, JsonlSource(files, fields), scorer, scorer=spec.scorer,
                       eval_only=spec.eval_only)


def register_jsonl_tasks(specs: dict[str, JsonlTaskConfig] | Any) -> None:
  """Registers data.jsonl_tasks (a re-registration replaces the earlier one); a name that is a
  built-in task's is refused (it would silently replace `reverse`, or a benchmark's eval-only
  flag)."""
  for name, spec in specs.items():
    if name in registry.BUILTIN_TASKS:
      raise BadInputError(f"data.jsonl_tasks.{name}", f"{name!r} is the name of a built-in task; "
                          "give your task another name")
    registry.register(jsonl_task(name, spec), replace=True)


# ----------------------------------------------------------------------------- the record


def describe(task: registry.Task) -> dict[str, Any]:
  """A task as data: {"kind": "builtin"} for mtjax's own tasks, else its source, fields and
  scorer name, with "rebuildable": false and the reason when code is needed to rebuild it, and
  the config files that registered the task ("defined_in") and its scorer ("scorer_defined_in")."""
  if registry.BUILTIN_TASKS.get(task.name) is task:
    return {"kind": "builtin"}
  scorer = task.scorer or scoring.name_of(task.is_correct)
  out: dict[str, Any] = {"scorer": scorer, "eval_only": task.eval_only,
                         "open_ended": task.open_ended, "metrics": list(task.metrics)}
  source = task.source
  reasons = []
  if isinstance(source, (JsonlSource, ArrayRecordSource)):
    out["kind"] = "jsonl" if isinstance(source, JsonlSource) else "array_record"
    out["files"] = {split: [absolute(p) for p in paths] for split, paths in source.files.items()}
    out["fingerprints"] = {absolute(p): _fingerprint(p) for paths in source.files.values()
                           for p in paths}
    out["fields"] = dataclasses.asdict(source.fields)
  else:
    out["kind"] = type(source).__name__
    reasons.append(f"its source is a {type(source).__name__} (Python code)")
  if task.preprocess is not None:
    reasons.append("it has a Python preprocess function")
  if not scorer:
    reasons.append("its scorer is a Python function without a registered name "
                   "(mtjax.tasks.scoring.register_scorer)")
  out["rebuildable"] = not reasons
  if reasons:
    out["why_not"] = "; ".join(reasons)
  if registry.defined_in(task.name):
    out["defined_in"] = registry.defined_in(task.name)
  if scorer and scoring.defined_in(scorer):
    out["scorer_defined_in"] = scoring.defined_in(scorer)
  return out


def _fingerprint(path: str) -> dict[str, Any]:
  """A data file's size and sha256 (read in 1 MiB blocks), so a resume can say it changed."""
  file = epath.Path(path)
  if not file.exists():
    return {}
  digest, size = hashlib.sha256(), 0
  with file.open("rb") as f:
    while block := f.read(1 << 20):
      digest.update(block)
      size += len(block)
  return {"bytes": size, "sha256": digest.hexdigest()}


def changed_files(old_record: str, new_record: str) -> list[str]:
  """The data files whose size or sha256 differ between two tasks.json texts (a resume after the
  data changed: its loader positions now index other examples)."""
  try:
    old = json.loads(old_record)
  except ValueError:
    return []
  new = json.loads(new_record)
  changed = []
  for name, entry in new.items():
    before = (old.get(name) or {}).get("fingerprints") or {} if isinstance(old, dict) else {}
    for path, now in (entry.get("fingerprints") or {}).items():
      if path in before and before[path] and before[path] != now:
        changed.append(f"{path} ({before[path].get('bytes')} -> {now.get('bytes')} bytes)")
  return changed


def record_text(names: Iterable[str]) -> str:
  """The text of a run's tasks.json: every named task, described (the trainer writes it beside
  the run's config.json)."""
  record = {name: describe(registry.get(name)) for name in dict.fromkeys(names)}
  return json.dumps(record, indent=2, sort_keys=True) + "\n"


def write_record(workdir: epath.Path, names: Iterable[str]) -> None:
  """workdir/tasks.json (record_text)."""
  (workdir / RECORD).write_text(record_text(names))


def _rebuild(name: str, entry: dict[str, Any]) -> registry.Task:
  fields = Fields(**entry["fields"])
  files = {split: tuple(paths) for split, paths in entry["files"].items()}
  source = JsonlSource(files, fields) if entry["kind"] == "jsonl" else ArrayRecordSource(files, fields)
  scorer = scoring.get_scorer(entry["scorer"])
  return registry.Task(name, source, scorer, open_ended=bool(entry.get("open_ended")),
                       metrics=tuple(entry.get("metrics", ("exact_match",))),
                       eval_only=bool(entry.get("eval_only")), scorer=entry["scorer"])


HINT = ("pass --config FILE (the config file that defines it: its task and scorer registrations "
        "are used, the run's recorded config is kept)")


def rebuild(workdir: epath.Path, names: Iterable[str],
            jsonl_tasks: Mapping[str, JsonlTaskConfig] | None = None) -> None:
  """Makes the run's tasks (and their scorers) available here, from workdir/tasks.json: a task
  described as data is rebuilt. One that needs code, or a scorer a config file registered, must
  already be registered (by `--config FILE` on the command line): a run directory is data, and
  the files its record names are never imported (sharing a run must never run code), only named
  in the BadInputError that says which --config to pass."""
  jsonl_tasks = jsonl_tasks or {}
  names = list(dict.fromkeys(names))
  path = workdir / RECORD
  record: dict[str, Any] = {}
  if path.exists():
    try:
      record = json.loads(path.read_text())
    except ValueError as e:
      raise BadInputError(str(path), f"is not valid JSON ({e})") from None

  def scorer_of(name: str) -> str:
    return jsonl_tasks[name].scorer if name in jsonl_tasks else record.get(name, {}).get("scorer", "")

  def missing(name: str) -> tuple[bool, bool]:  # (the task, its scorer)
    task = name not in jsonl_tasks and name not in registry.names()
    scorer = scorer_of(name)
    return task, bool(scorer) and scorer not in scoring.scorer_names()

  for name in names:
    task_missing, scorer_missing = missing(name)
    if not task_missing and not scorer_missing:
      continue
    entry = record.get(name)
    recorded = (entry or {}).get("scorer_defined_in" if scorer_missing else "defined_in", "")
    why = ""
    if recorded:  # named, never imported: the record is data someone else may have written
      why = (f" (recorded as defined in {recorded}, not imported from the run directory)"
             if os.path.isfile(recorded) else f" ({recorded}, which defined it, is gone)")
    hint = f"pass --config {recorded}" if recorded and os.path.isfile(recorded) else HINT
    if scorer_missing:
      raise BadInputError("data.tasks", f"task {name!r} is scored by {scorer_of(name)!r}, a "
                          f"scorer registered by a config file{why}; {hint}")
    if entry is None:
      raise BadInputError("data.tasks", f"task {name!r} of this run is not registered and "
                          f"{path} does not describe it (a run written before tasks.json); {HINT}")
    if not entry.get("rebuildable"):
      raise BadInputError("data.tasks", f"task {name!r} cannot be rebuilt from {path}: "
                          f"{entry.get('why_not', 'it needs code')}{why}; {hint}")
    try:
      registry.register(_rebuild(name, entry), replace=True)
    except (KeyError, TypeError) as e:
      raise BadInputError(str(path), f"entry {name!r} is malformed ({e})") from None
