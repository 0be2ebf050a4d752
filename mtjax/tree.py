"""Parameter trees by path: `layers/attn/q` names a leaf of a nested params dict.

The params of a run are a nested dict (nnx.to_pure_dict); checkpoints, HF layouts, optimizer
labels and adapters refer to their leaves by these "/"-joined paths. A leaf module: no mtjax
imports, so every layer may use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax


def param_path(path: tuple) -> str:
  """'layers/attn/q' from a jax key path."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def flatten(tree: Any) -> dict[str, Any]:
  """{path: leaf} of a tree (any pytree: nested dicts, a TrainState's fields)."""
  return {param_path(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten_like(like: Any, flat: Mapping[str, Any]) -> Any:
  """A tree shaped like `like` whose leaves are flat[path]."""
  return jax.tree_util.tree_map_with_path(lambda p, _: flat[param_path(p)], like)
