"""The string tasks' rules over a prompt's letters (copy, reverse, sort, descending sort), applied
to any task's input, and which of them is a task's own.

Two users: the floors (experiments/floors.py: what a model that learned ANOTHER task's rule, or
"the prompt's letters in some order", scores on a task) and the misleading-instruction ablation
(tasks.instruction_rewrite: an example gets only an instruction whose task would give a DIFFERENT
answer on its input, so a misleading instruction never happens to be right).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

from mtjax.tasks import Example

STRING_RULES: dict[str, Callable[[str], str]] = {
    "copy": lambda s: s,
    "reverse": lambda s: s[::-1],
    "sort": lambda s: "".join(sorted(s)),
    "sort_desc": lambda s: "".join(sorted(s, reverse=True)),
}
# A rule is a task's own when it gives the training target on SHARE of its first SAMPLE examples.
SAMPLE, SHARE = 200, 0.99


def apply(rule: Callable[[str], str], example: Example) -> str:
  """The rule's answer to an example's input (the input without its trailing newline)."""
  return rule(example.input.strip())


def own_rules(examples: Sequence[Example]) -> list[str]:
  """The STRING_RULES that give the target on SHARE of the first SAMPLE examples."""
  sample = list(examples[:SAMPLE])
  if not sample:
    return []
  return [name for name, rule in STRING_RULES.items()
          if sum(apply(rule, ex) == ex.target for ex in sample) >= SHARE * len(sample)]


@functools.cache
def task_rule(task_name: str, seed: int = 0) -> str | None:
  """The string rule a registered task follows (from its train split), or None (no string rule:
  addition, sentences, function calls)."""
  from mtjax import tasks
  examples = tasks.get(task_name).source.load("train", seed).examples
  own = own_rules([examples[i] for i in range(min(SAMPLE, len(examples)))])
  return own[0] if own else None


def gives_target(task_name: str | None, example: Example, seed: int = 0) -> bool:
  """Whether `task_name`'s rule, applied to the example's input, gives the example's target
  (False for a task without a known rule: its answer has another form)."""
  if task_name is None:
    return False
  rule = task_rule(task_name, seed)
  return rule is not None and apply(STRING_RULES[rule], example) == example.target.strip()
