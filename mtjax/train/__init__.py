"""Training: setup (the one way a run is built), losses, THE step, the loop and its hooks.

`mtjax.train.run(config, workdir)` trains with the default hooks, held-out eval included. Eval is
built on train's public pieces (mtjax.eval imports train, never the reverse), so this facade is
the one place that joins the two: it hands eval's Evaluator to the loop at call time.
"""

from mtjax.train.loop import Loop, RunResult, TrainingDiverged  # noqa: F401
from mtjax.train.loop import run as run_loop


def run(config, workdir, **kwargs) -> RunResult:
  """`mtjax.train.loop.run` with held-out eval (eval.every) as a hook."""
  from mtjax.eval.evaluate import Evaluator
  kwargs.setdefault("evaluator", Evaluator)
  return run_loop(config, workdir, **kwargs)
