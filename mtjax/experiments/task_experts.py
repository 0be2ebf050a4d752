"""Task-experts study (issue 20 (i)): per-task SVF experts vs per-task LoRA vs one shared LoRA vs
full multi-task fine-tuning vs one full fine-tuning per task, all from the same multi-task base.

Per seed:
  base           trained from scratch on the study's mixture (data.tasks, data.mixture) for
                 study.steps_per_task x number of tasks steps (a generalist, not converged, so
                 fine-tuning has room), exported once (`mtjax export`) to <seed>/base_export
  svf_per_task   model.svf (per_task: one expert z = sigmoid(p) per task rescales the singular
                 values of model.svf.targets; only p trains, at model.svf.lr)
  lora_per_task  model.lora per_task=True on the same projections (model.svf.targets), rank
                 model.lora.rank, at optimizer.lr x LORA_LR_SCALE
  lora_shared    the same with one adapter shared by every task (per_task=False)
  full_mt        full fine-tuning on the mixture (no adapters: every parameter trains)
  full_per_task  one full fine-tuning run per task, on that task alone
                 (<seed>/full_per_task_<task>): T models, T x the compute of the other arms
Every fine-tuning arm starts from the export and trains train.steps steps (each full_per_task run
too: equal optimizer steps PER MODEL) at data.batch_size rows, on the same mixture (full_per_task:
its one task). Measured: each task's held-out study.metric at each arm's last step, and each arm's
trainable parameter count (from the arm's own model: the Trained adapter variables,
for LoRA and SVF; every parameter for full fine-tuning; T models' for full_per_task).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from mtjax.config import Config
from mtjax.errors import BadInputError
from mtjax.experiments import arms, report, stats

FT_ARMS = ("svf_per_task", "lora_per_task", "lora_shared", "full_mt", "full_per_task")
ROWS = ("base", *FT_ARMS)  # the report's rows: the starting model, then every arm
EXPORT = "base_export"
TOKEN_METRIC = "token_accuracy"  # reported beside the study's metric (teacher-forced, smooth)
# The fine-tuning arms' LRs = optimizer.lr (the base's) x these (SVF: model.svf.lr); chosen on the
# tuning split (see configs/task_experts.py).
LORA_LR_SCALE = 1.0
FULL_LR_SCALE = 1 / 3
# The paired comparisons (a, b): a - b per seed.
COMPARISONS = (("svf_per_task", "lora_per_task"), ("lora_per_task", "lora_shared"),
               ("full_mt", "full_per_task"))
NAMES = tuple(f"{a}-{b}" for a, b in COMPARISONS)
# The question Transformer² asks of its experts: do per-task SVF scales match per-task LoRA?
DEFAULT_PRIMARY = "svf_per_task-lora_per_task"


def base_steps(base: Config) -> int:
  return base.study.steps_per_task * len(base.data.tasks)


def per_task_arm(task: str) -> str:
  return f"full_per_task_{task}"


def arm_configs(base: Config, seed: int, export_dir: epath.Path) -> dict[str, Config]:
  """The base run and every fine-tuning run of one seed (full_per_task: one per task, named
  full_per_task_<task>); the fine-tuning runs start from `export_dir`."""
  steps = base_steps(base)
  no_entropy: dict[str, Any] = {"train.entropy_coefs": {}}
  out = {"base": arms.configure(base, seed=seed, steps=steps, eval_every=steps, **no_entropy)}
  pinned = tuple(sorted(set(base.model.pinned) | {"data.tokenizer"}))  # keep the run's tokenizer
  steps, every = base.train.steps, base.study.eval_every

  def arm(dotted: Mapping[str, Any], tasks: Sequence[str] | None = None) -> Config:
    """A fine-tuning arm from the export, with these dotted config fields."""
    settings: dict[str, Any] = {"model.pretrained": str(export_dir), "model.pinned": pinned,
                                "train.entropy_coefs": {}, **dotted}
    return arms.configure(base, seed=seed, steps=steps, eval_every=every, tasks=tasks, **settings)

  lora = {"model.lora.targets": tuple(base.model.svf.targets),
          "optimizer.lr": base.optimizer.lr * LORA_LR_SCALE}
  out["svf_per_task"] = arm({"model.svf.enabled": True, "model.svf.per_task": True})
  out["lora_per_task"] = arm({**lora, "model.lora.per_task": True})
  out["lora_shared"] = arm({**lora, "model.lora.per_task": False})
  full = {"optimizer.lr": base.optimizer.lr * FULL_LR_SCALE}
  out["full_mt"] = arm(full)
  for t in base.data.tasks:
    out[per_task_arm(t)] = arm(full, tasks=(t,))
  return out


def _check(config: Config) -> None:
  if len(config.data.tasks) < 2:
    raise BadInputError("data.tasks", "the task_experts study compares per-task and shared "
                        f"adapters: expected at least 2 tasks, got {list(config.data.tasks)}")
  if config.model.lora.targets or config.model.svf.enabled:
    raise BadInputError("model.lora.targets" if config.model.lora.targets else "model.svf.enabled",
                        "the study sets the adapters per arm (the base trains without any): "
                        "leave model.lora.targets empty and model.svf.enabled false")
  if config.model.pretrained:
    raise BadInputError("model.pretrained", "the study trains its base from scratch and starts "
                        "every arm from that base's export: leave it empty")
  if config.rl.algorithm != "none":
    raise BadInputError("rl.algorithm", f"expected 'none' (supervised), got {config.rl.algorithm!r}")
  if config.train.steps <= 0:
    raise BadInputError("train.steps", "each fine-tuning arm's steps: expected a positive number")


def _record(config: Config) -> dict[str, Any]:
  st = config.study
  return {"steps_per_task": st.steps_per_task, "seeds": list(st.seeds), "eval_every": st.eval_every}


# ---------------------------------------------------------------- parameter counts

def param_counts(arm_dir: epath.Path) -> dict[str, int]:
  """{"total", "trainable"} parameters of a trained run's model, from its config.json (the model
  built abstractly, nothing allocated): trainable = the Trained adapter variables (by type) when
  the base is frozen, else every parameter."""
  import jax
  from flax import nnx

  from mtjax.data import tokenizer as tokenizer_lib
  from mtjax.model import Decoder, ModelSpec
  from mtjax.model import adapters as adapters_lib
  from mtjax.tree import param_path
  from mtjax.train.setup import workdir_config
  cfg = workdir_config(arm_dir)
  vocab = 0 if cfg.model.vocab_size else tokenizer_lib.for_data(cfg.data).vocab_size
  spec = ModelSpec.from_config(cfg.model, vocab, "float32", num_tasks=cfg.num_tasks)
  model = nnx.eval_shape(lambda: Decoder(spec, nnx.Rngs(0)))
  state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  adapters = adapters_lib.paths_of(model, adapters_lib.Trained)
  flat = [(param_path(p), math.prod(x.shape))
          for p, x in jax.tree_util.tree_flatten_with_path(state)[0]]
  total = sum(n for _, n in flat)
  trainable = sum(n for p, n in flat if p in adapters) if spec.frozen_base else total
  return {"total": int(total), "trainable": int(trainable)}


# ---------------------------------------------------------------- the runs and the summary

def summarize(base: Config, root: epath.Path, train_fn: arms.TrainFn) -> dict[str, Any]:
  tasks = list(base.data.tasks)
  metrics = {t: arms.metric_for(base, t) for t in tasks}
  per_seed = []
  params: dict[str, Any] = {}
  for seed in base.study.seeds:
    seed_dir = root / f"seed{seed}"
    export_dir = seed_dir / EXPORT
    cfgs = arm_configs(base, seed, export_dir)
    base_dir, from_export = arms.run_base(seed_dir, "base", cfgs["base"], train_fn, export_dir)

    dirs = {"base": base_dir}
    for name in ("svf_per_task", "lora_per_task", "lora_shared", "full_mt"):
      dirs[name] = arms.run(seed_dir, name, cfgs[name], from_export)
    for t in tasks:
      dirs[per_task_arm(t)] = arms.run(seed_dir, per_task_arm(t), cfgs[per_task_arm(t)],
                                       from_export)
    if not params:  # the same models in every seed: counted once, from the first seed's runs
      params = _params(dirs, tasks)
    per_seed.append({"seed": seed, "scores": _scores(dirs, tasks, metrics),
                     TOKEN_METRIC: _scores(dirs, tasks, {t: TOKEN_METRIC for t in tasks})})
  return {"tasks": tasks, "metrics": metrics, "seeds": list(base.study.seeds),
          "base_steps": base_steps(base), "steps": base.train.steps,
          "batch_size": base.data.batch_size, "base_lr": base.optimizer.lr,
          "full_lr": base.optimizer.lr * FULL_LR_SCALE,
          "lora_lr": base.optimizer.lr * LORA_LR_SCALE, "svf_lr": base.model.svf.lr,
          "lora_rank": base.model.lora.rank, "lora_alpha": base.model.lora.alpha,
          "targets": list(base.model.svf.targets), "num_examples": base.eval.num_examples,
          "num_scored": _num_scored(base, metrics),
          "params": params, "per_seed": per_seed, "findings": findings(per_seed, tasks, STUDY.primary(base))}


def _num_scored(base: Config, metrics: Mapping[str, str]) -> int:
  """Held-out examples per task behind the study's metric (the fewest over tasks)."""
  e = base.eval
  return min(e.num_generate if m == "accuracy" else e.sample_prompts if m.startswith("pass@")
             else e.num_examples for m in metrics.values())


