"""Study targets between a floor and a ceiling.

A target a trivial predictor already reaches measures nothing (a single-task run "reaches" it
without learning), and one above the best achievable score is never reached (its ratio is always
NaN). So every study task has

- a floor: the best score of trivial baselines on the held-out examples the study evaluates (the
  validation split's examples after eval.skip, tokenized as the evaluator does, BOS prompt target
  EOS). token_accuracy (teacher-forced next-token argmax over the target tokens and EOS, pooled
  over tokens): the max of (a) an oracle-length positional frequency predictor (EOS where the
  target ends, which it knows: generous on purpose, a floor must not be underestimated; elsewhere
  the most frequent training target token at that position) and (b) a unigram (the most frequent
  training target token, EOS counted, everywhere). accuracy and pass@k (generation scored by the
  task's scorer: exact match, or an open-ended task's verifier): always answering the most
  frequent training target (the best of tied ones). Other metrics (loss, entropy): no floor.
- a ceiling where one exists: 1.0 for accuracy, pass@k and token_accuracy of a task whose target
  is a function of the prompt; a task's declared `Task.ceilings`; for token_accuracy of generated
  open-ended tasks with a `Task.target_distribution`, the Bayes-optimal teacher-forced score on
  the same held-out prompts, in expectation over the generator's targets (at each target position
  the predictor knows the prompt and the target so far and predicts the likeliest next token;
  whole targets: a data.truncate=right cut is not modelled).
  Open-ended tasks without a distribution have no token_accuracy ceiling (None).

`check_targets(config)` refuses a study target (> 0; 0 means the study uses no targets) outside
(floor, ceiling), naming `study.targets.<task>`, before any arm trains (Study.run).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from mtjax import tasks as task_registry
from mtjax.config import Config
from mtjax.errors import BadInputError
from mtjax.tasks import Example, rules

TRAIN_SAMPLE = 5000  # training examples the frequency baselines count (the first of the split)
TOKEN_METRICS = ("token_accuracy",)
GENERATION_METRICS = ("accuracy",)  # and pass@k


def _is_pass_at(metric: str) -> bool:
  return metric.startswith("pass@")


def has_floor(metric: str) -> bool:
  """Whether `metric` is a score trivial baselines are defined for (not loss, entropy, ...)."""
  return metric in TOKEN_METRICS + GENERATION_METRICS or _is_pass_at(metric)


def _prepared(config: Config, name: str, examples: Sequence[Example]) -> list[Example]:
  """Task.preprocess and the run's instruction rewrite, as in training and in the evaluator."""
  task = task_registry.get(name)
  out = list(examples)
  if task.preprocess is not None:
    out = [task.preprocess(ex) for ex in out]
  if name in config.data.tasks:
    rewrite = task_registry.instruction_rewrite(
        name, config.data.instructions.get(name, "keep"), tuple(config.data.tasks), config.seed)
    if rewrite is not None:
      out = [rewrite(ex) for ex in out]
  return out


def heldout(config: Config, name: str, count: int) -> list[Example]:
  """The first `count` validation examples after eval.skip: the ones the evaluator scores."""
  from mtjax.eval.heldout import heldout_examples
  return heldout_examples(config, name, count)


def train_examples(config: Config, name: str) -> list[Example]:
  examples = task_registry.get(name).source.load("train", config.seed).examples
  return _prepared(config, name, [examples[i] for i in range(min(len(examples), TRAIN_SAMPLE))])


def _tokenizer(config: Config) -> Any:
  from mtjax.data import tokenizer as tokenizer_lib
  return tokenizer_lib.get(config.data.tokenizer)


def generated_for(config: Config, name: str, count: int, tokenizer: Any) -> list[Example]:
  """The held-out examples the evaluator generates for: the first `count` after eval.skip whose
  prompt leaves room for target and EOS in data.seq_len."""
  return [ex for ex in heldout(config, name, count)
          if 1 + tokenizer.count(ex.prompt) + tokenizer.count(ex.target) + 1 <= config.data.seq_len]


