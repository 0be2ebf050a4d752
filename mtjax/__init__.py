"""mtjax: multi-task training in JAX/Flax.

Python API (what a Colab cell calls; the CLI is a thin layer over it):
  mtjax.config.load(path, overrides=()) -> Config
  mtjax.run(config, workdir) -> RunResult  (mtjax.recipes.run: the supervised or GRPO recipe)
  mtjax.train.losses.multitask_objective(logits, batch, task_weights, entropy_coefs)
  mtjax.load(workdir_or_hf_dir, step=None) -> LoadedModel (.generate, .logits, .model, .tokenizer)
  mtjax.model.pretrained.forward(hf_dir, tokens) -> logits (numpy [B, L, vocab] float32)
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def run(config: Any, workdir: Any, **kwargs: Any) -> Any:
  """Trains `config` in `workdir` (resuming its latest checkpoint): see mtjax.recipes.run."""
  from mtjax.recipes import run as run_recipe
  return run_recipe(config, workdir, **kwargs)


def load(path: Any, step: int | None = None, **kwargs: Any) -> Any:
  """A run's checkpoint (workdir) or an HF directory as a LoadedModel: see mtjax.loading.load."""
  from mtjax.loading import load as load_model
  return load_model(path, step, **kwargs)
