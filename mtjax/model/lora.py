"""LoRA adapters outside the model: folding them into the base weights, and PEFT export.

The adapters live in the Decoder beside their projections (mtjax.model.llama.LoraParam):
`layers/attn/q_lora_a` [layers, T, d, r] and `layers/attn/q_lora_b` [layers, T, r, n, h] for
`layers/attn/q` [layers, d, n, h], and likewise for k, v, o (in [n, h], out [d]) and the MLP's
gate, up, down. T is the number of adapters (one per task with model.lora.per_task, else 1).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import traverse_util

from mtjax.model.llama import ModelSpec, is_lora_path

# mtjax projection -> (its module in an HF Llama layer)
HF_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
              "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
              "down": "mlp.down_proj"}
_GROUP = {"q": "attn", "k": "attn", "v": "attn", "o": "attn", "gate": "mlp", "up": "mlp",
          "down": "mlp"}


def adapter_index(spec: ModelSpec, tasks: tuple[str, ...], task: str | None, *,
                  field: str = "--task") -> int:
  """The adapter of `task` (0 for a shared adapter; None is allowed only then)."""
  from mtjax.errors import BadInputError
  if spec.adapter_tasks == 1:
    return 0
  if task is None:
    raise BadInputError(field, f"the run has per-task adapters: name the task to merge "
                        f"(one of {', '.join(tasks)})")
  if task not in tasks:
    raise BadInputError(field, f"unknown task {task!r} (the run's: {', '.join(tasks)})")
  return tasks.index(task)


def merge(params: Any, spec: ModelSpec, index: int = 0) -> Any:
  """The base parameters (the pure dict of spec.without_lora()'s Decoder) with adapter `index`
  folded in: W + (alpha / r) A[index] B[index], computed in float32, stored in W's dtype."""
  flat: dict[str, Any] = dict(traverse_util.flatten_dict(params, sep="/"))
  out = {k: v for k, v in flat.items() if not is_lora_path(k)}
  scale = spec.lora_scale() if spec.lora else 0.0
  for target in spec.lora_targets:
    path = f"layers/{_GROUP[target]}/{target}"
    a, b, w = flat[path + "_lora_a"][:, index], flat[path + "_lora_b"][:, index], out[path]
    delta = jax.vmap(lambda a, b: jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), axes=1))(a, b)
    out[path] = (w.astype(jnp.float32) + scale * delta).astype(w.dtype)
  return traverse_util.unflatten_dict(out, sep="/")


def peft_tensors(params: Any, spec: ModelSpec, index: int = 0) -> dict[str, np.ndarray]:
  """Adapter `index` as PEFT's tensors: per layer and target
  base_model.model.model.layers.{i}.<module>.lora_A.weight [r, in] and lora_B.weight [out, r]."""
  flat: dict[str, Any] = dict(traverse_util.flatten_dict(params, sep="/"))
  out = {}
  r = spec.lora_rank
  for target in spec.lora_targets:
    path = f"layers/{_GROUP[target]}/{target}"
    a = np.asarray(jax.device_get(flat[path + "_lora_a"][:, index]), np.float32)  # [L, *in, r]
    b = np.asarray(jax.device_get(flat[path + "_lora_b"][:, index]), np.float32)  # [L, r, *out]
    for i in range(spec.num_layers):
      name = f"base_model.model.model.layers.{i}.{HF_MODULES[target]}"
      out[f"{name}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, r).T)
      out[f"{name}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(r, -1).T)
  return out


def export_peft(params: Any, spec: ModelSpec, out: epath.PathLike, *, index: int = 0,
                base_model: str = "") -> list[str]:
  """A PEFT adapter directory (adapter_config.json, adapter_model.safetensors) of adapter
  `index`, which peft's PeftModel.from_pretrained loads onto the base model."""
  from safetensors.numpy import save_file
  out = epath.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  tensors = peft_tensors(params, spec, index)
  save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
  config: Mapping[str, Any] = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec.lora_rank,
      "lora_alpha": spec.lora_alpha, "lora_dropout": spec.lora_dropout,
      "target_modules": sorted(HF_MODULES[t].split(".")[-1] for t in spec.lora_targets),
      "base_model_name_or_path": base_model, "bias": "none", "fan_in_fan_out": False,
      "inference_mode": True, "init_lora_weights": True, "use_rslora": False,
      "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {},
      "alpha_pattern": {},
  }
  (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
  return ["adapter_config.json", "adapter_model.safetensors"]
