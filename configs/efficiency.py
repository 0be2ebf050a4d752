"""Efficiency study: the structured + open-ended suites, single-task vs multi-task at equal compute.

  mtjax experiment efficiency --config configs/efficiency.py --workdir runs/efficiency
  mtjax experiment efficiency --config configs/efficiency.py:demo --workdir runs/demo   # make demo
  mtjax experiment efficiency --config configs/efficiency.py:tiny --workdir /tmp/eff   # tests
  mtjax report runs/efficiency                                                          # rebuild

Sub-studies, each its own config and budget (2 cores):
  mtjax experiment efficiency --config configs/efficiency.py:sizes --workdir runs/efficiency_sizes
      the whole study at d_model 64, 128 and 256 (mlp 4 x d_model), tests Holm-corrected across
      tasks x sizes: "at which model sizes". d_model 64 is the full study (21 min measured
      without the tuned-mixture arm, ~30 min with it); 128 and 256 estimated at ~2.5x and ~8x
      from their parameter counts (0.6M, 2.2M): about 5 hours in all, not run yet.
  mtjax experiment efficiency --config configs/efficiency.py:lr --workdir runs/efficiency_lr
      each arm kind's LR among 1e-3, 3e-3, 1e-2 chosen on the tuning split (seed 0: 15 short
      runs, ~6 min), then the study at the chosen LRs (~30 min): about 40 minutes, not run yet.
"""

import ml_collections

from mtjax.config import sibling_config

# The tasks whose single-task runs rise clearly above their floor within 150 steps at this size.
# Dropped after the tuning-split pilot (seed 0, --config.study.split=tuning): structured_addition
# (final 0.386, floor 0.382), structured_modular (0.620, floor 0.601) and open_ended_sum_pair
# (verifier accuracy 0.000); and, once floors took the strongest trivial rules (issue 32: the
# other string tasks' rules, order-free; n-grams; a sentence frame), structured_copy (final 0.401
# against 0.455 for "the prompt's remaining letters in sorted order"), structured_reverse (0.273
# against 0.439, the same rule descending) and open_ended_grammar (verifier accuracy 0.360 against
# 1.000 for the fixed frame "the <subject> sees the <object>", which the verifier accepts): no
# target can lie between their floor and what a single-task run reaches, so no tokens-to-target
# exists for them (add them back for a larger model: the size sub-study's question).
TASKS = ("structured_sort", "open_ended_template")
ALL_TASKS = ("structured_copy", "structured_reverse", "structured_sort", "structured_addition",
             "structured_modular", "open_ended_grammar", "open_ended_sum_pair",
             "open_ended_template")


