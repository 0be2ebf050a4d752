"""data.truncate (prompt_left | right | skip): what the loader keeps of examples longer than
seq_len, the too_long count and its state, the preview's length and policy table, and the
held-out contamination check; against hand constructions from the tokenizer and direct counts."""

import json

import numpy as np
import pytest

from conftest import tiny_config
from mtjax.data import contamination, pipeline
from mtjax.data import rows as rows_lib
from mtjax.data.loader import MixtureLoader
from mtjax.data.tokenizer import ByteTokenizer
from mtjax.errors import BadInputError

TOK = ByteTokenizer()


def _task(tmp_path, name, records, validation=None):
  """A JSONL task {q, a} registered for this test (the registry guard unregisters it)."""
  from mtjax import tasks
  from mtjax.tasks.sources import Fields, JsonlSource
  files = {}
  for split, recs in (("train", records), ("validation", validation)):
    if recs is None:
      continue
    path = tmp_path / f"{name}.{split}.jsonl"
    path.write_text("".join(json.dumps({"q": p, "a": t}) + "\n" for p, t in recs), encoding="utf-8")
    files[split] = [str(path)]
  tasks.register(tasks.Task(name, JsonlSource(files, Fields(prompt="q", target="a")),
                            tasks.exact_match), replace=True)
  return records


def _cfg(names, seq_len, batch_size=8, **kw):
  return tiny_config(**{"data.tasks": tuple(names), "data.mixture": {n: 1.0 for n in names},
                        "train.loss_weights": {}, "train.entropy_coefs": {},
                        "data.tokenizer": "byte", "data.seq_len": seq_len,
                        "data.batch_size": batch_size, "seed": 1, **kw})


def _segments(arrays):
  """(row, task, inputs, targets, loss_mask) of every packed example."""
  out = []
  for row in range(arrays["inputs"].shape[0]):
    for seg in sorted(set(arrays["segment_ids"][row].tolist()) - {0}):
      idx = np.flatnonzero(arrays["segment_ids"][row] == seg)
      out.append((row, int(arrays["task_ids"][row, idx[0]]), arrays["inputs"][row, idx],
                  arrays["targets"][row, idx], arrays["loss_mask"][row, idx]))
  return out


def _consumed(name, records, cursor, seed=1):
  """(prompt, target) byte counts of a task's examples at cursors [0, cursor): its shuffled order
  (Grain's, see test_loader_speed.test_shuffled_order_is_grains)."""
  order = pipeline.shuffled_order(len(records), pipeline.task_seed(seed, name), 0, cursor)
  return (np.array([len(records[i][0].encode()) for i in order], np.int64),
          np.array([len(records[i][1].encode()) for i in order], np.int64))


def _records(n, prompt_len, target_len, tag):
  """n examples with unique targets (so a packed one can be told apart); lengths are functions of i."""
  return [(f"{tag}{i:03d}:" + "p" * prompt_len(i), f"<{tag}{i:03d}>" + "t" * target_len(i))
          for i in range(n)]


# -- (a) prompt_left keeps the target whole -------------------------------------------------------

@pytest.mark.multidevice
def test_prompt_left_trains_every_task_when_every_prompt_is_too_long(tmp_path):
  import jax
  from jax.sharding import NamedSharding, PartitionSpec
  from mtjax.train.batches import LoaderSource
  seq_len = 24
  data = {"longa": _task(tmp_path, "longa", _records(20, lambda i: 30 + i % 7, lambda i: i % 4, "a")),
          "longb": _task(tmp_path, "longb", _records(9, lambda i: 60, lambda i: 1 + i % 3, "b"))}
  by_target = {t: p for recs in data.values() for p, t in recs}
  assert all(len(p.encode()) >= seq_len for p in by_target.values())  # every prompt is too long
  loader = MixtureLoader.from_config(_cfg(data, seq_len), prefetch=0)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  source = LoaderSource(loader, NamedSharding(mesh, PartitionSpec("data")))
  loss = np.zeros(2)
  seen = 0
  for _ in range(3):
    host = next(loader)
    for _, task, inputs, targets, mask in _segments(host.arrays):
      target = TOK.decode(targets[mask > 0])
      prompt = by_target[target]
      t = len(target.encode())
      k = seq_len - 1 - t  # BOS + k prompt tokens + target + EOS = seq_len + 1 tokens
      tokens = np.concatenate([[TOK.bos_id], TOK.encode(prompt)[-k:], TOK.encode(target),
                               [TOK.eos_id]]).astype(np.int32)
      np.testing.assert_array_equal(inputs, tokens[:-1])
      np.testing.assert_array_equal(targets, tokens[1:])
      np.testing.assert_array_equal(mask, np.arange(seq_len) >= k)  # target tokens and EOS
      loss[task] += mask.sum()
      seen += 1
    assert all(v == 0 for v in host.state_after["too_long"].values())
  assert seen == 3 * 8 and (loss > 0).all()
  info = source.next(None).info  # type: ignore[arg-type]
  assert info["data/longa/too_long"] == 0 and info["data/longb/too_long"] == 0
  assert info["data/longa/truncated"] == loader.state["truncated"]["longa"] > 0
  loader.close()


