"""Typed run configuration: load a `get_config()` file, apply overrides, validate once.

Config files are Python (ml_collections), as in Flax examples and big_vision:

    def get_config(arg=None) -> ml_collections.ConfigDict

`load("configs/demo.py:tiny", ["--config.model.d_model=64"])` imports the file, calls
`get_config("tiny")`, writes it over the defaults (a file sets only what differs), applies the
dotted overrides, and validates types and values into the frozen dataclasses of each group. Every
problem is a `BadInputError` naming the field, raised at start-up, never at step 5,000.

Each group owns its schema and its checks, one module each: model, mesh, data, train, optimizer,
checkpoint, eval, rl, study (the studies' settings, validated by mtjax.experiments); the
settings that do not go together are declared once, in combinations.REFUSALS. This package is a
leaf: checks that need the task registry or files (task names, tokenizer files, mixtures) run
once at run start in `mtjax.resolve.resolve(config)`.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import importlib.util
import json
import math
import pathlib
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections


from mtjax.config import checkpoint as checkpoint_group
from mtjax.config import combinations
from mtjax.config import data as data_group
from mtjax.config import eval as eval_group
from mtjax.config import mesh as mesh_group
from mtjax.config import model as model_group
from mtjax.config import optimizer as optimizer_group
from mtjax.config import rl as rl_group
from mtjax.config import train as train_group
from mtjax.config.checkpoint import CheckpointConfig
from mtjax.config.data import (MIXING_METHODS, RATES, SCHEDULES, TRUNCATE,  # noqa: F401
                                   DataConfig, JsonlTaskConfig, MixingConfig)
from mtjax.config.eval import EvalConfig
from mtjax.config.mesh import MeshConfig
from mtjax.config.model import (ACTIVATIONS, ATTENTION, DTYPES, LAYER_TYPES,  # noqa: F401
                                    LORA_TARGETS, PARAM_DTYPES, REMAT, ROPE_SCALING_KEYS,
                                    SVF_TARGETS, LoraConfig, ModelConfig, SoftPromptConfig,
                                    SvfConfig)
from mtjax.config.optimizer import LR_SCHEDULES, OptimizerConfig  # noqa: F401
from mtjax.config.rl import RL_ALGORITHMS, RLConfig  # noqa: F401
from mtjax.config.study import StudyConfig
from mtjax.config.train import (WEIGHTING_METHODS, EntropyCoef,  # noqa: F401
                                    InstructionSearchConfig, TrainConfig, WeightingConfig)
from mtjax.errors import BadInputError

FLOAT32_MAX = 3.4028234663852886e38


def _frozen_mapping(d: Mapping[str, Any]) -> Mapping[str, Any]:
  return types.MappingProxyType(dict(d))


@dataclasses.dataclass(frozen=True)
class Config:
  seed: int = 0
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
  checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
  eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
  study: StudyConfig = dataclasses.field(default_factory=StudyConfig)
  rl: RLConfig = dataclasses.field(default_factory=RLConfig)

  @property
  def num_tasks(self) -> int:
    return len(self.data.tasks)

  def to_dict(self) -> dict[str, Any]:
    return _to_plain(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  def replace(self, **dotted: Any) -> Config:
    """A copy with dotted fields replaced, re-validated: `cfg.replace(**{"mesh.fsdp": 2})`."""
    tree = self.to_dict()
    for key, value in dotted.items():
      *parents, leaf = key.split(".")
      node = tree
      for p in parents:
        node = node[p]
      node[leaf] = value
    return from_dict(tree)


def _to_plain(x: Any) -> Any:
  if dataclasses.is_dataclass(x):
    return {f.name: _to_plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
  if isinstance(x, Mapping):
    return {k: _to_plain(v) for k, v in x.items()}
  if isinstance(x, tuple):
    return [_to_plain(v) for v in x]
  return x


# ----------------------------------------------------------------------------- typed conversion


def _type_name(t: Any) -> str:
  return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(t, str(t))


def _convert(value: Any, hint: Any, field: str) -> Any:
  """Converts one raw config value to the annotated type, or raises BadInputError."""
  origin = typing.get_origin(hint)
  if hint is bool:
    if isinstance(value, bool):
      return value
    raise BadInputError(field, f"expected true/false, got {value!r}")
  if hint is int:
    if isinstance(value, int) and not isinstance(value, bool):
      if not -2**63 <= value < 2**63:  # values reach numpy and JAX as int64 at most
        raise BadInputError(field, f"expected an integer that fits in 64 bits, got {value}")
      return value
    raise BadInputError(field, f"expected an integer, got {value!r}")
  if hint is float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      if not math.isfinite(value):
        raise BadInputError(field, f"expected a finite number, got {value!r}")
      if abs(value) > FLOAT32_MAX:  # the step computes in float32 (or bfloat16): it would overflow
        raise BadInputError(field, f"expected a number within float32 range (|x| <= 3.4e38), got {value!r}")
      return float(value)
    raise BadInputError(field, f"expected a number, got {value!r}")
  if hint is str:
    if isinstance(value, str):
      return value
    raise BadInputError(field, f"expected a string, got {value!r}")
  if origin is tuple:
    args = typing.get_args(hint)
    if isinstance(value, str) or not isinstance(value, Sequence):
      raise BadInputError(field, f"expected a list, got {value!r}")
    if len(args) == 2 and args[1] is Ellipsis:
      return tuple(_convert(v, args[0], f"{field}[{i}]") for i, v in enumerate(value))
    if len(value) != len(args):
      raise BadInputError(field, f"expected {len(args)} values, got {value!r}")
    return tuple(_convert(v, a, f"{field}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
  if origin in (types.UnionType, typing.Union):
    if int in typing.get_args(hint) and isinstance(value, str) and re.fullmatch(r"-?\d+", value):
      value = int(value)  # "--config.eval.max_new_tokens=8" over the default "auto"
    for option in typing.get_args(hint):
      try:
        return _convert(value, option, field)
      except BadInputError:
        pass
    if hint == EntropyCoef:
      raise BadInputError(field, f"expected a number or a (start, end) pair, got {value!r}")
    options = " or ".join(_type_name(o) if o in (int, float, bool, str) else "a list"
                          for o in typing.get_args(hint))
    raise BadInputError(field, f"expected {options}, got {value!r}")
  if origin in (Mapping, dict) or hint is Mapping:
    _, value_type = typing.get_args(hint)
    if not isinstance(value, (Mapping, ml_collections.ConfigDict)):
      raise BadInputError(field, f"expected a mapping of task name to value, got {value!r}")
    items = value.items()
    return _frozen_mapping({str(k): _convert(v, value_type, f"{field}.{k}") for k, v in items})
  if isinstance(hint, type) and dataclasses.is_dataclass(hint):
    return _build(hint, value, field)
  raise TypeError(f"unsupported config annotation {hint!r} at {field}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
  if not isinstance(raw, (Mapping, ml_collections.ConfigDict)):
    raise BadInputError(prefix or "config", f"expected a group of settings, got {raw!r}")
  hints = typing.get_type_hints(cls)
  names = [f.name for f in dataclasses.fields(cls)]
  for key in raw.keys():
    if key not in names:
      where = f"{prefix}.{key}" if prefix else key
      raise BadInputError(where, f"unknown key (known here: {', '.join(names)})")
  kwargs = {}
  for name in names:
    if name in raw.keys():
      kwargs[name] = _convert(raw[name], hints[name], f"{prefix}.{name}" if prefix else name)
  return cls(**kwargs)


# ----------------------------------------------------------------------------- schema checks
# Only what the values alone decide. Checks that need the task registry or files (task names,
# tokenizer files, mixtures) run once at run start: mtjax.resolve.resolve(config).

def _check(config: Config) -> None:
  """Every group's own checks, then the combinations that do not go together."""
  if not 0 <= config.seed < 2**31:
    raise BadInputError("seed", f"expected an integer in [0, 2**31), got {config.seed}")
  model_group.check(config.model)
  mesh_group.check(config.mesh)
  data_group.check(config.data)
  train_group.check(config.train)
  optimizer_group.check(config.optimizer)
  checkpoint_group.check(config.checkpoint)
  eval_group.check(config.eval)
  rl_group.check(config.rl)
  combinations.check(config)


