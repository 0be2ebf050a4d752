"""Batch sources for the loop: `next(state) -> Batch` (global sharded arrays, token count, the
data/* metrics of the batch). The supervised source wraps the mixture loader; an on-policy source
(RL) would sample from the current state."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Protocol

import jax
import numpy as np

from mtjax.data.loader import HostBatch, MixtureLoader
from mtjax.train.state import TrainState


@dataclasses.dataclass
class Batch:
  arrays: dict[str, jax.Array]  # global, sharded over the mesh
  tokens: int  # non-padding tokens in the global batch
  info: dict[str, Any]  # data/* metric values of this batch


class BatchSource(Protocol):
  def next(self, state: TrainState) -> Batch: ...
  def set_rates(self, rates: Mapping[str, float]) -> int: ...
  @property
  def state(self) -> dict[str, Any]: ...
  def close(self) -> None: ...


class LoaderSource:
  """Supervised batches: the mixture loader's rows for this process -> global sharded arrays.
  The data does not depend on the model, so `next` ignores the state."""

  def __init__(self, loader: MixtureLoader, sharding: jax.sharding.NamedSharding):
    self.loader, self.sharding = loader, sharding

  def next(self, state: TrainState) -> Batch:
    del state
    host: HostBatch = next(self.loader)
    arrays = {k: jax.make_array_from_process_local_data(self.sharding, v)
              for k, v in host.arrays.items()}
    info: dict[str, Any] = {"data/packing_efficiency": host.packing_efficiency}
    for i, name in enumerate(self.loader.task_names):
      info[f"data/{name}/rate"] = float(host.rates[i])  # as used for this step
      info[f"data/{name}/truncated"] = host.state_after["truncated"][name]
      info[f"data/{name}/skipped"] = host.state_after["skipped"][name]
      info[f"data/{name}/too_long"] = host.state_after["too_long"][name]
    tokens = int(np.count_nonzero(host.arrays["segment_ids"])) * jax.process_count()
    return Batch(arrays, tokens, info)

  def set_rates(self, rates: Mapping[str, float]) -> int:
    return self.loader.set_rates(rates)

  @property
  def state(self) -> dict[str, Any]:
    return self.loader.state

  def close(self) -> None:
    self.loader.close()
