"""HF checkpoints in and out: read an HF directory directly (no conversion step), write one back.

An HF directory holds config.json, model.safetensors (or shards with model.safetensors.index.json)
and the tokenizer files. Supported: Llama 2/3.x (incl. llama3 RoPE scaling and tied embeddings),
Mistral (sliding window), Qwen2/2.5 (q/k/v biases), Qwen3 (q/k RMSNorm), Gemma 3 text models
(Gemma3ForCausalLM: sliding and full layers, (1 + w) norms, four per block): one Decoder with
switches in ModelSpec (model/llama.py). Gemma 3's multimodal checkpoints
(Gemma3ForConditionalGeneration) are not read.

- `model_fields(directory)`: the ModelConfig fields a directory's config.json implies (rope settings
  read both as the legacy `rope_theta` + `rope_scaling` keys and as transformers 5's
  `rope_parameters`).
- `load_params(directory, spec, abstract, shardings)`: streams tensor by tensor from safetensors
  into the mesh's shardings; each process reads only the rows of the HF tensor that its devices
  hold, so the whole model is never in one host's memory.
- `export(params, spec, out, ...)`: writes an HF directory that transformers'
  AutoModelForCausalLM and vLLM read (shards of at most 5 GB with an index).
- `forward(path, tokens)`: logits of an HF directory (or an mtjax export) for token ids: the helper
  for checking an import by hand.

Parameter layouts. HF stores nn.Linear weights as [out, in]; mtjax keeps [in, out] with heads
split out: q [d, n, h] from q_proj.weight [n*h, d], o [n, h, d] from o_proj.weight [d, n*h],
gate/up [d, f] and down [f, d] transposed, lm_head [d, V] from lm_head.weight [V, d].
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from mtjax import tree as tree_lib
from mtjax.errors import BadInputError
from mtjax.model import tensorfile
from mtjax.model.llama import ModelSpec

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                 "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
                 "Gemma3ForCausalLM": "gemma3_text"}
# chat_template.jinja: where transformers 5 saves a chat template (tokenizer_config.json no longer
# holds it), so an export without it would lose the model's chat format.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "tokenizer.model", "chat_template.jinja")

# How an HF tensor maps onto an mtjax parameter (see the module docstring).
SAME, TRANSPOSE, HEADS_IN, HEADS_OUT, HEADS_BIAS = "same", "transpose", "heads_in", "heads_out", "heads_bias"


def _say(message: str) -> None:
  if jax.process_index() == 0:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- config.json


def read_config(directory: epath.PathLike) -> dict[str, Any]:
  path = epath.Path(directory) / "config.json"
  if not path.exists():
    raise BadInputError(str(path), "missing: model.pretrained must be an HF directory with "
                        "config.json, *.safetensors and tokenizer files")
  try:
    config = json.loads(path.read_text())
  except ValueError as e:
    raise BadInputError(str(path), f"not valid JSON ({e})") from None
  except OSError as e:  # a directory named config.json, unreadable permissions
    raise BadInputError(str(path), f"cannot be read ({e.strerror or e})") from None
  if not isinstance(config, dict):
    raise BadInputError(str(path), "expected a JSON object")
  return config


def architecture(hf: Mapping[str, Any], where: str) -> str:
  """The family ('llama', 'mistral', 'qwen2', 'qwen3', 'gemma3_text') of an HF config, or exit 2
  naming it."""
  names = hf.get("architectures") or []
  if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
    raise BadInputError(where, f"architectures: expected a list of class names, got {names!r}")
  name = names[0] if names else hf.get("model_type", "<none>")
  family = (ARCHITECTURES.get(name) or {f: f for f in ARCHITECTURES.values()}.get(name)
            if isinstance(name, str) else None)
  if family is None:
    raise BadInputError(where, f"architecture {name!r} is not supported (supported: "
                        f"{', '.join(ARCHITECTURES)})")
  return family


def _rope(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
  from mtjax.config import ROPE_SCALING_KEYS
  params = hf.get("rope_parameters")  # transformers 5
  if isinstance(params, Mapping) and "full_attention" in params:  # per layer type
    params = params["full_attention"]
  if isinstance(params, Mapping):
    theta = params.get("rope_theta", hf.get("rope_theta", 10_000.0))
    scaling: Mapping[str, Any] = params
  else:  # the legacy keys
    theta = hf.get("rope_theta", 10_000.0)
    scaling = hf.get("rope_scaling") or {}
  if not isinstance(scaling, Mapping):
    raise BadInputError(where, f"rope_scaling: expected a JSON object, got {scaling!r}")
  rope_type = scaling.get("rope_type", scaling.get("type", "default"))
  if rope_type not in ROPE_SCALING_KEYS:
    raise BadInputError(where, f"rope type {rope_type!r} is not supported (supported: "
                        f"{', '.join(ROPE_SCALING_KEYS)})")
  missing = [k for k in ROPE_SCALING_KEYS[rope_type] if k not in scaling]
  if missing:
    raise BadInputError(where, f"rope type {rope_type!r} needs {missing}")
  return {"rope_theta": _positive(theta, "rope_theta", where), "rope_type": rope_type,
          "rope_scaling": {k: _finite(scaling[k], f"rope_scaling.{k}", where)
                           for k in ROPE_SCALING_KEYS[rope_type]}}


def _integer(value: Any, key: str, where: str, minimum: int = 1) -> int:
  """An integer config.json value >= minimum (32.7, "32", true or -1 layers are refused, not
  truncated or trained on)."""
  if isinstance(value, bool) or not (isinstance(value, int) or
                                     (isinstance(value, float) and value.is_integer())):
    raise BadInputError(where, f"{key}: expected an integer, got {value!r}")
  if value < minimum:
    raise BadInputError(where, f"{key}: expected at least {minimum}, got {value!r}")
  return int(value)


def _finite(value: Any, key: str, where: str) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise BadInputError(where, f"{key}: expected a finite number, got {value!r}")
  return float(value)


def _positive(value: Any, key: str, where: str) -> float:
  number = _finite(value, key, where)
  if number <= 0:
    raise BadInputError(where, f"{key}: expected a positive number, got {value!r}")
  return number


def _sliding_window(hf: Mapping[str, Any], family: str, num_layers: int, where: str) -> int:
  window = hf.get("sliding_window") or 0
  layer_types = hf.get("layer_types")
  if layer_types:
    kinds = set(layer_types)
    if kinds == {"full_attention"}:
      return 0
    if kinds == {"sliding_attention"} and window:
      return int(window)
    raise BadInputError(where, f"layer_types {sorted(kinds)} (a per-layer mix of sliding and full "
                        "attention) is not supported")
  if family == "mistral":
    return int(window)
  if family in ("qwen2", "qwen3") and hf.get("use_sliding_window") and window:
    first = hf.get("max_window_layers", num_layers)
    if first >= num_layers:
      return 0
    if first == 0:
      return int(window)
    raise BadInputError(where, f"use_sliding_window with max_window_layers={first} of {num_layers} "
                        "(a per-layer mix of sliding and full attention) is not supported")
  return 0


def model_fields(directory: epath.PathLike) -> dict[str, Any]:
  """The ModelConfig fields that an HF directory's config.json sets."""
  where = str(epath.Path(directory) / "config.json")
  hf = read_config(directory)
  family = architecture(hf, where)
  try:
    d = _integer(hf["hidden_size"], "hidden_size", where)
    heads = _integer(hf["num_attention_heads"], "num_attention_heads", where)
    layers = _integer(hf["num_hidden_layers"], "num_hidden_layers", where)
    kv_heads = _integer(hf.get("num_key_value_heads") or heads, "num_key_value_heads", where)
    fields: dict[str, Any] = {
        "d_model": d, "num_layers": layers, "num_heads": heads, "num_kv_heads": kv_heads,
        "mlp_dim": _integer(hf["intermediate_size"], "intermediate_size", where),
        "head_dim": _integer(hf.get("head_dim") or d // heads, "head_dim", where),
        "vocab_size": _integer(hf["vocab_size"], "vocab_size", where),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "norm_eps": _positive(hf.get("rms_norm_eps", 1e-6), "rms_norm_eps", where),
    }
  except KeyError as e:
    raise BadInputError(where, f"missing key {e.args[0]!r}") from None
  if heads % kv_heads:
    raise BadInputError(where, f"num_attention_heads {heads} is not a multiple of "
                        f"num_key_value_heads {kv_heads}")
  window = hf.get("sliding_window")
  if window is not None:
    _integer(window, "sliding_window", where, minimum=0)
  if family == "gemma3_text":
    return _gemma3_fields(hf, fields, where)
  if hf.get("hidden_act", "silu") != "silu":
    raise BadInputError(where, f"hidden_act {hf['hidden_act']!r} is not supported (silu only)")
  if hf.get("mlp_bias"):
    raise BadInputError(where, "mlp_bias=true is not supported")
  attention_bias = bool(hf.get("attention_bias", False))
  fields.update(_rope(hf, where))
  fields["qkv_bias"] = family == "qwen2" or attention_bias
  fields["out_bias"] = family != "qwen2" and attention_bias
  fields["qk_norm"] = family == "qwen3"
  fields["sliding_window"] = _sliding_window(hf, family, layers, where)
  return fields


GEMMA3_DEFAULTS = {"head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 4096,
                   "sliding_window_pattern": 6, "rope_theta": 1_000_000.0,
                   "rope_local_base_freq": 10_000.0}


def _gemma3_fields(hf: Mapping[str, Any], fields: dict[str, Any], where: str) -> dict[str, Any]:
  """Gemma3TextConfig's keys (with its defaults where config.json leaves them out)."""
  act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
  if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
    raise BadInputError(where, f"hidden_activation {act!r} is not supported (gelu_pytorch_tanh)")
  for key in ("final_logit_softcapping", "attn_logit_softcapping"):
    if hf.get(key) is not None:
      raise BadInputError(where, f"{key}={hf[key]} is not supported (Gemma 3 has none)")
  if hf.get("use_bidirectional_attention"):
    raise BadInputError(where, "use_bidirectional_attention=true is not supported")
  if hf.get("attention_bias"):
    raise BadInputError(where, "attention_bias=true is not supported for gemma3")
  layers = fields["num_layers"]
  layer_types = hf.get("layer_types")
  if not layer_types:  # older configs: every sliding_window_pattern-th layer is a full one
    pattern = int(hf.get("sliding_window_pattern") or GEMMA3_DEFAULTS["sliding_window_pattern"])
    layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                   for i in range(layers)]
  from mtjax.config import LAYER_TYPES
  if len(layer_types) != layers or set(layer_types) - set(LAYER_TYPES):
    raise BadInputError(where, f"layer_types must name {', '.join(LAYER_TYPES)} once per layer "
                        f"({layers}), got {layer_types}")
  params = hf.get("rope_parameters")
  rope: dict[str, Any] = dict(hf)
  local_theta = hf.get("rope_local_base_freq", GEMMA3_DEFAULTS["rope_local_base_freq"])
  if isinstance(params, Mapping) and "sliding_attention" in params:
    local = params["sliding_attention"] or {}
    if local.get("rope_type", "default") != "default":
      raise BadInputError(where, f"sliding layers' rope type {local['rope_type']!r} is not "
                          "supported (default only)")
    local_theta = local.get("rope_theta", local_theta)
  if not (isinstance(params, Mapping) and "full_attention" in params):
    rope.setdefault("rope_theta", GEMMA3_DEFAULTS["rope_theta"])
  elif "rope_theta" not in (params["full_attention"] or {}):
    rope["rope_parameters"] = {**params, "full_attention": {
        **(params["full_attention"] or {}), "rope_theta": GEMMA3_DEFAULTS["rope_theta"]}}
  fields.update(_rope(rope, where))
  fields.update(
      head_dim=_integer(hf.get("head_dim") or GEMMA3_DEFAULTS["head_dim"], "head_dim", where),
      tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
      sliding_window=_integer(hf.get("sliding_window") or GEMMA3_DEFAULTS["sliding_window"],
                              "sliding_window", where),
      layer_types=tuple(layer_types),
      rope_local_theta=_positive(local_theta, "rope_local_base_freq", where),
      activation="gelu_tanh", norm_plus_one=True, post_norms=True, embed_scale=True,
      query_pre_attn_scalar=_positive(hf.get("query_pre_attn_scalar")
                                      or GEMMA3_DEFAULTS["query_pre_attn_scalar"],
                                      "query_pre_attn_scalar", where),
      qkv_bias=False, out_bias=False, qk_norm=True)
  return fields


