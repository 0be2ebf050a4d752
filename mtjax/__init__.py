"""mtjax: multi-task training in JAX/Flax.

Python API (what a Colab cell calls; the CLI is a thin layer over it):
  mtjax.config.load(path, overrides=()) -> Config
  mtjax.train.run(config, workdir) -> RunResult
  mtjax.train.losses.multitask_objective(logits, batch, task_weights, entropy_coefs)
"""

__version__ = "0.1.0"
