"""Everything a run needs, built once, in one place: train, eval, bench and the tests call `build`.

config (+ devices, + workdir) -> the resolved config, mesh, tokenizer, model spec, optimizer and
LR schedule, shardings, and the initial state: random init, or restored from the workdir's latest
checkpoint (`resume_from` picks an earlier one and, once every check passed, moves later ones
aside; `restore_step` restores one read-only, touching nothing, as eval does).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
from etils import epath
from flax import nnx

from mtjax.config import Config, MeshConfig
from mtjax.data.loader import MixtureLoader
from mtjax.data.tokenizer import Tokenizer
from mtjax.errors import BadInputError
from mtjax.model import Decoder, ModelSpec
from mtjax.model import adapters as adapters_lib
from mtjax.parallel import sharding as sharding_lib
from mtjax.parallel.mesh import Device, make_mesh
from mtjax.resolve import auto_dtype, resolve
from mtjax.train import checkpoint as checkpoint_lib
from mtjax.train import compile_cache
from mtjax.train import optimizer
from mtjax.train import state as state_lib
from mtjax.train import step as step_lib
from mtjax.train import weighting as weighting_lib


@dataclasses.dataclass
class Setup:
  config: Config  # resolved
  devices: list[Device]
  mesh: jax.sharding.Mesh
  tokenizer: Tokenizer
  spec: ModelSpec
  tx: Any  # optax.GradientTransformation
  schedule: Callable[[Any], Any]  # the LR schedule
  graphdef: Any
  state: state_lib.TrainState
  shardings: state_lib.TrainState
  run_facts: dict[str, Any]  # {"decay_steps"}: fixed at a run's first start
  checkpointer: checkpoint_lib.Checkpointer | None = None  # open; the caller closes it
  restored_step: int | None = None
  loader_state: dict[str, Any] | None = None  # of the restored checkpoint
  controls_state: dict[str, Any] | None = None
  changes: dict[str, tuple[Any, Any]] = dataclasses.field(default_factory=dict)  # safe changes
  workdir: epath.Path | None = None
  compilation_cache: str = "off"  # where JAX's persistent cache is for this run, or "off"

  @property
  def batch_sharding(self) -> jax.sharding.NamedSharding:
    return sharding_lib.named(self.mesh, sharding_lib.BATCH_AXES)

  def jit_step(self) -> Callable:
    """THE supervised train step of this run, jitted once with its shardings (state donated);
    an RL run's step comes from its recipe (mtjax.recipes.grpo)."""
    c = self.config
    fn = step_lib.make_step_fn(self.graphdef, self.tx, self.schedule, num_tasks=c.num_tasks,
                               grad_accum=c.optimizer.grad_accum, z_loss=c.model.z_loss,
                               loss_chunk=c.train.loss_chunk, lora=self.spec.frozen_base,
                               dropout_seed=c.seed if self.spec.dropout else None,
                               weighting=c.train.weighting, seed=c.seed)
    return step_lib.jit_step(fn, self.mesh, self.shardings)

  def loader(self, prefetch: int | None = None) -> MixtureLoader:
    """This process's mixture loader, continuing from the restored loader state if any."""
    return MixtureLoader.from_config(self.config, process_index=jax.process_index(),
                                     process_count=jax.process_count(), state=self.loader_state,
                                     prefetch=prefetch)


# Why JAX finds other devices than a launcher expects, by the expected platform.
PLATFORM_CAUSES = {
    "gpu": "a CPU-only jaxlib (install jax[cuda12]), the NVIDIA driver libraries not on "
           "LD_LIBRARY_PATH (GKE mounts them at /usr/local/nvidia/lib64), or JAX_PLATFORMS "
           "naming another platform",
    "tpu": "no libtpu (install jax[tpu]), the TPU held by another process (/dev/vfio/* on v5e "
           "and later, /dev/accel* before), or JAX_PLATFORMS naming another platform",
    "cpu": "JAX_PLATFORMS unset on a machine with an accelerator (set JAX_PLATFORMS=cpu)",
}


