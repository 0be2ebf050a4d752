"""Training: losses, the step, the loop. `mtjax.train.run(config, workdir)` is the entry point."""

from mtjax.train.loop import RunResult, TrainingDiverged, run  # noqa: F401
