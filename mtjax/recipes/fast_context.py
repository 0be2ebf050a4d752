"""The discrete fast channel in training: instructions found by search beside the slow weights.

Every train.instruction_search.every steps, `InstructionSearchHook` (a hook of the supervised
recipe: it scores with eval's held-out examples and packing) runs one round of the
evolutionary search (mtjax.train.instruction_search: pool phrasings, crossover with other tasks'
instructions, word edits; elitist) for every task, each candidate, and every text the search
keeps (scores from older params are dropped each round), scored with the CURRENT params
by the mean log-likelihood of the targets of the task's first `examples` held-out examples (the
validation split's start: a study's tuning split), teacher-forced in packed batches (one compile).
A task whose best instruction changed gets it fed to the loader (`set_instruction`: its training
examples read it from step s + data.feedback_lag on) and to the evaluator (its held-out examples
read the instruction in effect). The search's state lives in the loader state (checkpointed), so a
resumed run searches, trains and evaluates as an uninterrupted one.

Rows: fast/<task>/instruction_score (the current instruction's score) and
fast/<task>/instruction_words, at every round's step; the texts go to
<workdir>/instructions.jsonl, one line per round.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtjax import tasks as task_registry
from mtjax.config import InstructionSearchConfig
from mtjax.data.pipeline import Tokenize, fit_example, searched_instruction
from mtjax.eval.evaluate import model_length, pack_in_order
from mtjax.eval.heldout import heldout_examples
from mtjax.parallel import sharding as sharding_lib
from mtjax.train import instruction_search as search_lib
from mtjax.train import losses
from mtjax.train.hooks import Hook, Loop, StepOutput

MAX_GROUPS = 64  # candidates scored in one call at most (the compiled group axis)


class TuningScorer:
  """score(params, task, texts) -> per text, the mean log-likelihood per target token of the
  task's tuning examples with that instruction (pipeline.searched_instruction)."""

  def __init__(self, config: Any, graphdef: Any, mesh: jax.sharding.Mesh, tokenizer: Any,
               examples: Mapping[str, Sequence[Any]], task_ids: Mapping[str, int]):
    self.config, self.mesh, self.tokenizer = config, mesh, tokenizer
    self.examples, self.task_ids = dict(examples), dict(task_ids)
    self.length = model_length(config)
    shards = mesh.shape["dcn"] * mesh.shape["data"] * mesh.shape["fsdp"]
    self.rows = -(-config.eval.batch_size // shards) * shards
    self._sharding = sharding_lib.named(mesh, sharding_lib.BATCH_AXES)
    chunk = config.train.loss_chunk

    def group_sums(params, batch, groups):
      model = nnx.merge(graphdef, params)
      hidden = model.features(batch["inputs"], batch["positions"], batch["segment_ids"],
                              adapter_ids=batch["task_ids"])
      head, tied = model.head()
      if chunk:
        ce = losses.per_token_chunked(hidden, head.astype(hidden.dtype), batch["targets"],
                                      tied=tied, chunk=chunk)["ce"]
      else:
        ce = losses.per_token(model.logits(hidden), batch["targets"])["ce"]
      mask = batch["loss_mask"].reshape(-1)
      ids = jnp.where(groups.reshape(-1) >= 0, groups.reshape(-1), MAX_GROUPS)
      logp = jax.ops.segment_sum(-ce.reshape(-1) * mask, ids, num_segments=MAX_GROUPS + 1)
      count = jax.ops.segment_sum(mask, ids, num_segments=MAX_GROUPS + 1)
      return logp[:MAX_GROUPS], count[:MAX_GROUPS]

    self._fn = jax.jit(group_sums)

  def __call__(self, params: Any, task: str, texts: Sequence[str]) -> list[float]:
    if len(texts) > MAX_GROUPS:
      raise ValueError(f"at most {MAX_GROUPS} candidates per call, got {len(texts)}")
    tok = Tokenize(self.tokenizer, self.task_ids[task])
    items, groups = [], []
    for g, text in enumerate(texts):
      for ex in self.examples[task]:
        ex = dataclasses.replace(ex, instruction=searched_instruction(ex.instruction, text))
        fitted = fit_example(tok.map(ex), self.length, self.config.data.truncate)
        if fitted is not None:
          items.append(fitted[0])
          groups.append({**fitted[0], "task_id": g})
    batches = pack_in_order(items, self.rows, self.length)
    layout = pack_in_order(groups, self.rows, self.length)  # the same places; task id = group
    logp, count = np.zeros(MAX_GROUPS), np.zeros(MAX_GROUPS)
    with jax.set_mesh(self.mesh):
      for batch, where in zip(batches, layout):
        device = {k: jax.device_put(v, self._sharding) for k, v in batch.items()}
        a, b = self._fn(params, device, jax.device_put(where["task_ids"], self._sharding))
        logp += np.asarray(jax.device_get(a), np.float64)
        count += np.asarray(jax.device_get(b), np.float64)
    return [float(logp[g] / count[g]) if count[g] else float("-inf") for g in range(len(texts))]


def search_config(cfg: InstructionSearchConfig, seed: int) -> search_lib.SearchConfig:
  return search_lib.SearchConfig(population=cfg.population, elite=cfg.elite,
                                 mutations_per_round=cfg.mutations, seed=seed)


class InstructionSearchHook(Hook):
  """One search round per task every `every` steps (see the module docstring). Needs the mixture
  loader's batch source (its state holds the search's and the instruction schedule)."""

  def __init__(self, cfg: InstructionSearchConfig):
    self.cfg, self.every = cfg, cfg.every
    self._state: search_lib.SearchState | None = None
    self._loader: Any = None
    self._scorer: TuningScorer | None = None

  def _ensure(self, loop: Loop) -> search_lib.SearchState:
    if self._state is not None:
      return self._state
    loader: Any = getattr(loop.source, "loader", loop.source)
    if not hasattr(loader, "set_instruction"):
      raise TypeError("train.instruction_search needs the mixture loader's batch source "
                      f"(mtjax.train.batches.LoaderSource), not {type(loop.source).__name__}")
    self._loader = loader
    config, setup = loop.config, loop.setup
    tuning = config.replace(**{"eval.skip": 0})
    examples = {t: heldout_examples(tuning, t, self.cfg.examples) for t in config.data.tasks}
    self._scorer = TuningScorer(config, setup.graphdef, setup.mesh, setup.tokenizer, examples,
                                {t: i for i, t in enumerate(config.data.tasks)})
    if jax.process_index() == 0 and loop.workdir is not None:
      _drop_rounds_after(loop.workdir / "instructions.jsonl", loop.start)  # redone after a resume
    saved = loader.state.get("instruction_search")
    if saved is not None:
      self._state = search_lib.from_json(saved)
    else:
      starts = {t: examples[t][0].instruction if examples[t] else "" for t in config.data.tasks}
      pool = sorted({s.strip() for s in starts.values() if s.strip()} | set(_builtin_pool()))
      self._state = search_lib.init_state({t: s.strip() for t, s in starts.items()}, pool,
                                          search_config(self.cfg, config.seed))
    return self._state

  def before_step(self, loop: Loop, step: int) -> None:
    self._ensure(loop)

  def after_step(self, loop: Loop, out: StepOutput) -> None:
    if not self.due(out.done):
      return
    state = self._ensure(loop)
    scorer = self._scorer
    assert scorer is not None
    params = loop.state.params
    before = dict(state.current)
    # The params moved since the last round: every kept text is scored again with these.
    state = dataclasses.replace(state, scores={t: {} for t in state.scores})
    state = search_lib.step(state, lambda task, texts: scorer(params, task, texts),
                            search_config(self.cfg, loop.config.seed))
    self._state = state
    for task, text in sorted(state.current.items()):
      if text != before.get(task):
        self._loader.set_instruction(task, text)
    self._loader.set_search(search_lib.to_json(state))
    scores = search_lib.current_scores(state)
    loop.write({"step": out.done,
                **{f"fast/{t}/instruction_score": float(s) for t, s in scores.items() if s is not None},
                **{f"fast/{t}/instruction_words": len(x.split()) for t, x in state.current.items()}})
    if jax.process_index() == 0 and loop.workdir is not None:
      with (loop.workdir / "instructions.jsonl").open("a") as f:
        f.write(json.dumps({"step": out.done, "round": state.round, "instructions": state.current,
                            "scores": scores}) + "\n")


def _drop_rounds_after(path: Any, step: int) -> None:
  if not path.exists():
    return
  lines = [l for l in path.read_text().splitlines() if l.strip()]
  kept = [l for l in lines if json.loads(l)["step"] <= step]
  if len(kept) != len(lines):
    path.write_text("".join(l + "\n" for l in kept))


def _builtin_pool() -> tuple[str, ...]:
  return tuple(s.strip() for s in task_registry._builtin_instructions() if s.strip())