def check_platform(config: Config, devices: Sequence[Device]) -> None:
  """BadInputError when train.platform names another platform than the devices JAX found."""
  expected, found = config.train.platform, devices[0].platform
  if expected not in ("auto", found):
    raise BadInputError("train.platform", f"expected {expected} devices, but JAX found "
                        f"{len(devices)} {found} device(s) ({devices[0].device_kind}); usual "
                        f"causes: {PLATFORM_CAUSES[expected]}")


def check_divisibility(config: Config, mesh: jax.sharding.Mesh) -> None:
  shards = mesh.shape["dcn"] * mesh.shape["data"] * mesh.shape["fsdp"]
  if config.rl.algorithm != "none":
    rows = config.rl.prompts * config.rl.samples
    if rows % shards:
      raise BadInputError("rl.prompts", f"rl.prompts x rl.samples = {rows} rollout rows must be "
                          f"divisible by mesh dcn*data*fsdp = {shards}")
  per_micro = config.data.batch_size // config.optimizer.grad_accum
  if per_micro % shards:
    raise BadInputError("data.batch_size", f"{config.data.batch_size} rows / grad_accum "
                        f"{config.optimizer.grad_accum} must be divisible by mesh dcn*data*fsdp = {shards}")


def check_methods(config: Config) -> None:
  """What the run's pluggable methods need of the rest of the config (the weighting method:
  mtjax.train.weighting.Method.check), before anything is built."""
  weighting_lib.get(config.train.weighting).check(config.optimizer.grad_accum)


def _say(message: str) -> None:
  if jax.process_index() == 0:
    print(message, file=sys.stderr, flush=True)