@dataclasses.dataclass(frozen=True)
class Scored:
  """One held-out example as the teacher-forced evaluator scores it: its prompt context (BOS
  and prompt tokens as Tokenize places them) and the scored tokens (target, then the end token;
  a cut target keeps the tokens it still predicts). `whole`: the end token is among them."""

  example: Example
  context: tuple[int, ...]
  scored: tuple[int, ...]
  whole: bool


# A teacher-forced predictor: (the example, the target tokens so far) -> its guess of the next.
Predictor = Callable[[Scored, Sequence[int]], int]

# Rules over a prompt's letters (tasks/rules.py), applied to any task's input. A rule that is the
# task's own is left out: the task's floor asks what a model that learned ANOTHER task's rule, or
# "the prompt's letters in some order", scores on it.
STRING_RULES = rules.STRING_RULES
NGRAM_ORDERS = (2, 3, 4)
FAMILIES = ("all", "frequency")  # study.floors
_WORD = re.compile(r"\w+")


def _scored_examples(config: Config, examples: Sequence[Example], tokenizer: Any) -> list[Scored]:
  """The held-out examples the teacher-forced eval scores, each with its scored tokens as the
  evaluator places them under data.truncate in data.seq_len (examples it skips are left out)."""
  from mtjax.data.pipeline import Tokenize, fit_example
  tok = Tokenize(tokenizer, 0)
  out = []
  for ex in examples:
    item = tok.map(ex)
    start = int(item["target_start"])
    whole = [int(t) for t in item["tokens"][start:]]
    fitted = fit_example(item, config.data.seq_len, config.data.truncate)
    if fitted is None:
      continue
    placed, pairs = fitted
    scored = whole[:max(0, min(len(whole), pairs - (int(placed["target_start"]) - 1)))]
    out.append(Scored(ex, tuple(int(t) for t in item["tokens"][:start]), tuple(scored),
                      len(scored) == len(whole)))
  return out


def _train_items(config: Config, name: str, tokenizer: Any) -> list[tuple[Example, list[int], int]]:
  """The first TRAIN_SAMPLE training examples, each with its tokens (BOS prompt target end) and
  where its target starts."""
  from mtjax.data.pipeline import Tokenize
  tok = Tokenize(tokenizer, 0)
  out = []
  for ex in train_examples(config, name):
    item = tok.map(ex)
    out.append((ex, [int(t) for t in item["tokens"]], int(item["target_start"])))
  return out


def _end_token(items: Sequence[tuple[Example, list[int], int]], tokenizer: Any) -> int:
  """The token that ends a target: EOS, or under a chat template its end-of-turn token."""
  ends = collections.Counter(tokens[-1] for _, tokens, _ in items)
  return ends.most_common(1)[0][0] if ends else tokenizer.eos_id


def _score(held: Sequence[Scored], predict: Predictor) -> float:
  right = total = 0
  for h in held:
    for j, t in enumerate(h.scored):
      right += predict(h, h.scored[:j]) == t
      total += 1
  return right / total if total else math.nan


def _rule_text(rule: Callable[[str], str], ex: Example) -> str:
  return rules.apply(rule, ex)


def _other_rules(items: Sequence[tuple[Example, list[int], int]]) -> dict[str, Callable[[str], str]]:
  """STRING_RULES without the task's own (module docstring)."""
  own = rules.own_rules([ex for ex, _, _ in items])
  return {name: rule for name, rule in STRING_RULES.items() if name not in own}


