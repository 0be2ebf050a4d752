"""Logical-axis rules: the one table that says how every named axis maps onto the mesh.

Modules name only logical axes (`embed`, `mlp`, `heads`, ...); this table decides the physical
layout: FSDP shards parameters' `embed` axis over `fsdp`, Megatron-style tensor parallelism
shards heads, MLP and vocab over `tensor`, and batches go over (`dcn`, `data`, `fsdp`). `dcn` is
the outer data-parallel axis across TPU slices (multi-slice): only gradients cross it.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec

MESH_AXES = ("dcn", "data", "fsdp", "tensor")
BATCH_AXES = ("batch", "length")  # every [B, L] batch array: rows over the data-parallel axes

RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ("layers", None),  # the stacked layer axis of scanned layers: never sharded
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("lora_task", None),  # LoRA adapters' task axis and rank: replicated; their other axes are
    ("lora_rank", None),  # the base matrix's, so an adapter shards like its base
    ("svf_rank", None),  # SVF's singular-value axis: replicated (U and V^T shard like the base)
    ("soft_prompt", None),  # a soft prompt's virtual-token axis (its task axis is lora_task)
    # activations
    ("batch", ("dcn", "data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)
_RULES = dict(RULES)


def spec(logical_axes: Sequence[str | None]) -> PartitionSpec:
  """Logical axis names -> PartitionSpec (unknown names are an error, not silently replicated)."""
  out = []
  for name in logical_axes:
    if name is None:
      out.append(None)
    elif name in _RULES:
      out.append(_RULES[name])
    else:
      raise KeyError(f"no sharding rule for logical axis {name!r}; add it to RULES")
  return PartitionSpec(*out)


def named(mesh: jax.sharding.Mesh, logical_axes: Sequence[str | None]) -> NamedSharding:
  return NamedSharding(mesh, spec(logical_axes))


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """Sharding constraint on an activation, when a mesh is set (a no-op outside one)."""
  if jax.sharding.get_abstract_mesh().empty:
    return x
  return jax.lax.with_sharding_constraint(x, spec(logical_axes))