def test_fit_arrays_apply_fit_and_materialize_agree_with_fit_and_place():
  for policy in ("prompt_left", "right", "skip"):
    grid = [(p, t) for p in range(0, 9) for t in range(0, 9)]
    cut, n = pipeline.fit_arrays(np.array([g[0] for g in grid]), np.array([g[1] for g in grid]), 6,
                                 policy)
    for (p, t), c, k in zip(grid, cut.tolist(), n.tolist()):
      assert pipeline.fit(p, t, 6, policy) == (None if k == 0 else (c, k)), (policy, p, t)
  prompts, targets, cuts = ["abcdefgh", "xy", "0123456789"], ["T", "uv", "w"], [5, 0, 8]
  slots = rows_lib.Slots(np.array([0, 0, 1]), np.array([0, 4, 0]), np.array([4, 4, 4]),
                         np.array([0, 1, 0]), np.array([1, 2, 1]), prompts, targets, np.array(cuts))
  got = rows_lib.materialize(TOK, 2, 8, slots)
  want = rows_lib.empty_batch(2, 8)
  from mtjax.tasks import Example
  for k, (p, t, c) in enumerate(zip(prompts, targets, cuts)):
    ex = pipeline.apply_fit(pipeline.Tokenize(TOK, 0).map(Example("", p, t)), c)
    assert ex["target_start"] == 1 + len(p) - c and ex["tokens"][0] == TOK.bos_id
    rows_lib.place(want, int(slots.row[k]), int(slots.start[k]), 4, ex, int(slots.task[k]),
                   int(slots.segment[k]))
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  # fit_example is fit + apply_fit: BOS, the prompt's last 2 tokens, the target, EOS.
  ex = pipeline.Tokenize(TOK, 0).map(Example("", "abcdef", "XY"))
  fitted = pipeline.fit_example(ex, 5, "prompt_left")
  assert fitted is not None and fitted[1] == 5
  assert TOK.decode(fitted[0]["tokens"][1:]) == "efXY" and fitted[0]["target_start"] == 3
  assert pipeline.fit_example(ex, 2, "prompt_left") is None


# -- (b) right, (c) skip ---------------------------------------------------------------------------

def _mixed(tmp_path, name):
  # prompt + target + 1 pairs around seq_len 24: whole, cut with target left, prompt >= 24.
  return _task(tmp_path, name, _records(
      30, lambda i: (3, 12, 16, 19, 25)[i % 5], lambda i: (2, 4, 9)[i % 3], name[:1]))


def test_right_keeps_the_first_seq_len_pairs_and_skips_examples_without_a_target_token(tmp_path):
  seq_len = 24
  recs = _mixed(tmp_path, "mixed")
  by_prompt = {p: t for p, t in recs}
  loader = MixtureLoader.from_config(_cfg(["mixed"], seq_len, 4, **{"data.truncate": "right"}),
                                     prefetch=0)
  for _ in range(4):
    host = next(loader)
    for _, _, inputs, targets, mask in _segments(host.arrays):
      assert mask.sum() > 0  # never a zero-loss example
      first = int(np.argmax(mask))
      prompt = TOK.decode(inputs[1 : first + 1])
      tokens = np.concatenate([[TOK.bos_id], TOK.encode(prompt), TOK.encode(by_prompt[prompt]),
                               [TOK.eos_id]]).astype(np.int32)
      n = min(len(tokens) - 1, seq_len)
      np.testing.assert_array_equal(inputs, tokens[:n])
      np.testing.assert_array_equal(targets, tokens[1 : n + 1])
  state = loader.state
  p, t = _consumed("mixed", recs, state["cursors"]["mixed"])
  assert state["too_long"]["mixed"] == int((p >= seq_len).sum()) > 0
  assert state["truncated"]["mixed"] == int(((p + t + 1 > seq_len) & (p < seq_len)).sum()) > 0
  loader.close()