def _scores(dirs: Mapping[str, epath.Path], tasks: Sequence[str],
            metrics: Mapping[str, str]) -> dict[str, dict[str, float]]:
  """{row: {task: its final score}}; full_per_task: each task's score from its own run."""
  out = {arm: _final(dirs[arm], tasks, metrics) for arm in ROWS if arm != "full_per_task"}
  out["full_per_task"] = {t: _final(dirs[per_task_arm(t)], [t], metrics)[t] for t in tasks}
  return out


def _final(arm_dir: epath.Path, tasks: Sequence[str], metrics: Mapping[str, str]) -> dict[str, float]:
  """Each task's held-out metric at the run's last eval (NaN where it has none)."""
  out = {}
  for t in tasks:
    series = arms.eval_series(arm_dir, t, metrics[t])
    out[t] = float(series[-1][1]) if series else float("nan")
  return out


def _params(dirs: Mapping[str, epath.Path], tasks: Sequence[str]) -> dict[str, Any]:
  """Per arm: trainable parameters (full_per_task: the T models together) and the parameters a
  forward pass holds (base + adapters, or the T models)."""
  out = {}
  for name in ("base", "svf_per_task", "lora_per_task", "lora_shared", "full_mt"):
    out[name] = param_counts(dirs[name])
  per = [param_counts(dirs[per_task_arm(t)]) for t in tasks]
  out["full_per_task"] = {"total": sum(p["total"] for p in per),
                          "trainable": sum(p["trainable"] for p in per)}
  return out


