"""Packing invariants, loss on targets only, mixture rates and schedules, determinism, restore."""

import json

import numpy as np
import pytest

from conftest import tiny_config
from mtjax.data import mixture
from mtjax.data.loader import BATCH_KEYS, MixtureLoader
from mtjax.data.tokenizer import ByteTokenizer
from mtjax.tasks.synthetic import is_grammatical
from registry_guard import registry_snapshot

TASKS = ("reverse", "addition", "grammar")


def _config(**dotted):
  base = {"data.batch_size": 8, "data.seq_len": 48, "seed": 3}
  base.update(dotted)
  return tiny_config(**base)


def _loader(cfg=None, **kw):
  return MixtureLoader.from_config(cfg or _config(), **kw)


def test_batch_contract_and_packing_invariants():
  tok = ByteTokenizer()
  ld = _loader()
  b = next(ld).arrays
  ld.close()
  assert set(b) == set(BATCH_KEYS)
  assert b["loss_mask"].dtype == np.float32 and b["inputs"].dtype == np.int32
  pad = b["segment_ids"] == 0
  assert (b["task_ids"][pad] == -1).all() and (b["loss_mask"][pad] == 0).all()
  assert (b["task_ids"][~pad] >= 0).all()
  for row in range(b["inputs"].shape[0]):
    for seg in set(b["segment_ids"][row][~pad[row]].tolist()):
      idx = np.flatnonzero(b["segment_ids"][row] == seg)
      assert (np.diff(idx) == 1).all()  # contiguous
      np.testing.assert_array_equal(b["positions"][row, idx], np.arange(len(idx)))
      assert len(set(b["task_ids"][row, idx].tolist())) == 1
      inputs, targets, mask = b["inputs"][row, idx], b["targets"][row, idx], b["loss_mask"][row, idx]
      assert inputs[0] == tok.bos_id and targets[-1] == tok.eos_id
      np.testing.assert_array_equal(inputs[1:], targets[:-1])  # shifted by one
      # The loss covers one contiguous tail (target and EOS), never the prompt's start.
      first_target = int(np.argmax(mask))
      assert first_target > 0 and mask[first_target:].all() and not mask[:first_target].any()


def test_targets_decode_to_task_answers():
  arrays = next(_loader(_config(**{"data.batch_size": 4, "data.seq_len": 64}), prefetch=0)).arrays
  tok = ByteTokenizer()
  seen = set()
  for row in range(4):
    for seg in set(arrays["segment_ids"][row].tolist()) - {0}:
      idx = np.flatnonzero(arrays["segment_ids"][row] == seg)
      m = arrays["loss_mask"][row, idx] > 0
      prompt = tok.decode(arrays["inputs"][row, idx][~m][1:])
      answer = tok.decode(arrays["targets"][row, idx][m])
      task = TASKS[arrays["task_ids"][row, idx[0]]]
      if task == "addition":
        a, b = prompt.removeprefix("add: ").removesuffix("=").split("+")
        assert int(answer) == int(a) + int(b)
      elif task == "reverse":
        assert answer == prompt.removeprefix("reverse: ").rstrip("\n")[::-1]
      else:
        assert is_grammatical(answer)
      seen.add(task)
  assert seen == set(TASKS)


def _task_shares(batches):
  counts = {}
  for b in batches:
    ids, segs = b.arrays["task_ids"], b.arrays["segment_ids"]
    starts = (segs > 0) & (b.arrays["positions"] == 0)  # one per packed example
    for t in ids[starts]:
      counts[int(t)] = counts.get(int(t), 0) + 1
  total = sum(counts.values())
  return np.array([counts.get(i, 0) / total for i in range(3)])


def test_shares_follow_weights_over_2000_steps():
  cfg = _config(**{"data.mixture": {"reverse": 0.5, "addition": 0.3, "grammar": 0.2},
                   "data.batch_size": 2})
  ld = _loader(cfg, prefetch=0)
  batches = [next(ld) for _ in range(2000)]
  np.testing.assert_allclose(_task_shares(batches), [0.5, 0.3, 0.2], atol=0.01)
  np.testing.assert_allclose(batches[-1].rates, [0.5, 0.3, 0.2])