def test_skip_drops_every_example_that_does_not_fit(tmp_path):
  seq_len = 24
  recs = _mixed(tmp_path, "mixed")
  by_prompt = {p: t for p, t in recs}
  loader = MixtureLoader.from_config(_cfg(["mixed"], seq_len, 4, **{"data.truncate": "skip"}),
                                     prefetch=0)
  placed = 0
  for _ in range(4):
    host = next(loader)
    for _, _, inputs, targets, mask in _segments(host.arrays):
      first = int(np.argmax(mask))
      prompt = TOK.decode(inputs[1 : first + 1])
      tokens = np.concatenate([[TOK.bos_id], TOK.encode(prompt), TOK.encode(by_prompt[prompt]),
                               [TOK.eos_id]]).astype(np.int32)
      np.testing.assert_array_equal(inputs, tokens[:-1])  # whole
      np.testing.assert_array_equal(targets, tokens[1:])
      placed += 1
  state = loader.state
  p, t = _consumed("mixed", recs, state["cursors"]["mixed"])
  assert state["too_long"]["mixed"] == int((p + t + 1 > seq_len).sum()) > 0
  assert state["truncated"]["mixed"] == 0
  assert placed == int((p + t + 1 <= seq_len).sum())  # every cursor is placed or skipped
  loader.close()


# -- (d) nothing fits ------------------------------------------------------------------------------

def test_a_task_whose_targets_are_all_too_long_is_a_bad_input_naming_it(tmp_path):
  _task(tmp_path, "short", _records(10, lambda i: 5, lambda i: 2, "s"))
  essays = _task(tmp_path, "essays", _records(7, lambda i: 3, lambda i: 40 + i, "e"))
  shortest = min(len(t) for _, t in essays)  # "<e000>" + 40 t's: 46 tokens (+ EOS: 47 pairs)
  assert shortest == 46
  loader = MixtureLoader.from_config(_cfg(["short", "essays"], 32), prefetch=0)
  with pytest.raises(BadInputError) as e:
    next(loader)
  message = str(e.value)
  assert message.startswith("task 'essays': ") and "data.seq_len=32" in message, message
  assert "data.truncate=prompt_left" in message and "the shortest target has 46 tokens" in message
  assert "raise data.seq_len to at least 47" in message
  loader.close()


# -- (e) state -------------------------------------------------------------------------------------

def test_state_round_trip_and_an_old_state_without_too_long(tmp_path):
  _mixed(tmp_path, "mixed")
  cfg = _cfg(["mixed", "reverse"], 24, 4, **{"data.truncate": "skip"})
  straight = MixtureLoader.from_config(cfg, prefetch=0)
  for _ in range(3):
    next(straight)
  saved = json.loads(json.dumps(straight.state))
  assert saved["too_long"]["mixed"] > 0
  want = [next(straight) for _ in range(3)]
  resumed = MixtureLoader.from_config(cfg, prefetch=0, state=saved)
  old = MixtureLoader.from_config(cfg, prefetch=0,
                                  state={k: v for k, v in saved.items() if k != "too_long"})
  assert old.state["too_long"] == {"mixed": 0, "reverse": 0}
  for a in want:
    b, c = next(resumed), next(old)
    for k in a.arrays:
      np.testing.assert_array_equal(a.arrays[k], b.arrays[k])
      np.testing.assert_array_equal(a.arrays[k], c.arrays[k])
    assert b.state_after == a.state_after
    assert c.state_after["too_long"]["mixed"] == (a.state_after["too_long"]["mixed"] -
                                                 saved["too_long"]["mixed"])
  for loader in (straight, resumed, old):
    loader.close()
  with pytest.raises(BadInputError, match="'too_long' is not a count per task"):
    MixtureLoader.from_config(cfg, prefetch=0, state=dict(saved, too_long={"mixed": -1}))


# -- (f) worker processes ----------------------------------------------------------------------------

def test_workers_make_identical_batches_with_cuts(tmp_path):
  _mixed(tmp_path, "mixed")
  cfg = _cfg(["mixed", "reverse"], 24, 4)
  runs = []
  for workers in (0, 1):
    loader = MixtureLoader.from_config(cfg.replace(**{"data.workers": workers}), prefetch=2)
    runs.append([next(loader) for _ in range(4)])
    loader.close()
  assert sum(b.plan.cut.astype(bool).sum() for b in runs[0]) > 0  # type: ignore[union-attr]
  for a, b in zip(*runs):
    for k in a.arrays:
      np.testing.assert_array_equal(a.arrays[k], b.arrays[k])
    assert a.state_after == b.state_after