# HF config keys for the ModelConfig fields: used in conflict messages and in export.
HF_KEYS = {"d_model": "hidden_size", "num_layers": "num_hidden_layers",
           "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads",
           "mlp_dim": "intermediate_size", "head_dim": "head_dim", "vocab_size": "vocab_size",
           "tie_embeddings": "tie_word_embeddings", "norm_eps": "rms_norm_eps",
           "rope_theta": "rope_theta", "rope_type": "rope_type", "rope_scaling": "rope_scaling",
           "qkv_bias": "attention_bias", "out_bias": "attention_bias", "qk_norm": "q_norm",
           "sliding_window": "sliding_window", "layer_types": "layer_types",
           "rope_local_theta": "rope_local_base_freq", "activation": "hidden_activation",
           "norm_plus_one": "model_type", "post_norms": "model_type", "embed_scale": "model_type",
           "query_pre_attn_scalar": "query_pre_attn_scalar"}


def apply_to_config(config: Any) -> Any:
  """config (mtjax.config.Config) with model.pretrained set -> its model fields taken from the
  directory (its tokenizer is data's default: mtjax.data.resolve). A field given on the command
  line that differs from the directory's is exit 2 naming both values."""
  m = config.model
  directory = m.pretrained
  fields = model_fields(directory)
  if m.lora.targets and m.lora.rank > fields["d_model"]:
    raise BadInputError("model.lora.rank", f"{m.lora.rank} is more than {directory}'s hidden_size "
                        f"{fields['d_model']} (a rank above the projections' smaller side adds "
                        "nothing)")
  changed = {}
  for key, value in fields.items():
    current = getattr(m, key)
    same = dict(current) == value if isinstance(value, dict) else current == value
    if same:
      continue
    if f"model.{key}" in m.pinned:
      raise BadInputError(f"model.{key}", f"--config.model.{key}={current} conflicts with "
                          f"{directory}/config.json ({HF_KEYS[key]} gives {value})")
    changed[key] = value
  return config.replace(**{f"model.{k}": v for k, v in changed.items()})


