"""The decoder-only transformer (Flax NNX) and its attention implementations."""

from mtjax.model.llama import Decoder, ModelSpec  # noqa: F401