# -- (g) preview -----------------------------------------------------------------------------------

def _spread(values):
  v = sorted(values)
  m = (v[(len(v) - 1) // 2] + v[len(v) // 2]) / 2
  return f"{v[0]}/{int(m) if m == int(m) else m}/{v[-1]}"


def test_preview_shows_lengths_policy_losses_and_cut_prompts(tmp_path):
  from mtjax.data.preview import preview
  seq_len = 24
  recs = _mixed(tmp_path, "mixed")
  cfg = _cfg(["mixed"], seq_len, 4)
  text = preview(cfg, 2, ranges=1)
  p = np.array([len(a.encode()) for a, _ in recs])
  t = np.array([len(b.encode()) for _, b in recs])
  over = p + t + 1 > seq_len
  expected = {  # (truncated, too_long, loss tokens lost), counted by hand
      "prompt_left": (over & (t + 1 <= seq_len), t + 1 > seq_len, np.where(t + 1 > seq_len, t + 1, 0)),
      "right": (over & (p < seq_len), p >= seq_len,
                np.where(p >= seq_len, t + 1, np.where(over, p + t + 1 - seq_len, 0))),
      "skip": (np.zeros_like(over), over, np.where(over, t + 1, 0)),
  }
  lines = text.splitlines()
  row = next(i for i, line in enumerate(lines) if line.split()[:1] == ["mixed"] and "prompt_left" in line)
  assert lines[row].split()[:4] == ["mixed", str(len(recs)), _spread(p), _spread(t)]
  for k, policy in enumerate(("prompt_left", "right", "skip")):
    fields = lines[row + k].split()[-5:]
    truncated, too_long, lost = expected[policy]
    total = int((t + 1).sum())
    assert fields[0] == policy + ("*" if policy == "prompt_left" else "")
    assert fields[1:4] == [str(int(truncated.sum())), str(int(too_long.sum())),
                           f"{int(lost.sum())}/{total}"], (policy, lines[row + k])
  # The per-range table's too_long column: what the loader skipped in those steps.
  header = next(line for line in lines if line.strip().startswith("task") and "rate" in line)
  assert header.split()[-2:] == ["truncated", "too_long"]
  loader = MixtureLoader.from_config(cfg, prefetch=0)
  state = [next(loader) for _ in range(2)][-1].state_after
  loader.close()
  range_row = next(line for line in lines if line.split()[:2] == ["mixed", "1.000"])
  assert range_row.split()[-2:] == [str(state["truncated"]["mixed"]), str(state["too_long"]["mixed"])]
  shown = [line for line in lines if line.startswith("  [mixed] ")]
  assert len(shown) == 3 and not any("'' -> ''" in line for line in shown)
  by_prompt = {a: b for a, b in recs}
  for line in shown:
    body = line.removeprefix("  [mixed] ")
    if body.startswith("…"):  # a cut prompt: its kept end, the whole target
      prompt, target = (eval(x) for x in body[1:].split(" -> "))
      assert any(a.endswith(prompt) and b == target and len(a) > len(prompt)
                 for a, b in recs), body
    else:
      prompt, target = (eval(x) for x in body.split(" -> "))
      assert by_prompt[prompt] == target


# -- (h) contamination -------------------------------------------------------------------------------

def test_contamination_counts_validation_prompts_found_in_train(tmp_path):
  train = [(f"question {i}?", f"answer {i}") for i in range(8)]
  validation = [("question 2?", "x"), ("new one?", "y"), ("question 7?", "z"), ("other?", "w"),
                ("question 2", "v")]
  _task(tmp_path, "qa", train, validation)
  _task(tmp_path, "trainonly", train)
  count, examples = contamination.overlap("qa", 0)
  assert count == 2 and examples == ["question 2?", "question 7?"]
  assert contamination.overlap("trainonly", 0) == (0, [])
  assert contamination.overlap("reverse", 0) == (0, [])  # built-in: held out by construction
  warnings = contamination.warn(_cfg(["qa", "trainonly", "reverse"], 32))
  assert len(warnings) == 1 and warnings[0].startswith("warning: task 'qa': 2 of its 5 validation"), warnings
  assert "'question 2?'" in warnings[0] and "'question 7?'" in warnings[0]
  from mtjax.data.preview import preview
  assert warnings[0] in preview(_cfg(["qa"], 32), 1, ranges=1).splitlines()