def spec_for(directory: epath.PathLike, *, dtype: str = "float32",
             param_dtype: str = "float32") -> ModelSpec:
  """The ModelSpec of an HF directory alone (no mtjax config): forward() and export checks."""
  from mtjax.config import ModelConfig
  fields = model_fields(directory)
  cfg = dataclasses.replace(ModelConfig(), **fields, dtype=dtype, param_dtype=param_dtype)
  return ModelSpec.from_config(cfg, fields["vocab_size"], "float32")


# ----------------------------------------------------------------------------- tensor layouts


def layout(spec: ModelSpec) -> dict[str, tuple[str, str]]:
  """mtjax parameter path -> (HF tensor name, how it maps), for every parameter of `spec`.

  The layers are stacked (scanned): `layers/attn/q` [num_layers, d, n, h] holds every layer's
  q_proj; its HF name is a template with `{i}` for the layer index (see hf_tensors)."""
  out = {"token_embed": ("model.embed_tokens.weight", SAME),
         "final_norm/scale": ("model.norm.weight", SAME)}
  if not spec.tie_embeddings:
    out["lm_head"] = ("lm_head.weight", TRANSPOSE)
  p, h = "layers/", "model.layers.{i}."
  out[p + "attn_norm/scale"] = (h + "input_layernorm.weight", SAME)
  if spec.post_norms:  # Gemma 3's four norms
    out[p + "post_attn_norm/scale"] = (h + "post_attention_layernorm.weight", SAME)
    out[p + "mlp_norm/scale"] = (h + "pre_feedforward_layernorm.weight", SAME)
    out[p + "post_mlp_norm/scale"] = (h + "post_feedforward_layernorm.weight", SAME)
  else:
    out[p + "mlp_norm/scale"] = (h + "post_attention_layernorm.weight", SAME)
  for x in "qkv":
    out[p + f"attn/{x}"] = (h + f"self_attn.{x}_proj.weight", HEADS_IN)
    if spec.qkv_bias:
      out[p + f"attn/{x}_bias"] = (h + f"self_attn.{x}_proj.bias", HEADS_BIAS)
  out[p + "attn/o"] = (h + "self_attn.o_proj.weight", HEADS_OUT)
  if spec.out_bias:
    out[p + "attn/o_bias"] = (h + "self_attn.o_proj.bias", SAME)
  if spec.qk_norm:
    out[p + "attn/q_norm/scale"] = (h + "self_attn.q_norm.weight", SAME)
    out[p + "attn/k_norm/scale"] = (h + "self_attn.k_norm.weight", SAME)
  for x in ("gate", "up", "down"):
    out[p + f"mlp/{x}"] = (h + f"mlp.{x}_proj.weight", TRANSPOSE)
  return out


