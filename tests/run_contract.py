"""Checks a training workdir against DESIGN.md's contracts (in the repo, standard library only).

  python tests/run_contract.py WORKDIR     # prints each problem; exit 1 if any, 0 with a summary

`check(workdir)` returns the list of problems (empty: the run honours the contracts). It covers
what ../shared/tools/check_run.py checks and the rest of the written contract:

- config.json: JSON with the config tree every config shares (seed, model.*, mesh.*, data.*,
  train.*, optimizer.*, checkpoint.*, eval.*), task names without "/".
- env.json: JSON with versions (packages.jax), devices (device_count, device_kind), XLA flags.
- metrics.jsonl: one JSON object a line, each with `step`; rows with `train/loss` are train rows:
  steps strictly increasing; every train row has, for every task of data.tasks,
  train/<task>/{tokens,weight} and data/<task>/{rate,truncated,skipped}, and
  train/<task>/{loss,entropy,accuracy} exactly when train/<task>/tokens > 0 (the log window's
  token-weighted means: a task without tokens in the window has none, never a fake 0.0),
  and data/packing_efficiency, perf/{step_time_s,tokens_per_s,compiles}, train/skipped_steps;
  values in range (rates sum to 1, efficiency and accuracy in [0, 1], counts >= 0);
  perf/compiles == 1 (one train-step compilation per process, also after a resume); a NaN only
  on a row whose train/skipped_steps went up.
- checkpoints/ with at least one step directory; TensorBoard events; PNG plots.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys

CONFIG_TREE = {
    "": ("seed",),
    "model": ("d_model", "num_layers", "num_heads", "num_kv_heads", "mlp_dim", "dtype", "remat"),
    "mesh": ("data", "fsdp", "tensor"),
    "data": ("tasks", "mixture", "schedule", "batch_size", "seq_len"),
    "train": ("steps", "log_every", "loss_weights", "entropy_coefs"),
    "optimizer": ("lr", "warmup_steps", "weight_decay", "clip_norm", "grad_accum"),
    "checkpoint": ("every", "keep"),
    "eval": ("every", "tasks"),
}
PER_TASK_TRAIN = ("loss", "entropy", "accuracy", "tokens", "weight")
PER_TASK_MEANS = ("loss", "entropy", "accuracy")  # present only when the window had tokens
PER_TASK_DATA = ("rate", "truncated", "skipped")
PER_ROW = ("step", "train/loss", "data/packing_efficiency", "perf/step_time_s",
           "perf/tokens_per_s", "perf/compiles", "train/skipped_steps")


def _json(path: pathlib.Path, problems: list[str]):
  if not path.is_file():
    problems.append(f"{path.name} missing")
    return None
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    problems.append(f"{path.name}: not JSON ({e})")
    return None


def _number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_config(config, problems: list[str]) -> list[str]:
  """The config tree's shared names; returns data.tasks (empty if unknown)."""
  if config is None:  # missing or not JSON: already reported
    return []
  if not isinstance(config, dict):
    problems.append("config.json: not a JSON object")
    return []
  for section, names in CONFIG_TREE.items():
    node = config if not section else config.get(section)
    if not isinstance(node, dict):
      problems.append(f"config.json: section {section!r} missing")
      continue
    for name in names:
      if name not in node:
        problems.append(f"config.json: {section + '.' if section else ''}{name} missing")
  tasks = (config.get("data") or {}).get("tasks") or []
  if not isinstance(tasks, list) or not tasks:
    problems.append("config.json: data.tasks is not a non-empty list")
    return []
  for t in tasks:
    if not isinstance(t, str) or "/" in t:
      problems.append(f"config.json: bad task name {t!r} (a string without '/')")
  return [t for t in tasks if isinstance(t, str)]


def _check_env(env, problems: list[str]) -> None:
  if env is None:
    return
  if not isinstance(env, dict):
    problems.append("env.json: not a JSON object")
    return
  if not (env.get("packages") or {}).get("jax"):
    problems.append("env.json: packages.jax (versions) missing")
  if not isinstance(env.get("device_count"), int) or env["device_count"] < 1:
    problems.append("env.json: device_count missing or < 1")
  if not env.get("device_kind"):
    problems.append("env.json: device_kind missing")
  if not isinstance(env.get("xla_flags"), str):
    problems.append("env.json: xla_flags missing")