def from_dict(raw: Mapping[str, Any] | ml_collections.ConfigDict) -> Config:
  """Validates a raw (possibly nested) mapping into a frozen Config (schema and values only)."""
  config = _build(Config, raw, "")
  _check(config)
  return config


# ----------------------------------------------------------------------------- loading


_MAPPING_FIELDS = ("rope_scaling", "mixture", "loss_weights", "entropy_coefs", "instructions", "param_groups",
                   "targets", "jsonl_tasks")


def parse_override(arg: str) -> tuple[str, str]:
  """'--config.a.b=v' -> ('a.b', 'v')."""
  body = arg[2:] if arg.startswith("--") else arg
  if not body.startswith("config.") or "=" not in body:
    raise BadInputError(arg, "expected an override of the form --config.a.b=value")
  key, value = body[len("config."):].split("=", 1)
  if not all(part.strip() for part in key.split(".")):
    raise BadInputError(arg, "expected an override of the form --config.a.b=value (a dotted "
                        "name without empty parts)")
  return key, value


def _parse_item(text: str) -> Any:
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
    return text
  return value if isinstance(value, (int, float)) else text


def _parse_value(text: str, current: Any) -> Any:
  if isinstance(current, str):
    return text
  if isinstance(current, (tuple, list)) and not text.strip().startswith(("[", "(")):
    # a,b,c: names stay strings; numbers (--config.study.seeds=0,1,2) become numbers
    return tuple(_parse_item(p.strip()) for p in text.split(",") if p.strip())
  lowered = text.strip().lower()
  if lowered in ("true", "false"):
    return lowered == "true"
  if isinstance(current, float) and not isinstance(current, bool):
    with contextlib.suppress(ValueError):
      return float(text)  # also nan, inf, -inf: the schema then names them as not finite
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
    pass
  if current is None and lowered in ("nan", "inf", "+inf", "-inf", "infinity", "-infinity"):
    return float(lowered)  # a new per-task entry: the schema then names it as not finite
  return text


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
  for arg in overrides:
    key, text = parse_override(arg)
    *parents, leaf = key.split(".")
    node = cfg
    for i, p in enumerate(parents):
      if not isinstance(node, ml_collections.ConfigDict):  # --config.seed.x=1: below a value
        raise BadInputError(key, f"{'.'.join(parents[:i])} is a value, not a group of settings")
      if p not in node:
        raise BadInputError(".".join(parents[: i + 1]), "unknown key")
      node = node[p]
    if not isinstance(node, ml_collections.ConfigDict):
      raise BadInputError(key, f"{'.'.join(parents)} is a value, not a group of settings")
    # New keys are allowed only inside per-task mappings (their keys are task names).
    per_task = parents and parents[-1] in _MAPPING_FIELDS
    if leaf not in node and not per_task:
      known = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else ""
      raise BadInputError(key, f"unknown key (known here: {known})")
    current = node[leaf] if leaf in node else None
    value = _parse_value(text, current)
    try:
      with node.unlocked() if per_task and leaf not in node else contextlib.nullcontext():
        node[leaf] = value
    except (TypeError, ValueError, KeyError):
      expected = ("a mapping of task name to value ({'name': value, ...})"
                  if leaf in _MAPPING_FIELDS else _describe(current))
      raise BadInputError(key, f"expected {expected}, got {text!r}") from None