def test_stage_schedule_switches_at_boundary_and_zero_weight_task_waits():
  stages = ((0, {"reverse": 1.0, "addition": 1.0, "grammar": 0.0}),
            (40, {"reverse": 0.25, "addition": 0.25, "grammar": 0.5}))
  ld = _loader(_config(**{"data.schedule": "stages", "data.stages": stages}), prefetch=2)
  batches = [next(ld) for _ in range(80)]
  ld.close()
  first, second = _task_shares(batches[:40]), _task_shares(batches[40:])
  assert first[2] == 0  # grammar never appears before its stage
  assert (batches[40].arrays["task_ids"] == 2).any()  # and appears at once after
  np.testing.assert_allclose(first, [0.5, 0.5, 0.0], atol=0.02)
  np.testing.assert_allclose(second, [0.25, 0.25, 0.5], atol=0.02)
  assert [b.step for b in batches] == list(range(80))


def test_linear_schedule_interpolates():
  sched = mixture.Schedule.stages(TASKS, ((0, {"reverse": 1.0}), (100, {"grammar": 1.0})),
                                  linear=True)
  np.testing.assert_allclose(sched.at(0), [1, 0, 0])
  np.testing.assert_allclose(sched.at(25), [0.75, 0, 0.25])
  np.testing.assert_allclose(sched.at(500), [0, 0, 1])


def test_examples_proportional_matches_seqio_formula():
  rates = mixture.examples_proportional([100, 1000, 10000], cap=5000, temperature=2.0)
  ref = np.array([100, 1000, 5000]) ** 0.5
  np.testing.assert_allclose(rates, ref / ref.sum())
  cfg = _config(**{"data.rates": "examples_proportional"})
  np.testing.assert_allclose(mixture.schedule_from_config(cfg).at(0), [1 / 3] * 3)  # equal sizes


def test_restore_at_137_with_stage_change_and_feedback_matches_uninterrupted():
  stages = ((0, {"reverse": 1.0, "addition": 1.0}), (150, {"grammar": 1.0, "reverse": 1.0}))
  cfg = _config(**{"data.schedule": "stages", "data.stages": stages, "data.batch_size": 4})
  feedback = {134: {"grammar": 1.0, "reverse": 1.0, "addition": 2.0},  # pending at the save
              160: {"addition": 3.0, "grammar": 1.0}}  # after the restore, after the stage change
  effective = {}

  def drive(loader, steps, record_from=0):
    out = []
    for _ in range(steps):
      b = next(loader)
      if b.step in feedback:  # the trainer feeds back new rates (dynamic weighting)
        effective[b.step] = loader.set_rates(feedback[b.step])
      if b.step >= record_from:
        out.append(b)
    return out

  straight = _loader(cfg)
  reference = drive(straight, 187, record_from=137)
  straight.close()
  first = _loader(cfg)
  drive(first, 137)
  saved = json.loads(json.dumps(first.state))  # as stored in a checkpoint
  first.close()
  resumed = _loader(cfg, state=saved)
  got = drive(resumed, 50)
  resumed.close()
  assert [b.step for b in got] == [b.step for b in reference] == list(range(137, 187))
  for a, b in zip(reference, got):
    for k in a.arrays:
      np.testing.assert_array_equal(a.arrays[k], b.arrays[k])
    np.testing.assert_array_equal(a.rates, b.rates)
  lag = straight.feedback_lag
  assert effective == {134: 135 + lag, 160: 161 + lag}
  rates = {b.step: b.rates for b in reference}
  assert rates[137][2] == 0 and rates[effective[134]][1] == pytest.approx(0.5)  # fed back
  np.testing.assert_allclose(rates[150], [0.5, 0, 0.5])  # the stage change wins
  np.testing.assert_allclose(rates[effective[160] - 1], [0.5, 0, 0.5])  # not before the lag
  np.testing.assert_allclose(rates[effective[160]], [0, 0.75, 0.25])