def _frame(items: Sequence[tuple[Example, list[int], int]]) -> tuple[Any, ...] | None:
  """The most frequent training answer with the words it shares with its prompt's input as
  slots (word k of the input): e.g. "the {0} sees the {1}" for a sentence task. None when the
  most frequent frame takes nothing from the prompt (the most frequent answer covers it)."""
  frames: collections.Counter = collections.Counter()
  for ex, _, _ in items:
    words = _WORD.findall(ex.input)
    frames[tuple(("slot", words.index(w)) if w in words else w for w in ex.target.split(" "))] += 1
  if not frames:
    return None
  best, count = frames.most_common(1)[0]
  slots = sum(isinstance(w, tuple) for w in best)
  if not slots or slots == len(best) or count >= rules.SHARE * len(items):
    return None  # nothing from the prompt; only the prompt's words (a string rule); the task's rule
  return best


def _fill(frame: tuple[Any, ...], ex: Example) -> str:
  words = _WORD.findall(ex.input)
  return " ".join((words[w[1]] if w[1] < len(words) else "") if isinstance(w, tuple) else w
                  for w in frame)


def _positional(output: Callable[[Scored], Sequence[int]], end: int) -> Predictor:
  """Emit a fixed token sequence per example, then the end token (the prefix only counts)."""
  def predict(h: Scored, prefix: Sequence[int]) -> int:
    seq = output(h)
    return seq[len(prefix)] if len(prefix) < len(seq) else end
  return predict


def _order_free(output: Callable[[Scored], Sequence[int]], end: int) -> Predictor:
  """The prompt's remaining tokens (the rule's output less what the target already holds) in the
  rule's order: on copy, the sort rule guesses the smallest letter not yet written."""
  def predict(h: Scored, prefix: Sequence[int]) -> int:
    seq = output(h)
    remaining = collections.Counter(seq)
    remaining.subtract(prefix)
    return next((t for t in seq if remaining[t] > 0), end)
  return predict


def token_baselines(config: Config, name: str, tokenizer: Any) -> dict[str, float]:
  """Every trivial baseline's teacher-forced token_accuracy on the task's evaluated held-out
  examples (module docstring); the floor is their maximum."""
  held = _scored_examples(config, heldout(config, name, config.eval.num_examples), tokenizer)
  if not sum(len(h.scored) for h in held):
    return {}
  items = _train_items(config, name, tokenizer)
  end = _end_token(items, tokenizer)
  targets = [tokens[start:] for _, tokens, start in items]  # target tokens and the end token
  by_position: list[collections.Counter] = []
  unigram: collections.Counter = collections.Counter()
  bigram: dict[int | None, collections.Counter] = collections.defaultdict(collections.Counter)
  for seq in targets:
    unigram.update(seq)
    for j, t in enumerate(seq[:-1]):
      if j == len(by_position):
        by_position.append(collections.Counter())
      by_position[j][t] += 1
      bigram[seq[j - 1] if j else None][t] += 1
  mode = [c.most_common(1)[0][0] for c in by_position]
  top = unigram.most_common(1)[0][0] if unigram else end
  non_end = collections.Counter({t: c for t, c in unigram.items() if t != end})
  top_word = non_end.most_common(1)[0][0] if non_end else end

  def length(h: Scored) -> int | None:  # where the target ends, when the scored tokens show it
    return len(h.scored) - 1 if h.whole else None

  def positional(h: Scored, prefix: Sequence[int]) -> int:
    j = len(prefix)
    return end if j == length(h) else (mode[j] if j < len(mode) else end)

  def bigram_true_length(h: Scored, prefix: Sequence[int]) -> int:
    j = len(prefix)
    if j == length(h):
      return end
    nxt = bigram.get(prefix[-1] if j else None)
    return nxt.most_common(1)[0][0] if nxt else top_word

  out = {"positional (oracle length)": _score(held, positional),
         "unigram": _score(held, lambda h, p: top)}
  if config.study.floors == "frequency":
    return out
  out["bigram (true length)"] = _score(held, bigram_true_length)

  encoded: dict[str, list[int]] = {}

  def encode(text: str) -> list[int]:
    if text not in encoded:
      encoded[text] = [int(t) for t in tokenizer.encode(text)]
    return encoded[text]

  for rule_name, rule in _other_rules(items).items():
    def output(h: Scored, rule=rule) -> list[int]:
      return encode(_rule_text(rule, h.example))
    out[f"{rule_name} rule"] = _score(held, _positional(output, end))
    out[f"{rule_name} rule, order-free"] = _score(held, _order_free(output, end))
  frame = _frame(items)
  if frame is not None:
    out["frame (prompt words substituted)"] = _score(
        held, _positional(lambda h: encode(_fill(frame, h.example)), end))
  for n in NGRAM_ORDERS:
    out[f"{n}-gram"] = _score(held, _ngram(items, n, top))
  return out