def _describe(current: Any) -> str:
  """What an override must give to replace `current` (for the error message)."""
  if isinstance(current, ml_collections.ConfigDict):
    return f"a group of settings ({', '.join(sorted(current.keys()))}), not one value"
  if isinstance(current, (tuple, list)):
    return "a list (a,b,c or [...])"
  if isinstance(current, bool):
    return "true/false"
  return _type_name(type(current)) if current is not None else "a value"


_IMPORTING: list[str] = []  # config files being imported (innermost last)


def defining_file() -> str:
  """The config file being imported right now ("" if none): task and scorer registrations record
  it, so a run can re-import the file that defined its tasks (tasks/specs.py)."""
  return _IMPORTING[-1] if _IMPORTING else ""


def import_config_module(path: str) -> tuple[types.ModuleType, str]:
  """Imports the file of `path[:arg]`; returns (module, arg)."""
  file, _, arg = str(path).partition(":")
  file_path = pathlib.Path(file)
  if file_path.is_dir():
    raise BadInputError("--config", f"{file} is a directory, expected a Python config file")
  if not file_path.is_file():
    raise BadInputError("--config", f"config file not found: {file}")
  spec = importlib.util.spec_from_file_location(f"mtjax_config_{file_path.stem}", file_path)
  if spec is None or spec.loader is None:
    raise BadInputError(file, "cannot be imported as a Python file")
  module = importlib.util.module_from_spec(spec)
  _IMPORTING.append(str(file_path.resolve()))
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # a user's file: report, do not dump a traceback
    raise BadInputError(file, f"could not import config file ({type(e).__name__}: {e})") from None
  finally:
    _IMPORTING.pop()
  return module, arg


