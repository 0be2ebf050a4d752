"""Packing invariants, loss on targets only, mixture proportions, determinism and exact restore."""

import numpy as np

from conftest import tiny_config
from mtjax.data import loader as loader_lib
from mtjax.data import pipeline
from mtjax.data.tokenizer import ByteTokenizer

TASKS = ("reverse", "addition", "grammar")


def _loader(**kw):
  args = dict(tokenizer=ByteTokenizer(), seed=3, batch_size=8, seq_len=48, prefetch=2)
  args.update(kw)
  return loader_lib.MixtureLoader(TASKS, kw.pop("weights", {t: 1.0 for t in TASKS}), **args)


def test_batch_contract_and_packing_invariants():
  tok = ByteTokenizer()
  ld = _loader()
  b = next(ld).arrays
  ld.close()
  assert set(b) == set(loader_lib.BATCH_KEYS)
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
  ds = pipeline.mixture_dataset(TASKS, {t: 1.0 for t in TASKS}, ByteTokenizer(), seed=0)
  arrays, _, _ = loader_lib.pack(ds, 0, 4, 64, 3)
  tok = ByteTokenizer()
  seen = 0
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
        from mtjax.tasks.synthetic import is_grammatical
        assert is_grammatical(answer)
      seen += 1
  assert seen > 4


def test_mixture_rates_follow_weights():
  weights = {"reverse": 3.0, "addition": 1.0, "grammar": 0.0}
  ds = pipeline.mixture_dataset(TASKS, weights, ByteTokenizer(), seed=0)
  ids = np.array([ds[i]["task_id"] for i in range(4000)])
  counts = np.bincount(ids, minlength=3) / len(ids)
  np.testing.assert_allclose(counts, [0.75, 0.25, 0.0], atol=0.01)
  np.testing.assert_allclose(pipeline.sampling_rates(TASKS, weights), [0.75, 0.25, 0.0])


def test_deterministic_and_restores_exactly_from_state():
  straight = _loader()
  batches = [next(straight) for _ in range(5)]
  straight.close()
  again = _loader()
  for b in batches[:2]:
    nb = next(again)
    for k in b.arrays:
      np.testing.assert_array_equal(nb.arrays[k], b.arrays[k])
  state = dict(again.state)
  again.close()
  import json
  resumed = _loader(state=json.loads(json.dumps(state)))  # JSON round trip, as in a checkpoint
  for b in batches[2:]:
    nb = next(resumed)
    for k in b.arrays:
      np.testing.assert_array_equal(nb.arrays[k], b.arrays[k])
  resumed.close()
  assert batches[-1].state_after["batches"] == 5


def test_process_slices_tile_the_global_batch():
  full = _loader(prefetch=0)
  parts = [_loader(prefetch=0, process_index=i, process_count=4) for i in range(4)]
  for _ in range(2):
    g = next(full).arrays
    locals_ = [next(p).arrays for p in parts]
    for k in g:
      np.testing.assert_array_equal(np.concatenate([l[k] for l in locals_]), g[k])


def test_truncation_is_counted():
  ld = _loader(seq_len=12, batch_size=4, prefetch=0)  # every example is longer than 12
  b = next(ld)
  arrays = b.arrays
  assert sum(b.state_after["truncated"].values()) >= 4
  assert (arrays["segment_ids"] > 0).all()  # truncated examples fill their rows exactly
