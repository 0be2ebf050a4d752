"""`mtjax tokenizer train`: a byte-level BPE trained on the texts of a config's training tasks."""

from __future__ import annotations

import os
from typing import Any

from mtjax import tasks as task_registry
from mtjax.data import tokenizer as tokenizer_lib
from mtjax.data.resolve import resolve_data


def train_for_config(config: Any, vocab_size: int, out: str | os.PathLike,
                     max_examples_per_task: int = 50_000) -> dict[str, Any]:
  """`mtjax tokenizer train`: a byte-level BPE trained on the prompts and targets of the config's
  training tasks (their train splits, at most `max_examples_per_task` each). Returns the path and,
  per task, the longest example in bytes and in the new tokens."""
  config = resolve_data(config)
  texts: dict[str, list[str]] = {}
  for name in config.data.tasks:
    task = task_registry.get(name)
    examples = task.source.load("train", config.seed, config.data.on_bad_record).examples
    chosen = []
    for i in range(min(len(examples), max_examples_per_task)):
      example = examples[i] if task.preprocess is None else task.preprocess(examples[i])
      chosen += [example.prompt, example.target]
    texts[name] = chosen
  path = tokenizer_lib.train_byte_bpe((t for chosen in texts.values() for t in chosen), vocab_size, out)
  tok = tokenizer_lib.HfTokenizer(path)
  stats = {}
  for name, chosen in texts.items():
    pairs = list(zip(chosen[::2], chosen[1::2]))
    stats[name] = {"examples": len(pairs),
                   "max_bytes": max(len((p + t).encode()) for p, t in pairs) + 2,
                   "max_tokens": max(tok.count(p) + tok.count(t) for p, t in pairs) + 2}
  return {"path": path, "vocab_size": tok.vocab_size, "tasks": stats}