def _stacked(path: str) -> bool:
  return path.startswith("layers/")


@dataclasses.dataclass(frozen=True)
class HfTensor:
  name: str  # e.g. model.layers.3.self_attn.q_proj.weight
  path: str  # the mtjax parameter, e.g. layers/attn/q
  layer: int | None  # its index on the stacked layer axis (None: not a layer parameter)
  kind: str  # SAME, TRANSPOSE, ...
  shape: tuple[int, ...]  # the HF tensor's shape


def hf_tensors(spec: ModelSpec) -> list[HfTensor]:
  """Every HF tensor of `spec`, in the order transformers writes them (embed, layers, norm, head)."""
  shapes = _abstract_shapes(spec)
  out = []
  for path, (name, kind) in layout(spec).items():
    if _stacked(path):
      per_layer = shapes[path][1:]
      out += [HfTensor(name.format(i=i), path, i, kind, hf_shape(kind, per_layer))
              for i in range(spec.num_layers)]
    else:
      out.append(HfTensor(name, path, None, kind, hf_shape(kind, shapes[path])))
  return sorted(out, key=lambda t: hf_order(t.name))


def hf_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The HF tensor's shape for an mtjax parameter of `shape`."""
  if kind == SAME:
    return shape
  if kind == TRANSPOSE:
    return shape[::-1]
  if kind == HEADS_IN:  # [d, n, h] <- [n*h, d]
    return (shape[1] * shape[2], shape[0])
  if kind == HEADS_OUT:  # [n, h, d] <- [d, n*h]
    return (shape[2], shape[0] * shape[1])
  assert kind == HEADS_BIAS  # [n, h] <- [n*h]
  return (shape[0] * shape[1],)


def to_hf(kind: str, x: np.ndarray) -> np.ndarray:
  """An mtjax parameter (whole) in the HF tensor's layout."""
  if kind == SAME:
    return x
  if kind == TRANSPOSE:
    return x.T
  if kind == HEADS_IN:
    return x.reshape(x.shape[0], -1).T
  if kind == HEADS_OUT:
    return x.reshape(-1, x.shape[-1]).T
  return x.reshape(-1)