DEMO_TASKS = TASKS  # the demo's pilot dropped copy (0.187) and grammar (0.340) for the same reasons


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = sibling_config(__file__, "demo.py")
  c.model.update(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=256)
  c.data.tasks = TASKS
  c.data.mixture = {t: 1.0 for t in TASKS}
  c.data.update(batch_size=16, seq_len=64)
  c.train.log_every = 25
  c.optimizer.update(lr=3e-3, warmup_steps=20)
  # Structured tasks: teacher-forced held-out token accuracy (a smooth score they move on in
  # minutes of CPU). Open-ended tasks have many right answers, so they are judged by their verifier
  # on greedy generations (`accuracy`), not token accuracy (some target tokens are a guess:
  # sum_pair's best possible token accuracy is about 0.72). 1,000 held-out examples per task
  # teacher-forced (issue 32: less eval noise), 200 generated, after the first 100 (the tuning split, study.tuning_examples: targets were chosen there, in a pilot
  # run with --config.study.split=tuning).
  c.eval.update(num_examples=1000, num_generate=200, num_samples=0, batch_size=100)
  open_ended = [t for t in TASKS if t.startswith("open_ended_")]
  # Every arm at the same LR at the same step (constant after warmup, whatever its length), and
  # evals log-spaced early (steps 1, 2, 4, 8, ...) besides every eval_every steps, so crossings
  # of the targets are bracketed tightly where single-task runs cross them. Every target lies
  # strictly between the task's floor (trivial baselines) and ceiling (mtjax.experiments.floors;
  # checked before any arm trains): addition's floor is ~0.39, modular's ~0.58 (short answers).
  # Targets chosen on the tuning split (pilot above; single-task finals copy 0.401, reverse 0.273,
  # sort 0.873, grammar 0.360, template 0.800) by one rule: floor + 0.75 x (single-task final -
  # floor), rounded down to 0.01, the floor being the larger of the tuning and report splits'
  # (sort 0.483, template 0.126; mtjax.experiments.floors).
  # 10 seeds: the primary test (sign flips over seeds) can reach p = 2/1024 two-sided; with 3
  # it could never go below 0.25.
  c.study = ml_collections.ConfigDict(dict(
      steps_per_task=150, seeds=tuple(range(10)), primary="multiplier_vs_masked", eval_every=50, target=0.0, metric="token_accuracy",
      targets={"structured_sort": 0.77, "open_ended_template": 0.63},
      task_metrics={t: "accuracy" for t in open_ended}, tuning_examples=100,
      eval_schedule="log", lr_schedule="constant", lr_decay_steps=0,
      # A second joint arm at a mixture tuned on the tuning split (uniform, or rates ∝ share **
      # (-1/T) for these T): was uniform mixing the bottleneck? (+4 tuning runs and 10 joint
      # runs: about 30 minutes in all instead of 21.)
      mixture_temperatures=(1.0, 2.0, 4.0)))
  if variant == "demo":  # `make demo`: 2 tasks x 3 seeds, a few minutes on 2 CPU cores
    c.data.tasks = DEMO_TASKS
    c.data.mixture = {t: 1.0 for t in DEMO_TASKS}
    c.study.update(steps_per_task=100, seeds=(0, 1, 2), eval_every=25, mixture_temperatures=())
    # Chosen on the tuning split (pilot: seed 0, --config.study.split=tuning; single-task finals
    # sort 0.810, template 0.453) by the full study's rule: floor + 0.75 x (single-task final -
    # floor), rounded down to 0.01. Assigned, not updated: update() would merge these into the
    # full study's per-task targets.
    c.study.targets = {"structured_sort": 0.72, "open_ended_template": 0.37}
    c.study.task_metrics = {"open_ended_template": "accuracy"}
  elif variant == "sizes":  # "and when?": the same study at three model sizes
    c.study.model_sizes = (64, 128, 256)
  elif variant == "lr":  # every arm at its own tuned LR (so no arm loses for want of its LR)
    c.study.lr_candidates = (1e-3, 3e-3, 1e-2)
  elif variant == "tiny":  # the tests: the machinery, not a finding
    c.data.tasks = ("structured_sort", "open_ended_template")
    c.data.mixture = {t: 1.0 for t in c.data.tasks}
    c.model.update(d_model=32, mlp_dim=64)
    c.data.update(batch_size=8)
    c.train.log_every = 2
    c.optimizer.update(lr=1e-2, warmup_steps=2)
    c.eval.update(num_examples=8, num_generate=0)
    # Just above both tasks' frequency floors on these 8 examples (sort ~0.281, template ~0.357
    # under token accuracy), where both arms of both seeds cross within 24 steps per task: a model
    # this small does not beat the n-grams and prompt rules of the full family (study.floors=all:
    # sort 0.536, template 0.797), and the machinery, not a finding, is what the tests check. Two
    # seeds keep it fast: the verdict is "inconclusive" (fewer than 3 seeds) by design.
    c.study.update(steps_per_task=24, seeds=(0, 1), eval_every=4, target=0.0, tuning_examples=0,
                   floors="frequency", mixture_temperatures=())
    c.study.targets = {"structured_sort": 0.29, "open_ended_template": 0.37}
    c.study.task_metrics = {}
  elif variant:
    raise ValueError(f"unknown variant {variant!r} (known: demo, sizes, lr, tiny)")
  return c