def _ngram(items: Sequence[tuple[Example, list[int], int]], n: int, fallback: int) -> Predictor:
  """An n-gram model of the target tokens given the n - 1 tokens before them (prompt tokens
  included, so it can condition on the prompt), trained on the training sample: the most
  frequent next token of the longest seen context (backing off to shorter ones, then `fallback`)."""
  counts: dict[tuple[int, ...], collections.Counter] = collections.defaultdict(collections.Counter)
  for _, tokens, start in items:
    for i in range(start, len(tokens)):
      for k in range(1, n):
        if i - k >= 0:
          counts[tuple(tokens[i - k:i])][tokens[i]] += 1
  best = {ctx: c.most_common(1)[0][0] for ctx, c in counts.items()}

  def predict(h: Scored, prefix: Sequence[int]) -> int:
    seq = tuple(h.context) + tuple(prefix)
    for k in range(min(n - 1, len(seq)), 0, -1):
      guess = best.get(seq[len(seq) - k:])
      if guess is not None:
        return guess
    return fallback
  return predict


def generation_baselines(config: Config, name: str, count: int, tokenizer: Any) -> dict[str, float]:
  """Every trivial answer's score under the task's scorer on the examples the evaluator
  generates for: the most frequent training target (the best of tied ones), the other string
  rules' outputs, and the frame with the prompt's words."""
  task = task_registry.get(name)
  held = generated_for(config, name, count, tokenizer)
  if not held:
    return {}
  train = train_examples(config, name)
  counts = collections.Counter(ex.target for ex in train)
  out: dict[str, float] = {}
  if counts:
    best = max(counts.values())
    answers = [t for t, c in counts.items() if c == best]
    out["most frequent answer"] = max(sum(task.is_correct(ex, a) for ex in held)
                                      for a in answers) / len(held)
  if config.study.floors == "frequency":
    return out
  items = [(ex, [], 0) for ex in train]
  for rule_name, rule in _other_rules(items).items():
    out[f"{rule_name} rule"] = sum(task.is_correct(ex, _rule_text(rule, ex)) for ex in held) / len(held)
  frame = _frame(items)
  if frame is not None:
    out["frame (prompt words substituted)"] = sum(
        task.is_correct(ex, _fill(frame, ex)) for ex in held) / len(held)
  return out


def _count_for(config: Config, metric: str) -> int:
  """Held-out examples a metric is computed over (its eval setting)."""
  e = config.eval
  if metric in TOKEN_METRICS:
    return e.num_examples
  if metric in GENERATION_METRICS:
    return e.num_generate
  return e.sample_prompts if e.num_samples else 0


def baselines(task_name: str, metric: str, config: Config, tokenizer: Any = None) -> dict[str, float]:
  """Every trivial baseline's `metric` on the task's evaluated held-out examples (module
  docstring; the family study.floors names); {} when the metric has no floor or nothing is
  scored."""
  if not has_floor(metric):
    return {}
  tokenizer = tokenizer or _tokenizer(config)
  if metric in TOKEN_METRICS:
    return token_baselines(config, task_name, tokenizer)
  return generation_baselines(config, task_name, _count_for(config, metric), tokenizer)


def floor(task_name: str, metric: str, config: Config, tokenizer: Any = None) -> float | None:
  """The best trivial baseline's `metric` on the task's evaluated held-out examples (module
  docstring); None when the metric has no floor, NaN when no example is scored."""
  if not has_floor(metric):
    return None
  scores = [v for v in baselines(task_name, metric, config, tokenizer).values() if not math.isnan(v)]
  return max(scores) if scores else math.nan