def sibling_config(here: str, name: str, variant: str = "") -> ml_collections.ConfigDict:
  """get_config(variant) of the config file `name` beside `here`: configs build on each other
  (`c = sibling_config(__file__, "demo.py")`)."""
  module, _ = import_config_module(str(pathlib.Path(here).with_name(name)))
  return module.get_config(variant)


# Fields of a union type ("auto" or a number): a ConfigDict would fix their type from the first
# value, so a config file could not set 16 over "auto". They hold any value; the schema checks it.
_UNION_FIELDS = (("eval", "max_new_tokens"), ("rl", "max_new_tokens"))


def _untyped(tree: dict[str, Any]) -> dict[str, Any]:
  for group, name in _UNION_FIELDS:
    if isinstance(tree.get(group), dict) and name in tree[group]:
      tree[group][name] = ml_collections.FieldReference(tree[group][name], field_type=object)
  return tree


def defaults() -> ml_collections.ConfigDict:
  """Every setting at its default, as a ConfigDict: a config file may start from it and set only
  what differs (`c = mtjax.config.defaults(); c.train.steps = 400`)."""
  return ml_collections.ConfigDict(_untyped(Config().to_dict()))


def _merge(into: dict[str, Any], raw: Mapping[str, Any], cls: type) -> None:
  """Writes `raw` over the defaults `into`, group by group; mappings and lists replace whole."""
  hints = typing.get_type_hints(cls)
  for key, value in raw.items():
    hint = hints.get(key)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
      _merge(into[key], value, hint)
    else:
      into[key] = value  # an unknown key stays, so from_dict names it


def load_raw(path: str) -> ml_collections.ConfigDict:
  """Imports `path[:arg]` and returns `get_config(arg)` over the defaults, as a ConfigDict."""
  module, arg = import_config_module(path)
  file = str(path).partition(":")[0]
  if not hasattr(module, "get_config"):
    raise BadInputError(file, "expected a function get_config()")
  try:
    cfg = module.get_config(arg) if arg else module.get_config()
  except Exception as e:  # a user's function: report it in one line, whatever it raised
    raise BadInputError(path, f"get_config({arg!r}) failed ({type(e).__name__}: {e})") from None
  try:
    if isinstance(cfg, Mapping):
      cfg = ml_collections.ConfigDict(cfg)
    if not isinstance(cfg, ml_collections.ConfigDict):
      raise BadInputError(file, "get_config() must return an ml_collections.ConfigDict, got "
                          f"{type(cfg).__name__}")
    merged = Config().to_dict()
    _merge(merged, cfg.to_dict(), Config)
    return ml_collections.ConfigDict(_untyped(merged))
  except (TypeError, ValueError, KeyError, AttributeError) as e:
    if isinstance(e, BadInputError):
      raise
    raise BadInputError(file, f"get_config() returned settings that are not a config tree "
                        f"({type(e).__name__}: {e})") from None


def load(path: str, overrides: Sequence[str] = ()) -> Config:
  """Loads, overrides and validates a config: `load("configs/demo.py:tiny", ["--config.seed=1"])`."""
  cfg = load_raw(path)
  apply_overrides(cfg, overrides)
  keys = tuple(dict.fromkeys(parse_override(a)[0] for a in overrides))
  cfg.model.pinned = tuple(k for k in keys if k.startswith("model.") or k == "data.tokenizer")
  return from_dict(cfg)