def test_processes_tile_the_global_batch_and_state_moves_between_process_counts():
  cfg = _config()
  full = _loader(cfg, prefetch=0)
  four = [_loader(cfg, prefetch=0, process_index=i, process_count=4) for i in range(4)]
  for _ in range(3):
    g = next(full).arrays
    parts = [next(p).arrays for p in four]
    for k in g:
      np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), g[k])  # row for row
  states = [json.dumps(p.state, sort_keys=True) for p in four]
  assert len(set(states)) == 1  # the state is global, not per process
  two = [_loader(cfg, prefetch=0, process_index=i, process_count=2, state=json.loads(states[0]))
         for i in range(2)]
  for _ in range(3):
    g = next(full).arrays
    parts = [next(p).arrays for p in two]
    for k in g:
      np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), g[k])


def test_truncation_is_counted():
  # Every example is longer than 12 pairs. With data.truncate=prompt_left (the default) a kept
  # example is cut to exactly 12 pairs; grammar (targets of 16+ tokens) could keep none, so it is
  # left out of this run (tests/test_truncate.py covers skipping).
  cfg = _config(**{"data.seq_len": 12, "data.batch_size": 4, "data.tasks": ("reverse", "addition"),
                   "data.mixture": {"reverse": 1.0, "addition": 1.0},
                   "train.loss_weights": {}, "train.entropy_coefs": {}})
  ld = _loader(cfg, prefetch=0)
  b = next(ld)
  assert sum(b.state_after["truncated"].values()) >= 4
  assert (b.arrays["segment_ids"] > 0).all()  # truncated examples fill their rows exactly


def test_same_seed_same_stream_other_seed_differs():
  a = next(_loader(_config(), prefetch=0)).arrays["inputs"]
  b = next(_loader(_config(), prefetch=0)).arrays["inputs"]
  c = next(_loader(_config(seed=4), prefetch=0)).arrays["inputs"]
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_data_preview_is_deterministic_and_seed_dependent(capsys):
  from conftest import DEMO
  from mtjax import cli
  outs = []
  for seed in (0, 0, 1):
    assert cli.main(["data", "preview", "--config", DEMO, "--steps", "6", "--ranges", "2",
                     f"--config.seed={seed}"]) == 0
    outs.append(capsys.readouterr().out)
  assert outs[0] == outs[1] and outs[0] != outs[2]
  assert "steps 0-2" in outs[0] and "steps 3-5" in outs[0]
  assert outs[0].count("[reverse] 'reverse: ") == 3  # three decoded examples per task


def _write_jsonl(path, lines):
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _jsonl_config(tmp_path, lines, on_bad="stop"):
  """A config file that registers a JSONL task, the way a researcher adds their own data."""
  data = tmp_path / "qa.jsonl"
  _write_jsonl(data, lines)
  cfg = tmp_path / "qa.py"
  cfg.write_text(f'''
from mtjax import tasks
from mtjax.tasks.sources import Fields, JsonlSource
from configs_demo import get_config as demo

tasks.register(tasks.Task("qa", JsonlSource({{"train": [{str(data)!r}]}},
                                            Fields(prompt="question", target="answer",
                                                   instruction="Q: ")),
                          tasks.exact_match), replace=True)

def get_config():
  c = demo("tiny")
  c.data.tasks = ("qa", "reverse")
  c.data.mixture = {{"qa": 1.0, "reverse": 1.0}}
  c.train.loss_weights = {{}}
  c.train.entropy_coefs = {{}}
  c.data.on_bad_record = {on_bad!r}
  return c
''')
  return cfg


GOOD = ['{"question": "capital of peru?", "answer": "lima"}',
        '{"question": "2+2?", "answer": "4"}', '{"question": "ünïcode?", "answer": "ja"}']


