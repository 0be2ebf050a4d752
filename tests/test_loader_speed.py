"""The planned, vectorized loader against the per-example algorithm it replaced; worker processes."""

import dataclasses
import json

import grain
import numpy as np
import pytest

from conftest import tiny_config
from mtjax.data import mixture, pipeline
from mtjax.data import rows as rows_lib
from mtjax.data.loader import MixtureLoader
from mtjax.data.mixture import Sampler
from mtjax.data.tokenizer import ByteTokenizer
from registry_guard import registry_snapshot


def _reference(cfg, steps, rows=slice(None)):
  """The previous loader's algorithm, example by example through the Grain pipelines: draw a
  task, read its next tokenized example, fit it to seq_len under data.truncate (skipped: the
  draw takes the task's next one), close the row if it does not fit, place it."""
  from mtjax.resolve import resolve
  from mtjax.tasks import instruction_rewrite
  cfg = resolve(cfg)
  d, names = cfg.data, cfg.data.tasks
  tok = ByteTokenizer()
  data = [pipeline.task_dataset(n, i, tok, cfg.seed, rewrite=instruction_rewrite(
      n, d.instructions.get(n, "keep"), tuple(names), cfg.seed)) for i, n in enumerate(names)]
  schedule = mixture.schedule_from_config(cfg)
  sampler, cursors, out = Sampler(len(names)), [0] * len(names), []
  first, stop, _ = rows.indices(d.batch_size)
  for step in range(steps):
    rates = schedule.at(step)
    arrays = rows_lib.empty_batch(stop - first, d.seq_len)
    row, fill, segment, pending, skips = 0, 0, 0, None, 0
    while row < d.batch_size:
      if pending is None:
        before = sampler.state()
        pending = (sampler.draw(rates), before)
      task, _ = pending
      example = data[task].tokens[cursors[task]]
      assert example is not None
      fitted = pipeline.fit_example(example, d.seq_len, d.truncate)
      if fitted is None:  # too long: skipped for good
        cursors[task] += 1
        skips += 1
        assert skips < 2000, f"task {task}: no example fits seq_len {d.seq_len} ({d.truncate})"
        continue
      skips = 0
      example, n = fitted
      if fill + n > d.seq_len:
        row, fill, segment = row + 1, 0, 0
        continue
      segment += 1
      if first <= row < stop:
        rows_lib.place(arrays, row - first, fill, n, example, task, segment)
      cursors[task] += 1
      fill += n
      pending = None
    if pending is not None:
      sampler.credits = np.asarray(pending[1])
    out.append((arrays, sampler.state(), list(cursors)))
  return out


def _tiny_task(name, size):
  """A registered task of `size` examples: the loader wraps its epochs within a few steps."""
  from mtjax import tasks
  from mtjax.tasks.sources import GeneratorSource
  base = tasks.get("reverse")
  examples = tuple(tasks.Example("rev: ", "x" * (i % 9 + 1) + "\n", "y" * (i % 5))
                   for i in range(size))
  tasks.register(dataclasses.replace(base, name=name, source=GeneratorSource(
      lambda split, seed: examples)), replace=True)