def _hf_rows(kind: str, shape: tuple[int, ...], index: tuple[slice, ...]) -> tuple[int, int]:
  """The range of the HF tensor's first axis that an mtjax index (one device's shard) needs."""
  def bounds(dim: int, scale: int = 1) -> tuple[int, int]:
    s = index[dim]
    start = 0 if s.start is None else s.start
    stop = shape[dim] if s.stop is None else s.stop
    return start * scale, stop * scale
  if kind == SAME:
    return bounds(0)
  if kind == TRANSPOSE:
    return bounds(1)
  if kind == HEADS_IN:
    return bounds(1, shape[2])
  if kind == HEADS_OUT:
    return bounds(2)
  return bounds(0, shape[1])


def _from_hf_rows(kind: str, shape: tuple[int, ...], block: np.ndarray,
                  start: int) -> tuple[np.ndarray, tuple[int, ...]]:
  """HF rows [start, start + len(block)) -> (that block in mtjax layout, its offset per axis)."""
  offset = [0] * len(shape)
  if kind == SAME:
    offset[0] = start
    return block, tuple(offset)
  if kind == TRANSPOSE:
    offset[1] = start
    return block.T, tuple(offset)
  if kind == HEADS_IN:
    h = shape[2]
    offset[1] = start // h
    return block.reshape(-1, h, shape[0]).transpose(2, 0, 1), tuple(offset)
  if kind == HEADS_OUT:
    offset[2] = start
    return block.reshape(-1, shape[0], shape[1]).transpose(1, 2, 0), tuple(offset)
  offset[0] = start // shape[1]
  return block.reshape(-1, shape[1]), tuple(offset)


_flat, _unflat = tree_lib.flatten, tree_lib.unflatten_like


# ----------------------------------------------------------------------------- import


# An mtjax export of a run with soft prompts (model.soft_prompt) keeps them beside the HF files, in
# a file of their own (transformers and vLLM would not know the tensor), [tasks, length, d_model].
SOFT_PROMPT_FILE = "mtjax_soft_prompt.npy"


def read_soft_prompt(directory: epath.PathLike, shape: tuple[int, ...]) -> np.ndarray | None:
  """The soft prompts an export stored (None: it has none); a BadInputError naming the file when
  their shape is not `shape` (model.soft_prompt.length and the run's tasks)."""
  path = epath.Path(directory) / SOFT_PROMPT_FILE
  if not path.exists():
    return None
  try:
    with path.open("rb") as f:
      table = np.load(f, allow_pickle=False)  # never unpickles: an .npy of numbers only
  except (OSError, ValueError, EOFError) as e:
    raise BadInputError(str(path), f"not a readable .npy array ({e})") from None
  if not np.issubdtype(table.dtype, np.floating) or not np.isfinite(table).all():
    raise BadInputError(str(path), f"expected finite floating-point soft prompts, got "
                        f"{table.dtype}{' with NaN/Inf' if np.issubdtype(table.dtype, np.floating) else ''}")
  if tuple(table.shape) != tuple(shape):
    raise BadInputError(str(path), f"soft prompts of shape {tuple(table.shape)}, expected "
                        f"{tuple(shape)} ([tasks, model.soft_prompt.length, d_model])")
  return table