def build(config: Config, *, devices: Sequence[Device] | None = None,
          workdir: epath.Path | None = None, resume_from: int | None = None,
          restore_step: int | None = None, any_mesh: bool = False,
          decay_steps: int | None = None) -> Setup:
  """The one setup path.

  workdir: restore its latest checkpoint, if any (train's resume; the checkpointer stays open).
  resume_from: restore this step instead; later checkpoints are moved aside (never deleted) after
    every check passed and the state was restored, so a refused resume leaves them all in place.
  restore_step: restore exactly this step, no compatibility check, read-only: nothing in the
    workdir is created or changed (eval of a finished run; the checkpointer is read-only).
  any_mesh: if the config's mesh does not fit `devices`, put every device on fsdp (eval on other
    hardware than the run's). decay_steps: the LR schedule's length without a workdir (bench).
  """
  config = resolve(config)
  devices = list(devices) if devices is not None else jax.devices()
  check_platform(config, devices)
  try:
    mesh = make_mesh(config.mesh, devices)
  except BadInputError:
    if not any_mesh:
      raise
    mesh = make_mesh(MeshConfig(dcn=-1, data=1, fsdp=-1, tensor=1), devices)
  if not any_mesh:
    check_divisibility(config, mesh)
  check_methods(config)
  cache = compile_cache.configure(config.train.compilation_cache,
                                  config.train.compilation_cache_dir, devices)
  from mtjax.data import tokenizer as tokenizer_lib
  tokenizer = tokenizer_lib.for_config(config)
  spec = ModelSpec.from_config(config.model, tokenizer.vocab_size, auto_dtype(devices[0]),
                               num_tasks=config.num_tasks)

  checkpointer, restore_at, changes = None, None, {}
  # The schedule counts optimizer updates: an RL step takes rl.epochs of them.
  updates_per_step = config.rl.epochs if config.rl.algorithm != "none" else 1
  run_facts = {"decay_steps": decay_steps or config.optimizer.decay_steps
               or config.train.steps * updates_per_step,
               "tokenizer_sha256": tokenizer_lib.fingerprint(config.data.tokenizer)}
  if workdir is not None:
    # Every check of a resume (the target exists, the config may resume it, its format is
    # readable, its arrays restore) comes before resume_from moves later checkpoints aside.
    if resume_from is not None:
      _resume_target_exists(workdir, resume_from)
    checkpointer = checkpoint_lib.Checkpointer(
        workdir, config.checkpoint, read_only=restore_step is not None or resume_from is not None)
    restore_at = (resume_from if resume_from is not None else
                  checkpointer.latest_step() if restore_step is None else restore_step)
    if restore_at is not None:
      if restore_step is None:
        changes = checkpointer.check_compatible(restore_at, config)
      checkpointer.format_version(restore_at)  # a newer format is refused here, by name
      saved = checkpointer.read_facts(restore_at)[1]  # the LR schedule is fixed at the first start
      if restore_step is None:
        _check_same_tokenizer(saved, run_facts, config, restore_at)
      run_facts = {"decay_steps": saved["decay_steps"],
                   "tokenizer_sha256": saved.get("tokenizer_sha256", run_facts["tokenizer_sha256"])}

  opt_cfg = config.optimizer
  if config.model.svf.enabled:  # only the experts' p train, at their own LR
    opt_cfg = dataclasses.replace(opt_cfg, lr=config.model.svf.lr)
  trained, fast = adapter_groups(spec)
  tx, schedule = optimizer.make_optimizer(opt_cfg, run_facts["decay_steps"], trained=trained,
                                          fast=fast)
  load_params = None
  if config.model.pretrained and restore_at is None:  # a checkpoint, once there, wins
    from mtjax.model import pretrained
    load_params = pretrained.loader_for(config.model.pretrained, spec)
  graphdef, state, shardings = state_lib.init_state(mesh, spec, tx, config.seed, load_params,
                                                   weighting=config.train.weighting,
                                                   num_tasks=config.num_tasks,
                                                   reference=config.rl.algorithm != "none" or config.eval.drift)
  if spec.frozen_base:
    _say(state_summary(state.params, state.opt_state, spec, trained))
  setup = Setup(config=config, devices=devices, mesh=mesh, tokenizer=tokenizer, spec=spec, tx=tx,
                schedule=schedule, graphdef=graphdef, state=state, shardings=shardings,
                run_facts=run_facts, checkpointer=checkpointer, changes=changes, workdir=workdir,
                compilation_cache=cache)
  if checkpointer is not None and restore_at is not None:
    setup.state, setup.loader_state = checkpointer.restore(restore_at, state)
    setup.controls_state = checkpointer.restore_controls(restore_at)
    setup.restored_step = restore_at
  if workdir is not None and resume_from is not None:  # all checked: now move later ones aside
    assert checkpointer is not None
    checkpointer.close()
    if jax.process_index() == 0:
      moved = checkpoint_lib.set_aside_later_checkpoints(workdir, resume_from)
      if moved:
        _say(f"resume_from {resume_from}: moved checkpoints {moved} to "
             f"{workdir / 'abandoned_checkpoints'}")
    if jax.process_count() > 1:  # the others list the checkpoints only once they are moved
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("mtjax.setup.resume_from")
    setup.checkpointer = checkpoint_lib.Checkpointer(workdir, config.checkpoint)
  return setup


def _bytes(tree: Any) -> int:
  return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree)
             if hasattr(leaf, "dtype"))


def adapter_groups(spec: ModelSpec) -> tuple[frozenset[str] | None, frozenset[str]]:
  """(the paths that train on a frozen base, None when every parameter trains; the fast weights:
  adapter variables that train beside the base), from the typed variables of spec's model."""
  model = nnx.eval_shape(lambda: Decoder(spec, nnx.Rngs(0)))
  trained = adapters_lib.paths_of(model, adapters_lib.Trained)
  beside = {p for p, a in adapters_lib.variables_of(model).items() if not a.freezes_base}
  return (trained if spec.frozen_base else None), frozenset(trained & beside)


