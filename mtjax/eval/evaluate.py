"""Per-task evaluation on held-out splits: teacher-forced metrics and generation metrics.

Teacher-forced: one compiled eval step (fixed shapes, sharded like the train step) over packed
held-out examples gives per-task loss, token accuracy and entropy. Generation: greedy decoding of
`eval.num_generate` prompts per task scored by the task's scorer (exact match, function-call
structural match, or an open-ended task's verifier) -> `accuracy`; and `eval.num_samples` samples
for `eval.sample_prompts` prompts -> pass@1, pass@n, distinct@n (distinct valid outputs), and a
sequence-level entropy estimate. Logged as eval/<task>/<metric>.

Lengths: the model's length L is what it was trained on (`model_length`: data.seq_len).
- Teacher-forced examples go through `pipeline.fit` under data.truncate, as in training (prompt
  cut from the left after BOS under prompt_left); one that fit rejects is skipped.
- Generation budgets (eval.max_new_tokens): "auto" gives each task its longest target, in tokens,
  plus EOS, over the held-out examples it generates for, capped by L - 1; a number is every
  task's budget (it must be below L). A prompt of p tokens (BOS included) gets at most L - p new
  tokens. A prompt whose own target and EOS do not fit after it (p + target + 1 > L: its reference
  answer could not be produced, so a miss would measure the length, not the model) is skipped.
  Prompt buckets are decode.buckets_for(L); one compilation per bucket serves every budget.
- eval/<task>/skipped counts the task's held-out examples left out of some metric (teacher-forced
  or generation) by these rules; eval/<task>/truncated the teacher-forced ones cut to fit;
  eval/<task>/max_new_tokens its budget. Metrics average over what was scored: a metric with
  nothing scored is absent from the row (never NaN), and a task with every example skipped gets
  a one-line warning on stderr when the evaluator is built.

Tasks: any registered task can be evaluated (eval-only benchmarks on any checkpoint). The run's
tasks keep their task ids (positions in data.tasks); other tasks get ids after them.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from mtjax import tasks as task_registry
from mtjax.config import Config
from mtjax.data.loader import empty_batch, place
from mtjax.data.pipeline import Tokenize, fit_example, searched_instruction
from mtjax.data.tokenizer import ChatTokenizer, SlotTokenizer, generated_count
from mtjax.eval import scorers
from mtjax.errors import BadInputError
from mtjax.eval.decode import Generator, buckets_for
from mtjax.eval.heldout import heldout_examples
from mtjax.model import ModelSpec
from mtjax.monitoring import CompileCounter
from mtjax.parallel import sharding as sharding_lib
from mtjax.parallel.mesh import Device
from mtjax.parallel.sharding import BATCH_AXES
from mtjax.train import losses


def model_length(config: Config) -> int:
  """The longest sequence the model handles: the length it was trained on (data.seq_len)."""
  return config.data.seq_len


def auto_budget(target_tokens: Sequence[int], length: int) -> int:
  """eval.max_new_tokens=auto: the longest target plus EOS, capped by length - 1 (room for BOS)."""
  return min(max(target_tokens, default=0) + 1, length - 1)


def pack_in_order(examples: Sequence[dict], batch_size: int, seq_len: int) -> list[dict[str, np.ndarray]]:
  """Packs tokenized examples in order, each once, into fixed [batch_size, seq_len] batches
  (fitted first: see pipeline.fit_example; an example is cut to its first seq_len pairs)."""
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
  """Held-out evaluation of registered tasks (default: the run's); build once, call with params
  at any step."""

  def __init__(self, config: Config, graphdef: Any, spec: ModelSpec, mesh: jax.sharding.Mesh,
               tokenizer, tasks: Sequence[str] | None = None):
    self.config, self.mesh, self.tokenizer = config, mesh, tokenizer
    e = config.eval
    length = self.length = model_length(config)
    run_tasks = tuple(config.data.tasks)
    self.task_names = tuple(dict.fromkeys(tasks or e.tasks or run_tasks))
    known = task_registry.names()
    unknown = [n for n in self.task_names if n not in known]
    if unknown:
      raise BadInputError("eval.tasks", f"unknown task {', '.join(map(repr, unknown))} "
                          f"(known: {', '.join(known)})")
    # The run's tasks keep their ids (positions in data.tasks); other tasks come after them.
    extras = tuple(n for n in self.task_names if n not in run_tasks)
    self.task_ids = {n: i for i, n in enumerate(run_tasks + extras)}
    self.num_tasks = len(self.task_ids)
    shards = mesh.shape["dcn"] * mesh.shape["data"] * mesh.shape["fsdp"]
    self.batch_size = -(-e.batch_size // shards) * shards
    self.instructions: dict[str, str] = {}  # searched instructions in effect (set_instructions)
    self._prepare()
    self._batch_sharding = sharding_lib.named(mesh, BATCH_AXES)

    chunk = config.train.loss_chunk
    num_tasks = self.num_tasks

    def eval_step(params, batch):
      model = nnx.merge(graphdef, params)
      hidden = model.features(batch["inputs"], batch["positions"], batch["segment_ids"],
                              adapter_ids=batch.get("task_ids"))
      if chunk:  # as in training: never the whole [B, L, V] float32 logits at once
        head, tied = model.head()
        tok = losses.per_token_chunked(hidden, head.astype(hidden.dtype), batch["targets"],
                                       tied=tied, chunk=chunk)
      else:
        tok = losses.per_token(model.logits(hidden), batch["targets"])
      return {"loss": losses.task_sums(tok["ce"], batch, num_tasks),
              "entropy": losses.task_sums(tok["entropy"], batch, num_tasks),
              "token_accuracy": losses.task_sums(tok["correct"], batch, num_tasks),
              "tokens": losses.token_counts(batch, num_tasks)}

    self._eval_step = jax.jit(eval_step)

    def drift_step(params, reference, batch):
      """Per task: the sum over loss-carrying tokens of KL(model || reference), exact over the
      vocabulary, `chunk` tokens at a time (never [B, L, V] float32 logits at once)."""
      args = (batch["inputs"], batch["positions"], batch["segment_ids"])
      ids = batch.get("task_ids")
      heads = []
      for p in (params, reference):
        model = nnx.merge(graphdef, p)
        h = model.features(*args, adapter_ids=ids)
        heads.append((h.reshape(-1, h.shape[-1]), model))
      (hp, mp), (hq, mq) = heads
      n = hp.shape[0]
      size = min(chunk or n, n)
      pad = -n % size
      hp, hq = (jnp.pad(h, ((0, pad), (0, 0))).reshape(-1, size, h.shape[-1]) for h in (hp, hq))

      def kl(xs):
        a, b = xs
        lp = jax.nn.log_softmax(mp.logits(a[None])[0], axis=-1)
        lq = jax.nn.log_softmax(mq.logits(b[None])[0], axis=-1)
        return jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)

      per_token = jax.lax.map(kl, (hp, hq)).reshape(-1)[:n].reshape(batch["inputs"].shape)
      return losses.task_sums(per_token, batch, num_tasks)

    self._drift_step = jax.jit(drift_step)
    self.eval_compiles = CompileCounter()
    # One generator for every task: budgets are per-call arguments (one compilation per bucket),
    # each bucket's KV cache sized for the largest budget that can apply in it.
    self.generator = Generator(graphdef, spec, mesh, max_new_tokens=max(self.budgets.values(), default=1),
                               eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                               stop_ids=tokenizer.stop_ids, batch_size=self.batch_size,
                               buckets=buckets_for(length), max_len=length)

  def set_instructions(self, instructions: Mapping[str, str]) -> None:
    """Evaluates these tasks with these instructions (the instruction search's, in effect in
    training: mtjax.recipes.fast_context); the others with their own."""
    if dict(instructions) != self.instructions:
      self.instructions = dict(instructions)
      self._prepare()

  def _prepare(self) -> None:
    """Each task's held-out examples, tokenized: prompts to generate from, packed batches."""
    config, tokenizer, e, length = self.config, self.tokenizer, self.config.eval, self.length
    num_gen = max(e.num_generate, e.sample_prompts if e.num_samples else 0)
    self.examples: dict[str, list] = {}
    self.prompts: dict[str, list[np.ndarray]] = {}  # [BOS] prompt of each example
    self.generate_ok: dict[str, list[bool]] = {}  # its prompt leaves room for its target + EOS
    self.budgets: dict[str, int] = {}  # new tokens per prompt (capped by the room it leaves)
    # The last call's greedy generations, one record per scored prompt (`mtjax eval` writes them
    # beside the scores: eval/step_<S>.samples.jsonl).
    self.samples: list[dict[str, Any]] = []
    self.skipped: dict[str, int] = {}
    self.truncated: dict[str, int] = {}
    tokenized = []
    for name in self.task_names:
      # After eval.skip examples (a study's tuning split), the reported ones.
      chosen = heldout_examples(config, name, max(e.num_examples, num_gen))
      if name in self.instructions:  # the instruction search's text (as in training)
        text = self.instructions[name]
        chosen = [dataclasses.replace(ex, instruction=searched_instruction(ex.instruction, text))
                  for ex in chosen]
      self.examples[name] = chosen
      tok = Tokenize(tokenizer, self.task_ids[name])
      items = [tok.map(ex) for ex in chosen]
      self.prompts[name] = [item["tokens"][: item["target_start"]] for item in items]
      targets = [len(item["tokens"]) - item["target_start"] - 1 for item in items]
      if isinstance(getattr(tokenizer, "base", None) if isinstance(tokenizer, SlotTokenizer)
                    else tokenizer, ChatTokenizer):  # generation stops at the end-of-turn token
        targets = [generated_count(tokenizer, ex.target) for ex in chosen]
      self.generate_ok[name] = [len(p) + t + 1 <= length for p, t in zip(self.prompts[name], targets)]
      skipped = {i for i in range(min(len(items), num_gen)) if not self.generate_ok[name][i]}
      truncated = 0
      for i, item in enumerate(items[: e.num_examples]):
        fitted = fit_example(item, length, config.data.truncate)
        if fitted is None:
          skipped.add(i)
          continue
        truncated += fitted[1] < len(item["tokens"]) - 1
        tokenized.append(fitted[0])
      if num_gen:
        self.budgets[name] = (auto_budget(targets[:num_gen], length) if e.max_new_tokens == "auto"
                              else int(e.max_new_tokens))
      self.skipped[name], self.truncated[name] = len(skipped), truncated
      wanted = max(min(len(items), e.num_examples), min(len(items), num_gen))
      if wanted and len(skipped) == wanted:
        print(f"warning: eval task {name}: all {wanted} held-out examples are too long for the "
              f"model's {length} tokens (data.seq_len); skipped, counted in eval/{name}/skipped",
              file=sys.stderr)
    self.batches = pack_in_order(tokenized, self.batch_size, length)

  def _generated_for(self, name: str, count: int) -> list[int]:
    """Indices of the task's first `count` examples whose prompts are generated for."""
    return [i for i in range(min(count, len(self.examples[name]))) if self.generate_ok[name][i]]

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

  def drift(self, params, reference) -> np.ndarray:
    """[num_tasks] summed KL(model || reference) over the held-out teacher-forced tokens."""
    total = np.zeros(self.num_tasks)
    with jax.set_mesh(self.mesh):
      for batch in self.batches:
        device_batch = {k: jax.device_put(v, self._batch_sharding) for k, v in batch.items()}
        with self.eval_compiles:
          total = total + np.asarray(jax.device_get(self._drift_step(params, reference, device_batch)))
    return total

  def __call__(self, params, step: int, reference=None) -> dict[str, Any]:
    """eval/<task>/<metric> for every eval task, plus perf/eval_time_s and compile counts.
    reference: the run's starting params, for eval/<task>/kl_drift (eval.drift)."""
    e = self.config.eval
    t0 = time.perf_counter()
    row: dict[str, Any] = {"step": step}
    self.samples = []
    sums = self.teacher_forced(params)
    drift = self.drift(params, reference) if reference is not None else None
    for name in self.task_names:
      i = self.task_ids[name]
      n = float(sums["tokens"][i]) if sums else 0.0
      if n:  # absent when every example was skipped
        row[f"eval/{name}/loss"] = float(sums["loss"][i]) / n
        row[f"eval/{name}/entropy"] = float(sums["entropy"][i]) / n
        row[f"eval/{name}/token_accuracy"] = float(sums["token_accuracy"][i]) / n
        if drift is not None:
          row[f"eval/{name}/kl_drift"] = float(drift[i]) / n
      row[f"eval/{name}/tokens"] = int(n)
      row[f"eval/{name}/skipped"] = self.skipped[name]
      row[f"eval/{name}/truncated"] = self.truncated[name]
      if name in self.budgets:
        row[f"eval/{name}/max_new_tokens"] = self.budgets[name]
    for name in self.task_names:
      task = task_registry.get(name)
      examples, prompts = self.examples[name], self.prompts[name]
      budget = self.budgets.get(name, 1)
      chosen = self._generated_for(name, e.num_generate)
      if chosen:
        outs = self.generator(params, [prompts[j] for j in chosen], max_new_tokens=budget,
                              adapter=self.task_ids[name])
        texts = [self.tokenizer.decode(o[0].tokens) for o in outs]
        right = [task.is_correct(examples[j], text) for j, text in zip(chosen, texts)]
        row[f"eval/{name}/accuracy"] = float(np.mean(right))
        self.samples += [{"task": name, "index": j, "prompt": examples[j].prompt, "output": text,
                          "reference": examples[j].target, "correct": bool(ok)}
                         for j, text, ok in zip(chosen, texts, right)]
      chosen = self._generated_for(name, e.sample_prompts) if e.num_samples else []
      if chosen:
        outs = self.generator(params, [prompts[j] for j in chosen], num_samples=e.num_samples,
                              seed=self.config.seed + step, temperature=e.temperature,
                              top_k=e.top_k, top_p=e.top_p, max_new_tokens=budget,
                              adapter=self.task_ids[name])
        k = e.num_samples
        pass1, passk, distinct, logps = [], [], [], []
        for j, samples in zip(chosen, outs):
          texts = [self.tokenizer.decode(s.tokens) for s in samples]
          ok = [task.is_correct(examples[j], t) for t in texts]
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

  if tasks:  # any registered task (eval-only benchmarks too); the run's own tasks registered first
    setup_lib.workdir_config(workdir)
    known = task_registry.names()
    unknown = [n for n in tasks if n not in known]
    if unknown:
      raise BadInputError("--tasks", f"unknown task {', '.join(map(repr, unknown))} "
                          f"(known: {', '.join(known)})")
  run = setup_lib.from_workdir(workdir, step, devices=devices, purpose="evaluate")
  path, step = run.workdir, run.restored_step
  assert path is not None and step is not None
  from mtjax.train import rundir
  rundir.check_writable(path / "eval", "mtjax eval writes its scores there")  # before, not after
  evaluator = Evaluator(run.config, run.graphdef, run.spec, run.mesh, run.tokenizer, tasks or None)
  return _write(path, step, evaluator(run.state.params, step), evaluator.samples)


def evaluate_pretrained(config: Config, out: str | epath.PathLike,
                        devices: Sequence[Device] | None = None) -> dict[str, Any]:
  """`mtjax eval --model`: score a pretrained model (config.model.pretrained: an HF directory, a
  .gguf file or pkg:smollm2) without a run, on config.data.tasks with config.eval's settings, as
  a run of this config would score it at step 0; writes out/eval/step_0.json and its samples."""
  from mtjax.train import rundir
  from mtjax.train import setup as setup_lib
  out = epath.Path(out)
  rundir.check_writable(out / "eval", "mtjax eval writes its scores there")
  run = setup_lib.build(config, devices=devices, any_mesh=True)
  evaluator = Evaluator(run.config, run.graphdef, run.spec, run.mesh, run.tokenizer)
  return _write(out, 0, evaluator(run.state.params, 0), evaluator.samples)


def _write(path: epath.Path, step: int, row: dict[str, Any],
           samples_rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """Merges `row` into path/eval/step_<step>.json and the samples into its .samples.jsonl."""
  from mtjax.train import rundir
  out = path / "eval" / f"step_{step}.json"
  out.parent.mkdir(parents=True, exist_ok=True)
  with rundir.file_lock(out):  # atomic writes: a temporary file renamed locally, one upload on gs://  # two evals of one step (--tasks a, --tasks b) merge, not race
    stored = {}
    if out.exists():  # another --tasks subset of this step: keep its rows, refresh this one's
      try:
        stored = json.loads(out.read_text())
      except ValueError:
        out.rename(out.with_name(f"{out.name}.unreadable.{int(time.time())}"))  # never deleted
    merged = {**stored, **row}
    rundir.replace_file(out, (json.dumps(merged, indent=2, sort_keys=True) + "\n").encode())
    if samples_rows:  # this evaluation's tasks replace their own lines, others' stay
      samples = out.with_name(f"step_{step}.samples.jsonl")
      done = {r["task"] for r in samples_rows}
      kept = [line for line in (samples.read_text().splitlines() if samples.exists() else [])
              if line.strip() and json.loads(line).get("task") not in done]
      lines = kept + [json.dumps(r, ensure_ascii=False) for r in samples_rows]
      rundir.replace_file(samples, ("\n".join(lines) + "\n").encode())
      row["_samples"] = str(samples)
  row["_path"] = str(out)
  return row


COUNTS = ("max_new_tokens", "skipped", "truncated")  # integer columns, after the metrics


def table(row: dict[str, Any]) -> str:
  """A short per-task table of an eval row: every metric, then the counts."""
  per_task: dict[str, dict[str, float]] = {}
  for key, value in row.items():
    if key.startswith("eval/"):
      _, task, metric = key.split("/", 2)
      per_task.setdefault(task, {})[metric] = value
  present = {m for d in per_task.values() for m in d if m != "tokens"}
  metrics = sorted(present - set(COUNTS)) + [m for m in COUNTS if m in present]
  width = max([len(t) for t in per_task] + [4])

  def cell(values: dict[str, float], m: str) -> str:
    if m not in values:
      return f"{'-':>14}"
    return f"{int(values[m]):14d}" if m in COUNTS else f"{values[m]:14.4f}"

  lines = [f"{'task':<{width}}  " + "  ".join(f"{m:>14}" for m in metrics)]
  for task, values in per_task.items():
    lines.append(f"{task:<{width}}  " + "  ".join(cell(values, m) for m in metrics))
  return "\n".join(lines)
