"""`mtjax export`: a run's checkpoint as an HF directory (or a PEFT adapter directory).

The run is read through the one setup path (mtjax.train.setup.from_workdir, read-only, any
hardware); adapters are folded into the base weights by their own modules (mtjax.model.lora,
mtjax.model.svf) and the weights written by mtjax.model.pretrained.export.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import jax
from etils import epath

from mtjax.errors import BadInputError
from mtjax.model import lora, pretrained
from mtjax.train import setup as setup_lib


def export_run(workdir: str | epath.PathLike, out: str | epath.PathLike, step: int | None = None,
               *, max_shard_bytes: int = 5 * 10**9, devices: Sequence[Any] | None = None,
               task: str | None = None, adapters_only: bool = False) -> list[str]:
  """`mtjax export`: a run's checkpoint as an HF directory (config.json, safetensors shards of at
  most max_shard_bytes with an index, the tokenizer files) that transformers and vLLM load.
  Returns the files written.

  Adapters on a frozen base (LoRA, DoRA, SVF experts) are merged into the base weights, each by
  its own `merge` (per-task adapters: `task`'s, which must then be given); adapters_only writes a
  PEFT adapter directory instead (of `task`'s adapter when per task; LoRA and DoRA), which peft
  loads onto the run's base model. Soft prompts travel beside the weights (mtjax_soft_prompt.npy)."""
  out = epath.Path(out)
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise BadInputError(str(out), "exists and is not empty: export writes into a new directory")
  run = setup_lib.from_workdir(workdir, step, devices=devices, purpose="export")
  with _staged(out) as staging:
    return _export(run, staging, max_shard_bytes=max_shard_bytes, task=task,
                   adapters_only=adapters_only)


@contextlib.contextmanager
def _staged(out: epath.Path) -> Iterator[epath.Path]:
  """Where the export writes: locally a hidden sibling `.<name>.partial-<pid>`, renamed to `out`
  only once every file is written, so `out` is whole or absent (a SIGTERM, SIGINT, full disk or
  error removes the partial directory; SIGTERM then exits 3; one left by a SIGKILL is removed by
  the next export to the same place). Object stores have no rename: there `out` is written in
  place, and an interrupted export leaves it partial (export again to a new path)."""
  if "://" in str(out):
    yield out
    return
  for stale in out.parent.glob(f".{out.name}.partial-*"):  # a killed export's leftovers
    pid = stale.name.rsplit("-", 1)[-1]
    if pid.isdigit() and not _alive(int(pid)):
      shutil.rmtree(stale, ignore_errors=True)
  staging = out.parent / f".{out.name}.partial-{os.getpid()}"
  previous = None
  if threading.current_thread() is threading.main_thread():
    previous = signal.signal(signal.SIGTERM, _interrupt)
  try:
    if jax.process_index() == 0:
      staging.mkdir(parents=True, exist_ok=False)
    yield staging
    if jax.process_index() == 0:
      if out.exists():
        out.rmdir()  # the empty directory it was allowed to be
      staging.rename(out)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  finally:
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)


class ExportInterrupted(KeyboardInterrupt):
  """SIGTERM during an export: the partial directory was removed (the CLI exits 3)."""


def _interrupt(signum, frame) -> None:
  del signum, frame
  raise ExportInterrupted()


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _export(run: Any, out: epath.Path, *, max_shard_bytes: int, task: str | None,
            adapters_only: bool) -> list[str]:
  config = run.config
  spec, params = run.spec, run.state.params
  if adapters_only:
    lora.low_rank(spec)  # exit 2 without LoRA adapters
  if task is not None and spec.adapter_tasks == 1:
    raise BadInputError("--task", "the run has no per-task adapters (LoRA, SVF) to choose from")
  if spec.frozen_base:  # the task's adapter folded into the base weights
    index = lora.adapter_index(spec, config.data.tasks, task)
    if adapters_only:
      if jax.process_index() != 0:
        return []
      return lora.export_peft(params, spec, out, index=index, base_model=config.model.pretrained)
    params, spec = lora.merge(params, spec, index), spec.without_adapters()
  tokenizer = run.tokenizer
  base = None
  if config.model.pretrained:
    base = pretrained.read_config(config.model.pretrained)
  hf = pretrained.hf_config(spec, base=base, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
                            pad_id=tokenizer.pad_id, max_length=config.data.seq_len)
  tokenizer_dir = None
  kind, _, where = config.data.tokenizer.partition(":")
  if kind == "hf":
    where_path = epath.Path(where)
    tokenizer_dir = where_path if where_path.is_dir() else where_path.parent
  files = pretrained.export(params, spec, out, config=hf,
                            tokenizer_dir=tokenizer_dir, max_shard_bytes=max_shard_bytes)
  if jax.process_index() == 0 and not (out / "generation_config.json").exists():
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": tokenizer.bos_id, "eos_token_id": list(tokenizer.stop_ids),
         "pad_token_id": tokenizer.pad_id}, indent=2))
    files.append("generation_config.json")
  return files
