"""The one resolve step at run start: what the config alone cannot decide.

`mtjax.config` checks types and values; this step reads what the config names: a pretrained
model's directory sets the model's shape (mtjax.model.pretrained.apply_to_config), then the data
half (mtjax.data.resolve: the task registry, the tokenizer, the mixture). Idempotent: resolving a
resolved config returns it unchanged. What the devices decide (`auto_dtype`) is passed beside the
config, never written into it (a checkpoint's config must not change with the hardware it resumes
on).
"""

from __future__ import annotations

from typing import Any

from mtjax.config import Config
from mtjax.data.resolve import resolve_data


def resolve(config: Config) -> Config:
  if config.model.pretrained:  # the shape comes from the HF directory
    from mtjax.model import gguf, pretrained
    if gguf.is_gguf(config.model.pretrained):  # a GGUF file: its converted HF directory (cached)
      config = config.replace(**{"model.pretrained": str(gguf.hf_directory(config.model.pretrained))})
    config = pretrained.apply_to_config(config)
  return resolve_data(config)


def auto_dtype(device: Any) -> str:
  """The compute dtype model.dtype="auto" means on this device: bfloat16 on TPU and on NVIDIA GPUs
  from Ampere on (compute capability >= 8.0); float32 on CPU and on older GPUs, which emulate
  bfloat16 slowly (a Colab T4 is 7.5)."""
  if device.platform == "cpu":
    return "float32"
  if device.platform == "gpu":
    try:
      major = int(str(getattr(device, "compute_capability", "")).split(".")[0])
    except ValueError:  # no capability reported (ROCm): bfloat16 is native there
      return "bfloat16"
    return "bfloat16" if major >= 8 else "float32"
  return "bfloat16"