def load_params(directory: epath.PathLike, spec: ModelSpec, abstract: Any, shardings: Any, *,
                progress: bool = True) -> Any:
  """The parameters of an HF directory, streamed into `shardings` (a tree like `abstract`, the
  pure params dict of `spec`'s Decoder), in spec.param_dtype.

  Per parameter, this process reads the rows of each HF tensor (one per layer for the stacked
  layer parameters) that its devices' shards need, converts them to the mtjax layout and dtype
  and places each device's shard: at most one parameter's rows are in host memory at a time.
  """
  directory = epath.Path(directory)
  index = check_tensors(directory, spec)  # every name and shape, before anything is read
  names = layout(spec)
  shapes, targets = _flat(abstract), _flat(shardings)
  soft, soft_sharding = shapes.pop("soft_prompt", None), targets.pop("soft_prompt", None)
  unknown = sorted(set(shapes) - set(names))
  assert not unknown, f"parameters without an HF mapping: {unknown}"
  dtype = np.dtype(spec.param_dtype)
  loaded: dict[str, jax.Array] = {}
  from tqdm import tqdm
  items = tqdm(shapes.items(), desc=f"loading {directory.name}", unit="tensor",
               disable=not progress or jax.process_index() != 0 or None, leave=False)
  for path, leaf in items:
    name, kind = names[path]
    shape = tuple(leaf.shape)
    sharding = targets[path]
    device_indices = list(sharding.addressable_devices_indices_map(shape).values())
    stacked = _stacked(path)
    per_layer = shape[1:] if stacked else shape
    ranges = [_hf_rows(kind, per_layer, idx[1:] if stacked else idx) for idx in device_indices]
    start, stop = min(r[0] for r in ranges), max(r[1] for r in ranges)
    if stacked:  # the layer axis is never sharded (rules: "layers" -> None): read every layer
      blocks = [_from_hf_rows(kind, per_layer, index.file(n).read(n, (start, stop)), start)
                for n in (name.format(i=i) for i in range(spec.num_layers))]
      block, offset = np.stack([b for b, _ in blocks]), (0, *blocks[0][1])
      del blocks
    else:
      block, offset = _from_hf_rows(kind, shape, index.file(name).read(name, (start, stop)), start)

    def shard(idx, block=block, offset=offset, shape=shape):
      local = tuple(slice((s.start or 0) - o, (shape[d] if s.stop is None else s.stop) - o)
                    for d, (s, o) in enumerate(zip(idx, offset)))
      return np.ascontiguousarray(block[local], dtype=dtype)

    loaded[path] = jax.make_array_from_callback(shape, sharding, shard)
    del block
  used = {t.name for t in hf_tensors(spec)}
  extra = sorted(n for n in set(index.where) - used if not n.endswith("rotary_emb.inv_freq"))
  if extra and not (spec.tie_embeddings and extra == ["lm_head.weight"]):
    _say(f"warning: {len(extra)} tensors of {directory} are not used (e.g. {extra[:3]})")
  if soft is not None:  # the export's soft prompts, when it has them (else the caller makes them)
    table = read_soft_prompt(directory, tuple(soft.shape))
    if table is not None:
      loaded["soft_prompt"] = jax.make_array_from_callback(
          table.shape, soft_sharding, lambda idx, t=table: np.ascontiguousarray(t[idx], dtype=dtype))
    else:
      abstract = {k: v for k, v in abstract.items() if k != "soft_prompt"}
  return _unflat(abstract, loaded)


def check_tensors(directory: epath.PathLike, spec: ModelSpec) -> tensorfile.TensorIndex:
  """Reads only the safetensors headers: every tensor `spec` needs is there, with the shape its
  config.json implies (exit 2 naming the tensor and file otherwise). Returns the index."""
  directory = epath.Path(directory)
  index = tensorfile.TensorIndex(directory)
  for t in hf_tensors(spec):
    if t.name not in index:
      raise BadInputError(str(directory), f"missing tensor {t.name} (for mtjax {t.path}; "
                          f"config.json: {spec_summary(spec)})")
    got = index.file(t.name).shape(t.name)
    if got != t.shape:
      raise BadInputError(str(index.file(t.name).path), f"tensor {t.name} has shape "
                          f"{list(got)}, expected {list(t.shape)} (config.json: "
                          f"{spec_summary(spec)})")
  return index


def _abstract_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
  from flax import nnx

  from mtjax.model.llama import Decoder
  abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: Decoder(spec, nnx.Rngs(0)))))
  return {k: tuple(v.shape) for k, v in _flat(abstract).items()}


def spec_summary(spec: ModelSpec) -> str:
  return (f"d_model {spec.d_model}, {spec.num_layers} layers, {spec.num_heads} heads "
          f"({spec.num_kv_heads} kv) of {spec.head_dim}, mlp {spec.mlp_dim}, vocab {spec.vocab_size}")


# ----------------------------------------------------------------------------- export


def hf_config(spec: ModelSpec, *, base: Mapping[str, Any] | None = None, bos_id: int | None = None,
              eos_id: int | None = None, pad_id: int | None = None,
              max_length: int = 2048) -> dict[str, Any]:
  """config.json for `spec`: the pretrained directory's (base) updated with the shape, or a new
  one of the family whose switches the spec uses."""
  gemma = (spec.norm_plus_one, spec.post_norms, spec.embed_scale, spec.activation == "gelu_tanh",
           spec.qk_norm)
  if any(gemma[:4]):
    if not all(gemma) or spec.qkv_bias or spec.out_bias:
      raise ValueError("(1 + w) norms, post norms, the embedding scale and gelu_tanh exist only "
                       "together, with q/k norms and no biases (Gemma 3)")
    return _gemma3_config(spec, base=base, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id,
                          max_length=max_length)
  if spec.layer_types or spec.rope_local_theta or spec.query_pre_attn_scalar:
    raise ValueError("layer_types, rope_local_theta and query_pre_attn_scalar exist only as "
                     "Gemma 3")
  if spec.qk_norm:
    arch, model_type = "Qwen3ForCausalLM", "qwen3"
  elif spec.qkv_bias and not spec.out_bias:
    arch, model_type = "Qwen2ForCausalLM", "qwen2"
  elif spec.sliding_window:
    arch, model_type = "MistralForCausalLM", "mistral"
  else:
    arch, model_type = "LlamaForCausalLM", "llama"
  if spec.qkv_bias != spec.out_bias and model_type != "qwen2":
    raise ValueError("q/k/v biases without an output bias exist only as Qwen2")
  config: dict[str, Any] = dict(base or {})
  config.setdefault("architectures", [arch])
  config.setdefault("model_type", model_type)
  config.setdefault("max_position_embeddings", max_length)
  config.setdefault("hidden_act", "silu")
  config.update({
      "hidden_size": spec.d_model, "num_hidden_layers": spec.num_layers,
      "num_attention_heads": spec.num_heads, "num_key_value_heads": spec.num_kv_heads,
      "intermediate_size": spec.mlp_dim, "head_dim": spec.head_dim,
      "vocab_size": spec.vocab_size, "tie_word_embeddings": spec.tie_embeddings,
      "rms_norm_eps": spec.norm_eps,
      "torch_dtype": spec.param_dtype, "dtype": spec.param_dtype,
  })
  if model_type != "qwen2":
    config["attention_bias"] = spec.out_bias
  if model_type == "mistral" or spec.sliding_window:
    config["sliding_window"] = spec.sliding_window or None
  rope = {"rope_type": spec.rope_type, **dict(spec.rope_scaling)}
  # Both forms: transformers 5 reads rope_parameters, 4.x and vLLM read the legacy keys.
  config["rope_theta"] = spec.rope_theta
  config["rope_scaling"] = None if spec.rope_type == "default" else rope
  config["rope_parameters"] = {"rope_theta": spec.rope_theta, **rope}
  for key, value in (("bos_token_id", bos_id), ("eos_token_id", eos_id), ("pad_token_id", pad_id)):
    if value is not None and key not in (base or {}):
      config[key] = value
  return config


