"""Task suites as TFDS datasets (array_record), built offline on first use into `data_dir()`.

Each suite is one `GeneratorBasedBuilder` with a BuilderConfig per task; records are
{instruction, input, target} strings. Content is fixed by the builder's version and seed, so a
suite built on two machines is identical. Each task partitions its prompt space into a train part
and a held-out part before drawing (`HeldOut`: by a hash of the prompt's input, or a task's own
rule), so validation prompts never occur in train and the two parts are alike in distribution.
Tasks register as "<suite>_<task>" (e.g.
"structured_copy"; no dots: ml_collections keys cannot hold them), read through `tfds.data_source` (random access, no TensorFlow).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

from mtjax.tasks import Example, Task, register
from mtjax.tasks.sources import TfdsSource
from mtjax.tasks.synthetic import HeldOut, held_out_by_input

# validation: a study scores 1,000 examples after its 100-example tuning split, leaving out the
# examples whose prompt the tuning split holds (frequent templates repeat: 3,000 leave 1,000+).
SPLIT_SIZES = {"train": 5000, "validation": 3000}
SUITE_SEED = 20261128

Generator = Callable[[np.random.Generator], Example]


def split_examples(suite: str, task: str, make: Generator,
                   held_out: HeldOut = held_out_by_input) -> dict[str, list[Example]]:
  """Train examples drawn from the train part of the prompt space, validation examples from the
  held-out part (`held_out(example)` is True there): validation prompts never occur in train."""
  out = {}
  for split, size in SPLIT_SIZES.items():
    want = split == "validation"
    rng = np.random.default_rng([SUITE_SEED, zlib.crc32(f"{suite}/{task}/{split}".encode())])
    examples, attempts = [], 0
    while len(examples) < size:
      ex = make(rng)
      attempts += 1
      if attempts > 50 * size:
        raise RuntimeError(f"{suite}.{task}: cannot draw {size} {split} examples from its part "
                           "of the prompt space")
      if held_out(ex) == want:
        examples.append(ex)
    out[split] = examples
  return out


class SuiteBuilder(tfds.core.GeneratorBasedBuilder):
  """Base: subclasses set TASKS = {task: (generator, held_out)} and a BuilderConfig per task."""

  VERSION = tfds.core.Version("1.0.0")
  # A suite that overrides _split_generators may leave the generator and partition None.
  TASKS: Mapping[str, tuple[Generator | None, HeldOut | None]] = {}
  SUITE = ""

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "instruction": tfds.features.Text(), "input": tfds.features.Text(),
        "target": tfds.features.Text()}))

  @property
  def task(self) -> str:
    """The task this builder makes: its BuilderConfig's name (every suite builder has one)."""
    config = self.builder_config
    assert config is not None, f"{type(self).__name__} needs config=<task>"
    return config.name

  def _split_generators(self, dl_manager):
    del dl_manager  # generated, nothing to download
    make, held_out = self.TASKS[self.task]
    if make is None or held_out is None:
      raise NotImplementedError(f"{type(self).__name__}: task {self.task!r} has no generator")
    splits = split_examples(self.SUITE, self.task, make, held_out)
    return {split: self._generate_examples(examples) for split, examples in splits.items()}

  def _generate_examples(self, examples):
    for i, ex in enumerate(examples):
      yield i, {"instruction": ex.instruction, "input": ex.input, "target": ex.target}


def register_suite(builder_cls: type[SuiteBuilder], scorers: Mapping[str, Callable[[Example, str], bool]],
                   open_ended: bool = False,
                   distributions: Mapping[str, Callable[[Example], Sequence[tuple[str, float]]]]
                   | None = None) -> None:
  """Registers each task of the suite; `distributions`: a task's target_distribution (Task)."""
  distributions = distributions or {}
  for task in builder_cls.TASKS:
    name = f"{builder_cls.SUITE}_{task}"
    tfds_name = f"{builder_cls.name}/{task}"
    source = TfdsSource(tfds_name, lambda data_dir, t=task: builder_cls(config=t, data_dir=data_dir,
                                                                          file_format="array_record"))
    register(Task(name, source, scorers[task], open_ended=open_ended,
                  target_distribution=distributions.get(task)))