def test_jsonl_task_from_a_config_file_and_bad_line(tmp_path, capsys, monkeypatch):
  from conftest import REPO
  from mtjax import cli
  monkeypatch.syspath_prepend(str(tmp_path))
  (tmp_path / "configs_demo.py").write_text((REPO / "configs" / "demo.py").read_text())
  cfg = _jsonl_config(tmp_path, GOOD)
  assert cli.main(["data", "preview", "--config", str(cfg), "--steps", "2"]) == 0
  out = capsys.readouterr().out
  for line in ("[qa] 'Q: capital of peru?' -> 'lima'", "[qa] 'Q: 2+2?' -> '4'",
               "[qa] 'Q: ünïcode?' -> 'ja'"):  # one shuffled epoch of the 3 records: all appear
    assert line in out, out

  bad = _jsonl_config(tmp_path, GOOD[:1] + ['{"question": "broken'] + GOOD[1:])
  assert cli.main(["data", "preview", "--config", str(bad), "--steps", "2"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith(f"error: {tmp_path / 'qa.jsonl'}:2: bad record"), err

  missing = _jsonl_config(tmp_path, GOOD + ['{"question": "no answer"}'])
  assert cli.main(["data", "preview", "--config", str(missing), "--steps", "2"]) == 2
  assert "qa.jsonl:4: bad record (missing field 'answer'" in capsys.readouterr().err

  skip = _jsonl_config(tmp_path, GOOD[:1] + ["not json", '{"question": 3, "answer": "x"}'] + GOOD[1:],
                       on_bad="skip")
  from mtjax import config as config_lib
  from mtjax.data.loader import MixtureLoader
  loader = MixtureLoader.from_config(config_lib.load(str(skip)), prefetch=0)
  assert loader.state["skipped"] == {"qa": 2, "reverse": 0}
  assert next(loader).state_after["skipped"]["qa"] == 2  # carried into data/qa/skipped


def test_array_record_source_reads_json_records(tmp_path):
  from array_record.python.array_record_module import ArrayRecordWriter
  from mtjax.tasks.sources import ArrayRecordSource, Fields
  path = str(tmp_path / "qa.array_record")
  writer = ArrayRecordWriter(path, "group_size:1")
  for line in GOOD + ['{"question": 1}']:
    writer.write(line.encode("utf-8"))
  writer.close()
  loaded = ArrayRecordSource({"train": [path]}, Fields(prompt="question", target="answer")).load("train", 0)
  assert len(loaded.examples) == 4
  assert loaded.examples[1].input == "2+2?" and loaded.examples[2].input == "ünïcode?"
  from mtjax.errors import BadInputError
  with pytest.raises(BadInputError, match="record 3: bad record"):
    loaded.examples[3]


def test_task_preprocess_can_blank_the_instruction():
  import dataclasses as dc
  from mtjax import tasks
  base = tasks.get("reverse")
  tasks.register(dc.replace(base, name="reverse_blank",
                            preprocess=lambda ex: dc.replace(ex, instruction="")), replace=True)
  cfg = _config(**{"data.tasks": ("reverse_blank",), "data.mixture": {"reverse_blank": 1.0},
                   "train.loss_weights": {}, "train.entropy_coefs": {}})
  arrays = next(_loader(cfg, prefetch=0)).arrays
  text = ByteTokenizer().decode(arrays["inputs"][0])
  assert "reverse:" not in text and len(text) > 3


def test_registry_snapshot_restores_tasks_and_mixtures():
  import dataclasses as dc
  from mtjax import tasks
  reverse, names, mixtures = tasks.get("reverse"), tasks.names(), tasks.mixture_names()
  with registry_snapshot():
    tasks.register(dc.replace(reverse, name="reverse_copy"))
    tasks.register(dc.replace(reverse, open_ended=True), replace=True)
    tasks.register_mixture(tasks.Mixture("copies", {"reverse_copy": 1.0}))
    assert "reverse_copy" in tasks.names() and tasks.get("reverse").open_ended
  assert tasks.names() == names and tasks.mixture_names() == mixtures
  assert tasks.get("reverse") is reverse
