"""Decomposition study (Granite): function calling as the umbrella task alone vs the seven
granular subtasks plus the umbrella, at equal tokens; scored on held-out APIs per subtask.

  mtjax experiment decomposition --config configs/decomposition.py --workdir runs/decomposition
  mtjax experiment decomposition --config configs/decomposition.py:tiny --workdir /tmp/dec  # tests
  mtjax report runs/decomposition
"""

import pathlib

import ml_collections

from mtjax.config import sibling_config

TASKS = tuple(f"fc_{t}" for t in ("name_detection", "parameter_detection", "next_best", "parallel",
                                  "chaining", "nested", "response", "umbrella"))


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = sibling_config(__file__, "demo.py")
  c.model.update(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=256)
  c.data.tasks = TASKS
  c.data.mixture = {t: 1.0 for t in TASKS}
  # A byte-level BPE of 2,048 tokens trained on these tasks' train splits (`mtjax tokenizer train
  # --config configs/decomposition.py --vocab 2048 --out configs/tokenizers/
  # function_calling_bpe2048.json`): the longest example, 1,545 bytes, is 454 tokens, so rows of
  # 512 hold every example whole (no target cut off) at a ninth of the attention cost of bytes.
  c.data.update(batch_size=8, seq_len=512, tokenizer="hf:" + str(
      pathlib.Path(__file__).resolve().parent / "tokenizers" / "function_calling_bpe2048.json"))
  c.train.log_every = 25
  c.optimizer.update(lr=3e-3, warmup_steps=30)
  # accuracy = structural match of the greedy completion on held-out APIs; 200 held-out examples
  # per subtask after the first 100 (the tuning split, study.tuning_examples), teacher-forced
  # token accuracy on the same 200. max_new_tokens "auto" (the default): each task's longest
  # held-out call + EOS.
  c.eval.update(num_examples=200, num_generate=200, num_samples=0, sample_prompts=0, batch_size=50)
  c.study = ml_collections.ConfigDict(dict(
      # 10 seeds: the primary test (sign flips over seeds, Holm over its 2 keys) can reach
      # p = 2 x 2/1024; with 3 seeds it could never go below 0.25.
      steps_per_task=25, seeds=tuple(range(10)), primary="umbrella_task", eval_every=200, target=0.0, targets={}, metric="accuracy",
      entropy_coef=0.0, tuning_examples=100))
  if variant == "tiny":
    c.model.update(d_model=32, num_layers=2, mlp_dim=64)
    c.train.log_every = 4
    c.eval.update(num_examples=4, num_generate=2, batch_size=8)
    c.optimizer.update(warmup_steps=2)
    c.study.update(steps_per_task=1, seeds=(0,), eval_every=8)
  elif variant:
    raise ValueError(f"unknown variant {variant!r} (known: tiny)")
  return c
