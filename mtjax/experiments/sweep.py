"""Sweeps: a config's `get_sweep()` returns dotted-key override dicts (big_vision style).

`mtjax sweep --config X --workdir DIR` trains the variants one after another into DIR/<variant>,
skipping variants already complete (a DONE marker holding the variant, written after it finished:
experiments.runs; an interrupted variant resumes from its own checkpoints; a preempted one stops
the sweep, exit code 3), then aggregates DIR/results.{csv,md}:
final metrics per variant, and mean and spread over seeds for variants that differ only in seed.
`--print` prints one `mtjax train` command per variant instead, for a cluster.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from mtjax import config as config_lib
from mtjax.errors import BadInputError
from mtjax.experiments import runs


def load_sweep(path: str) -> list[dict[str, Any]]:
  """The variants of get_sweep(): any iterable (a list, a generator) of dicts of dotted overrides."""
  module, arg = config_lib.import_config_module(path)
  file = str(path).partition(":")[0]
  if not hasattr(module, "get_sweep"):
    raise BadInputError(file, "expected a function get_sweep() for a sweep")
  expected = "expected a non-empty list of dicts of dotted overrides ({'a.b': value, ...})"
  try:
    returned = module.get_sweep(arg) if arg else module.get_sweep()
    if isinstance(returned, (str, bytes, Mapping)) or not isinstance(returned, Iterable):
      raise BadInputError("get_sweep()", f"{expected}, got {type(returned).__name__}")
    variants = list(returned)  # a generator or tuple is listed once
  except BadInputError:
    raise
  except Exception as e:  # a user's function: report it in one line, whatever it raised
    raise BadInputError(path, f"get_sweep({arg!r}) failed ({type(e).__name__}: {e})") from None
  if not variants:
    raise BadInputError("get_sweep()", f"{expected}, got none")
  for i, v in enumerate(variants):
    if not isinstance(v, Mapping) or not all(isinstance(k, str) and k for k in v):
      raise BadInputError(f"get_sweep()[{i}]", f"{expected}, got {v!r}")
  return [dict(v) for v in variants]


def variant_name(index: int, overrides: dict[str, Any]) -> str:
  parts = [f"{k.split('.')[-1]}={v}" for k, v in overrides.items()]
  slug = re.sub(r"[^A-Za-z0-9=._-]+", "-", "_".join(parts))[:80].strip("-_")
  return f"{index:03d}_{slug}" if slug else f"{index:03d}"


def _config_for(base: config_lib.Config, index: int, overrides: dict[str, Any]) -> config_lib.Config:
  try:
    return base.replace(**overrides)
  except BadInputError as e:
    raise BadInputError(f"get_sweep()[{index}]", str(e)) from None
  except (KeyError, TypeError, AttributeError) as e:
    raise BadInputError(f"get_sweep()[{index}]", f"override {e} does not name a config field") from None


def launch_commands(path: str, workdir: str, overrides: Sequence[str] = ()) -> list[str]:
  commands = []
  for i, variant in enumerate(load_sweep(path)):
    args = ["mtjax", "train", "--config", path, "--workdir",
            str(epath.Path(workdir) / variant_name(i, variant)), *overrides]
    args += [f"--config.{k}={v if isinstance(v, str) else repr(v)}" for k, v in variant.items()]
    commands.append(shlex.join(args))
  return commands


def run_sweep(path: str, workdir: str, overrides: Sequence[str] = (), train_fn=None) -> dict[str, Any]:
  """Runs every variant not yet complete; returns {"ran": [...], "skipped": [...], "table": path}.

  Raises runs.Preempted when a variant was stopped by a preemption signal (not marked DONE).
  """
  from mtjax import recipes
  train_fn = train_fn or recipes.run
  root = epath.Path(workdir)
  base = config_lib.load(path, overrides)
  variants = load_sweep(path)
  configs = [_config_for(base, i, v) for i, v in enumerate(variants)]  # validate all first
  ran, skipped = [], []
  for i, (variant, cfg) in enumerate(zip(variants, configs)):
    vdir = root / variant_name(i, variant)
    trained = runs.run_once(vdir, cfg, train_fn, payload=json.dumps(variant, sort_keys=True) + "\n",
                            announce=f"sweep variant {i + 1}/{len(variants)}: {vdir.name}")
    (ran if trained else skipped).append(vdir.name)
  csv_path = aggregate(root, variants)
  return {"ran": ran, "skipped": skipped, "table": str(csv_path)}


def _final_metrics(vdir: epath.Path) -> dict[str, float]:
  out: dict[str, float] = {}
  for row in runs.rows(vdir):
    for k, v in row.items():
      if (k.startswith("eval/") or k == "train/loss" or
          (k.startswith("train/") and k.endswith("/loss"))) and isinstance(v, (int, float)):
        out[k] = float(v)  # the last value logged wins
  return out


def aggregate(workdir: epath.Path, variants: Sequence[dict[str, Any]]) -> epath.Path:
  """results.csv (one row per finished variant) and results.md (mean ± std over seeds)."""
  rows = []
  for i, variant in enumerate(variants):
    vdir = workdir / variant_name(i, variant)
    if runs.is_done(vdir):
      rows.append((variant, _final_metrics(vdir)))
  keys = sorted({k for _, m in rows for k in m})
  settings = sorted({k for v, _ in rows for k in v})
  buf = io.StringIO()
  writer = csv.writer(buf)
  writer.writerow(["variant", *settings, *keys])
  for variant, metrics in rows:
    writer.writerow([variant_name(variants.index(variant), variant),
                     *[variant.get(s, "") for s in settings], *[metrics.get(k, "") for k in keys]])
  csv_path = workdir / "results.csv"
  csv_path.write_text(buf.getvalue())

  groups: dict[str, list[dict[str, float]]] = {}
  for variant, metrics in rows:
    key = json.dumps({k: v for k, v in variant.items() if k != "seed"}, sort_keys=True, default=str)
    groups.setdefault(key, []).append(metrics)
  lines = ["| setting | seeds | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
  for key, group in groups.items():
    cells = []
    for k in keys:
      vals = [m[k] for m in group if k in m]
      cells.append(f"{np.mean(vals):.4f} ± {np.std(vals):.4f}" if vals else "")
    lines.append(f"| `{key}` | {len(group)} | " + " | ".join(cells) + " |")
  (workdir / "results.md").write_text("\n".join(lines) + "\n")
  return csv_path
