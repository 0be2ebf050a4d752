"""Config loading, overrides, variants, and every bad-config case: exit 2, one line naming the field."""

import json
import subprocess
import sys

import pytest

from conftest import DEMO, REPO
from mtjax import cli
from mtjax import config as config_lib
from mtjax.errors import BadInputError


def test_load_variant_and_overrides():
  cfg = config_lib.load(f"{DEMO}:tiny", ["--config.model.d_model=48", "--config.optimizer.lr=0.01",
                                         "--config.data.tasks=reverse,grammar",
                                         "--config.data.mixture={'reverse': 2.0, 'grammar': 1.0}",
                                         "--config.train.loss_weights={'reverse': 1.0}",
                                         "--config.train.entropy_coefs={}",
                                         "--config.model.dtype=bfloat16"])
  assert cfg.model.d_model == 48 and cfg.model.num_layers == 2  # tiny variant + override
  assert cfg.optimizer.lr == 0.01 and cfg.model.dtype == "bfloat16"
  assert cfg.data.tasks == ("reverse", "grammar") and cfg.data.mixture["reverse"] == 2.0
  with pytest.raises(TypeError):
    cfg.data.mixture["reverse"] = 3.0  # frozen
  assert json.loads(cfg.to_json())["model"]["d_model"] == 48


def test_comma_lists_of_numbers_are_numbers():
  cfg = config_lib.load(f"{DEMO}:tiny", ["--config.study.seeds=0,", "--config.eval.steps=1,2,4"])
  assert cfg.study.seeds == (0,) and cfg.eval.steps == (1, 2, 4)
  cfg = config_lib.load(f"{DEMO}:tiny", ["--config.study.seeds=3,4,5"])
  assert cfg.study.seeds == (3, 4, 5)


def _run_cli(capsys, *args):
  code = cli.main(["train", "--config", f"{DEMO}:tiny", "--workdir", "/nonexistent/never-written",
                   "--config.train.progress=false", *args])
  err = capsys.readouterr().err.strip()
  return code, err


BAD = [
    # (overrides, field named in the message)
    (["--config.model.d_modle=64"], "model.d_modle"),
    (["--config.model.d_model=wide"], "model.d_model"),
    (["--config.model.d_model=1.5"], "model.d_model"),
    (["--config.data.mixture.reverse=-1.0"], "data.mixture.reverse"),
    (["--config.data.mixture={'reverse': 0.0, 'addition': 0.0, 'grammar': 0.0}"], "data.mixture"),
    (["--config.mesh.data=3"], "mesh"),
    (["--config.data.batch_size=6", "--config.mesh.fsdp=4", "--config.mesh.data=2"], "data.batch_size"),
    (["--config.data.tasks=reverse,add/sub"], "data.tasks"),
    (["--config.data.tasks=reverse,nosuchtask"], "data.tasks"),
    (["--config.model.num_kv_heads=3"], "model.num_kv_heads"),
    (["--config.optimizer.grad_accum=0"], "optimizer.grad_accum"),
    (["--config.data.schedule=stages", "--config.data.stages=((5, {'reverse': 1.0}),)"], "data.stages"),
    (["--config.data.schedule=stages",
      "--config.data.stages=((0, {'reverse': 1.0}), (9, {'grammar': -1.0}))"], "data.stages[1].grammar"),
    (["--config.data.schedule=linear"], "data.stages"),
    (["--config.data.rates=proportional"], "data.rates"),
]


# The batch's divisibility over fsdp=4 x data=2 needs 8 devices (the multidevice tier).
@pytest.mark.parametrize("overrides,field", [
    pytest.param(*b, id=b[1] + str(i),
                 marks=[pytest.mark.multidevice] if b[1] == "data.batch_size" else [])
    for i, b in enumerate(BAD)])
def test_bad_config_exits_2_naming_field(capsys, overrides, field):
  code, err = _run_cli(capsys, *overrides)
  assert code == 2
  assert err.startswith(f"error: {field}"), err
  assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_unknown_key_in_config_file(tmp_path, capsys):
  bad = tmp_path / "bad.py"
  demo = (REPO / "configs" / "demo.py").read_text()
  assert "  c.train.steps = 400\n" in demo
  bad.write_text(demo.replace("  c.train.steps = 400\n", "  c.train_steps = 5\n"))
  code = cli.main(["train", "--config", str(bad), "--workdir", str(tmp_path / "w")])
  err = capsys.readouterr().err.strip()
  assert code == 2 and err.startswith("error: train_steps: unknown key"), err
  assert not (tmp_path / "w").exists()  # nothing written for a bad config