def _int_if_whole(x: float) -> float | int:
  """transformers' Gemma3TextConfig types query_pre_attn_scalar as an int (strictly checked)."""
  return int(x) if float(x).is_integer() else x


def _gemma3_config(spec: ModelSpec, *, base: Mapping[str, Any] | None, bos_id: int | None,
                   eos_id: int | None, pad_id: int | None, max_length: int) -> dict[str, Any]:
  """config.json of a Gemma3ForCausalLM (gemma3_text) for `spec`."""
  if spec.rope_type != "default" and spec.rope_type != "linear":
    raise ValueError(f"Gemma 3 takes default or linear RoPE, not {spec.rope_type!r}")
  config: dict[str, Any] = dict(base or {})
  config.setdefault("architectures", ["Gemma3ForCausalLM"])
  config.setdefault("model_type", "gemma3_text")
  config.setdefault("max_position_embeddings", max_length)
  config.pop("hidden_act", None)
  layer_types = list(spec.layer_types) or (
      ["sliding_attention" if spec.sliding_window else "full_attention"] * spec.num_layers)
  local_theta = spec.rope_local_theta or spec.rope_theta
  full = {"rope_type": spec.rope_type, "rope_theta": spec.rope_theta, **dict(spec.rope_scaling)}
  config.update({
      "hidden_size": spec.d_model, "num_hidden_layers": spec.num_layers,
      "num_attention_heads": spec.num_heads, "num_key_value_heads": spec.num_kv_heads,
      "intermediate_size": spec.mlp_dim, "head_dim": spec.head_dim,
      "vocab_size": spec.vocab_size, "tie_word_embeddings": spec.tie_embeddings,
      "rms_norm_eps": spec.norm_eps, "hidden_activation": "gelu_pytorch_tanh",
      "query_pre_attn_scalar": _int_if_whole(spec.query_pre_attn_scalar or spec.head_dim),
      "sliding_window": spec.sliding_window or None, "layer_types": layer_types,
      "attention_bias": False, "final_logit_softcapping": None, "attn_logit_softcapping": None,
      "rope_theta": spec.rope_theta, "rope_local_base_freq": local_theta,
      "rope_scaling": None if spec.rope_type == "default" else {
          "rope_type": spec.rope_type, **dict(spec.rope_scaling)},
      "rope_parameters": {"full_attention": full, "sliding_attention": {
          "rope_type": "default", "rope_theta": local_theta}},
      "torch_dtype": spec.param_dtype, "dtype": spec.param_dtype,
  })
  for key, value in (("bos_token_id", bos_id), ("eos_token_id", eos_id), ("pad_token_id", pad_id)):
    if value is not None and key not in (base or {}):
      config[key] = value
  return config


