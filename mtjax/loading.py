"""A model outside the train loop: load a run's checkpoint or an HF directory, generate, export.

    model = mtjax.load("runs/demo")            # a workdir (latest checkpoint) or an HF directory
    model.generate(["copy: abc ->"], max_new_tokens=16)
    model.logits([[1, 70, 71]])                 # numpy [B, L, vocab] float32

`mtjax generate` and `mtjax export` are thin layers over `load(...).generate` and `export_run`
(mtjax.train.export).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from etils import epath

from mtjax.data.tokenizer import Tokenizer
from mtjax.errors import BadInputError
from mtjax.model import ModelSpec
from mtjax.train.export import export_run  # noqa: F401  (`mtjax.loading.export_run`, as before)


@dataclasses.dataclass
class LoadedModel:
  """Parameters on a mesh, the model's graph and spec, and its tokenizer."""

  graphdef: Any
  params: Any
  spec: ModelSpec
  tokenizer: Tokenizer
  mesh: jax.sharding.Mesh
  source: str  # "WORKDIR@step" or the HF directory
  config: Any = None  # the run's resolved Config, for a workdir

  @property
  def model(self) -> Any:
    """The Flax NNX Decoder with these parameters: model(tokens, positions, segment_ids)."""
    from flax import nnx
    return nnx.merge(self.graphdef, self.params)

  def logits(self, tokens: Any, *, task: str | None = None) -> np.ndarray:
    """Logits [B, L, vocab] float32 for token ids [B, L] (each row one sequence from position 0).
    task: whose adapter to use in a run with per-task adapters (LoRA, SVF, soft prompts; default
    its first task, as `generate`)."""
    from mtjax.model.pretrained import logits_of
    with jax.set_mesh(self.mesh):
      return logits_of(self.graphdef, self.params, np.asarray(tokens, np.int32),
                       adapter=self.adapter_index(task))

  def adapter_index(self, task: str | None) -> int:
    """The adapter (task id) of `task` in a run with per-task adapters; 0 (the first task) when
    task is None; BadInputError for a task the run does not have."""
    if task is None:
      return 0
    tasks = list(self.config.data.tasks) if self.config is not None else []
    if self.spec.adapter_tasks == 1:
      raise BadInputError("task", f"{self.source} has no per-task adapters to choose from")
    if task not in tasks:
      raise BadInputError("task", f"expected one of {', '.join(tasks)} (the run's tasks), got "
                          f"{task!r}")
    return tasks.index(task)

  def generate(self, prompts: str | Sequence[str], *, max_new_tokens: int = 64,
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
               bos: bool = True, task: str | None = None) -> list[str]:
    """Completions of text prompts: greedy at temperature 0, else sampled (top-k, top-p).
    Generation stops at the tokenizer's EOS ids (the HF directory's generation_config). task: as
    in `logits`."""
    if isinstance(prompts, str):
      prompts = [prompts]
    ids = [self.encode(p, bos=bos) for p in prompts]
    return [self.tokenizer.decode(t) for t in self.generate_ids(
        ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        seed=seed, task=task)]

  def encode(self, prompt: str, *, bos: bool = True) -> np.ndarray:
    """The prompt's ids: under a chat format (a run trained with data.format=chat, or
    load(..., chat=True)) rendered as a user turn with the generation prompt, as training saw its
    prompts (the template writes BOS where it has one; `bos` is not used); else BOS + the text
    (for an HF directory, BOS only when its tokenizer_config adds one: add_bos_token)."""
    from mtjax.data.tokenizer import ChatTokenizer
    if isinstance(self.tokenizer, ChatTokenizer):
      return self.tokenizer.prompt_ids(prompt).astype(np.int32)
    body = self.tokenizer.encode(prompt)
    bos = bos and (self.config is not None or getattr(self.tokenizer, "add_bos", True))
    return np.concatenate([[self.tokenizer.bos_id], body] if bos else [body]).astype(np.int32)

  def generate_ids(self, prompts: Sequence[np.ndarray], *, max_new_tokens: int = 64,
                   temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                   seed: int = 0, task: str | None = None) -> list[np.ndarray]:
    """Generated token ids for prompts of token ids (stop token excluded)."""
    from mtjax.eval.decode import DEFAULT_BUCKETS, Generator
    longest = max((len(p) for p in prompts), default=1)
    buckets = tuple(b for b in DEFAULT_BUCKETS if b < longest) + (
        next((b for b in DEFAULT_BUCKETS if b >= longest), longest),)
    rows = -(-len(prompts) // _batch_shards(self.mesh)) * _batch_shards(self.mesh)
    generator = Generator(self.graphdef, self.spec, self.mesh, max_new_tokens=max_new_tokens,
                          eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id,
                          stop_ids=self.tokenizer.stop_ids, batch_size=max(rows, 1),
                          buckets=buckets)
    samples = generator(self.params, list(prompts), seed=seed, temperature=temperature,
                        top_k=top_k, top_p=top_p, adapter=self.adapter_index(task))
    return [s[0].tokens for s in samples]


def _batch_shards(mesh: jax.sharding.Mesh) -> int:
  return mesh.shape["dcn"] * mesh.shape["data"] * mesh.shape["fsdp"]


def _is_hf_directory(path: epath.Path) -> bool:
  return (path / "config.json").exists() and not (path / "checkpoints").exists()


def model_length(path: str | epath.PathLike) -> tuple[int | None, str]:
  """(the longest sequence the model at `path` was made for, where that comes from): an HF
  directory's max_position_embeddings; a run's pretrained base's, else its data.seq_len (what
  its export records as max_position_embeddings). (None, "") where nothing says. Reads configs
  only (a .gguf file is converted, as loading it would)."""
  import json

  from mtjax.model import gguf, pretrained
  if gguf.is_gguf(str(path)):
    path = gguf.hf_directory(str(path))
  p = epath.Path(path)
  if _is_hf_directory(p):
    value = pretrained.read_config(p).get("max_position_embeddings")
    return (int(value), f"{p}/config.json max_position_embeddings") if isinstance(value, int) \
        and value > 0 else (None, "")
  try:
    recorded = json.loads((p / "config.json").read_text())
    base, seq_len = recorded["model"]["pretrained"], int(recorded["data"]["seq_len"])
  except (OSError, ValueError, KeyError, TypeError):  # load() names what is wrong with the run
    return None, ""
  if base and epath.Path(base).exists():
    length, where = model_length(base)
    if length:
      return max(length, seq_len), where
  return seq_len, "the run's data.seq_len"


def load(path: str | epath.PathLike, step: int | None = None, *,
         devices: Sequence[Any] | None = None, param_dtype: str = "float32",
         tokenizer: str = "", chat: bool | None = None) -> LoadedModel:
  """A run's checkpoint (a workdir; `step`, default the latest) or an HF directory (config.json,
  safetensors, tokenizer files: a pretrained model or an `mtjax export`), on all devices.
  tokenizer: for an HF directory, a data.tokenizer name to use instead of its own tokenizer.json
  ("byte" for an export of a byte-tokenizer run, which carries none). chat: prompts go through
  the chat template (True: exit 2 without one), or not (False), or when the model has one / the
  run was trained with data.format=chat (None: what `mtjax generate` does unless --raw).
  `path` may also be a .gguf file or pkg:smollm2 (converted once: mtjax.model.gguf)."""
  from mtjax.model import gguf
  if gguf.is_gguf(str(path)):  # a GGUF file (or pkg:NAME): its converted HF directory
    path = gguf.hf_directory(str(path))
  p = epath.Path(path)
  if not p.exists():
    raise BadInputError(str(p), "not found: expected a run directory, an HF model directory or a "
                        ".gguf file")
  if _is_hf_directory(p):
    if step is not None:
      raise BadInputError("--step", f"{p} is an HF directory, not a run: it has no steps")
    loaded = _load_hf(p, devices, param_dtype, tokenizer)
    if chat or (chat is None and getattr(loaded.tokenizer, "chat_template", None)):
      from mtjax.data.tokenizer import ChatTokenizer
      loaded.tokenizer = ChatTokenizer(loaded.tokenizer)  # exit 2 when it has no chat template
    return loaded
  if tokenizer:
    raise BadInputError("--tokenizer", f"{p} is a run: it uses its own tokenizer")
  from mtjax.train import setup as setup_lib
  run = setup_lib.from_workdir(p, step, devices=devices, purpose="load")
  from mtjax.data.tokenizer import ChatTokenizer
  run_tokenizer = run.tokenizer
  if chat is False and isinstance(run_tokenizer, ChatTokenizer):  # raw text, as asked
    run_tokenizer = run_tokenizer.base
  elif chat and not isinstance(run_tokenizer, ChatTokenizer):
    raise BadInputError("chat", f"{p} was trained with data.format=plain: its prompts never went "
                        "through a chat template")
  return LoadedModel(graphdef=run.graphdef, params=run.state.params, spec=run.spec,
                     tokenizer=run_tokenizer, mesh=run.mesh, source=f"{p}@{run.restored_step}",
                     config=run.config)


def _load_hf(directory: epath.Path, devices: Sequence[Any] | None, param_dtype: str,
             tokenizer_name: str = "") -> LoadedModel:
  from flax import nnx

  from mtjax.config import MeshConfig
  from mtjax.data import tokenizer as tokenizer_lib
  from mtjax.model import Decoder, pretrained
  from mtjax.parallel.mesh import make_mesh
  from mtjax.resolve import auto_dtype
  from mtjax.train.state import param_shardings

  devices = list(devices) if devices is not None else jax.devices()
  spec = pretrained.spec_for(directory, dtype=auto_dtype(devices[0]), param_dtype=param_dtype)
  if not tokenizer_name and not (epath.Path(directory) / "tokenizer.json").exists():
    raise BadInputError(str(directory), "has no tokenizer.json: an export of a run that used "
                        "mtjax's byte tokenizer carries none (HF tokenizers only); pass "
                        "--tokenizer byte, or generate from the run itself (--workdir RUN)")
  tokenizer = tokenizer_lib.get(tokenizer_name or f"hf:{directory}")
  if tokenizer.vocab_size > spec.vocab_size:  # ids past the embedding would be clamped silently
    raise BadInputError(str(directory), f"the tokenizer has {tokenizer.vocab_size} tokens, more "
                        f"than the {spec.vocab_size} rows of the model's embedding (config.json "
                        "vocab_size)")
  mesh = make_mesh(MeshConfig(fsdp=-1), devices)
  _, abstract, shardings = param_shardings(mesh, spec)
  params = pretrained.load_params(directory, spec, abstract, shardings)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: Decoder(spec, nnx.Rngs(0))))
  return LoadedModel(graphdef=graphdef, params=params, spec=spec, tokenizer=tokenizer, mesh=mesh,
                     source=str(directory))