def _check_train_row(r: dict, tasks: list[str], problems: list[str]) -> None:
  where = f"metrics.jsonl step {r.get('step')}"
  keys = list(PER_ROW)
  for t in tasks:
    tokens = r.get(f"train/{t}/tokens")
    means = [f"train/{t}/{k}" for k in PER_TASK_MEANS]
    if _number(tokens) and tokens == 0:  # no tokens in the window: no means, never a fake 0.0
      present = [k for k in means if k in r]
      if present:
        problems.append(f"{where}: {', '.join(present)} logged for a window without tokens")
      means = []
    keys += means + [f"train/{t}/{k}" for k in PER_TASK_TRAIN if k not in PER_TASK_MEANS]
    keys += [f"data/{t}/{k}" for k in PER_TASK_DATA]
  missing = [k for k in keys if k not in r]
  if missing:
    problems.append(f"{where}: missing {', '.join(missing)}")
  bad = [k for k in keys if k in r and not _number(r[k])]
  if bad:
    problems.append(f"{where}: not numbers: {', '.join(bad)}")

  def val(k) -> float | None:
    v = r.get(k)
    if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v):
      return v
    return None

  def in_range(k, lo, hi, lo_open=False):
    v = val(k)
    if v is not None and not ((lo < v if lo_open else lo <= v) and v <= hi):
      problems.append(f"{where}: {k} = {v} outside {'(' if lo_open else '['}{lo}, {hi}]")

  in_range("data/packing_efficiency", 0, 1, lo_open=True)
  in_range("perf/step_time_s", 0, math.inf, lo_open=True)
  in_range("perf/tokens_per_s", 0, math.inf, lo_open=True)
  in_range("train/skipped_steps", 0, math.inf)
  if val("perf/compiles") is not None and r["perf/compiles"] != 1:
    problems.append(f"{where}: perf/compiles = {r['perf/compiles']} (contract: 1 per process)")
  for t in tasks:
    in_range(f"train/{t}/accuracy", 0, 1)
    in_range(f"train/{t}/entropy", 0, math.inf)
    in_range(f"train/{t}/loss", 0, math.inf)
    in_range(f"train/{t}/tokens", 0, math.inf)
    in_range(f"data/{t}/rate", 0, 1)
    in_range(f"data/{t}/truncated", 0, math.inf)
    in_range(f"data/{t}/skipped", 0, math.inf)
  rates = [v for v in (val(f"data/{t}/rate") for t in tasks) if v is not None]
  if tasks and len(rates) == len(tasks) and abs(sum(rates) - 1) > 1e-6:
    problems.append(f"{where}: data/<task>/rate sum to {sum(rates)}, not 1")


def check(workdir) -> list[str]:
  run = pathlib.Path(workdir)
  problems: list[str] = []
  if not run.is_dir():
    return [f"{run}: not a directory"]
  tasks = _check_config(_json(run / "config.json", problems), problems)
  _check_env(_json(run / "env.json", problems), problems)

  rows = []
  metrics = run / "metrics.jsonl"
  if not metrics.is_file():
    problems.append("metrics.jsonl missing")
  else:
    for n, line in enumerate(metrics.read_text().splitlines(), 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        problems.append(f"metrics.jsonl:{n}: not JSON ({e})")
        continue
      if not isinstance(row, dict) or not isinstance(row.get("step"), int):
        problems.append(f"metrics.jsonl:{n}: not an object with an integer 'step'")
        continue
      rows.append(row)
  train = [r for r in rows if "train/loss" in r]
  if metrics.is_file() and not train:
    problems.append("metrics.jsonl: no row with train/loss")
  logged = sorted({k.split("/")[1] for r in train for k in r
                   if k.startswith("train/") and k.count("/") == 2})
  steps = [r["step"] for r in train]
  if any(b <= a for a, b in zip(steps, steps[1:])):
    problems.append(f"metrics.jsonl: train steps not strictly increasing: {steps}")
  skipped_before = 0
  for r in train:
    _check_train_row(r, tasks or logged, problems)
    skipped = r.get("train/skipped_steps", 0)
    nans = [k for k, v in r.items() if isinstance(v, float) and math.isnan(v)]
    if nans and not (_number(skipped) and skipped > skipped_before):
      problems.append(f"metrics.jsonl step {r['step']}: NaN in {nans[:3]} with no skipped step counted")
    skipped_before = skipped if _number(skipped) else skipped_before

  ckpt = run / "checkpoints"
  if not ckpt.is_dir():
    problems.append("checkpoints/ missing")
  elif not [p for p in ckpt.iterdir() if p.is_dir() and p.name.isdigit()]:
    problems.append("checkpoints/: no step directory")
  if not list(run.rglob("events.out.tfevents*")):
    problems.append("no TensorBoard events")
  if not list(run.rglob("*.png")):
    problems.append("no PNG plots")
  return problems


def main(argv: list[str]) -> int:
  if len(argv) != 1:
    print(__doc__)
    return 2
  problems = check(argv[0])
  for p in problems:
    print(p)
  if not problems:
    print(f"ok: {argv[0]} honours the run contracts")
  return 1 if problems else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
