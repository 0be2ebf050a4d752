"""Runs `mtjax` with test-only fault hooks, for the kill/preemption tests (a subprocess).

  python tests/fault_driver.py [--step-delay S] [--finalize-delay S --finalize-from STEP] -- ARGS

--step-delay: sleep S seconds after every train step (so a test can signal mid-run).
--finalize-delay: hold Orbax's final commit of checkpoints at step >= STEP for S seconds
  (so a test can kill the process while a save is half-written).
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
  split = sys.argv.index("--")
  args = parser.parse_args(sys.argv[1:split])
  rest = sys.argv[split + 1:]

  from mtjax import cli
  from mtjax.train import step as step_lib

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

  return cli.main(rest)


if __name__ == "__main__":
  sys.exit(main())