def export(params: Any, spec: ModelSpec, out: epath.PathLike, *, config: Mapping[str, Any],
           tokenizer_dir: epath.PathLike | None = None, max_shard_bytes: int = 5 * 10**9,
           progress: bool = True) -> list[str]:
  """Writes `params` (the pure params dict, possibly sharded over processes) as an HF directory.

  Every process takes part in gathering each tensor (multi-process runs); process 0 writes,
  one tensor at a time. Returns the files written (process 0; [] elsewhere).
  """
  out = epath.Path(out)
  flat = _flat(params)
  dtype = np.dtype(spec.param_dtype)
  listed = hf_tensors(spec)
  tensors = [(t.name, t.shape, dtype) for t in listed]
  by_name = {t.name: t for t in listed}

  def gather(x: Any) -> np.ndarray:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))

  def fetch(hf_name: str) -> np.ndarray:
    t = by_name[hf_name]
    x = flat[t.path] if t.layer is None else flat[t.path][t.layer]  # one layer's slice
    return to_hf(t.kind, gather(x).astype(dtype))

  soft = None
  if "soft_prompt" in flat:
    soft = gather(flat["soft_prompt"]).astype(dtype)
  if jax.process_index() != 0:
    for name, _, _ in tensors:  # the gathers are collective: every process takes part
      fetch(name)
    return []
  out.mkdir(parents=True, exist_ok=True)
  from tqdm import tqdm
  bar = tqdm(total=len(tensors), desc=f"exporting to {out.name}", unit="tensor",
             disable=not progress or None, leave=False)

  def fetch_counted(name: str) -> np.ndarray:
    bar.update(1)
    return fetch(name)

  files = tensorfile.write(out, tensors, fetch_counted, max_shard_bytes=max_shard_bytes)
  bar.close()
  (out / "config.json").write_text(json.dumps(dict(config), indent=2, sort_keys=True))
  files.append("config.json")
  if soft is not None:
    with (out / SOFT_PROMPT_FILE).open("wb") as f:
      np.save(f, soft)
    files.append(SOFT_PROMPT_FILE)
  if tokenizer_dir is not None:
    source = epath.Path(tokenizer_dir)
    for name in TOKENIZER_FILES:
      if (source / name).exists() and not (name == "generation_config.json" and
                                           (out / name).exists()):
        (out / name).write_bytes((source / name).read_bytes())
        files.append(name)
  return files


def hf_order(name: str) -> tuple:
  """embed, layers in numeric order, norm, lm_head: the order transformers writes."""
  parts = name.split(".")
  if parts[:2] == ["model", "layers"]:
    return (1, int(parts[2]), name)
  return ({"model.embed_tokens.weight": 0, "model.norm.weight": 2}.get(name, 3), 0, name)


# ----------------------------------------------------------------------------- checking by hand


def forward(path: epath.PathLike, tokens: Any) -> np.ndarray:
  """Logits [B, L, vocab] (numpy float32) of an HF directory, an mtjax export or a GGUF file
  (mtjax.model.gguf) for token ids
  `tokens` (int array [B, L], every row one sequence from position 0), computed in float32 with
  mtjax's Decoder: compare them with transformers' to check an import by hand.

      >>> from mtjax.model.pretrained import forward
      >>> logits = forward("path/to/Llama-3.2-1B", [[128000, 791, 6864, 315]])
  """

  from mtjax.model import gguf
  if gguf.is_gguf(str(path)):  # a GGUF file (or pkg:NAME): its converted HF directory
    path = gguf.hf_directory(str(path))
  tokens = np.asarray(tokens, np.int32)
  if tokens.ndim != 2:
    raise BadInputError("tokens", f"expected an int array [batch, length], got shape {tokens.shape}")
  spec = spec_for(path)
  if tokens.size and (tokens.min() < 0 or tokens.max() >= spec.vocab_size):
    raise BadInputError("tokens", f"ids must lie in [0, {spec.vocab_size})")
  params, graphdef = load_replicated(path, spec)
  return logits_of(graphdef, params, tokens)


def logits_of(graphdef: Any, params: Any, tokens: np.ndarray, adapter: int = 0) -> np.ndarray:
  """Logits [B, L, vocab] float32 of the Decoder (graphdef, params) for int32 tokens [B, L],
  every row one unpacked sequence from position 0; adapter: the task id every token uses with
  per-task adapters (ignored without them)."""
  from flax import nnx
  positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
  adapter_ids = np.full(tokens.shape, adapter, np.int32)
  apply = jax.jit(lambda params, t, p, a: nnx.merge(graphdef, params)(t, p, jnp.ones_like(t),
                                                                     adapter_ids=a))
  return np.asarray(apply(params, tokens, positions, adapter_ids), np.float32)


def load_replicated(path: epath.PathLike, spec: ModelSpec,
                    device: Any = None) -> tuple[Any, Any]:
  """(params, graphdef) of an HF directory on one device (the first by default)."""
  from flax import nnx

  from mtjax.model.llama import Decoder
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Decoder(spec, nnx.Rngs(0))))
  abstract = nnx.to_pure_dict(abstract)
  sharding = jax.sharding.SingleDeviceSharding(device or jax.devices()[0])
  shardings = jax.tree_util.tree_map(lambda _: sharding, abstract)
  return load_params(path, spec, abstract, shardings, progress=False), graphdef


def loader_for(directory: epath.PathLike, spec: ModelSpec) -> Callable[[Any, Any], Any]:
  """A `load_params(abstract, shardings)` callable for train.step.init_state."""
  return lambda abstract, shardings: load_params(directory, spec, abstract, shardings)
