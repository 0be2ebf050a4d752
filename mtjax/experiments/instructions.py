"""Instruction ablation (Kung & Peng, 2023: do models really learn to follow instructions?).

Arms per seed, equal steps (study.steps_per_task x number of tasks), the same mixture:
  original    instructions as written
  empty       every task's instruction blanked (data.instructions.<task>="empty"), train and eval
  misleading  each example gets another task's instruction, drawn per example from the other
              tasks' instructions whose rule gives a DIFFERENT answer on its input
              (data.instructions.<task>="misleading"), train and eval
  task_id     a fixed meaningless string per task (data.instructions.<task>="task_id"): the model
              can tell the tasks apart, but no instruction names a rule
Score: greedy exact match (study.metric, `accuracy`: eval.num_generate held-out prompts per task),
token accuracy beside it. Without instructions, tasks whose inputs look alike (copy, reverse, sort
on letters) give the same prompt different targets: the report measures that ambiguity per task
and the score any predictor could at most get in the empty arm.

With model.pretrained set (configs/instructions.py:zero_shot) the study also runs Kung & Peng's
zero-shot arms: per held-out task and instruction mode, train on the other tasks (the held-out
task at mixture weight 0) and score the held-out task. A from-scratch model scores ~0 there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from etils import epath

from mtjax.config import Config
from mtjax.errors import BadInputError
from mtjax.experiments import arms, report, stats

ARMS = {"original": "keep", "empty": "empty", "misleading": "misleading",
        "task_id": "task_id"}  # arm -> data.instructions mode
SECONDARY = "token_accuracy"
ABLATIONS = tuple(a for a in ARMS if a != "original")
NAMES = tuple(f"{a}-original" for a in ABLATIONS)  # the paired comparisons, per task
# Kung & Peng's finding to test: misleading instructions cost little against the originals.
DEFAULT_PRIMARY = "misleading-original"


def check(config: Config) -> None:
  """The score is generated exact match, and the zero-shot arms need the pretrained base."""
  if config.study.metric == "accuracy" and config.eval.num_generate <= 0:
    raise BadInputError("eval.num_generate", "study.metric=accuracy (greedy exact match) needs "
                        f"held-out prompts to generate for: expected > 0, got {config.eval.num_generate}")
  path = config.model.pretrained
  if path and not (epath.Path(path) / "config.json").exists():
    raise BadInputError("model.pretrained", f"{path}: no pretrained checkpoint there (an HF "
                        "directory with config.json, *.safetensors, tokenizer files); the zero-shot "
                        "arms need one: set --config.model.pretrained=DIR")


# ---------------------------------------------------------------- empty-instruction ambiguity

def _held_out(name: str, cfg: Config, count: int) -> list[Any]:
  """The `count` held-out examples of a task an arm of `cfg` scores (before the ablation)."""
  from mtjax.eval.heldout import heldout_examples
  return heldout_examples(cfg, name, count, ablation=False)


def ambiguity(held_out: dict[str, Sequence[Any]]) -> dict[str, Any]:
  """How far blanked instructions leave held-out prompts ambiguous, from {task: its examples}.

  Per task, `fraction`: its examples whose blanked prompt (the input) is also another task's
  blanked prompt with a different target. `cap`: a sound upper bound on the run's mean exact
  match over tasks in the empty arm: a prompt gets one answer, so among the examples sharing a
  prompt only those with the most common target can be right (mean over tasks of each task's
  right fraction under that best single answer per prompt, maximized per prompt).
  `same_format`: its examples whose blanked prompt has the shape (`_shape`) of another task's
  held-out prompt: indicative of ambiguity in distribution (same-looking inputs), not a bound.
  """
  by_prompt: dict[str, dict[str, dict[str, int]]] = {}  # prompt -> target -> task -> count
  for name, examples in held_out.items():
    for ex in examples:
      cell = by_prompt.setdefault(ex.input, {}).setdefault(ex.target, {})
      cell[name] = cell.get(name, 0) + 1
  sizes = {n: len(ex) for n, ex in held_out.items()}
  fraction = {}
  for name, examples in held_out.items():
    shared = sum(any(other != name for tgt, cell in by_prompt[ex.input].items() if tgt != ex.target
                     for other in cell) for ex in examples)
    fraction[name] = shared / len(examples) if examples else float("nan")
  # Each task weighs 1/|task| per example in the mean over tasks: the best answer to a prompt is the
  # target with the most weight.
  best = sum(max(sum(c / sizes[n] for n, c in cell.items()) for cell in targets.values())
             for targets in by_prompt.values())
  tasks = [n for n in held_out if sizes[n]]
  shapes = {n: {_shape(ex.input) for ex in examples} for n, examples in held_out.items()}
  same_format = {n: (sum(any(_shape(ex.input) in shapes[o] for o in held_out if o != n) for ex in examples)
                     / len(examples) if examples else float("nan"))
                 for n, examples in held_out.items()}
  # In distribution: tasks that share an input format draw their inputs alike, and their rules
  # disagree on almost every input, so one answer per input is right for at most one of the k
  # same-format tasks (a task with same_format >= 1/2 counts the others it shares a shape with).
  group = {n: 1 + sum(bool(shapes[n] & shapes[o]) for o in held_out if o != n)
           if same_format[n] >= 0.5 else 1 for n in tasks}
  return {"fraction": fraction, "cap": best / len(tasks) if tasks else float("nan"),
          "same_format": same_format,
          "cap_in_distribution": (sum(1 / group[n] for n in tasks) / len(tasks)
                                  if tasks else float("nan"))}


def _shape(prompt: str) -> str:
  """A prompt with every letter as `a` and every digit as `0`: prompts of one shape differ only
  in which letters or digits they hold (copy, reverse and sort words of one length)."""
  return "".join("a" if c.isalpha() else "0" if c.isdigit() else c for c in prompt)


# ---------------------------------------------------------------- arms

def zero_shot_arms(base: Config) -> list[tuple[str, str, dict[str, float], dict[str, str]]]:
  """(arm name, held-out task, mixture, data.instructions) of the zero-shot arms: per held-out task and
  instruction mode, the other tasks train (the held-out one stays in data.tasks at weight 0, so
  it is evaluated under the same instruction mode); none without model.pretrained."""
  if not base.model.pretrained:
    return []
  tasks = list(base.data.tasks)
  out = []
  for held in tasks:
    mixture = {t: (0.0 if t == held else base.data.mixture.get(t, 1.0)) for t in tasks}
    for arm, mode in ARMS.items():
      out.append((f"zero_shot_{held}_{arm}", held, mixture, {t: mode for t in tasks}))
  return out


def summarize(base: Config, root: epath.Path, train_fn: arms.TrainFn) -> dict[str, Any]:
  tasks = list(base.data.tasks)
  metric = base.study.metric
  steps = base.study.steps_per_task * len(tasks)
  per_seed = []
  for seed in base.study.seeds:
    result: dict[str, Any] = {"seed": seed}
    for name, mode in ARMS.items():
      ablation: dict[str, Any] = {"data.instructions": {t: mode for t in tasks}}
      cfg = arms.configure(base, seed=seed, steps=steps, eval_every=base.study.eval_every, **ablation)
      d = arms.run(root / f"seed{seed}", name, cfg, train_fn)
      result[name] = arms.final_eval(d, tasks, metric)
      if metric != SECONDARY:
        result[f"{name}/{SECONDARY}"] = arms.final_eval(d, tasks, SECONDARY)
    zero = {}
    for name, held, mixture, modes in zero_shot_arms(base):
      ablation = {"data.instructions": modes}
      cfg = arms.configure(base, seed=seed, steps=steps, eval_every=base.study.eval_every,
                           mixture=mixture, **ablation)
      d = arms.run(root / f"seed{seed}", name, cfg, train_fn)
      zero[name] = arms.final_eval(d, [held], metric)[held]
    if zero:
      result["zero_shot"] = zero
    per_seed.append(result)
  count = base.eval.num_generate if metric == "accuracy" else base.eval.num_examples
  amb = []
  for seed in base.study.seeds:
    cfg = arms.configure(base, seed=seed, steps=steps, eval_every=base.study.eval_every)
    amb.append(ambiguity({t: _held_out(t, cfg, count) for t in tasks}))
  return {"tasks": tasks, "seeds": list(base.study.seeds), "metric": metric, "steps": steps,
          "held_out_examples": count, "per_seed": per_seed,
          "ambiguity": {"fraction": {t: [a["fraction"][t] for a in amb] for t in tasks},
                        "same_format": {t: [a["same_format"][t] for a in amb] for t in tasks},
                        "cap": [a["cap"] for a in amb],
                        "cap_in_distribution": [a["cap_in_distribution"] for a in amb]},
          "pretrained": base.model.pretrained}


def describe(summary: dict[str, Any], root: Any = None) -> report.Report:
  del root
  tasks, runs, metric = summary["tasks"], summary["per_seed"], summary["metric"]
  amb = summary["ambiguity"]
  ablations = [a for a in ABLATIONS if runs and a in runs[0]]  # older records: no task_id arm
  rows = []
  for t in tasks:
    base = [r["original"][t] for r in runs]
    cells = [t, report.floor_of(summary, t), report.mean_std(base)]
    for arm in ablations:
      vals = [r[arm][t] for r in runs]
      cells += [report.mean_std(vals), report.mean_std([v - b for v, b in zip(vals, base)])]
    cells += [report.mean_std(amb["fraction"][t]), report.mean_std(amb["same_format"][t])]
    rows.append(cells)
  primary = summary.get("primary", DEFAULT_PRIMARY)
  tested = stats.compare_named(
      {f"{a}-original": {t: [r[a][t] - r["original"][t] for r in runs] for t in tasks}
       for a in ablations}, primary)
  shown = ["original", *ablations]
  secondary = [[t] + [report.mean_std([r[f"{arm}/{SECONDARY}"][t] for r in runs]) for arm in shown]
               for t in tasks] if runs and f"original/{SECONDARY}" in runs[0] else []
  doc = report.Report("Instruction ablation")
  if primary in tested:
    doc.text(stats.plainly(primary, {
        t: (tested[primary][t], tested[primary][t].sentence("higher", "lower")) for t in tasks},
        cannot="whether a pretrained instruction-tuned model follows instructions (a tiny model "
               "from scratch; the zero-shot arms need model.pretrained), or tasks whose inputs "
               "do not reveal the task."))
  doc.text(
      f"Seeds: {summary['seeds']}. Each arm trains {summary['steps']} steps on the same mixture; the "
      "ablation applies in training and in evaluation. `misleading` gives each example another "
      "task's instruction, drawn per example from the other tasks' instructions"
      + (" whose rule gives a different answer on its input; `task_id` gives every example of a "
         "task one fixed meaningless string (the tasks stay distinguishable, no rule is named)"
         if "task_id" in ablations else "") + ". Score: "
      f"held-out `{metric}` ({'greedy exact match, ' if metric == 'accuracy' else ''}"
      f"{summary['held_out_examples']} held-out examples per task). Δ = arm − original (per seed, "
      "then mean ± std). Floor: the score of always answering the most frequent training answer "
      "(original instructions).")
  doc.table(["task", "floor", "original",
             *[c for a in ablations for c in (a, f"Δ {a}")],
             "empty-prompt ambiguity", "same format"], rows)
  doc.text(stats.method_note(primary, len(runs), len(tasks), "tasks"))
  doc.bullets([f"`{t}`, {name.replace('-original', '')} vs original: "
               + tested[name][t].sentence("higher", "lower")
               for name in tested for t in tasks])
  doc.heading("Empty-instruction ambiguity")
  doc.text(
      "Empty-prompt ambiguity: the fraction of a task's held-out prompts that, with the instruction "
      "blanked, are identical to another task's held-out prompt with a different target. No model "
      "can tell those tasks apart there: scores of the empty arm are capped by that ambiguity. The "
      "best mean exact match over tasks any predictor could get in the empty arm (one answer per "
      f"prompt): {report.mean_std(amb['cap'])}. Identical prompts are counted among the scored "
      "held-out examples only, so this cap is sound but loose (vacuous when no two sampled "
      "prompts coincide): tasks that share an input format (copy, reverse and sort on the same "
      "letters) are ambiguous in distribution."
      + (" In distribution, one answer per input is right for at most one of k same-format tasks "
         "whose rules disagree on it: the mean exact match over tasks is then at most the mean of "
         f"1/k, {report.mean_std(amb['cap_in_distribution'])} here (assuming same-format tasks "
         "draw their inputs alike)." if "cap_in_distribution" in amb else "")
      + " `same format`: the fraction of a task's held-out prompts shaped "
      "like another task's (letters and digits masked; indicative, not a bound); where it is high, "
      "a model without instructions can only guess which task a prompt belongs to, and the empty "
      "arm's score measures that guess, not instruction following.")
  if secondary:
    doc.heading("Token accuracy (teacher-forced, secondary)")
    doc.table(["task", *shown], secondary)
  if runs and "zero_shot" in runs[0]:
    zrows = []
    for t in tasks:
      zrows.append([t] + [report.mean_std([r["zero_shot"][f"zero_shot_{t}_{arm}"] for r in runs])
                          for arm in ARMS])
    doc.heading("Zero-shot on held-out tasks")
    doc.text(f"Base: {summary['pretrained']}. Each row's task is held out of training (mixture "
             f"weight 0) and scored by `{metric}` under the arm's instructions.")
    doc.table(["held-out task", *ARMS], zrows)
  return doc


STUDY = arms.Study(name="instructions",
                   help="instruction ablation: original vs empty vs misleading vs task id",
                   summarize=summarize, describe=describe, check=check, comparisons=NAMES,
                   default_primary=DEFAULT_PRIMARY)


def run(config: Config, workdir: str, *, train_fn: arms.TrainFn | None = None) -> dict[str, Any]:
  """Runs the study (settings in config.study); writes summary.json and report.md in workdir."""
  return STUDY.run(config, workdir, train_fn=train_fn)
