"""Runs `mtjax` with test-only fault hooks, for the kill/preemption tests (a subprocess).

  python tests/fault_driver.py [--step-delay S] [--finalize-delay S --finalize-from STEP]
      [--first-batch-delay S] [--setup-delay S] [--plots-delay S] [--marker PATH] -- ARGS

--step-delay: sleep S seconds after every train step (so a test can signal mid-run).
--finalize-delay: hold Orbax's final commit of checkpoints at step >= STEP for S seconds
  (so a test can kill the process while a save is half-written).
--first-batch-delay: sleep S seconds in the loop's first batch fetch, before the first step runs
  (where a slow data pipeline start or a long step-0 eval would be).
--setup-delay: sleep S seconds at the end of the run's setup (mtjax.train.setup.build).
--plots-delay: sleep S seconds before the run's plots are drawn (after the loop).
--marker: the *-delay flags above create this file when their sleep starts (for the test to wait on).
--run-ahead PATH: at every train step's dispatch, append to PATH whether the state passed in (the
  previous step's output) was still being computed ("pending") or finished ("ready").
"""

import argparse
import asyncio
import sys
import time


def main() -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument("--step-delay", type=float, default=0.0)
  parser.add_argument("--finalize-delay", type=float, default=0.0)
  parser.add_argument("--finalize-from", type=int, default=0)
  parser.add_argument("--first-batch-delay", type=float, default=0.0)
  parser.add_argument("--setup-delay", type=float, default=0.0)
  parser.add_argument("--plots-delay", type=float, default=0.0)
  parser.add_argument("--marker", default=None)
  parser.add_argument("--run-ahead", default=None)
  split = sys.argv.index("--")
  args = parser.parse_args(sys.argv[1:split])
  rest = sys.argv[split + 1:]

  from mtjax import cli
  from mtjax.train import step as step_lib

  if args.run_ahead:
    import jax
    watched_jit_step = step_lib.jit_step

    def watching_jit_step(*a, **k):
      fn = watched_jit_step(*a, **k)

      def watched(state, *x):
        ready = all(leaf.is_ready() for leaf in jax.tree.leaves(state))
        with open(args.run_ahead, "a") as f:
          f.write("ready\n" if ready else "pending\n")
        return fn(state, *x)
      return watched
    step_lib.jit_step = watching_jit_step

  if args.step_delay:
    jit_step = step_lib.jit_step

    def slow_jit_step(*a, **k):
      fn = jit_step(*a, **k)

      def slow(*x):
        out = fn(*x)
        time.sleep(args.step_delay)
        return out
      return slow
    step_lib.jit_step = slow_jit_step

  if args.finalize_delay:
    from orbax.checkpoint._src.path import atomicity
    for cls in (atomicity.AtomicRenameTemporaryPath, atomicity.CommitFileTemporaryPath):
      original = cls.finalize

      async def finalize(self, _original=original):
        name = self.get_final().name
        if name.isdigit() and int(name) >= args.finalize_from:
          await asyncio.sleep(args.finalize_delay)
        return await _original(self)
      cls.finalize = finalize

  def delay(seconds):
    if args.marker:
      open(args.marker, "w").close()
    time.sleep(seconds)

  if args.first_batch_delay:
    from mtjax.train import batches
    next_batch = batches.LoaderSource.next
    fetched = []

    def slow_first_next(self, state):
      if not fetched:
        fetched.append(True)
        delay(args.first_batch_delay)
      return next_batch(self, state)
    batches.LoaderSource.next = slow_first_next

  if args.setup_delay:
    from mtjax.train import setup as setup_lib
    build = setup_lib.build

    def slow_build(*a, **k):
      out = build(*a, **k)
      delay(args.setup_delay)
      return out
    setup_lib.build = slow_build

  if args.plots_delay:
    from mtjax.train import metrics as metrics_lib
    plot = metrics_lib.plot_per_task

    def slow_plot(*a, **k):
      delay(args.plots_delay)
      return plot(*a, **k)
    metrics_lib.plot_per_task = slow_plot

  return cli.main(rest)


if __name__ == "__main__":
  sys.exit(main())
