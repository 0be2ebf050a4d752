"""RL diversity study (issue 19): does GRPO collapse the diversity that supervised fine-tuning
gave, and does a DARLING diversity reward keep quality and diversity?

Per seed:
  sft           supervised fine-tuning on data.tasks (study.steps_per_task x number of tasks
                steps), exported (`mtjax export`) to <seed>/sft_export: the baseline row and the
                start of every RL arm
  grpo          rl.algorithm=grpo from the export, beta = rl.kl_coef
  grpo_darling  the same with rl.diversity=darling (reward x within-group diversity)
  grpo_high_kl  plain GRPO with beta = HIGH_KL_FACTOR x rl.kl_coef
Every RL arm runs train.steps steps of rl.prompts prompts x rl.samples samples (equal steps, equal
samples), at optimizer.lr x RL_LR_SCALE, evaluated every study.eval_every steps. Held-out per task
(eval.sample_prompts prompts x eval.num_samples = rl.samples samples): pass@1, pass@n, distinct@n
(number of distinct verifier-valid outputs among the n), sequence entropy of the samples
(seq_entropy) and teacher-forced predictive entropy on held-out targets (entropy).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from mtjax.config import Config
from mtjax.errors import BadInputError
from mtjax.experiments import arms, report, stats

RL_ARMS = ("grpo", "grpo_darling", "grpo_high_kl")
ARMS = ("sft", *RL_ARMS)
HIGH_KL_FACTOR = 10.0  # grpo_high_kl's beta = this x rl.kl_coef
# The RL arms' peak LR = optimizer.lr (the SFT LR) x this. A pilot at a third of the SFT LR
# (1e-3; 40 steps, n=4) drove KL to the reference to ~0.5 and halved template pass@1 in the plain
# GRPO arm: unstable updates, not the effect under study.
RL_LR_SCALE = 0.1
EXPORT = "sft_export"
# Held-out metrics per task ("passn" and "distinct" are read at k = eval.num_samples).
# "unique": distinct valid outputs per valid output, pooled over the prompts (distinct@n / (n x
# pass@1)): diversity among the right answers, apart from how many there are (distinct@n counts
# valid outputs only, so it falls with pass@1 alone).
METRICS = ("pass1", "passn", "distinct", "unique", "seq_entropy", "entropy")
# Training-prompt metrics of the RL arms (rl/<task>/...).
TRAIN_METRICS = ("reward", "train_distinct")


def _n(base: Config) -> int:
  return base.eval.num_samples


def sft_steps(base: Config) -> int:
  return base.study.steps_per_task * len(base.data.tasks)


def beta_of(base: Config, arm: str) -> float:
  return base.rl.kl_coef * (HIGH_KL_FACTOR if arm == "grpo_high_kl" else 1.0)


def arm_configs(base: Config, seed: int, export_dir: epath.Path) -> dict[str, Config]:
  """The SFT arm and the three RL arms of one seed (the RL arms start from `export_dir`)."""
  steps = sft_steps(base)
  sft = arms.configure(base, seed=seed, steps=steps, eval_every=steps,
                       **{"rl.algorithm": "none", "train.entropy_coefs": {}})
  pinned = tuple(sorted(set(base.model.pinned) | {"data.tokenizer"}))  # keep the run's tokenizer
  rl_steps = base.train.steps
  out = {"sft": sft}
  for arm in RL_ARMS:
    out[arm] = arms.configure(
        base, seed=seed, steps=rl_steps, eval_every=base.study.eval_every,
        **{"model.pretrained": str(export_dir), "model.pinned": pinned,
           "rl.algorithm": "grpo", "rl.kl_coef": beta_of(base, arm),
           "rl.diversity": "darling" if arm == "grpo_darling" else "none",
           "train.entropy_coefs": {}, "optimizer.lr": base.optimizer.lr * RL_LR_SCALE})
  return out


def _check(config: Config) -> None:
  if config.eval.num_samples < 2 or config.eval.num_samples != config.rl.samples:
    raise BadInputError("eval.num_samples", "the rl_diversity study reads pass@n and distinct@n at "
                        f"n = rl.samples ({config.rl.samples}): expected eval.num_samples = "
                        f"{config.rl.samples}, got {config.eval.num_samples}")
  if config.eval.sample_prompts <= 0:
    raise BadInputError("eval.sample_prompts", "expected a positive number of sampled prompts")
  if config.rl.algorithm != "none":
    raise BadInputError("rl.algorithm", "the study sets it per arm (SFT: none, the rest: grpo); "
                        f"leave it 'none', got {config.rl.algorithm!r}")
  if config.train.entropy_coefs:
    raise BadInputError("train.entropy_coefs", "expected {} (GRPO takes no entropy term)")
  if config.train.steps <= 0:
    raise BadInputError("train.steps", "the RL arms' steps: expected a positive number")


def _record(config: Config) -> dict[str, Any]:
  st = config.study
  return {"steps_per_task": st.steps_per_task, "seeds": list(st.seeds), "eval_every": st.eval_every}


# ---------------------------------------------------------------- the runs and the summary

def _arm_series(d: epath.Path, tasks: Sequence[str], n: int, rl: bool) -> dict[str, Any]:
  out = {}
  for t in tasks:
    s: dict[str, Any] = {
        "pass1": arms.eval_series(d, t, "pass@1"), "passn": arms.eval_series(d, t, f"pass@{n}"),
        "distinct": arms.eval_series(d, t, f"distinct@{n}"),
        "seq_entropy": arms.eval_series(d, t, "seq_entropy"),
        "entropy": arms.eval_series(d, t, "entropy")}
    pass1 = dict(s["pass1"])
    s["unique"] = [(x, y / (n * pass1[x]) if pass1.get(x) else float("nan"))
                   for x, y in s["distinct"] if x in pass1]
    if rl:
      s["reward"] = _rl_series(d, t, "reward")
      s["train_distinct"] = _rl_series(d, t, f"distinct@{n}")
    out[t] = s
  return out


def _rl_series(d: epath.Path, task: str, metric: str) -> list[tuple[int, float]]:
  from mtjax.experiments import runs
  key = f"rl/{task}/{metric}"
  return [(r["step"], float(r[key])) for r in runs.rows(d) if key in r]


def summarize(base: Config, root: epath.Path, train_fn: arms.TrainFn) -> dict[str, Any]:
  tasks = list(base.data.tasks)
  n = _n(base)
  per_seed = []
  for seed in base.study.seeds:
    seed_dir = root / f"seed{seed}"
    export_dir = seed_dir / EXPORT
    cfgs = arm_configs(base, seed, export_dir)
    sft_dir, from_export = arms.run_base(seed_dir, "sft", cfgs["sft"], train_fn, export_dir)

    result: dict[str, Any] = {"seed": seed, "arms": {
        "sft": _arm_series(sft_dir, tasks, n, rl=False)}}
    for arm in RL_ARMS:
      d = arms.run(seed_dir, arm, cfgs[arm], from_export)
      result["arms"][arm] = _arm_series(d, tasks, n, rl=True)
    per_seed.append(result)
  from mtjax import tasks as task_registry
  return {"tasks": tasks, "open_ended": {t: task_registry.get(t).open_ended for t in tasks},
          "seeds": list(base.study.seeds), "n": n, "sft_steps": sft_steps(base),
          "rl_steps": base.train.steps, "prompts": base.rl.prompts, "epochs": base.rl.epochs,
          "betas": {a: beta_of(base, a) for a in RL_ARMS},
          "sft_lr": base.optimizer.lr, "rl_lr": base.optimizer.lr * RL_LR_SCALE,
          "sample_prompts": base.eval.sample_prompts,
          "per_seed": per_seed, "findings": findings(per_seed, tasks, STUDY.primary(base))}


def final(series: Sequence[Sequence[float]]) -> float:
  return float(series[-1][1]) if series else float("nan")


def value(seed_result: Mapping[str, Any], arm: str, task: str, metric: str) -> float:
  """One seed's value of a held-out metric: an RL arm's at its last eval; "sft": the SFT model as
  the RL arms evaluate it at their step 0 (the grpo arm's first eval: the exported SFT model,
  sampled with the same seeds as every RL arm's step 0)."""
  series = seed_result["arms"]["grpo" if arm == "sft" else arm][task][metric]
  if not series:
    return float("nan")
  return float(series[0][1] if arm == "sft" else series[-1][1])


def finals(per_seed: Sequence[Mapping[str, Any]], arm: str, task: str, metric: str) -> list[float]:
  """Each seed's value (see `value`) of one arm's held-out metric."""
  return [value(s, arm, task, metric) for s in per_seed]


# The tested comparisons: name -> (the findings entry, its metric). Each is one family over tasks.
TESTS = {
    "grpo_distinct_vs_sft": ("grpo_vs_sft", "distinct"),
    "grpo_unique_vs_sft": ("grpo_vs_sft", "unique"),
    "grpo_seq_entropy_vs_sft": ("grpo_vs_sft", "seq_entropy"),
    "grpo_pass1_vs_sft": ("grpo_vs_sft", "pass1"),
    "darling_pass1_vs_grpo": ("darling_vs_grpo", "pass1"),
    "darling_distinct_vs_grpo": ("darling_vs_grpo", "distinct"),
    "darling_unique_vs_grpo": ("darling_vs_grpo", "unique"),
    "high_kl_distinct_vs_grpo": ("high_kl_vs_grpo", "distinct"),
}
# DARLING's claim: its diversity reward keeps more distinct valid answers than plain GRPO.
DEFAULT_PRIMARY = "darling_distinct_vs_grpo"


def _paired(per_seed, a: str, b: str, task: str, metric: str) -> dict[str, Any]:
  """a - b per seed, its mean and std over seeds."""
  diffs = [x - y for x, y in zip(finals(per_seed, a, task, metric), finals(per_seed, b, task, metric))]
  return {"diffs": diffs, "mean": float(np.mean(diffs)), "std": float(np.std(diffs))}


def findings(per_seed: Sequence[Mapping[str, Any]], tasks: Sequence[str],
             primary: str = DEFAULT_PRIMARY) -> dict[str, Any]:
  """Per task: each arm's final held-out metrics (mean, std over seeds); plain GRPO vs SFT
  (did it collapse diversity?) and DARLING vs plain GRPO (quality and diversity), paired by seed
  and tested by sign flips (Holm across the primary comparison's tasks; the rest exploratory).
  verdicts: 'raised' / 'lowered' with the corrected p, or no detectable difference."""
  out: dict[str, Any] = {}
  for t in tasks:
    f: dict[str, Any] = {"final": {a: {m: {"mean": float(np.mean(finals(per_seed, a, t, m))),
                                           "std": float(np.std(finals(per_seed, a, t, m)))}
                                       for m in METRICS} for a in ARMS}}
    collapse = {m: _paired(per_seed, "grpo", "sft", t, m)
                for m in ("distinct", "unique", "seq_entropy", "pass1")}
    darling = {m: _paired(per_seed, "grpo_darling", "grpo", t, m)
               for m in ("pass1", "distinct", "unique", "passn")}
    high_kl = {m: _paired(per_seed, "grpo_high_kl", "grpo", t, m) for m in ("pass1", "distinct")}
    f["grpo_vs_sft"] = collapse
    f["darling_vs_grpo"] = darling
    f["high_kl_vs_grpo"] = high_kl
    out[t] = f
  tests = stats.compare_named({name: {t: out[t][entry][metric]["diffs"] for t in tasks}
                               for name, (entry, metric) in TESTS.items()}, primary)
  for t in tasks:
    out[t]["tests"] = {name: tests[name][t].to_json() for name in TESTS}
    out[t]["directions"] = {name: tests[name][t].direction() for name in TESTS}
    out[t]["verdicts"] = {name: tests[name][t].sentence("raised", "lowered") for name in TESTS}
  return out


# ---------------------------------------------------------------- the report

def _cell(per_seed, arm: str, task: str, metric: str, digits: int) -> str:
  values = finals(per_seed, arm, task, metric)
  return "-" if any(np.isnan(values)) else report.mean_std(values, digits)


def _diff(d: Mapping[str, Any], digits: int = 3) -> str:
  if np.isnan(d["mean"]):
    return "n/a"  # a seed without a value (unique: no valid output)
  return f"{d['mean']:+.{digits}f} ± {d['std']:.{digits}f}"


def describe(summary: dict[str, Any], root: Any = None) -> report.Report:
  del root
  tasks, per_seed, n = summary["tasks"], summary["per_seed"], summary["n"]
  betas = summary["betas"]
  primary = summary.get("primary", DEFAULT_PRIMARY)
  f = findings(per_seed, tasks, primary)  # the tests, from the stored per-seed values
  doc = report.Report("RL diversity study: does GRPO collapse what SFT gave, and does DARLING help?")
  doc.text(stats.plainly(primary, {
      t: (stats.Comparison.from_json(f[t]["tests"][primary]), f[t]["verdicts"][primary])
      for t in tasks},
      cannot="how a pretrained LLM behaves under GRPO (a tiny model from scratch, few RL "
             "steps), or diversity beyond the verifier's equivalence."))
  doc.text(
      f"Tasks: {', '.join(f'{t} (' + ('open-ended' if summary['open_ended'][t] else 'structured') + ')' for t in tasks)}. "
      f"Seeds: {summary['seeds']}. Per seed: supervised fine-tuning for {summary['sft_steps']} steps "
      f"(LR {summary['sft_lr']:g}), exported, then three GRPO arms from that export, each "
      f"{summary['rl_steps']} steps of {summary['prompts']} prompts x {n} samples "
      f"({summary['epochs']} update epoch(s) per batch, LR {summary['rl_lr']:g}): "
      f"`grpo` (beta {betas['grpo']:g}), `grpo_darling` (DARLING diversity reward, beta "
      f"{betas['grpo_darling']:g}), `grpo_high_kl` (beta {betas['grpo_high_kl']:g}). The `sft` row "
      "is the starting model of every RL arm, as the RL arms evaluate it at their step 0 (the "
      "SFT arm's own final eval is in summary.json under per_seed.arms.sft).")
  doc.text(
      f"Held-out, per task: {summary['sample_prompts']} prompts x {n} samples at temperature 1: "
      f"pass@1, pass@{n}, distinct@{n} (the number of distinct verifier-valid outputs among the "
      f"{n}, 0..{n}; it falls with pass@1 alone), unique (distinct@{n} / ({n} x pass@1): distinct "
      "valid outputs per valid output, pooled over prompts; '-' where a seed has no valid output), "
      "seq entropy (mean -log p of a sample, nats per sequence) and predictive "
      "entropy (teacher-forced, per target token, on held-out targets). Final values; mean ± std "
      "over seeds.")
  rows = []
  for t in tasks:
    for arm in ARMS:
      rows.append([t, arm, _cell(per_seed, arm, t, "pass1", 3), _cell(per_seed, arm, t, "passn", 3),
                   _cell(per_seed, arm, t, "distinct", 2), _cell(per_seed, arm, t, "unique", 2),
                   _cell(per_seed, arm, t, "seq_entropy", 2),
                   _cell(per_seed, arm, t, "entropy", 3)])
  doc.table(["task", "arm", "pass@1", f"pass@{n}", f"distinct@{n}", "unique", "seq entropy",
             "pred. entropy"], rows)
  doc.text("Paired by seed (arm minus arm, mean ± std of the per-seed differences):")
  rows = []
  for t in tasks:
    g, d, h = f[t]["grpo_vs_sft"], f[t]["darling_vs_grpo"], f[t]["high_kl_vs_grpo"]
    rows.append([t, "grpo - sft", _diff(g["pass1"]), "", _diff(g["distinct"], 2),
                 _diff(g["unique"], 2), _diff(g["seq_entropy"], 2)])
    rows.append([t, "grpo_darling - grpo", _diff(d["pass1"]), _diff(d["passn"]),
                 _diff(d["distinct"], 2), _diff(d["unique"], 2), ""])
    rows.append([t, "grpo_high_kl - grpo", _diff(h["pass1"]), "", _diff(h["distinct"], 2), "", ""])
  doc.table(["task", "difference", "pass@1", f"pass@{n}", f"distinct@{n}", "unique",
             "seq entropy"], rows)
  doc.text("Training prompts (last logged RL step; mean ± std over seeds): verifier reward and "
           f"the fraction of distinct outputs among each prompt's {n} samples.")
  rows = []
  for t in tasks:
    for arm in RL_ARMS:
      reward = [final(s["arms"][arm][t]["reward"]) for s in per_seed]
      dist = [final(s["arms"][arm][t]["train_distinct"]) for s in per_seed]
      rows.append([t, arm, "-" if any(np.isnan(reward)) else report.mean_std(reward, 3),
                   "-" if any(np.isnan(dist)) else report.mean_std(dist, 3)])
  doc.table(["task", "arm", "reward", f"distinct@{n} (fraction)"], rows)
  doc.text(f"Over RL steps (held-out; mean over seeds): pass@1 / distinct@{n} / seq entropy.")
  for t in tasks:
    doc.text(f"`{t}`:")
    doc.table(*_over_steps(per_seed, t))
  doc.heading("Findings")
  doc.text(stats.method_note(primary, len(per_seed), len(tasks), "tasks"))
  doc.bullets([f"`{t}`: {_headline(f[t], summary['open_ended'][t])}" for t in tasks])
  truth = _truth_lines(summary, per_seed)
  if truth:
    doc.text("Predictive entropy against the generator's true entropy (nats per target token, "
             "from the task's answer distribution; model minus truth, mean ± std over seeds; "
             "descriptive, not a test): below 0 the model is more certain than the data allow "
             "(collapsed), above 0 it is underfit.")
    doc.bullets(truth)
  doc.text("In numbers:")
  numbers = []
  for t in tasks:
    v = f[t]["verdicts"]
    g, d = f[t]["grpo_vs_sft"], f[t]["darling_vs_grpo"]
    numbers.append(
        f"`{t}`: plain GRPO vs SFT: distinct@{n} {_diff(g['distinct'], 2)} "
        f"({v['grpo_distinct_vs_sft']}), unique {_diff(g['unique'], 2)} "
        f"({v['grpo_unique_vs_sft']}), seq entropy {_diff(g['seq_entropy'], 2)} "
        f"({v['grpo_seq_entropy_vs_sft']}), pass@1 {_diff(g['pass1'])} ({v['grpo_pass1_vs_sft']}). "
        f"DARLING vs plain GRPO: pass@1 {_diff(d['pass1'])} ({v['darling_pass1_vs_grpo']}), "
        f"distinct@{n} {_diff(d['distinct'], 2)} ({v['darling_distinct_vs_grpo']}), unique "
        f"{_diff(d['unique'], 2)} ({v['darling_unique_vs_grpo']}). "
        f"Higher KL vs plain GRPO: distinct@{n} ({v['high_kl_distinct_vs_grpo']}).")
  doc.bullets(numbers)
  doc.figure("rl_diversity.png", lambda: _figure(summary),
             alt=f"pass@1, distinct@{n} and entropy over RL steps")
  doc.heading("What this run does NOT show")
  doc.bullets([
      "A tiny model (well under a million parameters) trained from scratch for a few "
      "hundred SFT steps, on synthetic tasks: nothing here says how a pretrained LLM behaves "
      "under GRPO (the papers this follows studied math reasoning with billion-parameter "
      "models).",
      f"Few RL steps ({summary['rl_steps']}) and few samples per prompt ({n}): a collapse "
      "that takes hundreds of steps would not show; nor would DARLING's effect at larger n.",
      "Equivalence is the verifier's: distinct@n counts different valid strings, and DARLING "
      "classes come from the task's canonical answer; semantic diversity beyond that (e.g. "
      "different sentences with the same structure) is not measured.",
      f"Held-out numbers come from {summary['sample_prompts']} prompts per task; the "
      "evaluation itself is noisy at that size (the std over seeds includes it).",
      "No hyperparameter search: one LR, one beta pair, one clip (the RL LR, a tenth of the "
      "SFT LR, was set after one pilot in which a third of it drove the KL to ~0.5 and "
      "halved template pass@1); a different LR could change every verdict. 'No detectable difference' is a result of this size, not evidence of no effect.",
      "Known from larger models and not tested here: RL on a pretrained model tends to "
      "sharpen (squeeze) what the model already produces while SFT expands it ("
      "'RL Squeezes, SFT Expands', arXiv 2509.21128); a model trained from scratch for a "
      "few hundred steps may sit far from that regime.",
      "Evaluations at different steps sample with different seeds (eval seed + step), so a "
      "difference from the step-0 row includes sampling noise besides the training.",
      "Seeds vary the SFT model, the RL sampling and the evaluation samples together; the "
      "spread does not separate those sources."])
  return doc


def _headline(f: Mapping[str, Any], open_ended: bool) -> str:
  """The two questions in words, from the tested directions (a direction only where the
  Holm-corrected sign-flip p is below 0.05; the p-values are in the verdicts quoted)."""
  v, d = f["verdicts"], f["directions"]
  collapse = (d["grpo_unique_vs_sft"], d["grpo_seq_entropy_vs_sft"])
  if not open_ended:
    first = ("one right answer per prompt (distinct@n <= 1, so distinct and unique say nothing "
             "about diversity here: unique falls as pass@1 rises); plain GRPO vs SFT: sequence "
             f"entropy {v['grpo_seq_entropy_vs_sft']}, pass@1 {v['grpo_pass1_vs_sft']}")
  elif all(x == -1 for x in collapse):
    first = ("plain GRPO narrowed the output distribution: fewer distinct answers per valid answer "
             f"({v['grpo_unique_vs_sft']}) and a lower sequence entropy "
             f"({v['grpo_seq_entropy_vs_sft']}) than SFT")
    if d["grpo_distinct_vs_sft"] == 1:
      first += (f" (distinct valid outputs per prompt {v['grpo_distinct_vs_sft']}, carried by "
                f"more valid outputs: pass@1 {v['grpo_pass1_vs_sft']})")
  elif all(x == 1 for x in collapse):
    first = (f"plain GRPO did not narrow the outputs here (unique {v['grpo_unique_vs_sft']}, seq "
             f"entropy {v['grpo_seq_entropy_vs_sft']})")
  else:
    first = (f"plain GRPO vs SFT: unique {v['grpo_unique_vs_sft']}; seq entropy "
             f"{v['grpo_seq_entropy_vs_sft']}")
  second = (f"DARLING vs plain GRPO: pass@1 {v['darling_pass1_vs_grpo']}, distinct "
            f"{v['darling_distinct_vs_grpo']}, unique {v['darling_unique_vs_grpo']}")
  if open_ended and d["darling_distinct_vs_grpo"] == 1 and d["darling_pass1_vs_grpo"] == 1:
    second += (" (more distinct valid answers can follow from more valid answers alone: "
               "distinct@n counts valid outputs)")
  if not open_ended and d["darling_distinct_vs_grpo"] != 0:
    second += (" (with one right answer, distinct@n moves with pass@1 mechanically: it is not "
               "diversity here)")
  return f"{first}. {second}."


def _truth_lines(summary: Mapping[str, Any], per_seed: Sequence[Mapping[str, Any]]) -> list[str]:
  """Per open-ended task with a recorded true entropy: each arm's held-out predictive entropy
  minus the truth."""
  truth = report.true_entropies(summary)
  lines = []
  for t in summary["tasks"]:
    if t not in truth:
      continue
    cells = []
    for arm in ARMS:
      values = [v - truth[t] for v in finals(per_seed, arm, t, "entropy")]
      if not any(np.isnan(values)):
        cells.append(f"{arm} {report.mean_std(values, 3)}")
    lines.append(f"`{t}` (true {truth[t]:.3f}): " + ", ".join(cells))
  return lines


def _over_steps(per_seed: Sequence[Mapping[str, Any]],
                task: str) -> tuple[list[str], list[list[str]]]:
  """(header, rows) of a table: arm x eval step, each cell the seeds' mean pass@1 / distinct@n / seq
  entropy (steps every seed of the arm was evaluated at)."""
  def mean_at(arm: str, metric: str, step: int) -> float:
    return float(np.mean([dict(s["arms"][arm][task][metric])[step] for s in per_seed]))

  steps = sorted(set.intersection(*[{x for x, _ in s["arms"][a][task]["pass1"]}
                                    for s in per_seed for a in RL_ARMS]))
  rows = [[arm] + [f"{mean_at(arm, 'pass1', x):.2f} / {mean_at(arm, 'distinct', x):.2f} / "
                   f"{mean_at(arm, 'seq_entropy', x):.1f}" for x in steps] for arm in RL_ARMS]
  return ["arm"] + [f"step {x}" for x in steps], rows


def _figure(summary: dict[str, Any]) -> Any:
  tasks, n = summary["tasks"], summary["n"]
  panels = (("pass1", "held-out pass@1"), ("distinct", f"held-out distinct@{n}"),
            ("seq_entropy", "held-out seq entropy"))
  fig, axes = report.figure(len(panels), len(tasks), figsize=(3.6 * len(tasks), 2.6 * len(panels)),
                            dpi=110, squeeze=False)
  for col, t in enumerate(tasks):
    for row, (metric, label) in enumerate(panels):
      ax = axes[row, col]
      base = finals(summary["per_seed"], "sft", t, metric)
      if not any(np.isnan(base)):
        ax.axhline(float(np.mean(base)), color="k", ls="--", lw=1, label="sft (start)")
      for i, arm in enumerate(RL_ARMS):
        curves = [s["arms"][arm][t][metric] for s in summary["per_seed"]]
        if not all(curves):
          continue
        steps = [x for x, _ in curves[0]]
        if any([x for x, _ in c] != steps for c in curves):  # seeds evaluated at other steps
          continue
        ys = np.asarray([[y for _, y in c] for c in curves])
        mean, std = ys.mean(0), ys.std(0)
        ax.plot(steps, mean, color=f"C{i}", marker="o", ms=3, label=arm)
        ax.fill_between(steps, mean - std, mean + std, color=f"C{i}", alpha=0.15)
      ax.set_ylabel(label, fontsize=8)
      ax.grid(alpha=0.3)
      if row == 0:
        ax.set_title(t, fontsize=9)
      if row == len(panels) - 1:
        ax.set_xlabel("RL step")
  axes[0, 0].legend(fontsize=7)
  return fig


STUDY = arms.Study(
    name="rl_diversity",
    help="SFT, then GRPO vs GRPO + DARLING vs GRPO with a larger KL: pass@k, distinct@k, entropy",
    summarize=summarize, describe=describe, check=_check, record=_record,
    comparisons=tuple(TESTS), default_primary=DEFAULT_PRIMARY)


def run(config: Config, workdir: str, *, train_fn: arms.TrainFn | None = None) -> dict[str, Any]:
  """Runs the study (settings in config.study, config.rl, config.train.steps); writes
  summary.json, report.md and rl_diversity.png in workdir."""
  return STUDY.run(config, workdir, train_fn=train_fn)