def state_summary(params: Any, opt_state: Any, spec: ModelSpec,
                  trained: frozenset[str] | None) -> str:
  """One line at start: parameter counts (the trainable ones on a frozen base) and
  optimizer-state bytes."""
  from mtjax.tree import param_path
  flat = [(param_path(p), x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]]
  total = sum(x.size for _, x in flat)
  line = f"parameters: {total:,}"
  if trained is not None:
    count = sum(x.size for p, x in flat if p in trained)
    kind = "; ".join(a.describe() for a in spec.adapters if a.freezes_base)
    line += (f" ({count:,} trainable: {kind} x {spec.adapter_tasks} adapter(s); the base is "
             "frozen)")
  return line + f"; optimizer state: {_bytes(opt_state):,} bytes"


def _resume_target_exists(workdir: epath.Path, step: int) -> None:
  directory = workdir / "checkpoints"
  steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) \
      if directory.exists() else []
  if step not in steps:
    raise BadInputError("--resume_from", f"no checkpoint at step {step} in {directory} "
                        f"(available: {steps or 'none'})")


def _check_same_tokenizer(saved: dict[str, Any], now: dict[str, Any], config: Config,
                          step: int) -> None:
  """A resume whose tokenizer file changed CONTENT (same path) is refused: the checkpoint's
  embedding rows and the loader's stored positions mean the old ids. Checkpoints written before
  the fingerprint was recorded are not checked."""
  was = saved.get("tokenizer_sha256")
  if was is not None and was != now["tokenizer_sha256"]:
    raise BadInputError("data.tokenizer", f"{config.data.tokenizer}: its content changed since "
                        f"the checkpoint at step {step} (sha256 {was[:12]}... then, "
                        f"{now['tokenizer_sha256'][:12]}... now); the stored token ids would mean "
                        "other text: restore the file, or train in a new --workdir")


def workdir_config(workdir: str | epath.PathLike) -> Config:
  """The resolved config a run recorded in its workdir (exit 2 if it is not a run directory)."""
  import json

  from mtjax import config as config_lib
  from mtjax.train import rundir
  path = rundir.resolve(workdir)
  if not (path / "config.json").exists():
    raise BadInputError(str(path), "not a run directory (no config.json)")
  try:
    recorded = json.loads((path / "config.json").read_text())
  except ValueError as e:
    raise BadInputError(str(path / "config.json"), f"is not valid JSON ({e})") from None
  if not isinstance(recorded, dict):
    raise BadInputError(str(path / "config.json"), "expected a JSON object (a run's config)")
  config = config_lib.from_dict(recorded)
  from mtjax.tasks import specs  # tasks a config file defined: rebuilt from tasks.json
  specs.rebuild(path, config.data.tasks + config.eval.tasks, config.data.jsonl_tasks)
  specs.register_jsonl_tasks(config.data.jsonl_tasks)  # so `--tasks` can name them too
  return config


def from_workdir(workdir: str | epath.PathLike, step: int | None = None, *,
                 devices: Sequence[Device] | None = None, purpose: str = "read") -> Setup:
  """A finished (or running) run's checkpoint, read-only: eval, export, generate and mtjax.load.

  step: the checkpoint (default: the latest). Any hardware: if the run's mesh does not fit
  `devices`, every device goes on fsdp. Nothing in the workdir is created or changed; the
  checkpointer is closed.
  """
  from mtjax.train import rundir
  path = rundir.resolve(workdir)
  config = workdir_config(path)
  available = []
  if (path / "checkpoints").exists():
    checkpointer = checkpoint_lib.Checkpointer(path, config.checkpoint, read_only=True)
    try:
      available = checkpointer.all_steps()
    finally:
      checkpointer.close()
  if not available:
    raise BadInputError(str(path / "checkpoints"), f"no checkpoint to {purpose}")
  step = available[-1] if step is None else step
  if step not in available:
    raise BadInputError("--step", f"no checkpoint at step {step} (available: {available})")
  run = build(config, devices=devices, workdir=path, restore_step=step, any_mesh=True)
  assert run.checkpointer is not None
  run.checkpointer.close()
  run.checkpointer = None
  return run
