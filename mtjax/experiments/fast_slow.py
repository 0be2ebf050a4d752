"""Fast/slow study (issue 21): a sequence of tasks learned one after another by slow weights only,
fast weights only, and both (Tiwari et al. 2026, "Learning, Fast and Slow", with soft prompts as
the fast channel).

Per seed:
  base       trained from scratch on the equal mixture of data.tasks for study.steps_per_task x
             number of tasks steps (a generalist, not converged), its per-task soft prompts
             (model.soft_prompt.length) trained with its weights at optimizer.lr; exported once
             to <seed>/base_export (with the soft prompts); every arm below starts from it
  slow       supervised fine-tuning of every weight at study.slow_lr (the soft prompts frozen)
  fast       per-task soft prompts (model.soft_prompt.length virtual tokens) at study.fast_lr;
             the weights frozen (optimizer.slow_lr_ratio = 0)
  fast_slow  both: soft prompts at study.fast_lr, the weights at study.slow_lr
             (slow_lr_ratio = slow_lr / fast_lr), interleaved by optimizer.fast_every/slow_every
Every arm trains the tasks in data.tasks order, study.steps_per_task steps each (data.stages: one
task at a time), so every arm takes the same optimizer steps on the same stream of examples.
Measured, each from the arm's eval rows (held-out, after the tuning split): every task's score at
every stage's end; forgetting (Chaudhry et al. 2018: a task's best score at the end of its own or
a later stage, minus its final score, averaged over all tasks but the last); plasticity (steps
from a stage's start until its task first reaches its target, study.targets); the final scores;
and the drift from the start, eval/<task>/kl_drift = KL(model || starting model) per held-out
target token (eval.drift), at the end.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from mtjax.config import Config
from mtjax.errors import BadInputError
from mtjax.experiments import arms, report, stats

ARMS = ("slow", "fast", "fast_slow")
EXPORT = "base_export"
CHANNEL = "soft prompts (per-task virtual-token embeddings trained by gradient)"
# The paired comparisons (a, b) with the quantity and which sign is better for a.
QUANTITIES = {"final": "final score (mean over tasks)", "forgetting": "forgetting (mean over "
              "earlier tasks)", "kl_drift": "KL drift from the start (mean over tasks)",
              "steps_to_target": "steps to target (mean over stages; unreached: the stage length)"}
COMPARISONS = (("fast_slow", "slow"), ("fast_slow", "fast"), ("fast", "slow"))
NAMES = tuple(f"{a}-{b}" for a, b in COMPARISONS)
# The paper's claim: fast weights beside slow ones beat slow weights alone.
DEFAULT_PRIMARY = "fast_slow-slow"


def base_steps(base: Config) -> int:
  return base.study.steps_per_task * len(base.data.tasks)


def stage_ends(base: Config) -> list[int]:
  n = base.study.steps_per_task
  return [n * (i + 1) for i in range(len(base.data.tasks))]


def arm_configs(base: Config, seed: int, export_dir: epath.Path) -> dict[str, Config]:
  """The base run and the three arms of one seed; the arms start from `export_dir`."""
  st = base.study
  steps, tasks = base_steps(base), tuple(base.data.tasks)
  # The base trains its soft prompts with its weights (one LR), so every arm starts from the
  # same model reading the same prompts (the export keeps them) and no arm starts with prompts
  # the model never saw.
  plain = {"train.entropy_coefs": {}, "eval.drift": False, "optimizer.slow_lr_ratio": 1.0,
           "optimizer.fast_every": 1, "optimizer.slow_every": 1}
  out = {"base": arms.configure(base, seed=seed, steps=steps, eval_every=steps, **plain)}
  pinned = tuple(sorted(set(base.model.pinned) | {"data.tokenizer"}))  # keep the run's tokenizer
  stages = arms.sequential_stages(tasks, st.steps_per_task)

  def arm(**dotted: Any) -> Config:
    settings = {"model.pretrained": str(export_dir), "model.pinned": pinned,
                "train.entropy_coefs": {}, "eval.drift": True, **dotted}
    return arms.configure(base, seed=seed, steps=steps, eval_every=st.eval_every, stages=stages,
                          **settings)

  out["slow"] = arm(**{"optimizer.lr": st.slow_lr, "optimizer.slow_lr_ratio": 1.0,
                       "optimizer.fast_every": 0, "optimizer.slow_every": 1})
  out["fast"] = arm(**{"optimizer.lr": st.fast_lr, "optimizer.slow_lr_ratio": 0.0,
                       "optimizer.fast_every": 1, "optimizer.slow_every": 1})
  out["fast_slow"] = arm(**{"optimizer.lr": st.fast_lr,
                            "optimizer.slow_lr_ratio": st.slow_lr / st.fast_lr,
                            "optimizer.fast_every": base.optimizer.fast_every,
                            "optimizer.slow_every": base.optimizer.slow_every})
  return out


def _check(config: Config) -> None:
  st = config.study
  if len(config.data.tasks) < 2:
    raise BadInputError("data.tasks", "the fast_slow study learns tasks in sequence: expected at "
                        f"least 2 tasks, got {list(config.data.tasks)}")
  if config.model.soft_prompt.length <= 0:
    raise BadInputError("model.soft_prompt.length", "the fast arms' soft-prompt length: expected "
                        f"a positive number, got {config.model.soft_prompt.length}")
  for field, value in (("study.fast_lr", st.fast_lr), ("study.slow_lr", st.slow_lr)):
    if not value > 0:
      raise BadInputError(field, f"expected a learning rate > 0, got {value}")
  if config.model.lora.targets or config.model.svf.enabled:
    raise BadInputError("model.lora.targets" if config.model.lora.targets else "model.svf.enabled",
                        "the study compares soft prompts with full fine-tuning: no adapters")
  if config.model.pretrained:
    raise BadInputError("model.pretrained", "the study trains its base from scratch and starts "
                        "every arm from that base's export: leave it empty")
  if config.rl.algorithm != "none":
    raise BadInputError("rl.algorithm", f"expected 'none' (supervised), got {config.rl.algorithm!r}")
  if st.steps_per_task % st.eval_every:
    raise BadInputError("study.eval_every", f"must divide study.steps_per_task={st.steps_per_task} "
                        "(every stage's end is an eval step)")


def _record(config: Config) -> dict[str, Any]:
  st = config.study
  return {"steps_per_task": st.steps_per_task, "seeds": list(st.seeds), "eval_every": st.eval_every}


# ---------------------------------------------------------------- the runs and the summary

def summarize(base: Config, root: epath.Path, train_fn: arms.TrainFn) -> dict[str, Any]:
  tasks = list(base.data.tasks)
  metrics = {t: arms.metric_for(base, t) for t in tasks}
  targets = {t: float(base.study.targets.get(t, base.study.target)) for t in tasks}
  per_seed = []
  for seed in base.study.seeds:
    seed_dir = root / f"seed{seed}"
    export_dir = seed_dir / EXPORT
    cfgs = arm_configs(base, seed, export_dir)
    _, from_export = arms.run_base(seed_dir, "base", cfgs["base"], train_fn, export_dir)
    dirs = {name: arms.run(seed_dir, name, cfgs[name], from_export) for name in ARMS}
    per_seed.append({"seed": seed, **{name: measure(dirs[name], base, metrics, targets)
                                      for name in ARMS}})
  st = base.study
  return {"tasks": tasks, "metrics": metrics, "targets": targets, "seeds": list(st.seeds),
          "channel": CHANNEL, "base_steps": base_steps(base), "steps_per_task": st.steps_per_task,
          "eval_every": st.eval_every, "batch_size": base.data.batch_size,
          "base_lr": base.optimizer.lr, "fast_lr": st.fast_lr, "slow_lr": st.slow_lr,
          "soft_prompt_length": base.model.soft_prompt.length,
          "fast_every": base.optimizer.fast_every, "slow_every": base.optimizer.slow_every,
          "num_scored": _num_scored(base, metrics), "per_seed": per_seed,
          "findings": findings(per_seed, st.steps_per_task, STUDY.primary(base))}


def _num_scored(base: Config, metrics: Mapping[str, str]) -> int:
  e = base.eval
  return min(e.num_generate if m == "accuracy" else e.num_examples for m in metrics.values())


def measure(arm_dir: epath.Path, base: Config, metrics: Mapping[str, str],
            targets: Mapping[str, float]) -> dict[str, Any]:
  """One arm's numbers from its eval rows: scores[k][task] at the end of stage k (and "start":
  step 0), forgetting per earlier task, steps to target per stage (None: not reached), final
  scores and the final KL drift per task."""
  tasks = list(base.data.tasks)
  n = base.study.steps_per_task
  at = lambda step: dict(zip(tasks, arms.eval_at(arm_dir, step, tasks, dict(metrics))))
  ends = stage_ends(base)
  by_stage = [at(step) for step in ends]
  forgetting = {t: forgetting_of([s[t] for s in by_stage], j) for j, t in enumerate(tasks[:-1])}
  to_target: dict[str, int | None] = {}
  for j, t in enumerate(tasks):
    series = [(s, v) for s, v in arms.eval_series(arm_dir, t, metrics[t]) if j * n < s <= (j + 1) * n]
    to_target[t] = next((s - j * n for s, v in series if v >= targets[t]), None)
  drift = dict(zip(tasks, arms.eval_at(arm_dir, ends[-1], tasks, "kl_drift")))
  return {"start": at(0), "by_stage": by_stage, "final": by_stage[-1], "forgetting": forgetting,
          "steps_to_target": to_target, "kl_drift": drift}


def forgetting_of(scores: Sequence[float], j: int) -> float:
  """Chaudhry et al.'s forgetting of task j after the last stage: max over the stage ends
  l = j..T-2 of its score minus its score at the end (scores[l]: at the end of stage l)."""
  return float(max(scores[j:-1]) - scores[-1])


def quantity(arm: Mapping[str, Any], name: str, tasks: Sequence[str], stage_len: int) -> float:
  """One arm's number of one seed: a mean over tasks (forgetting: over all tasks but the last)."""
  if name == "final":
    return float(np.mean([arm["final"][t] for t in tasks]))
  if name == "forgetting":
    return float(np.mean(list(arm["forgetting"].values())))
  if name == "kl_drift":
    return float(np.mean([arm["kl_drift"][t] for t in tasks]))
  if name == "steps_to_target":
    return float(np.mean([stage_len if arm["steps_to_target"][t] is None
                          else arm["steps_to_target"][t] for t in tasks]))
  raise ValueError(name)


