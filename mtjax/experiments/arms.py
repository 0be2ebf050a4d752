"""What every study shares: the Study record, study-config checks, arm configs, trained-once arms,
reading an arm's stored metrics.

An arm is one training run of a study, in `<study workdir>/seed<S>/<arm name>`; it is marked DONE
only after it finished (experiments.runs), so an interrupted study reruns just the unfinished arms.
A study's workdir also holds study.json (which study, with which config), summary.json and
report.md with its plots; `mtjax report DIR` rebuilds the last three from the arms' metrics.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from etils import epath

from mtjax.config import Config
from mtjax.errors import BadInputError
from mtjax.experiments import floors, runs
from mtjax.experiments import report as report_lib
from mtjax.experiments.floors import metric_for  # noqa: F401  (the studies use arms.metric_for)

TrainFn = Callable[[Config, epath.Path], Any]


# ---------------------------------------------------------------- the study record

@dataclasses.dataclass(frozen=True)
class Study:
  """One study of the registry: `mtjax experiment <name>` and `mtjax report DIR`.

  Attributes:
    name: the subcommand and study.json's "study".
    help: one line for `mtjax experiment --help`.
    summarize: `summarize(config, root, train_fn) -> summary`: trains the arms not yet DONE
      through `train_fn` and computes the JSON summary from their stored metrics.
    describe: `describe(summary, root) -> report.Report`: the report's blocks (text, tables,
      figures, verdict) from a summary (root: where the report lives, for files the study wrote
      beside it); `report(root, summary)` writes report.md and the figures.
    check: `check(config)` raises BadInputError for what else this study needs of a config.
    record: extra study.json entries for a config (the settings a study once took as arguments).
  """

  name: str
  help: str
  summarize: Callable[[Config, epath.Path, TrainFn], dict[str, Any]]
  describe: Callable[[dict[str, Any], Any], report_lib.Report]
  check: Callable[[Config], None] = lambda config: None
  record: Callable[[Config], Mapping[str, Any]] = lambda config: {}
  # The comparisons the study tests (paired over seeds; stats.compare_named) and the one it takes
  # as primary when study.primary is empty.
  comparisons: tuple[str, ...] = ()
  default_primary: str = ""

  def primary(self, config: Config) -> str:
    """The primary comparison this config names (study.primary, else the study's default);
    BadInputError when it names none of the study's comparisons."""
    name = config.study.primary or self.default_primary
    if self.comparisons and name not in self.comparisons:
      raise BadInputError("study.primary", f"expected one of {', '.join(self.comparisons)} "
                          f"(the {self.name} study's comparisons), got {name!r}")
    if not self.comparisons and config.study.primary:
      raise BadInputError("study.primary", f"the {self.name} study names its tests itself; "
                          f"expected '', got {config.study.primary!r}")
    return name

  def run(self, config: Config, workdir: str, *, train_fn: TrainFn | None = None) -> dict[str, Any]:
    """Checks the config, trains every arm not yet DONE, writes summary.json and report.md.

    Raises BadInputError (before any training) for bad settings, runs.Preempted when an arm was
    stopped by a preemption signal (that arm is not marked DONE; rerun to resume).
    """
    from mtjax import recipes
    from mtjax.check import check_generation_budgets
    validate_study_config(config)
    primary = self.primary(config)
    self.check(config)
    check_generation_budgets(config)  # a budget shorter than a held-out target: before any arm
    # Targets strictly between what trivial baselines score and the best achievable score.
    bounds = floors.check_targets(config.replace(**split_settings(config)))  # the scored examples
    root = epath.Path(workdir)
    write_study_json(root, self.name, config, **self.record(config))
    summary = self.summarize(config, root, train_fn or recipes.run)
    summary.setdefault("floors", bounds)
    if primary:
      summary["primary"] = primary
    return self._finish(root, summary)

  def rebuild(self, root: epath.Path, config: Config) -> epath.Path:
    """summary.json, report.md and plots again from the arms' stored metrics (no training)."""
    summary = self.summarize(config, root, runs.stored_only)
    # As run() stored them (on the examples the arms score), none refused.
    summary.setdefault("floors", floors.describe(config.replace(**split_settings(config))))
    if self.primary(config):
      summary["primary"] = self.primary(config)
    self._finish(root, summary)
    return root / "report.md"

  def report(self, root: epath.Path, summary: dict[str, Any]) -> epath.Path:
    """report.md and the figures of a summary (the one renderer: mtjax.experiments.report)."""
    described = self.describe(summary, root)
    report_lib.baselines_section(described, summary)
    return report_lib.write(root, described)

  def _finish(self, root: epath.Path, summary: dict[str, Any]) -> dict[str, Any]:
    (root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    self.report(root, summary)
    return summary


def validate_study_config(config: Config) -> None:
  """The `study` group makes sense for this run; raises BadInputError naming the field."""
  st = config.study
  for field in ("steps_per_task", "eval_every"):
    value = getattr(st, field)
    if value <= 0:
      raise BadInputError(f"study.{field}", f"expected a positive integer, got {value}")
  seeds = list(st.seeds)
  if not seeds:
    raise BadInputError("study.seeds", "expected at least one seed, got none")
  if len(set(seeds)) != len(seeds):
    raise BadInputError("study.seeds", f"expected distinct seeds, got {seeds}")
  for name in st.targets:
    if name not in config.data.tasks:
      raise BadInputError(f"study.targets.{name}",
                          f"not a task of this run (data.tasks: {list(config.data.tasks)})")
  if not st.metric.strip():
    raise BadInputError("study.metric",
                        f"expected an eval metric name (e.g. token_accuracy), got {st.metric!r}")
  if st.floors not in floors.FAMILIES:
    raise BadInputError("study.floors",
                        f"expected one of {', '.join(floors.FAMILIES)}, got {st.floors!r}")
  if st.eval_schedule not in EVAL_SCHEDULES:
    raise BadInputError("study.eval_schedule",
                        f"expected one of {', '.join(EVAL_SCHEDULES)}, got {st.eval_schedule!r}")
  if st.lr_schedule not in LR_SCHEDULES:
    raise BadInputError("study.lr_schedule",
                        f"expected one of {', '.join(LR_SCHEDULES)} (a schedule whose value at a "
                        "step does not depend on the arm's length), got {st.lr_schedule!r}")
  if st.lr_schedule == "wsd":
    _check_decay(config, st.steps_per_task)
  for name, metric in st.task_metrics.items():
    if name not in config.data.tasks:
      raise BadInputError(f"study.task_metrics.{name}",
                          f"not a task of this run (data.tasks: {list(config.data.tasks)})")
    if not str(metric).strip():
      raise BadInputError(f"study.task_metrics.{name}", "expected an eval metric name, got ''")
  if st.tuning_examples < 0:
    raise BadInputError("study.tuning_examples",
                        f"expected a number of examples >= 0, got {st.tuning_examples}")
  if st.split not in SPLITS:
    raise BadInputError("study.split", f"expected one of {', '.join(SPLITS)}, got {st.split!r}")
  if st.split == "tuning" and st.tuning_examples == 0:
    raise BadInputError("study.split", "'tuning' needs a tuning split: set study.tuning_examples "
                        "to a positive number of examples")


def write_study_json(root: epath.Path, study: str, base: Config, **extra: Any) -> None:
  root.mkdir(parents=True, exist_ok=True)
  (root / "study.json").write_text(
      json.dumps({"study": study, "config": base.to_dict(), **extra}, indent=2) + "\n")


def read_study_json(root: epath.Path) -> tuple[str, Config]:
  """(study name, config) of a study workdir; top-level study.json entries besides "study" and
  "config" are study settings (as `Study.record` wrote them) and win over config.study."""
  from mtjax import config as config_lib
  path = root / "study.json"
  if not path.exists():
    raise BadInputError(str(root), "not a study directory (no study.json)")
  stored = json.loads(path.read_text())
  config = config_lib.from_dict(stored["config"])
  settings = {f"study.{k}": v for k, v in stored.items() if k not in ("study", "config")}
  return stored.get("study"), config.replace(**settings) if settings else config


# ---------------------------------------------------------------- arms

EVAL_SCHEDULES = ("every", "log")
LR_SCHEDULES = ("constant", "wsd")
SPLITS = ("report", "tuning")


def _check_decay(config: Config, steps: int) -> None:
  """wsd's absolute decay length fits an arm of `steps` steps after its warmup."""
  d, warmup = config.study.lr_decay_steps, config.optimizer.warmup_steps
  if not 1 <= d <= steps - warmup:
    raise BadInputError("study.lr_decay_steps",
                        f"study.lr_schedule=wsd needs 1 <= lr_decay_steps <= {steps - warmup} (an "
                        f"arm of {steps} steps minus optimizer.warmup_steps={warmup}), got {d}")


def lr_settings(base: Config, steps: int) -> dict[str, Any]:
  """The optimizer fields of an arm of `steps` steps under study.lr_schedule, set explicitly
  (never the base config's schedule): `constant` after the base's warmup, or `wsd` decaying over
  the last study.lr_decay_steps steps, so the LR at step s is the same in every arm (for wsd:
  until the shorter arm's decay starts; every arm decays over the same number of steps). The
  base's lr, warmup_steps and min_lr_ratio are shared by every arm."""
  st = base.study
  if st.lr_schedule == "constant":
    return {"optimizer.schedule": "constant", "optimizer.decay_steps": 0}
  if st.lr_schedule == "wsd":
    _check_decay(base, steps)
    return {"optimizer.schedule": "wsd", "optimizer.decay_steps": steps,
            "optimizer.decay_fraction": st.lr_decay_steps / steps}
  raise BadInputError("study.lr_schedule", f"expected one of {', '.join(LR_SCHEDULES)}, "
                      f"got {st.lr_schedule!r}")


def lr_note(optimizer: Mapping[str, Any], steps: int) -> str:
  """How an arm of `steps` steps with these optimizer settings (a config's `optimizer` group, as
  in its config.json) sets the LR, in words (mtjax.train.optimizer.lr_schedule's arithmetic)."""
  o = optimizer
  warmup, lr = int(o["warmup_steps"]), float(o["lr"])
  end = lr * float(o["min_lr_ratio"])
  decay_steps = max(int(o["decay_steps"]) or steps, warmup + 1)
  head = f"linear warmup over {warmup} steps to {lr:g}, then "
  if o["schedule"] == "constant":
    return head + "constant"
  if o["schedule"] == "wsd":
    decay = max(1, round(float(o["decay_fraction"]) * decay_steps))
    return head + f"constant, then a linear decay to {end:g} over the last {decay} steps"
  return head + f"{o['schedule']} decay to {end:g} at step {decay_steps}"


def stored_lr_note(arm_dir: epath.Path) -> str:
  """`lr_note` of a trained arm, from its config.json (what it actually ran with)."""
  path = arm_dir / "config.json"
  if not path.exists():
    return "unknown (no config.json)"
  cfg = json.loads(path.read_text())
  return lr_note(cfg["optimizer"], int(cfg["train"]["steps"]))


def schedule_note(notes: Mapping[str, str]) -> str:
  """One sentence for a report from {arm name: its lr_note}: one schedule for every arm, or each
  arm's (then the LR at a step may depend on the arm's length: say so)."""
  distinct = sorted(set(notes.values()))
  if len(distinct) == 1:
    return (f"LR schedule of every arm: {distinct[0]} (the same LR at the same step in arms of "
            "any length).")
  return ("LR schedules differ between arms (the LR at a step depends on the arm): " +
          "; ".join(f"{name}: {note}" for name, note in notes.items()) + ".")


def eval_steps(total: int, every: int, schedule: str = "every") -> list[int]:
  """The steps an arm of `total` steps is evaluated at: 0, every `every` steps, the end, and under
  the "log" schedule also the powers of two below `total`."""
  steps = {total}
  if every > 0:
    steps.update(range(0, total, every))
  if schedule == "log":
    steps.add(0)
    k = 1
    while k < total:
      steps.add(k)
      k *= 2
  return sorted(steps)


def extra_eval_steps(total: int, every: int, schedule: str) -> tuple[int, ...]:
  """The eval steps of an arm that its eval.every cadence does not give (log-spaced ones): its
  eval.steps."""
  regular = set(eval_steps(total, every))
  return tuple(s for s in eval_steps(total, every, schedule) if s not in regular)


def configure(base: Config, *, seed: int, steps: int, eval_every: int,
              tasks: Sequence[str] | None = None,
              mixture: Mapping[str, float] | None = None,
              stages: Sequence[tuple[int, Mapping[str, float]]] | None = None,
              **dotted: Any) -> Config:
  """The base config as one arm, trained on `mixture` (constant) or on `stages`; no checkpoints
  but the last, no progress bar. The data schedule and the LR schedule are set explicitly
  (`lr_settings`: study.lr_schedule), never inherited from the base config.

  Args:
    base: the study's config.
    seed, steps, eval_every: the arm's seed, train.steps and eval.every.
    tasks: narrow the run to these tasks (only their data.mixture, train.loss_weights and
      train.entropy_coefs entries are kept; default mixture: the base's entries, or equal). By
      default every base task stays in data.tasks, so every task is evaluated, and the default
      mixture is the base's (1.0 where it has none).
    mixture: the constant sampling weights (missing tasks: 0).
    stages: ((start step, {task: weight}), ...) instead of a mixture (missing tasks: 0).
    **dotted: any further dotted config fields.
  """
  changes = {"data.mixture_name": "", "seed": seed, "train.steps": steps, "eval.every": eval_every,
             "eval.steps": extra_eval_steps(steps, eval_every, base.study.eval_schedule),
             "eval.tasks": (), "checkpoint.every": 0, "train.progress": False,
             **lr_settings(base, steps)}
  if tasks is None:
    tasks = base.data.tasks
    default_mixture = {t: base.data.mixture.get(t, 1.0) for t in tasks}
  else:
    tasks = tuple(tasks)
    keep = lambda m: {k: v for k, v in m.items() if k in tasks}
    changes.update({"data.tasks": tasks, "train.loss_weights": keep(base.train.loss_weights),
                    "train.entropy_coefs": keep(base.train.entropy_coefs)})
    default_mixture = keep(base.data.mixture) or {t: 1.0 for t in tasks}
  if stages is not None:
    changes.update({"data.schedule": "stages", "data.mixture": {},
                    "data.stages": tuple((int(s), {t: float(w.get(t, 0.0)) for t in tasks})
                                         for s, w in stages)})
  else:
    mixture = mixture or default_mixture
    changes.update({"data.schedule": "constant", "data.stages": (),
                    "data.mixture": {t: float(mixture.get(t, 0.0)) for t in tasks}})
  changes.update(split_settings(base))
  changes.update(dotted)
  return base.replace(**changes)


def split_settings(base: Config) -> dict[str, Any]:
  """The held-out examples an arm evaluates: the first study.tuning_examples of each task's
  validation split are the tuning split (study.split=tuning evaluates on them, to choose targets
  and knobs); the reported numbers (study.split=report) come from the examples after them."""
  st, e = base.study, base.eval
  if not st.tuning_examples:
    return {}
  if st.split == "report":
    return {"eval.skip": st.tuning_examples}
  n = st.tuning_examples
  return {"eval.skip": 0, "eval.num_examples": min(e.num_examples, n),
          "eval.num_generate": min(e.num_generate, n), "eval.sample_prompts": min(e.sample_prompts, n)}


def loss_tokens_per_step(cfg: Config, batches: int) -> float:
  """An arm's mean loss (supervised) tokens per step over its first `batches` training batches,
  as its loader builds them (packing, truncation and the sampler included)."""
  return sum(loss_tokens_by_task(cfg, batches).values()) / max(1, batches)


def loss_tokens_by_task(cfg: Config, batches: int) -> dict[str, float]:
  """An arm's loss (supervised) tokens per task over its first `batches` training batches, as its
  loader builds them (the per-token task ids of the batch contract): its mixture's measured
  shares, not its nominal rates."""
  import numpy as np

  from mtjax.data.loader import MixtureLoader
  tasks = list(cfg.data.tasks)
  counts = np.zeros(len(tasks), np.float64)
  loader = MixtureLoader.from_config(cfg, prefetch=0)
  try:
    for _ in range(max(1, batches)):
      arrays = next(loader).arrays
      mask = np.asarray(arrays["loss_mask"], np.float64)
      ids = np.asarray(arrays["task_ids"]).astype(np.int64)
      real = ids >= 0  # padding carries task id -1 (and no loss)
      counts += np.bincount(ids[real], weights=mask[real], minlength=len(tasks))[:len(tasks)]
  finally:
    loader.close()
  return {t: float(c) for t, c in zip(tasks, counts)}


def sequential_stages(order: Sequence[str], steps_per_task: int) -> list[tuple[int, dict[str, float]]]:
  return [(i * steps_per_task, {t: 1.0}) for i, t in enumerate(order)]


def run(root: epath.Path, name: str, cfg: Config, train_fn: TrainFn) -> epath.Path:
  """Trains one arm unless it is already DONE; returns its workdir (raises runs.Preempted)."""
  arm_dir = root / name
  runs.run_once(arm_dir, cfg, train_fn, announce=f"study: {root.name}/{name} ({cfg.train.steps} steps)")
  return arm_dir
# ---------------------------------------------------------------- stored metrics

def eval_series(arm_dir: epath.Path, task: str, metric: str) -> list[tuple[int, float]]:
  key = f"eval/{task}/{metric}"
  return [(r["step"], float(r[key])) for r in runs.rows(arm_dir) if key in r]


def train_series(arm_dir: epath.Path, task: str, metric: str) -> list[tuple[int, float]]:
  key = f"train/{task}/{metric}"
  return [(r["step"], float(r[key])) for r in runs.rows(arm_dir) if key in r]


def eval_curves(arm_dir: epath.Path, metric: str) -> dict[str, list[tuple[int, float]]]:
  """task -> [(step, value)] of every eval/<task>/<metric> row."""
  out: dict[str, list[tuple[int, float]]] = {}
  for row in runs.rows(arm_dir):
    for key, value in row.items():
      if key.startswith("eval/") and key.endswith(f"/{metric}"):
        out.setdefault(key.split("/")[1], []).append((row["step"], float(value)))
  return out


def eval_at(arm_dir: epath.Path, step: int, tasks: Sequence[str],
            metric: str | Mapping[str, str]) -> list[float]:
  """Scores of `tasks` (by one metric, or one per task) at the eval row of `step` (NaN for a task
  the row has no score of)."""
  per_task = metric if isinstance(metric, Mapping) else {t: metric for t in tasks}
  for r in runs.rows(arm_dir):
    if r.get("step") == step and _is_eval_row(r):
      return [_score(r, t, per_task[t]) for t in tasks]
  raise BadInputError(str(arm_dir / "metrics.jsonl"), f"no eval row at step {step}")


def final_eval(arm_dir: epath.Path, tasks: Sequence[str], metric: str) -> dict[str, float]:
  last = [r for r in runs.rows(arm_dir) if _is_eval_row(r)][-1]
  return {t: _score(last, t, metric) for t in tasks}


def _is_eval_row(row: dict) -> bool:
  return any(k.startswith("eval/") for k in row)


def _score(row: dict, task: str, metric: str) -> float:
  """A task's eval metric, NaN when the row has none (every prompt of the task was skipped)."""
  return float(row.get(f"eval/{task}/{metric}", float("nan")))


# ---------------------------------------------------------------- shared by several studies

def export_once(run_dir: epath.Path, export_dir: epath.Path) -> None:
  """`mtjax export` of a finished arm's final checkpoint (the start of later arms, through
  model.pretrained), unless already there; written to a temporary directory first, so a
  half-written export is never used."""
  from mtjax.train.export import export_run
  if (export_dir / "config.json").exists():
    return
  tmp = export_dir.parent / (export_dir.name + ".partial")
  if tmp.exists():
    tmp.rmtree()
  export_run(run_dir, tmp)
  tmp.rename(export_dir)


def run_base(seed_dir: epath.Path, name: str, cfg: Config, train_fn: TrainFn,
             export_dir: epath.Path) -> tuple[epath.Path, TrainFn]:
  """Trains a study's base run `name` (unless DONE) and returns (its workdir, the train_fn of the
  arms that start from its export at `export_dir`): the export is made once, and only when such
  an arm still has to train (a finished study rebuilds its report without it)."""
  base_dir = run(seed_dir, name, cfg, train_fn)

  def from_export(arm_cfg: Config, arm_dir: epath.Path) -> Any:
    export_once(base_dir, export_dir)
    return train_fn(arm_cfg, arm_dir)

  return base_dir, from_export


def sign_verdict(diffs: Sequence[float], up: str, down: str, *, tie: str = "equal on every seed",
                 atol: float = 0.0) -> str:
  """`up`/`down` when every seed's paired difference has that sign (at least 3 seeds), `tie` when
  all are 0 (|d| <= atol), else inconclusive with the reason."""
  import numpy as np
  d = np.asarray(diffs, np.float64)
  if len(d) < 3:
    return "inconclusive (fewer than 3 seeds)"
  if np.isnan(d).any():
    return "inconclusive (missing values)"
  d = np.where(np.abs(d) <= atol, 0.0, d)
  if (d == 0).all():
    return tie
  if (d > 0).all():
    return up
  if (d < 0).all():
    return down
  return "inconclusive (the sign differs between seeds)"