def bayes_token_accuracy(examples: Sequence[Example], tokenizer: Any, distribution) -> float:
  """The Bayes-optimal teacher-forced token accuracy on these prompts, in expectation over the
  generator's targets (`distribution(example)`: [(target, probability)]), pooled over tokens:
  at each position the predictor knows the prompt and the target's tokens so far and predicts
  the likeliest next token (or EOS), right with probability max_token P(token | prefix). Summed
  over a prompt's prefix tree that is sum over prefixes of max over next tokens of P(prefix +
  token); divided by the expected number of scored tokens (target and EOS)."""
  eos = tokenizer.eos_id
  right = total = 0.0
  for ex in examples:
    options = [(tuple(int(t) for t in tokenizer.encode(text)) + (eos,), p)
               for text, p in distribution(ex)]
    mass = sum(p for _, p in options)
    children: dict[tuple[int, ...], collections.Counter] = collections.defaultdict(collections.Counter)
    for seq, p in options:
      total += p / mass * len(seq)
      for j in range(len(seq)):
        children[seq[:j]][seq[j]] += p / mass
    right += sum(max(c.values()) for c in children.values())
  return right / total if total else math.nan


def true_entropy(examples: Sequence[Example], tokenizer: Any, distribution) -> float:
  """The generator's entropy in nats per scored token (target and EOS), pooled over tokens as the
  eval pools a model's predictive entropy: sum over prompts of H(target | prompt) over the
  expected number of scored tokens. By the chain rule H(target) = E[sum over positions of
  H(token | prompt, prefix)], so a model that learned the generator exactly scores this in
  expectation; below it a model is more certain than the data allow (collapse), above it
  underfit."""
  nats = total = 0.0
  for ex in examples:
    options = [(len(tokenizer.encode(text)) + 1, p) for text, p in distribution(ex)]
    mass = sum(p for _, p in options)
    nats -= sum(p / mass * math.log(p / mass) for _, p in options if p > 0)
    total += sum(p / mass * n for n, p in options)
  return nats / total if total else math.nan


def entropy_truth(task_name: str, config: Config, tokenizer: Any = None) -> float | None:
  """`true_entropy` on the held-out examples the eval scores, or None where the task has no
  known answer distribution (a structured task's truth is 0: one answer per prompt)."""
  task = task_registry.get(task_name)
  if not task.open_ended:
    return 0.0
  if task.target_distribution is None:
    return None
  tokenizer = tokenizer or _tokenizer(config)
  kept = [ex for ex in heldout(config, task_name, config.eval.num_examples)
          if _fits(config, ex, tokenizer)]
  return true_entropy(kept, tokenizer, task.target_distribution)


def ceiling(task_name: str, metric: str, config: Config, tokenizer: Any = None) -> float | None:
  """The best achievable `metric` on the task (module docstring), or None where it is unknown."""
  task = task_registry.get(task_name)
  if metric in task.ceilings:
    return float(task.ceilings[metric])
  if metric in GENERATION_METRICS or _is_pass_at(metric):
    return 1.0  # a right answer exists for every prompt (the target itself)
  if metric not in TOKEN_METRICS:
    return None
  if not task.open_ended:
    return 1.0  # the target is a function of the prompt
  if task.target_distribution is None:
    return None  # some target tokens are a guess, with unknown odds
  tokenizer = tokenizer or _tokenizer(config)
  examples = heldout(config, task_name, config.eval.num_examples)
  kept = [ex for ex in examples if _fits(config, ex, tokenizer)]  # as the evaluator skips
  return bayes_token_accuracy(kept, tokenizer, task.target_distribution)


def _fits(config: Config, ex: Example, tokenizer: Any) -> bool:
  from mtjax.data.pipeline import fit
  return fit(tokenizer.count(ex.prompt), tokenizer.count(ex.target), config.data.seq_len,
             config.data.truncate) is not None