def findings(per_seed: Sequence[Mapping[str, Any]], stage_len: int,
             primary: str = DEFAULT_PRIMARY) -> dict[str, Any]:
  """Per quantity: each arm's value (mean, std over seeds) and each comparison's per-seed
  differences (a - b) with its sign-flip test (Holm across the primary comparison's quantities;
  the others one exploratory family) and verdict (which arm is better: higher final score, lower
  forgetting, drift and steps to target)."""
  if not per_seed:
    return {}
  tasks = list(per_seed[0]["slow"]["final"])
  out: dict[str, Any] = {}
  for name in QUANTITIES:
    values = {a: [quantity(s[a], name, tasks, stage_len) for s in per_seed] for a in ARMS}
    f: dict[str, Any] = {"values": {a: {"mean": float(np.mean(v)), "std": float(np.std(v)),
                                        "per_seed": v} for a, v in values.items()}}
    for a, b in COMPARISONS:
      diffs = [x - y for x, y in zip(values[a], values[b])]
      f[f"{a}-{b}"] = {"diffs": diffs, "mean": float(np.mean(diffs)), "std": float(np.std(diffs))}
    out[name] = f
  tests = stats.compare_named({n: {q: out[q][n]["diffs"] for q in QUANTITIES} for n in NAMES},
                              primary, atol=1e-6)
  for (a, b), name in zip(COMPARISONS, NAMES):
    for q, c in tests[name].items():
      up, down = (f"{a} better", f"{b} better") if q == "final" else (f"{b} better", f"{a} better")
      out[q][name].update(test=c.to_json(), verdict=c.sentence(up, down))
  return out


