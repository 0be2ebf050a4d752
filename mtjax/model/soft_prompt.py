"""Soft prompts (Lester et al. 2021), the fast context of fast/slow training, as an adapter
plug-in (mtjax.model.adapters) at the token embedding.

`soft_prompt` [T, P, d_model]: P learned embeddings per task (model.soft_prompt.length), Trained,
beside the full model (the base is not frozen: the optimizer's fast/slow groups decide what moves
when). The data writes P slot tokens (a spare id past the tokenizer's vocabulary) at the end of
every prompt, right before the target; a slot's embedding is replaced by its task's row, so a
task's soft prompt reaches only its own examples. Fresh prompts copy the embeddings of random
vocabulary tokens (Lester et al.'s vocabulary init), so they start at the scale of the embeddings
they stand in for.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from mtjax.model.adapters import Adapter, Call, Site, Trained

PARAM = "soft_prompt"  # the table's params path (and, in an export, mtjax_soft_prompt.npy)


class SoftPromptParam(Trained):
  """The soft-prompt table [T, P, d_model]."""


def soft_prompt_embeddings(table: jax.Array, tokens: jax.Array, task_ids: jax.Array,
                           slot_token: int) -> tuple[jax.Array, jax.Array]:
  """(is_slot [B, L], each token's soft-prompt row [B, L, d]) for soft prompts `table` [T, P, d].
  A run of slot tokens ends right before its example's target, so a slot's row is P minus its
  distance to the run's end: the last slot always reads row P - 1, also when a prompt_left cut
  removed the first slots. Tokens of a task without a row (padding: < 0) read row 0 of task 0,
  and are never slots."""
  tasks, length, _ = table.shape
  is_slot = tokens == slot_token
  idx = jnp.broadcast_to(jnp.arange(tokens.shape[-1]), tokens.shape)
  run_end = jax.lax.cummin(jnp.where(is_slot, tokens.shape[-1], idx), axis=tokens.ndim - 1,
                           reverse=True)
  row = jnp.clip(length - (run_end - idx), 0, length - 1)
  task = jnp.clip(task_ids, 0, tasks - 1)
  is_slot = is_slot & (task_ids >= 0) & (task_ids < tasks)
  return is_slot, table[task, row]


@dataclasses.dataclass(frozen=True)
class SoftPrompt(Adapter):
  kind = "soft_prompt"
  group = "soft_prompt"
  freezes_base = False
  length: int = 0
  token: int = -1  # the slot token: the first id past the tokenizer's vocabulary

  @classmethod
  def from_config(cls, model_config: Any, num_tasks: int, tokenizer_vocab: int) -> Adapter | None:
    length = model_config.soft_prompt.length
    if not length:
      return None
    return cls(targets=("token_embed",), tasks=max(1, num_tasks), length=length,
               token=tokenizer_vocab)

  def describe(self) -> str:
    return f"soft prompts of {self.length} tokens"

  def names(self, site: Site) -> tuple[str, ...]:
    return (PARAM,)

  def init(self, site: Site, w: jax.Array, key: jax.Array) -> dict[str, tuple[type, Any, tuple]]:
    ids = jax.random.randint(key, (self.tasks, self.length), 0, self.token)
    return {PARAM: (SoftPromptParam, w[ids], ("lora_task", "soft_prompt", "embed"))}

  def apply(self, call: Call) -> jax.Array:
    if call.ctx.task_ids is None:
      raise ValueError("soft prompts need adapter_ids (each token's task id)")
    table = getattr(call.module, PARAM)[...]
    is_slot, soft = soft_prompt_embeddings(table, call.x, call.ctx.task_ids, self.token)
    return jnp.where(is_slot[..., None], soft.astype(call.y.dtype), call.y)
