"""Composing a run's SVF experts at inference (Transformer-squared, Sun et al. 2025, section 3.2).

A run with per-task SVF experts (model.svf.enabled, per_task) has one expert vector z_k per task
of data.tasks (k in that order). On a new task the experts are mixed, z' = sum_k alpha_k z_k,
with alpha in [0, 1]^K either given or found few-shot by the cross-entropy method
(mtjax.eval.cem: population 32, elite 20%, 50 iterations by default): each candidate alpha is
scored by exact match (the task's is_correct on greedy generations) on N few-shot examples of the
new task's TRAIN split, ties broken by the mean log-likelihood of their targets (teacher-forced,
per target token, EOS included). The chosen mixture is then scored on the task's held-out
(validation) examples, disjoint from train, beside each single expert (alpha one-hot), the base
(z = 1 everywhere: no expert) and the best single expert on the few-shot examples.

Every candidate is folded into the base weights (mtjax.model.svf.merge, jitted once) and run
through the base model (spec.without_adapters()): one compiled merge, one compiled teacher-forced
step and one compiled generation per prompt bucket serve every candidate (no recompiles).

  mtjax eval --workdir RUN --compose --task structured_sort_desc [--alpha a,b,c] [--shots N]
  compose.run("RUN", "structured_sort_desc", shots=16)   # the same from Python; returns the dict

Writes WORKDIR/eval/compose_<task>_step_<S>.json.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from mtjax import tasks as task_registry
from mtjax.errors import BadInputError
from mtjax.eval.cem import cem

POPULATION, ELITE_FRACTION, ITERATIONS = 32, 0.2, 50  # the paper's CEM settings (the defaults)
HELDOUT = 200  # held-out examples scored by default


# ---------------------------------------------------------------- input checks

def parse_alpha(text: str) -> list[float]:
  """'0.2,1,0' -> [0.2, 1.0, 0.0] (BadInputError naming --alpha otherwise)."""
  try:
    values = [float(x) for x in text.split(",")]
  except ValueError:
    raise BadInputError("--alpha", f"expected comma-separated numbers in [0, 1], got {text!r}") from None
  return values


def check_alpha(alpha: Sequence[float], experts: Sequence[str]) -> np.ndarray:
  """One weight in [0, 1] per expert (the run's data.tasks, in order)."""
  a = np.asarray(list(alpha), np.float64)
  if a.ndim != 1 or len(a) != len(experts):
    raise BadInputError("--alpha", f"expected {len(experts)} weights, one per expert in the run's "
                        f"data.tasks order ({', '.join(experts)}), got {len(a.reshape(-1))}")
  if not np.isfinite(a).all() or (a < 0).any() or (a > 1).any():
    raise BadInputError("--alpha", f"expected every weight in [0, 1], got {a.tolist()}")
  if not a.sum() > 0:
    raise BadInputError("--alpha", "expected at least one positive weight (z' = 0 scales every "
                        "singular value to 0: no weights)")
  return a


def check_inputs(config: Any, task: str, alpha: Sequence[float] | None, shots: int,
                 examples: int) -> np.ndarray | None:
  """Everything the composition needs of its inputs, before any checkpoint is read."""
  if task not in task_registry.names():
    raise BadInputError("--task", f"unknown task {task!r} (known: {', '.join(task_registry.names())})")
  svf = config.model.svf
  if not svf.enabled or not svf.per_task:
    raise BadInputError("--compose", "the run has no per-task SVF experts to compose (it needs "
                        "model.svf.enabled=true and model.svf.per_task=true)")
  if shots <= 0:
    raise BadInputError("--shots", f"expected a positive number of few-shot examples, got {shots}")
  if examples <= 0:
    raise BadInputError("--examples", f"expected a positive number of held-out examples, got {examples}")
  return None if alpha is None else check_alpha(alpha, tuple(config.data.tasks))


# ---------------------------------------------------------------- the composer

@dataclasses.dataclass
class ExampleSet:
  """Examples tokenized once: prompts for greedy generation, arrays for teacher forcing."""

  examples: list[Any]
  prompts: list[np.ndarray]  # [BOS] prompt, per example
  budget: int  # new tokens per prompt: the longest target + EOS
  arrays: dict[str, np.ndarray]  # inputs, targets, positions, segment_ids, mask [rows, L]
  skipped: int  # examples whose prompt, target and EOS do not fit the model's length


class Composer:
  """A run's experts and base on one mesh: merged parameters for any alpha, and their exact match
  and target log-likelihood on example sets. Compiled once for every candidate."""

  def __init__(self, config: Any, spec: Any, mesh: jax.sharding.Mesh, tokenizer: Any, params: Any,
               *, batch_size: int | None = None):
    from flax import nnx

    from mtjax.eval.decode import Generator, buckets_for
    from mtjax.model import Decoder, svf
    from mtjax.monitoring import CompileCounter
    from mtjax.parallel import sharding as sharding_lib

    self.config, self.mesh, self.tokenizer, self.params = config, mesh, tokenizer, params
    # New tokens per generated prompt; None: each example set's longest target + EOS.
    self.max_new_tokens: int | None = None
    self.experts = tuple(config.data.tasks)
    self.spec = spec.without_adapters()
    self.length = int(config.data.seq_len)
    self.graphdef = nnx.graphdef(nnx.eval_shape(lambda: Decoder(self.spec, nnx.Rngs(0))))
    shards = mesh.shape["dcn"] * mesh.shape["data"] * mesh.shape["fsdp"]
    rows = batch_size or config.eval.batch_size  # generation rows per call
    self.batch_size = -(-max(rows, 1) // shards) * shards
    self.shards = shards
    logits = list(svf.expert_vectors(params).values())  # [layers, T, r] each
    if not logits or any(p.shape[1] != len(self.experts) for p in logits):
      raise BadInputError("--compose", f"the run has no per-task SVF experts, one per task of "
                          f"data.tasks ({len(self.experts)})")
    self._merge = jax.jit(lambda p, alpha: svf.merge(p, svf.mix(svf.expert_vectors(p, spec), alpha)))
    self._base = jax.jit(lambda p: svf.merge(p, {}))
    graphdef = self.graphdef

    def loglik(p, inputs, targets, positions, segment_ids, mask):
      logits = nnx.merge(graphdef, p)(inputs, positions, segment_ids)
      logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
      tok = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
      return jnp.sum(tok * mask), jnp.sum(mask)

    self._loglik = jax.jit(loglik)
    self._rows = sharding_lib.named(mesh, ("batch", "length"))
    self.compiles = CompileCounter()  # merge and teacher-forced step
    self.generator = Generator(self.graphdef, self.spec, mesh, max_new_tokens=self.length - 1,
                               eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                               stop_ids=tokenizer.stop_ids, batch_size=self.batch_size,
                               buckets=buckets_for(self.length), max_len=self.length)

  # parameters
  def merged(self, alpha: Sequence[float] | np.ndarray) -> Any:
    """The base weights with z' = sum_k alpha_k z_k folded in."""
    with jax.set_mesh(self.mesh), self.compiles:
      return self._merge(self.params, jnp.asarray(np.asarray(alpha, np.float32)))

  def base(self) -> Any:
    """The base weights (z = 1 everywhere: no expert)."""
    with jax.set_mesh(self.mesh), self.compiles:
      return self._base(self.params)

  # examples
  def prepare(self, examples: Sequence[Any]) -> ExampleSet:
    from mtjax.data.pipeline import Tokenize
    tok = Tokenize(self.tokenizer, 0)
    kept, prompts, targets, items = [], [], [], []
    for ex in examples:
      item = tok.map(ex)
      start = int(item["target_start"])
      if len(item["tokens"]) > self.length:  # prompt + target + EOS must fit, as the evaluator
        continue
      kept.append(ex)
      items.append(item)
      prompts.append(item["tokens"][:start])
      targets.append(len(item["tokens"]) - start)  # target tokens + EOS
    rows = max(self.shards, -(-len(items) // self.shards) * self.shards)
    L = self.length
    arrays: dict[str, np.ndarray] = {k: np.zeros((rows, L), np.int32)
                                     for k in ("inputs", "targets", "positions", "segment_ids")}
    arrays["mask"] = np.zeros((rows, L), np.float32)
    for r, item in enumerate(items):
      t, start = item["tokens"], int(item["target_start"])
      n = len(t) - 1
      arrays["inputs"][r, :n], arrays["targets"][r, :n] = t[:-1], t[1:]
      arrays["positions"][r, :n] = np.arange(n)
      arrays["segment_ids"][r, :n] = 1
      arrays["mask"][r, start - 1:n] = 1.0  # pair j predicts token j + 1: the target and EOS
    budget = self.max_new_tokens or max(targets, default=1)
    return ExampleSet(kept, prompts, budget, arrays, len(examples) - len(kept))

  def outputs(self, params: Any, data: ExampleSet) -> list[str]:
    """Greedy generations (decoded) for the set's prompts."""
    outs = self.generator(params, data.prompts, max_new_tokens=data.budget)
    return [self.tokenizer.decode(o[0].tokens) for o in outs]

  def exact_match(self, params: Any, data: ExampleSet, task: Any) -> float:
    if not data.examples:
      return float("nan")
    texts = self.outputs(params, data)
    return float(np.mean([task.is_correct(ex, t) for ex, t in zip(data.examples, texts)]))

  def log_likelihood(self, params: Any, data: ExampleSet) -> float:
    """Mean log-probability per target token (EOS included), teacher-forced."""
    args = [jax.device_put(data.arrays[k], self._rows)
            for k in ("inputs", "targets", "positions", "segment_ids", "mask")]
    with jax.set_mesh(self.mesh), self.compiles:
      total, count = self._loglik(params, *args)
    count = float(count)
    return float(total) / count if count else float("nan")

  def score(self, params: Any, data: ExampleSet, task: Any) -> tuple[float, float]:
    """(exact match, mean target log-likelihood): higher is better, in that order (a non-finite
    log-likelihood counts as -inf)."""
    ll = self.log_likelihood(params, data)
    return self.exact_match(params, data, task), ll if np.isfinite(ll) else -np.inf


# ---------------------------------------------------------------- the composition

def compose(composer: Composer, task_name: str, fewshot: Sequence[Any], heldout: Sequence[Any], *,
            alpha: Sequence[float] | np.ndarray | None = None, population: int = POPULATION,
            elite_fraction: float = ELITE_FRACTION, iterations: int = ITERATIONS, seed: int = 0,
            progress: Callable[[str], None] | None = None) -> dict[str, Any]:
  """The composition's results on examples already chosen (see `run`): alpha (given, or CEM on
  `fewshot`), few-shot scores, held-out exact match of the composed model, each single expert, the
  base and the best single expert on the few-shot examples."""
  task = task_registry.get(task_name)
  experts = composer.experts
  t0 = time.perf_counter()
  shots, held = composer.prepare(fewshot), composer.prepare(heldout)
  if not shots.examples:
    raise BadInputError("--shots", f"none of the {len(fewshot)} few-shot examples of {task_name!r} "
                        f"fits the model's {composer.length} tokens")
  if not held.examples:
    raise BadInputError("--examples", f"none of the {len(heldout)} held-out examples of "
                        f"{task_name!r} fits the model's {composer.length} tokens")
  onehots = np.eye(len(experts))
  single_fewshot = [composer.score(composer.merged(e), shots, task) for e in onehots]
  best = max(range(len(experts)), key=lambda k: single_fewshot[k])
  base_params = composer.base()
  base_fewshot = composer.score(base_params, shots, task)

  search: dict[str, Any] | None = None
  if alpha is None:
    calls = [0]
    best_so_far = [(-np.inf, -np.inf)]
    started = time.perf_counter()

    def objective(a: np.ndarray) -> tuple[float, float]:
      # alpha = 0 (CEM's clipping makes exact zeros) gives z' = 0: no weights, never chosen.
      s = composer.score(composer.merged(a), shots, task) if a.sum() > 0 else (-np.inf, -np.inf)
      best_so_far[0] = max(best_so_far[0], s)
      calls[0] += 1
      if progress is not None and calls[0] % population == 0:
        it = calls[0] // population
        em, ll = best_so_far[0]
        progress(f"compose {task_name}: CEM iteration {it}/{iterations}: best few-shot exact match "
                 f"{em:.3f} (log-likelihood {ll:.4f}), {time.perf_counter() - started:.0f}s")
      return s

    result = cem(objective, len(experts), population=population, elite_fraction=elite_fraction,
                 iterations=iterations, seed=seed)
    chosen, chosen_fewshot = result.alpha, result.score
    search = {"population": population, "elite_fraction": elite_fraction,
              "iterations": iterations, "seed": seed, "evaluations": result.evaluations,
              "history": [list(h) for h in result.history]}
  else:
    chosen = np.asarray(alpha, np.float64)
    chosen_fewshot = composer.score(composer.merged(chosen), shots, task)

  heldout_em = {"composed": composer.exact_match(composer.merged(chosen), held, task),
                "base": composer.exact_match(base_params, held, task)}
  singles = {name: composer.exact_match(composer.merged(e), held, task)
             for name, e in zip(experts, onehots)}
  heldout_em["best_single"] = singles[experts[best]]
  # Held-out mean target log-likelihood (teacher-forced): a graded view where exact match is 0.
  heldout_ll = {"composed": composer.log_likelihood(composer.merged(chosen), held),
                "base": composer.log_likelihood(base_params, held)}
  single_ll = {name: composer.log_likelihood(composer.merged(e), held)
               for name, e in zip(experts, onehots)}
  heldout_ll["best_single"] = single_ll[experts[best]]
  return {
      "task": task_name, "experts": list(experts), "alpha": [float(x) for x in chosen],
      "alpha_source": "given" if alpha is not None else "cem", "cem": search,
      "shots": len(shots.examples), "heldout": len(held.examples),
      "skipped": {"fewshot": shots.skipped, "heldout": held.skipped},
      "fewshot": {"composed": list(chosen_fewshot), "base": list(base_fewshot),
                  "experts": {n: list(s) for n, s in zip(experts, single_fewshot)}},
      "best_single": experts[best],
      "exact_match": {**heldout_em, "experts": singles},
      "log_likelihood": {**heldout_ll, "experts": single_ll},
      "compiles": {"merge_and_loglik": composer.compiles.count,
                   "generate": sum(composer.generator.compiles.values())},
      "time_s": time.perf_counter() - t0,
  }


def fewshot_examples(config: Any, task_name: str, shots: int) -> list[Any]:
  """The first `shots` examples of the task's TRAIN split (after Task.preprocess)."""
  task = task_registry.get(task_name)
  examples = task.source.load("train", config.seed).examples
  chosen = [examples[i] for i in range(min(shots, len(examples)))]
  return [task.preprocess(ex) for ex in chosen] if task.preprocess is not None else chosen


def heldout_examples(config: Any, task_name: str, count: int) -> list[Any]:
  """The task's held-out examples the evaluator would score (its validation split, after
  eval.skip): disjoint from its train split."""
  from mtjax.eval.heldout import heldout_examples as chosen
  return chosen(config, task_name, count)


def run(workdir: str | epath.PathLike, task: str, *, alpha: Sequence[float] | None = None,
        shots: int = 16, examples: int = HELDOUT, step: int | None = None,
        population: int = POPULATION, elite_fraction: float = ELITE_FRACTION,
        iterations: int = ITERATIONS, seed: int = 0, progress: bool = True,
        devices: Sequence[Any] | None = None, extra: dict[str, Any] | None = None
        ) -> dict[str, Any]:
  """`mtjax eval --compose`: restores the run's checkpoint (default: the latest), composes its
  experts on `task` (alpha given, or CEM on `shots` few-shot examples), scores `examples` held-out
  examples, writes WORKDIR/eval/compose_<task>_step_<S>.json (atomically) and returns its dict
  (with "_path"). extra: more entries for the JSON (a study's settings)."""
  from mtjax.train import rundir
  from mtjax.train import setup as setup_lib

  config = setup_lib.workdir_config(workdir)  # registers the run's tasks; cheap
  checked = check_inputs(config, task, alpha, shots, examples)
  run_ = setup_lib.from_workdir(workdir, step, devices=devices, purpose="compose")
  path, step = run_.workdir, run_.restored_step
  assert path is not None and step is not None
  # Generation batches of the few-shot set's size: every CEM candidate generates for it once.
  composer = Composer(run_.config, run_.spec, run_.mesh, run_.tokenizer, run_.state.params,
                      batch_size=min(run_.config.eval.batch_size, shots))
  say = (lambda line: print(line, file=sys.stderr, flush=True)) if progress else None
  result = compose(composer, task, fewshot_examples(run_.config, task, shots),
                   heldout_examples(run_.config, task, examples), alpha=checked,
                   population=population, elite_fraction=elite_fraction, iterations=iterations,
                   seed=seed, progress=say)
  result["step"] = step
  result["workdir"] = str(path)
  result.update(extra or {})
  out = path / "eval" / f"compose_{task}_step_{step}.json"
  out.parent.mkdir(parents=True, exist_ok=True)
  rundir.replace_file(out, (json.dumps(result, indent=2, sort_keys=True) + "\n").encode())
  result["_path"] = str(out)
  return result


def table(result: dict[str, Any]) -> str:
  """A short table of a composition's held-out exact match (and few-shot scores)."""
  em, few = result["exact_match"], result["fewshot"]
  alpha = ", ".join(f"{a:.3f}" for a in result["alpha"])
  rows = [(f"composed ({result['alpha_source']}: {alpha})", em["composed"], few["composed"]),
          ("base (no expert)", em["base"], few["base"])]
  rows += [(f"expert {n}" + (" (best few-shot)" if n == result["best_single"] else ""),
            em["experts"][n], few["experts"][n]) for n in result["experts"]]
  width = max(len(r[0]) for r in rows)
  lines = [f"{result['task']}: held-out exact match on {result['heldout']} examples; few-shot "
           f"({result['shots']} train examples): exact match / mean target log-likelihood",
           f"{'model':<{width}}  {'held-out':>9}  {'few-shot':>17}"]
  lines += [f"{name:<{width}}  {h:9.4f}  {f[0]:8.4f} / {f[1]:7.4f}" for name, h, f in rows]
  return "\n".join(lines)