# ---------------------------------------------------------------- the report

def _diff(d: Mapping[str, Any], digits: int = 3) -> str:
  return f"{d['mean']:+.{digits}f} ± {d['std']:.{digits}f}"


def describe(summary: dict[str, Any], root: Any = None) -> report.Report:
  del root
  tasks, per_seed = summary["tasks"], summary["per_seed"]
  primary = summary.get("primary", DEFAULT_PRIMARY)
  f = findings(per_seed, summary["steps_per_task"], primary)  # tests from the per-seed values
  metric_names = sorted(set(summary["metrics"].values()))
  n = summary["steps_per_task"]
  doc = report.Report("Fast and slow: soft prompts beside the weights, on a sequence of tasks")
  doc.text(stats.plainly(primary, {
      q: (stats.Comparison.from_json(f[q][primary]["test"]), f[q][primary]["verdict"])
      for q in QUANTITIES},
      cannot="prompt evolution by an LLM (the paper's fast channel is text; here, soft prompts "
             "trained by gradient), RL as the slow learner, or a pretrained model on new tasks."))
  doc.text(
      f"Fast channel: {summary['channel']}. Tasks, learned in this order: "
      f"{' -> '.join(tasks)}. Seeds: {summary['seeds']}. Per seed: a base model trained from "
      f"scratch on the equal mixture of the tasks for {summary['base_steps']} steps (LR "
      f"{summary['base_lr']:g}), with {summary['soft_prompt_length']} soft-prompt tokens per task "
      "trained beside its weights, exported with its soft prompts, then three arms from that "
      f"export (the same model and prompts at step 0), each {n} optimizer steps per task on that "
      f"task alone ({len(tasks) * n} steps, {summary['batch_size']} packed rows a step): `slow` "
      f"(every weight at LR {summary['slow_lr']:g}; the soft prompts frozen), `fast` (the soft "
      f"prompts at LR {summary['fast_lr']:g}; the weights frozen) and `fast_slow` (both: the soft prompts at "
      f"{summary['fast_lr']:g} every {summary['fast_every']} step(s), the weights at "
      f"{summary['slow_lr']:g} every {summary['slow_every']} step(s)).")
  doc.text(
      f"Score: held-out {' / '.join(metric_names)} per task ({summary['num_scored']} examples per "
      "task after the tuning split; " + ", ".join(f"{t}: {m}" for t, m in summary["metrics"].items())
      + "), every " + f"{summary['eval_every']} steps; mean ± std over seeds.")
  doc.text("Every task's score at the start and at the end of each stage (mean over seeds):")
  rows = []
  for arm in ARMS:
    rows.append([arm, "start", *[_mean([s[arm]["start"][t] for s in per_seed]) for t in tasks]])
    for k, stage_task in enumerate(tasks):
      rows.append([arm, f"stage {k + 1} ({stage_task})",
                   *[_mean([s[arm]["by_stage"][k][t] for s in per_seed]) for t in tasks]])
  rows.append(["floor", "(trivial baseline)", *[report.floor_of(summary, t) for t in tasks]])
  doc.table(["arm", "after", *tasks], rows)
  doc.text("The floor row is what a trivial baseline scores on the same examples "
           "(mtjax.experiments.floors); every target lies strictly between it and the "
           "ceiling (1.0), checked before any run.")
  doc.text("Per arm (mean ± std over seeds): " + "; ".join(
      f"**{q}** = {QUANTITIES[q]}" for q in QUANTITIES) + ". Targets for steps to target: " +
      ", ".join(f"{t} {v:g}" for t, v in summary["targets"].items()) + ".")
  doc.table(["arm", *QUANTITIES],
            [[arm, *[report.mean_std(f[q]["values"][arm]["per_seed"]) for q in QUANTITIES]]
             for arm in ARMS])
  unreached = {arm: sum(s[arm]["steps_to_target"][t] is None for s in per_seed for t in tasks)
               for arm in ARMS}
  doc.text("Stages whose task never reached its target (counted as the stage length, "
           f"{n}): " + ", ".join(f"{a} {unreached[a]}" for a in ARMS) + f" of "
           f"{len(per_seed) * len(tasks)}.")
  doc.text("Paired by seed (a minus b, mean ± std of the per-seed differences) and the verdict:")
  rows = []
  for q in QUANTITIES:
    for a, b in COMPARISONS:
      d = f[q][f"{a}-{b}"]
      rows.append([q, f"{a} - {b}", _diff(d), ", ".join(f"{x:+.3f}" for x in d["diffs"]),
                   d["verdict"]])
  doc.table(["quantity", "difference", "mean ± std", "per seed", "verdict"], rows)
  doc.heading("Findings")
  doc.text(stats.method_note(primary, len(per_seed), len(QUANTITIES), "quantities"))
  lines = []
  for q in QUANTITIES:
    d = f[q]["fast_slow-slow"]
    lines.append(f"{QUANTITIES[q]}, `fast_slow` - `slow`: {_diff(d)}: {d['verdict']}.")
  d = f["final"]["fast-slow"]
  lines.append(f"Soft prompts alone (`fast`) vs fine-tuning (`slow`), final score: {_diff(d)}: "
                  f"{d['verdict']}.")
  doc.bullets(lines)
  doc.figure("fast_slow.png", lambda: _figure(summary),
             alt="score of every task along the sequence, per arm")
  doc.heading("What this run does NOT show")
  doc.bullets([
      "The paper's fast channel is text: an LLM rewrites the prompt from feedback (GEPA). "
      "This run's fast channel is soft prompts, trained by gradient; a tiny model cannot "
      "reflect, and mtjax's discrete channel (train.instruction_search: blind mutations of "
      "instruction texts) is not used in this run. Nothing here speaks for prompt "
      "evolution.",
      "A tiny model trained from scratch on synthetic tasks it already saw in its base "
      "run, not a pretrained LLM on new tasks: forgetting here is losing a task the base "
      "knew, and the soft prompts can only steer what the base learned.",
      "The `fast` arm's small residual forgetting is not interference through shared "
      "weights (they are frozen there): Adam's moments of a finished task's soft-prompt rows "
      "keep moving them for some steps after its stage (a zero gradient does not stop a "
      "nonzero momentum), so that row drifts a little while later tasks train.",
      "The slow learner is supervised fine-tuning, not GRPO (the paper's RL): fast/slow "
      "with GRPO is not built in mtjax yet.",
      f"One LR per channel (fast {summary['fast_lr']:g}, slow {summary['slow_lr']:g}), one "
      f"prompt length ({summary['soft_prompt_length']}) and one stage length ({n} steps), "
      "set after a short pilot, not a search: other settings can change every verdict. "
      "'Inconclusive' is a result of this size, not evidence of no effect.",
      "Equal optimizer steps on the same examples (every arm reads the soft-prompt slots) "
      "are equal forward and backward compute; `fast` skips the weights' optimizer update "
      "and `slow` the prompts', which this size does not time.",
      "KL drift is measured against the common start (the export with its soft prompts), "
      "on the held-out examples of every task; it includes what the soft prompts change, so "
      "`fast` drifts too although its weights never move.",
      f"Steps to target are read at the evals (every {summary['eval_every']} steps): "
      "a stage that reaches its target between two evals counts at the later one.",
      _metric_caveat(metric_names, summary["num_scored"]),
      "Seeds vary the base, the data order and the soft prompts' initialization "
      "together; the spread does not separate those sources."])
  return doc


