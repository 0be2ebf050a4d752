"""Per-task evaluation on held-out splits: teacher-forced metrics and generation metrics.

Teacher-forced: one compiled eval step (fixed shapes, sharded like the train step) over packed
held-out examples gives per-task loss, token accuracy and entropy. Generation: greedy decoding of
`eval.num_generate` prompts per task scored by the task's scorer (exact match, function-call
structural match, or an open-ended task's verifier) -> `accuracy`; and `eval.num_samples` samples
for `eval.sample_prompts` prompts -> pass@1, pass@n, distinct@n (distinct valid outputs), and a
sequence-level entropy estimate. Logged as eval/<task>/<metric>.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from etils import epath
from flax import nnx

from mtjax import tasks as task_registry
from mtjax.config import Config
from mtjax.data.loader import empty_batch, place
from mtjax.data.pipeline import Tokenize
from mtjax.eval import scorers
from mtjax.errors import BadInputError
from mtjax.eval.decode import Generator
from mtjax.model import ModelSpec
from mtjax.monitoring import CompileCounter
from mtjax.parallel import sharding as sharding_lib
from mtjax.parallel.mesh import Device
from mtjax.parallel.sharding import BATCH_AXES
from mtjax.train import losses


def pack_in_order(examples: Sequence[dict], batch_size: int, seq_len: int) -> list[dict[str, np.ndarray]]:
  """Packs tokenized examples in order, each once, into fixed [batch_size, seq_len] batches."""
  batches, row, fill, segment = [], 0, 0, 0
  for ex in examples:
    n = min(len(ex["tokens"]) - 1, seq_len)
    if not batches:
      batches.append(empty_batch(batch_size, seq_len))
    if fill + n > seq_len:
      row, fill, segment = row + 1, 0, 0
      if row == batch_size:
        batches.append(empty_batch(batch_size, seq_len))
        row = 0
    segment += 1
    place(batches[-1], row, fill, n, ex, ex["task_id"], segment)
    fill += n
  return batches


class Evaluator:
  """Held-out evaluation of the run's tasks; build once, call with params at any step."""

  def __init__(self, config: Config, graphdef: Any, spec: ModelSpec, mesh: jax.sharding.Mesh,
               tokenizer, tasks: Sequence[str] | None = None):
    self.config, self.mesh, self.tokenizer = config, mesh, tokenizer
    e = config.eval
    self.task_names = tuple(tasks or e.tasks or config.data.tasks)
    self.num_tasks = len(config.data.tasks)  # task ids are positions in the run's task list
    shards = mesh.shape["dcn"] * mesh.shape["data"] * mesh.shape["fsdp"]
    self.batch_size = -(-e.batch_size // shards) * shards
    self.examples = {}
    tokenized = []
    for name in self.task_names:
      task_id = config.data.tasks.index(name)
      examples = task_registry.get(name).source.load("validation", config.seed).examples
      self.examples[name] = [examples[i] for i in range(min(len(examples), max(
          e.num_examples, e.num_generate, e.sample_prompts)))]
      rewrite = task_registry.instruction_rewrite(  # the same ablation as in training
          name, config.data.instructions.get(name, "keep"), config.data.tasks, config.seed)
      if rewrite is not None:
        self.examples[name] = [rewrite(ex) for ex in self.examples[name]]
      tok = Tokenize(tokenizer, task_id)
      tokenized += [tok.map(ex) for ex in self.examples[name][: e.num_examples]]
    self.batches = pack_in_order(tokenized, self.batch_size, config.data.seq_len)
    self._batch_sharding = sharding_lib.named(mesh, BATCH_AXES)

    chunk = config.train.loss_chunk

    def eval_step(params, batch):
      model = nnx.merge(graphdef, params)
      hidden = model.features(batch["inputs"], batch["positions"], batch["segment_ids"])
      if chunk:  # as in training: never the whole [B, L, V] float32 logits at once
        head, tied = model.head()
        tok = losses.per_token_chunked(hidden, head.astype(hidden.dtype), batch["targets"],
                                       tied=tied, chunk=chunk)
      else:
        tok = losses.per_token(model.logits(hidden), batch["targets"])
      return {"loss": losses.task_sums(tok["ce"], batch, self.num_tasks),
              "entropy": losses.task_sums(tok["entropy"], batch, self.num_tasks),
              "token_accuracy": losses.task_sums(tok["correct"], batch, self.num_tasks),
              "tokens": losses.token_counts(batch, self.num_tasks)}

    self._eval_step = jax.jit(eval_step)
    self.eval_compiles = CompileCounter()
    self.generator = Generator(graphdef, spec, mesh, max_new_tokens=e.max_new_tokens,
                               eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                               stop_ids=tokenizer.stop_ids,
                               batch_size=self.batch_size)

  def _prompt(self, example) -> np.ndarray:
    return np.concatenate([[self.tokenizer.bos_id], self.tokenizer.encode(example.prompt)]).astype(np.int32)

  def teacher_forced(self, params) -> dict[str, np.ndarray]:
    totals: dict[str, np.ndarray] = {}
    with jax.set_mesh(self.mesh):
      for batch in self.batches:
        device_batch = {k: jax.device_put(v, self._batch_sharding) for k, v in batch.items()}
        with self.eval_compiles:
          sums = self._eval_step(params, device_batch)
        sums = jax.device_get(sums)
        totals = {k: totals[k] + sums[k] if k in totals else sums[k] for k in sums}
    return totals

  def __call__(self, params, step: int) -> dict[str, Any]:
    """eval/<task>/<metric> for every eval task, plus perf/eval_time_s and compile counts."""
    e = self.config.eval
    t0 = time.perf_counter()
    row: dict[str, Any] = {"step": step}
    sums = self.teacher_forced(params)
    for name in self.task_names:
      i = self.config.data.tasks.index(name)
      n = max(float(sums["tokens"][i]), 1.0)
      row[f"eval/{name}/loss"] = float(sums["loss"][i]) / n
      row[f"eval/{name}/entropy"] = float(sums["entropy"][i]) / n
      row[f"eval/{name}/token_accuracy"] = float(sums["token_accuracy"][i]) / n
      row[f"eval/{name}/tokens"] = int(sums["tokens"][i])
    for name in self.task_names:
      task = task_registry.get(name)
      examples = self.examples[name]
      if e.num_generate:
        chosen = examples[: e.num_generate]
        outs = self.generator(params, [self._prompt(ex) for ex in chosen])
        right = [task.is_correct(ex, self.tokenizer.decode(o[0].tokens)) for ex, o in zip(chosen, outs)]
        row[f"eval/{name}/accuracy"] = float(np.mean(right))
      if e.num_samples and e.sample_prompts:
        chosen = examples[: e.sample_prompts]
        outs = self.generator(params, [self._prompt(ex) for ex in chosen], num_samples=e.num_samples,
                              seed=self.config.seed + step, temperature=e.temperature,
                              top_k=e.top_k, top_p=e.top_p)
        k = e.num_samples
        pass1, passk, distinct, logps = [], [], [], []
        for ex, samples in zip(chosen, outs):
          texts = [self.tokenizer.decode(s.tokens) for s in samples]
          ok = [task.is_correct(ex, t) for t in texts]
          pass1.append(scorers.pass_at_k(k, sum(ok), 1))
          passk.append(scorers.pass_at_k(k, sum(ok), k))
          distinct.append(scorers.distinct_k(texts, ok, k))
          logps += [s.logprob for s in samples]
        row[f"eval/{name}/pass@1"] = float(np.mean(pass1))
        row[f"eval/{name}/pass@{k}"] = float(np.mean(passk))
        row[f"eval/{name}/distinct@{k}"] = float(np.mean(distinct))
        row[f"eval/{name}/seq_entropy"] = scorers.sequence_entropy(logps)
    row["perf/eval_time_s"] = time.perf_counter() - t0
    row["perf/eval_compiles"] = self.eval_compiles.count
    row["perf/generate_compiles"] = sum(self.generator.compiles.values())
    return row


def evaluate_checkpoint(workdir: str | epath.PathLike, step: int | None = None,
                        tasks: Sequence[str] = (),
                        devices: Sequence[Device] | None = None) -> dict[str, Any]:
  """`mtjax eval`: restore a run's checkpoint, evaluate, write workdir/eval/step_<S>.json."""
  from mtjax.train import setup as setup_lib

  for name in tasks:
    config = setup_lib.workdir_config(workdir)
    if name not in config.data.tasks:
      raise BadInputError("--tasks", f"{name!r} is not a task of this run ({list(config.data.tasks)})")
  run = setup_lib.from_workdir(workdir, step, devices=devices, purpose="evaluate")
  path, step = run.workdir, run.restored_step
  assert path is not None and step is not None
  evaluator = Evaluator(run.config, run.graphdef, run.spec, run.mesh, run.tokenizer, tasks or None)
  row = evaluator(run.state.params, step)
  out = path / "eval" / f"step_{step}.json"
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(row, indent=2, sort_keys=True) + "\n")
  row["_path"] = str(out)
  return row


def table(row: dict[str, Any]) -> str:
  """A short per-task table of an eval row."""
  per_task: dict[str, dict[str, float]] = {}
  for key, value in row.items():
    if key.startswith("eval/"):
      _, task, metric = key.split("/", 2)
      per_task.setdefault(task, {})[metric] = value
  metrics = sorted({m for d in per_task.values() for m in d if m != "tokens"})
  width = max([len(t) for t in per_task] + [4])
  lines = [f"{'task':<{width}}  " + "  ".join(f"{m:>14}" for m in metrics)]
  for task, values in per_task.items():
    lines.append(f"{task:<{width}}  " + "  ".join(
        f"{values[m]:14.4f}" if m in values else f"{'-':>14}" for m in metrics))
  return "\n".join(lines)
