"""The one resolve step at run start: what the config alone cannot decide.

`mtjax.config` checks types and values; this step reads what the config names: a pretrained
model's directory sets the model's shape (mtjax.model.pretrained.apply_to_config), then the data
half (mtjax.data.resolve: the task registry, the tokenizer, the mixture). Idempotent: resolving a
resolved config returns it unchanged.
"""

from __future__ import annotations

from mtjax.config import Config
from mtjax.data.resolve import resolve_data


def resolve(config: Config) -> Config:
  if config.model.pretrained:  # the shape comes from the HF directory
    from mtjax.model import pretrained
    config = pretrained.apply_to_config(config)
  return resolve_data(config)