def _mean(values: Sequence[float]) -> str:
  v = np.asarray(values, np.float64)
  return "-" if np.isnan(v).any() else f"{v.mean():.3f}"


def _metric_caveat(metric_names: Sequence[str], num_scored: int) -> str:
  return (f"{num_scored} held-out examples per task: an exact-match score moves in steps of "
          f"{1 / num_scored:.3f}; teacher-forced token accuracy is smoother but does not score "
          "generated answers." if "accuracy" in metric_names else
          "Teacher-forced token accuracy only: no generated answers are scored.")


def _figure(summary: dict[str, Any]) -> Any:
  """Per task: its score at the start and each stage's end, one line per arm (mean over seeds)."""
  tasks, per_seed = summary["tasks"], summary["per_seed"]
  fig, axes = report.figure(1, len(tasks), figsize=(3.4 * len(tasks), 3.0), dpi=110, squeeze=False)
  xs = list(range(len(tasks) + 1))
  for col, t in enumerate(tasks):
    ax = axes[0, col]
    for i, arm in enumerate(ARMS):
      ys = [float(np.mean([s[arm]["start"][t] for s in per_seed]))] + [
          float(np.mean([s[arm]["by_stage"][k][t] for s in per_seed])) for k in range(len(tasks))]
      ax.plot(xs, ys, marker="o", color=f"C{i}", label=arm)
    ax.axvspan(col + 0.0, col + 1.0, color="0.9", zorder=0)  # the task's own stage
    ax.set_xticks(xs)
    ax.set_xticklabels(["start", *[f"after {k + 1}" for k in range(len(tasks))]], fontsize=7)
    ax.set_title(f"{t} ({summary['metrics'][t]})", fontsize=9)
    ax.grid(alpha=0.3)
  axes[0, 0].legend(fontsize=7)
  return fig


STUDY = arms.Study(
    name="fast_slow",
    help="tasks learned in sequence by slow weights (fine-tuning), fast weights (per-task soft "
         "prompts) or both, at equal steps: forgetting, plasticity, final scores, KL drift",
    summarize=summarize, describe=describe, check=_check, record=_record,
    comparisons=NAMES, default_primary=DEFAULT_PRIMARY)


def run(config: Config, workdir: str, *, train_fn: arms.TrainFn | None = None) -> dict[str, Any]:
  """Runs the study (settings in config.study, model.soft_prompt, optimizer.fast_every and
  slow_every); writes summary.json, report.md and fast_slow.png in workdir."""
  return STUDY.run(config, workdir, train_fn=train_fn)
