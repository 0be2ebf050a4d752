"""Training: setup (the one way a run is built), the state, losses, THE step, the loop and its hooks.

The generic run is `mtjax.train.loop.run(config, workdir, recipe)`; the recipes (mtjax.recipes:
supervised, GRPO) bring the step, the batch source and the hooks, held-out eval included, and
`mtjax.recipes.run(config, workdir)` picks one by the config. Nothing here imports mtjax.eval,
mtjax.rl or the recipes (tests/test_layers.py checks the package layers).
"""

from mtjax.train.loop import Loop, RunResult, TrainingDiverged  # noqa: F401
