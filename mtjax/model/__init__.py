"""The decoder-only transformer (Flax NNX) and its attention implementations."""

from mtjax.model.llama import Decoder, ModelSpec, init_cache  # noqa: F401