def test_missing_file_and_unknown_variant(capsys):
  assert cli.main(["train", "--config", "nope.py", "--workdir", "/tmp/x"]) == 2
  assert "config file not found" in capsys.readouterr().err
  assert cli.main(["train", "--config", f"{DEMO}:huge", "--workdir", "/tmp/x"]) == 2
  assert "unknown variant" in capsys.readouterr().err


def test_entropy_coef_schedule_values():
  from mtjax.train.controls import entropy_coef_at
  assert entropy_coef_at(0.3, 50, 100) == 0.3
  assert entropy_coef_at((0.0, 1.0), 25, 100) == pytest.approx(0.25)
  assert entropy_coef_at((1.0, 0.0), 200, 100) == 0.0
  with pytest.raises(BadInputError, match="train.entropy_coefs.grammar"):
    config_lib.load(DEMO, ["--config.train.entropy_coefs.grammar=(1.0, 2.0, 3.0)"])


def test_real_process_exit_code_and_one_line(tmp_path):
  """The installed entry point, as a user runs it: exit 2, one stderr line, no traceback."""
  proc = subprocess.run([sys.executable, "-m", "mtjax", "train", "--config", DEMO, "--workdir",
                         str(tmp_path), "--config.mesh.tensor=3"], capture_output=True, text=True,
                        cwd=REPO, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
  assert proc.stderr.startswith("error: mesh"), proc.stderr


def test_mixture_name_expands_to_tasks_and_rates():
  from mtjax.resolve import resolve
  cfg = config_lib.load(DEMO, ["--config.data.mixture_name=fc_granite", "--config.data.tasks=",
                               "--config.data.mixture={}"])
  assert cfg.data.tasks == ()  # the leaf config knows no registry: resolve expands the name
  cfg = resolve(cfg)
  assert len(cfg.data.tasks) == 8 and "fc_umbrella" in cfg.data.tasks
  assert cfg.data.mixture["fc_nested"] == 1.0
  assert resolve(cfg) == cfg  # idempotent
  with pytest.raises(BadInputError, match="data.mixture_name: unknown mixture 'nope'"):
    resolve(config_lib.load(DEMO, ["--config.data.mixture_name=nope"]))


def test_config_file_sets_only_what_differs(tmp_path):
  """A partial get_config() is written over the defaults; an empty mixture means every task."""
  from mtjax.resolve import resolve
  part = tmp_path / "part.py"
  part.write_text("import ml_collections\n\n\ndef get_config():\n"
                  "  c = ml_collections.ConfigDict()\n"
                  "  c.data = ml_collections.ConfigDict({'tasks': ('reverse', 'grammar')})\n"
                  "  c.optimizer = ml_collections.ConfigDict({'lr': 1e-3})\n  return c\n")
  cfg = config_lib.load(str(part), ["--config.model.d_model=64"])
  defaults = config_lib.Config()
  assert cfg.optimizer.lr == 1e-3 and cfg.model.d_model == 64
  assert cfg.optimizer.warmup_steps == defaults.optimizer.warmup_steps
  assert cfg.model.num_layers == defaults.model.num_layers and cfg.data.mixture == {}
  assert dict(resolve(cfg).data.mixture) == {"reverse": 1.0, "grammar": 1.0}


def test_importing_config_loads_no_task_registry_or_tfds():
  code = ("import sys, mtjax.config as c; c.load(sys.argv[1]); "
          "bad = [m for m in sys.modules if m.startswith(('tensorflow_datasets', 'mtjax.tasks', "
          "'mtjax.data', 'jax'))]; print(bad); sys.exit(1 if bad else 0)")
  proc = subprocess.run([sys.executable, "-c", code, f"{DEMO}:tiny"], capture_output=True,
                        text=True, cwd=REPO, timeout=120)
  assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("override,field", [
    ("--config.optimizer.lr=float('nan')", "optimizer.lr"),
    ("--config.optimizer.lr=1e999", "optimizer.lr"),
    ("--config.optimizer.schedule=linear", "optimizer.schedule"),
    ("--config.optimizer.ema=1.0", "optimizer.ema"),
    ("--config.optimizer.decay_fraction=0.0", "optimizer.decay_fraction"),
    ("--config.optimizer.param_groups.embed=-1.0", "optimizer.param_groups.embed"),
    ("--config.data.feedback_lag=2", "data.feedback_lag"),
])
def test_bad_values_named_at_load(override, field):
  with pytest.raises(BadInputError) as e:
    config_lib.load(f"{DEMO}:tiny", [override])
  assert e.value.field == field, str(e.value)