CASES = {
    "weights_truncation": {"data.mixture": {"reverse": 5.0, "addition": 2.0, "grammar": 1.0},
                           "data.seq_len": 20, "data.batch_size": 6},
    "truncate_right": {"data.truncate": "right", "data.seq_len": 20, "data.batch_size": 6},
    # grammar examples are 38-57 tokens whole: at 48 skip drops some and keeps some.
    "truncate_skip": {"data.truncate": "skip", "data.seq_len": 48, "data.batch_size": 6},
    "stages_zero_rate": {"data.schedule": "stages", "data.batch_size": 4, "data.stages": (
        (0, {"reverse": 1.0, "addition": 1.0, "grammar": 0.0}), (5, {"grammar": 1.0}))},
    "instructions": {"data.instructions": {"reverse": "wrong", "addition": "empty"}},
    "epochs": {"data.tasks": ("tiny1", "tiny30", "reverse"), "data.batch_size": 4,
               "data.mixture": {"tiny1": 1.0, "tiny30": 2.0, "reverse": 1.0},
               "train.loss_weights": {}, "train.entropy_coefs": {}},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_batches_and_states_equal_the_per_example_reference(case):
  with registry_snapshot():
    _tiny_task("tiny1", 1)
    _tiny_task("tiny30", 30)
    cfg = tiny_config(**{"data.batch_size": 8, "data.seq_len": 48, "seed": 3, **CASES[case]})
    steps = 12
    size = cfg.data.batch_size
    for index, count in ((0, 1), (1, 2)):  # the whole batch; the second process's rows
      rows = slice(index * size // count, (index + 1) * size // count)
      reference = _reference(cfg, steps, rows)
      loader = MixtureLoader.from_config(cfg, prefetch=0, process_index=index, process_count=count)
      for step, (arrays, credits, cursors) in enumerate(reference):
        got = next(loader)
        assert got.step == step
        for k in arrays:
          np.testing.assert_array_equal(got.arrays[k], arrays[k], err_msg=f"{case} {k} {step}")
          assert got.arrays[k].dtype == arrays[k].dtype
        assert got.state_after["credits"] == credits  # float for float
        assert list(got.state_after["cursors"].values()) == cursors
      loader.close()


def test_shuffled_order_is_grains():
  for size, seed in ((1, 5), (7, 0), (100, 2**32 - 3)):
    ds = grain.MapDataset.range(size).shuffle(seed=seed).repeat(None)
    np.testing.assert_array_equal(pipeline.shuffled_order(size, seed, 0, 3 * size + 2),
                                  [ds[i] for i in range(3 * size + 2)])
    np.testing.assert_array_equal(pipeline.shuffled_order(size, seed, size - 1, size + 1),
                                  [ds[size - 1], ds[size]])


class _SlowBytes(ByteTokenizer):
  """Byte ids through the generic (per-example encode) path."""


def test_vectorized_tokenize_equals_the_generic_path_and_tokenize_map():
  prompts, targets = ["ab", "", "ünï", "x"], ["c", "dé", "", ""]
  fast = rows_lib.tokenize(ByteTokenizer(), prompts, targets)
  slow = rows_lib.tokenize(_SlowBytes(), prompts, targets)
  for a, b in zip(fast, slow):
    np.testing.assert_array_equal(a, b)
  flat, offsets, starts = fast
  from mtjax.tasks import Example
  for i, (p, t) in enumerate(zip(prompts, targets)):
    item = pipeline.Tokenize(ByteTokenizer(), 0).map(Example("", p, t))
    np.testing.assert_array_equal(flat[offsets[i] : offsets[i] + len(item["tokens"])], item["tokens"])
    assert starts[i] == item["target_start"]


def _alive(loader):
  assert loader._workers is not None
  return [p.poll() is None for p in loader._workers.procs]


def test_workers_make_identical_batches_states_and_close_ends_them():
  cfg = tiny_config(**{"data.batch_size": 8, "data.seq_len": 48, "seed": 5,
                       "data.mixture": {"reverse": 3.0, "addition": 1.0, "grammar": 1.0}})
  runs = {}
  for workers in (0, 1, 2):
    loader = MixtureLoader.from_config(cfg.replace(**{"data.workers": workers}), prefetch=2)
    got, states = [], []
    for _ in range(8):
      b = next(loader)
      if b.step == 2:  # fed-back rates, as the trainer's dynamic weighting does
        loader.set_rates({"grammar": 4.0, "reverse": 1.0})
      got.append(b)
      states.append(json.dumps(loader.state, sort_keys=True))
    runs[workers] = (got, states)
    if workers:
      assert all(_alive(loader)) and len(_alive(loader)) == workers
    loader.close()
    if workers:
      assert not any(_alive(loader))  # close() ended them
  for workers in (1, 2):
    for a, b in zip(runs[0][0], runs[workers][0]):
      assert a.step == b.step and a.packing_efficiency == b.packing_efficiency
      np.testing.assert_array_equal(a.rates, b.rates)
      for k in a.arrays:
        np.testing.assert_array_equal(a.arrays[k], b.arrays[k])
    assert runs[workers][1] == runs[0][1]
  # A restored state continues the same stream with another worker count.
  resumed = MixtureLoader.from_config(cfg.replace(**{"data.workers": 1}), prefetch=0,
                                      state=json.loads(runs[2][1][4]))
  for want in runs[0][0][5:]:
    np.testing.assert_array_equal(next(resumed).arrays["inputs"], want.arrays["inputs"])
  resumed.close()
