"""LoRA (Hu et al. 2021) as an adapter plug-in (mtjax.model.adapters): low-rank updates of the
projections in model.lora.targets, folding them into the base weights, and PEFT export.

Beside a projection `<t>` [*in, *out] (stacked layers: a leading layer axis on everything) LoRA
adds `<t>_lora_a` [T, *in, r] and `<t>_lora_b` [T, r, *out] (T: one adapter per task with
model.lora.per_task, else 1), both Trained. A token of adapter t sees W + (alpha / r) A[t] B[t];
B starts at zero, so the model starts equal to its base; A is normal with stddev 1 / sqrt(fan in).
Dropout (model.lora.dropout) drops the adapter's input in training.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import traverse_util

from mtjax.errors import BadInputError
from mtjax.model import adapters as adapters_lib
from mtjax.model.adapters import Adapter, Call, Site, Trained

if TYPE_CHECKING:
  from mtjax.model.llama import ModelSpec

# mtjax projection -> (its module in an HF Llama layer)
HF_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
              "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
              "down": "mlp.down_proj"}
TARGET_IDS = {t: i for i, t in enumerate(HF_MODULES)}  # folded into a dropout key per target


class LoraParam(Trained):
  """A LoRA matrix: `<target>_lora_a` or `<target>_lora_b`."""


def is_lora_path(path: str) -> bool:
  """Whether a params path is a LoRA matrix (for reading checkpoints and exports by name)."""
  return path.endswith(("_lora_a", "_lora_b"))


@dataclasses.dataclass(frozen=True)
class LoRA(Adapter):
  kind = "lora"
  group = "lora"
  label: ClassVar[str] = "LoRA"
  rank: int = 8
  alpha: float = 16.0
  rate: float = 0.0  # dropout on the adapter's input, in training

  @classmethod
  def from_config(cls, model_config: Any, num_tasks: int, tokenizer_vocab: int) -> Adapter | None:
    lora = model_config.lora
    if not lora.targets or lora.kind != cls.kind:
      return None
    return cls(targets=tuple(lora.targets), tasks=max(1, num_tasks) if lora.per_task else 1,
               rank=lora.rank, alpha=lora.alpha, rate=lora.dropout)

  @property
  def dropout(self) -> float:
    return self.rate

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def describe(self) -> str:
    return f"{self.label} rank {self.rank} on {','.join(self.targets)}"

  def names(self, site: Site) -> tuple[str, ...]:
    return (f"{site.name}_lora_a", f"{site.name}_lora_b")

  def init(self, site: Site, w: jax.Array, key: jax.Array) -> dict[str, tuple[type, Any, tuple]]:
    lead = w.shape[:1] if site.stacked else ()
    n_in = len(site.in_axes)
    in_shape, out_shape = w.shape[len(lead):len(lead) + n_in], w.shape[len(lead) + n_in:]
    a = jax.random.normal(key, (*lead, self.tasks, *in_shape, self.rank), jnp.float32)
    a = a / math.sqrt(math.prod(in_shape))
    b = jnp.zeros((*lead, self.tasks, self.rank, *out_shape), w.dtype)
    return {f"{site.name}_lora_a": (LoraParam, a.astype(w.dtype),
                                    (*site.lead, "lora_task", *site.in_axes, "lora_rank")),
            f"{site.name}_lora_b": (LoraParam, b,
                                    (*site.lead, "lora_task", "lora_rank", *site.out_axes))}

  def dropped(self, call: Call) -> jax.Array:
    """The adapter's input: x, dropped at `rate` in training (a key per target)."""
    x = call.x
    if call.ctx.key is None or self.rate <= 0:
      return x
    key = jax.random.fold_in(call.ctx.key, TARGET_IDS[call.site])
    keep = jax.random.bernoulli(key, 1.0 - self.rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - self.rate, x.dtype), jnp.zeros((), x.dtype))

  def delta(self, call: Call, x: jax.Array) -> jax.Array:
    """(alpha / r) x A B of each token's adapter, from the adapter input x [B, L, *in]."""
    dt = x.dtype
    a, b = call.var("_lora_a").astype(dt), call.var("_lora_b").astype(dt)
    n_in = a.ndim - 2
    i, o = "defg"[:n_in], "uvwz"[:b.ndim - 2]
    mix = self.mix(call, dt)
    if mix is None:
      xa = jnp.einsum(f"bl{i},{i}r->blr", x, a[0])
      out = jnp.einsum(f"blr,r{o}->bl{o}", xa, b[0])
    else:
      xa = jnp.einsum(f"bl{i},t{i}r->bltr", x, a) * mix[..., None]
      out = jnp.einsum(f"bltr,tr{o}->bl{o}", xa, b)
    return out * jnp.asarray(self.scale, dt)

  def apply(self, call: Call) -> jax.Array:
    return call.y + self.delta(call, self.dropped(call))

  def neutral(self, params: Mapping[str, jax.Array], site: Site) -> dict[str, jax.Array]:
    path = site.beside(f"{site.name}_lora_b")
    return {path: jnp.zeros_like(params[path])}

  def product(self, params: Mapping[str, jax.Array], site: Site, index: int) -> jax.Array:
    """(alpha / r) A[index] B[index] in float32, shaped like the site's weight."""
    a = params[site.beside(f"{site.name}_lora_a")].astype(jnp.float32)
    b = params[site.beside(f"{site.name}_lora_b")].astype(jnp.float32)
    one = lambda a, b: jnp.tensordot(a[index], b[index], axes=1)
    return self.scale * (jax.vmap(one)(a, b) if site.stacked else one(a, b))

  def merge(self, params: Mapping[str, jax.Array], site: Site, index: int) -> jax.Array:
    w = params[site.path]
    return (w.astype(jnp.float32) + self.product(params, site, index)).astype(w.dtype)

  # -------------------------------------------------------------- PEFT

  def peft_tensors(self, params: Mapping[str, Any], site: Site, index: int,
                   layers: int) -> dict[str, np.ndarray]:
    """Adapter `index` of one site as PEFT's tensors: per layer
    base_model.model.model.layers.{i}.<module>.lora_A.weight [r, in] and lora_B.weight [out, r]."""
    r = self.rank
    take = lambda suffix: np.asarray(jax.device_get(
        params[site.beside(site.name + suffix)][:, index]), np.float32)
    a, b = take("_lora_a"), take("_lora_b")  # [L, *in, r], [L, r, *out]
    out = {}
    for i in range(layers):
      name = f"base_model.model.model.layers.{i}.{HF_MODULES[site.name]}"
      out[f"{name}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, r).T)
      out[f"{name}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(r, -1).T)
    return out

  def peft_config(self) -> dict[str, Any]:
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.rank,
            "lora_alpha": self.alpha, "lora_dropout": self.rate,
            "target_modules": sorted(HF_MODULES[t].split(".")[-1] for t in self.targets),
            "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
            "init_lora_weights": True, "use_rslora": False, "use_dora": False,
            "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {},
            "alpha_pattern": {}}


# ---------------------------------------------------------------- a run's adapters

def adapter_index(spec: ModelSpec, tasks: tuple[str, ...], task: str | None, *,
                  field: str = "--task") -> int:
  """The adapter of `task` (0 for a shared adapter; None is allowed only then)."""
  if spec.adapter_tasks == 1:
    return 0
  if task is None:
    raise BadInputError(field, f"the run has per-task adapters: name the task to merge "
                        f"(one of {', '.join(tasks)})")
  if task not in tasks:
    raise BadInputError(field, f"unknown task {task!r} (the run's: {', '.join(tasks)})")
  return tasks.index(task)


def _model(spec: ModelSpec) -> Any:
  from flax import nnx

  from mtjax.model.llama import Decoder
  return nnx.eval_shape(lambda: Decoder(spec, nnx.Rngs(0)))


def merge(params: Any, spec: ModelSpec, index: int = 0) -> Any:
  """The base parameters (the pure dict of spec.without_adapters()'s Decoder) with adapter `index`
  folded in: W + (alpha / r) A[index] B[index] (DoRA: its rescaled weight), in float32, stored in
  W's dtype."""
  return adapters_lib.merged(_model(spec), params, index)


def low_rank(spec: ModelSpec) -> LoRA:
  """The run's LoRA-family adapter (LoRA, DoRA)."""
  found = [a for a in spec.adapters if isinstance(a, LoRA)]
  if not found:
    raise BadInputError("--adapters_only", "the run has no LoRA adapters (model.lora.targets)")
  return found[0]


def peft_tensors(params: Any, spec: ModelSpec, index: int = 0) -> dict[str, np.ndarray]:
  """Adapter `index` as PEFT's tensors, every adapted projection of every layer."""
  flat = dict(traverse_util.flatten_dict(params, sep="/"))
  out: dict[str, np.ndarray] = {}
  for adapter, site in adapters_lib.layout(_model(spec)):
    if isinstance(adapter, LoRA):
      out.update(adapter.peft_tensors(flat, site, index, spec.num_layers))
  return out


def export_peft(params: Any, spec: ModelSpec, out: epath.PathLike, *, index: int = 0,
                base_model: str = "") -> list[str]:
  """A PEFT adapter directory (adapter_config.json, adapter_model.safetensors) of adapter
  `index`, which peft's PeftModel.from_pretrained loads onto the base model."""
  from safetensors.numpy import save_file
  out = epath.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  save_file(peft_tensors(params, spec, index), str(out / "adapter_model.safetensors"),
            metadata={"format": "pt"})
  config = {**low_rank(spec).peft_config(), "base_model_name_or_path": base_model}
  (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
  return ["adapter_config.json", "adapter_model.safetensors"]