def scores(per_seed: Sequence[Mapping[str, Any]], arm: str, task: str,
           key: str = "scores") -> list[float]:
  """Each seed's final score of one row and task (key: "scores", the study's metric, or
  TOKEN_METRIC)."""
  return [float(s[key][arm][task]) for s in per_seed]


def mean_over_tasks(per_seed: Sequence[Mapping[str, Any]], arm: str,
                    tasks: Sequence[str], key: str = "scores") -> list[float]:
  """Each seed's unweighted mean over tasks of a row's scores."""
  return [float(np.mean([s[key][arm][t] for t in tasks])) for s in per_seed]


def _paired(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
  diffs = [x - y for x, y in zip(a, b)]
  return {"diffs": diffs, "mean": float(np.mean(diffs)), "std": float(np.std(diffs))}


def findings(per_seed: Sequence[Mapping[str, Any]], tasks: Sequence[str],
             primary: str = DEFAULT_PRIMARY) -> dict[str, Any]:
  """Per task and for the mean over tasks: each row's score (mean, std over seeds); each
  comparison's per-seed differences (a - b), its sign-flip test (Holm across the primary
  comparison's tasks and mean; the other comparisons one exploratory family) and verdict."""
  out: dict[str, Any] = {}
  for key in (*tasks, "mean"):
    get = (lambda arm: mean_over_tasks(per_seed, arm, tasks)) if key == "mean" else (
        lambda arm, key=key: scores(per_seed, arm, key))
    f: dict[str, Any] = {"final": {a: {"mean": float(np.mean(get(a))), "std": float(np.std(get(a)))}
                                   for a in ROWS}}
    for a, b in COMPARISONS:
      f[f"{a}-{b}"] = _paired(get(a), get(b))
    out[key] = f
  tests = stats.compare_named({n: {k: out[k][n]["diffs"] for k in out} for n in NAMES}, primary)
  for (a, b), name in zip(COMPARISONS, NAMES):
    for key, c in tests[name].items():
      out[key][name].update(test=c.to_json(), verdict=c.sentence(f"{a} higher", f"{b} higher"))
  return out


# ---------------------------------------------------------------- the report

def _diff(d: Mapping[str, Any], digits: int = 3) -> str:
  if np.isnan(d["mean"]):
    return "n/a"
  return f"{d['mean']:+.{digits}f} ± {d['std']:.{digits}f}"


def _cell(values: Sequence[float], digits: int = 3) -> str:
  return "-" if any(np.isnan(values)) else report.mean_std(values, digits)


def describe(summary: dict[str, Any], root: Any = None) -> report.Report:
  del root
  tasks, per_seed = summary["tasks"], summary["per_seed"]
  primary = summary.get("primary", DEFAULT_PRIMARY)
  f = findings(per_seed, tasks, primary)  # the tests, from the stored per-seed scores
  params, n_tasks = summary["params"], len(summary["tasks"])
  metric_names = sorted(set(summary["metrics"].values()))
  doc = report.Report("Task experts: per-task SVF experts vs LoRA (per task, shared) vs full "
                      "fine-tuning")
  doc.text(stats.plainly(primary, {
      ("mean over tasks" if k == "mean" else k): (stats.Comparison.from_json(f[k][primary]["test"]),
                                                 f[k][primary]["verdict"])
      for k in (*tasks, "mean")},
      cannot="how these methods compare on a pretrained LLM (a tiny model trained from scratch "
             "on synthetic tasks), at other ranks, LRs or budgets, or with Transformer²'s RL "
             "training of the expert vectors (this run trains them with SFT)."))
  doc.text(
      f"Tasks: {', '.join(tasks)}. Seeds: {summary['seeds']}. Per seed: a base model trained from "
      f"scratch on the equal mixture of the tasks for {summary['base_steps']} steps (LR "
      f"{summary['base_lr']:g}; a generalist, deliberately not converged), exported, then five arms from that export, each "
      f"{summary['steps']} optimizer steps of {summary['batch_size']} packed rows: "
      f"`svf_per_task` (one SVF expert per task on {', '.join(summary['targets'])}: only the "
      f"singular-value scales train, LR {summary['svf_lr']:g}), `lora_per_task` (one LoRA adapter "
      f"per task, rank {summary['lora_rank']}, alpha {summary['lora_alpha']:g}, on the same "
      f"projections, LR {summary['lora_lr']:g}), `lora_shared` (one adapter of the same rank for "
      f"every task), `full_mt` (every parameter trains on the mixture, LR {summary['full_lr']:g}) and "
      f"`full_per_task` ({n_tasks} separate full fine-tuning runs, one per task on that task "
      f"alone, {summary['steps']} steps each). Equal steps means equal optimizer steps PER MODEL: "
      f"`full_per_task` therefore spends {n_tasks} x the compute of the other arms, and each of "
      f"its models sees {n_tasks} x the examples of its task that a multi-task arm sees.")
  doc.text(
      f"Score: held-out {' / '.join(metric_names)} per task ({summary['num_scored']} examples "
      "per task after the tuning split; accuracy: greedy generations scored by the task's scorer, "
      "exact match for the structured tasks and the verifier for open-ended ones; token_accuracy: "
      "teacher-forced next-token argmax over the target and EOS), at each run's last step; mean "
      "± std over seeds. `base` is the exported starting model (its own final eval).")
  header = ["arm", *tasks, "mean over tasks"]
  doc.table(header, [[arm, *[_cell(scores(per_seed, arm, t)) for t in tasks],
                      _cell(mean_over_tasks(per_seed, arm, tasks))] for arm in ROWS])
  if metric_names != [TOKEN_METRIC]:
    doc.text(f"The same models by teacher-forced {TOKEN_METRIC} on {summary['num_examples']} "
             "held-out examples per task (a smoother score; no verdicts are drawn from it):")
    doc.table(header, [[arm, *[_cell(scores(per_seed, arm, t, TOKEN_METRIC)) for t in tasks],
                        _cell(mean_over_tasks(per_seed, arm, tasks, TOKEN_METRIC))]
                       for arm in ROWS])
  doc.text("Parameters (counted from each run's model: its trained adapter variables, LoRA's A "
           "and B or SVF's p; full fine-tuning trains every parameter; "
           f"`full_per_task` = its {n_tasks} models together). 'Held' = the parameters needed to "
           "serve every task (base + adapters, or the separate models; SVF also stores the "
           "frozen SVD factors of its targets).")
  rows = []
  for arm in ROWS[1:]:
    p = params[arm]
    rows.append([arm, f"{p['trainable']:,}", f"{p['trainable'] / params['base']['total']:.2%}",
                 f"{p['total']:,}"])
  doc.table(["arm", "trainable", "of the base", "held"], rows)
  doc.text(f"Base model: {params['base']['total']:,} parameters.")
  doc.text("Paired by seed (a minus b, mean ± std of the per-seed differences) and the verdict:")
  rows = []
  for a, b in COMPARISONS:
    for key in (*tasks, "mean"):
      p = f[key][f"{a}-{b}"]
      rows.append([f"{a} - {b}", key if key != "mean" else "mean over tasks", _diff(p),
                   ", ".join(f"{x:+.3f}" for x in p["diffs"]), p["verdict"]])
  doc.table(["difference", "task", "mean ± std", "per seed", "verdict"], rows)
  doc.heading("Findings")
  doc.text(stats.method_note(primary, len(per_seed), len(tasks) + 1, "tasks and the mean over "
                                                                     "tasks"))
  lines = []
  for a, b in COMPARISONS:
    m = f["mean"][f"{a}-{b}"]
    per = "; ".join(f"`{t}` {f[t][f'{a}-{b}']['verdict']}" for t in tasks)
    lines.append(f"`{a}` vs `{b}` (mean over tasks {_diff(m)}): {m['verdict']}. Per task: "
                 f"{per}.")
  gains = f["mean"]["final"]
  best = max(FT_ARMS, key=lambda a: gains[a]["mean"])
  lines.append(f"Largest mean score over tasks (descriptive, not a test): `{best}` "
               f"({gains[best]['mean']:.3f}; base {gains['base']['mean']:.3f}), with "
               f"{params[best]['trainable']:,} trainable parameters.")
  doc.bullets(lines)
  doc.figure("task_experts.png", lambda: _figure(summary), alt="held-out score per task and arm")
  doc.heading("What this run does NOT show")
  doc.bullets([
      f"A tiny model ({params['base']['total']:,} parameters) trained from scratch on "
      "synthetic tasks, not a pretrained LLM: Transformer² and LoRA were proposed for "
      "billion-parameter models whose singular directions already encode many skills; "
      "nothing here says how they compare there.",
      "SVF only rescales the singular values of a base that has already seen these very "
      "tasks (the base trained on the same mixture): it can re-weight what the base learned, "
      "not add new directions, so its ceiling here is set by an unconverged base.",
      f"Short fine-tuning ({summary['steps']} steps) with one LR per method (SVF "
      f"{summary['svf_lr']:g}, LoRA {summary['lora_lr']:g}, full {summary['full_lr']:g}) and one "
      "LoRA rank, set after a short pilot, not a search: another LR, rank or step budget can "
      "change every verdict. 'Inconclusive' is a result of this size, not evidence of no "
      "effect.",
      "Equal optimizer steps per model is not equal compute: `full_per_task` trains "
      f"{n_tasks} models, and adapter steps still run the full forward and backward pass "
      "through the frozen base (their savings are optimizer memory and stored parameters, "
      "not step time, at this size).",
      _metric_caveat(metric_names, summary["num_scored"]),
      f"`full_mt` vs `full_per_task` is not a comparison at equal compute or data: "
      f"`full_per_task` has {n_tasks} x the compute and {n_tasks} x the examples of each "
      "task, so it does not separate specialization (no interference between tasks) from "
      "the extra data and steps each task gets.",
      "Transformer² trains its z-vectors (the singular-value scales) with reinforcement "
      "learning (REINFORCE on the task's reward); this run trains them with supervised "
      "fine-tuning, like the LoRA arms, so it compares the parameterizations, not the paper's "
      "training recipe.",
      "No composition or adaptation at test time (Transformer²'s second pass that mixes "
      "experts for an unseen prompt): each token uses its own task's expert, known from its "
      "task id.",
      "Seeds vary the base model, the fine-tuning data order and the adapter "
      "initialization together; the spread does not separate those sources."])
  return doc


def _metric_caveat(metric_names: Sequence[str], num_scored: int) -> str:
  if metric_names == [TOKEN_METRIC]:
    return (f"One score per task ({TOKEN_METRIC}), teacher-forced: no generated answers are "
            "scored, so exact-match accuracy may order the arms differently.")
  return (f"Exact match on {num_scored} prompts per task is coarse (one prompt = "
          f"{1 / num_scored:.3f}): a task every arm leaves near 0 (or near 1) cannot separate the "
          "arms; the token-accuracy table shows the same models on a smoother score, without "
          "verdicts.")


def _figure(summary: dict[str, Any]) -> Any:
  tasks, per_seed = summary["tasks"], summary["per_seed"]
  cols = [*tasks, "mean"]
  fig, axes = report.figure(1, len(cols), figsize=(3.2 * len(cols), 3.0), dpi=110, squeeze=False)
  for col, key in enumerate(cols):
    ax = axes[0, col]
    values = [mean_over_tasks(per_seed, a, tasks) if key == "mean" else scores(per_seed, a, key)
              for a in ROWS]
    means = [float(np.mean(v)) for v in values]
    stds = [float(np.std(v)) for v in values]
    ax.bar(range(len(ROWS)), means, yerr=stds, color=[f"C{i}" for i in range(len(ROWS))],
           capsize=3)
    for i, v in enumerate(values):
      ax.scatter([i] * len(v), v, color="k", s=6, zorder=3)
    ax.set_xticks(range(len(ROWS)))
    ax.set_xticklabels(ROWS, rotation=45, ha="right", fontsize=7)
    lo = min(min(v) for v in values)
    ax.set_ylim(max(0.0, lo - 0.05), None)
    ax.set_title("mean over tasks" if key == "mean" else key, fontsize=9)
    ax.grid(alpha=0.3, axis="y")
  axes[0, 0].set_ylabel(f"held-out {'/'.join(sorted(set(summary['metrics'].values())))}",
                        fontsize=8)
  return fig


STUDY = arms.Study(
    name="task_experts",
    help="one multi-task base, then per-task SVF experts vs per-task / shared LoRA vs full "
         "multi-task vs full per-task fine-tuning at equal steps: per-task score and parameters",
    summarize=summarize, describe=describe, check=_check, record=_record,
    comparisons=NAMES, default_primary=DEFAULT_PRIMARY)


def run(config: Config, workdir: str, *, train_fn: arms.TrainFn | None = None) -> dict[str, Any]:
  """Runs the study (settings in config.study, config.model.lora/svf, config.train.steps); writes
  summary.json, report.md and task_experts.png in workdir."""
  return STUDY.run(config, workdir, train_fn=train_fn)