def _metric_count_check(config: Config, name: str, metric: str) -> None:
  """A metric the eval never computes would leave every curve empty: say which setting."""
  if has_floor(metric) and not _count_for(config, metric):
    setting = {"token_accuracy": "eval.num_examples", "accuracy": "eval.num_generate"}.get(
        metric, "eval.num_samples")
    raise BadInputError(setting, f"task {name!r} is scored by {metric}, which the eval computes "
                        f"only with {setting} > 0")


def normalized(score: float, floor: float | None, ceiling: float | None) -> float | None:
  """(score - floor) / (ceiling - floor); None without both bounds (or with ceiling <= floor)."""
  if floor is None or ceiling is None or not ceiling > floor or math.isnan(score):
    return None
  return (score - floor) / (ceiling - floor)


def mean_normalized(scores: Mapping[str, float], bounds: Mapping[str, Mapping[str, Any]]) -> float:
  """The mean over tasks of their normalized scores (tasks without both bounds left out; NaN if
  none has them)."""
  values = [normalized(s, bounds.get(t, {}).get("floor"), bounds.get(t, {}).get("ceiling"))
            for t, s in scores.items()]
  kept = [v for v in values if v is not None]
  return math.fsum(kept) / len(kept) if kept else math.nan


def check_targets(config: Config) -> dict[str, dict[str, Any]]:
  """Every study task's target (study.targets.<task>, else study.target) lies strictly between
  its floor and ceiling under its metric, or a BadInputError names `study.targets.<task>`.
  Targets of 0 (studies that use none) are not checked. Returns {task: {metric, floor, ceiling,
  target}} for reports (None where a bound is not defined)."""
  return _table(config, strict=True)


def metric_for(config: Config, task: str) -> str:
  """The eval metric a study scores `task` by: study.task_metrics.<task>, else study.metric."""
  return str(config.study.task_metrics.get(task, config.study.metric))


def describe(config: Config) -> dict[str, dict[str, Any]]:
  """check_targets' table without refusing anything (reports rebuilt from old studies)."""
  return _table(config, strict=False)


def _table(config: Config, *, strict: bool) -> dict[str, dict[str, Any]]:
  from mtjax.resolve import resolve
  config = resolve(config)
  st = config.study
  tokenizer = None
  out: dict[str, dict[str, Any]] = {}
  for name in config.data.tasks:
    target = float(st.targets.get(name, st.target))
    metric = metric_for(config, name)
    tokenizer = tokenizer or _tokenizer(config)
    truth = entropy_truth(name, config, tokenizer) if config.eval.num_examples else None
    if target <= 0 and not (has_floor(metric) and _count_for(config, metric)):
      out[name] = {"metric": metric, "floor": None, "ceiling": None, "target": target,
                   "true_entropy": truth}
      continue
    if strict and target > 0:
      _metric_count_check(config, name, metric)
    scores = baselines(name, metric, config, tokenizer)
    finite = [v for v in scores.values() if not math.isnan(v)]
    lo = max(finite) if finite else None
    hi = ceiling(name, metric, config, tokenizer)
    hi = None if hi is None or math.isnan(hi) else hi
    out[name] = {"metric": metric, "floor": lo, "ceiling": hi, "target": target,
                 "baselines": scores, "floor_family": config.study.floors,
                 "true_entropy": truth}
    if strict and target > 0 and ((lo is not None and target <= lo) or
                                  (hi is not None and target >= hi)):
      raise BadInputError(
          f"study.targets.{name}",
          f"task {name!r} target {target:g} under {metric} must lie strictly between its floor "
          f"{_fmt(lo)} (trivial baselines on the evaluated held-out examples) and its ceiling "
          f"{_fmt(hi)} (the best achievable score)")
  return out


def _fmt(x: float | None) -> str:
  return "none" if x is None else f"{x:.4f}"
